"""Which token positions of a text batch can reach the text tower's pooled output.

A text map sees every position of the padded context (77 for CLIP), but CLIP's causal text
tower pools at the end-of-text token: a position after it can influence only later positions,
never the pooled embedding, so its input is no input the model's output depends on. GNSP's
statistics keep only the positions that can reach the pooled output:

- open_clip's own text tower (`CLIP`, or `TextTransformer` inside `CustomTextCLIP`): with its
  causal mask, the positions up to the pooled one (`argmax` = end-of-text for CLIP's tokenizer,
  `eos`, `first`); without a causal mask, or pooling `last` / `none`, every position;
- a Hugging Face text tower (`HFTextEncoder`): the non-padding positions (padding is masked out
  of attention and pooling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

Reach = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class TextTower:
    """A text tower's sequence maps (names under `prefix`) and how to tell their useful positions."""

    prefix: str
    """Module-name prefix of the maps that see one row per token (not the pooled projection)."""
    ids_module: nn.Module
    """Whose forward receives the token ids [B, L] as its first argument."""
    reach: Reach
    """Token ids [B, L] -> bool [B, L]: positions whose input can reach the pooled output."""
    batch_first: bool = True

    def keep_rows(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The rows of a map input `x` ([B, L, d], or [L, B, d] if not batch-first) that reach the
        pooled output, as [N, d]. An input of any other shape (a layout this module does not know)
        is kept whole."""
        keep = self.reach(ids).to(x.device)
        if not self.batch_first:
            keep = keep.T
        if x.ndim != 3 or x.shape[:2] != keep.shape:
            return x.reshape(-1, x.shape[-1])
        return x[keep]


def _causal_reach(pool_type: str, causal: bool, eos_id: int | None) -> Reach:
    def reach(ids: torch.Tensor) -> torch.Tensor:
        if not causal or pool_type not in ("argmax", "eos", "first"):
            return torch.ones_like(ids, dtype=torch.bool)
        if pool_type == "argmax":
            last = ids.argmax(dim=-1)
        elif pool_type == "eos":
            last = (ids == eos_id).int().argmax(dim=-1)
        else:
            last = torch.zeros(len(ids), dtype=torch.long, device=ids.device)
        positions = torch.arange(ids.shape[1], device=ids.device)
        return positions[None, :] <= last[:, None]

    return reach


def _open_clip_tower(prefix: str, owner: nn.Module, pool_type: str, eos_id: int | None) -> TextTower:
    transformer = owner.transformer
    causal = getattr(owner, "attn_mask", None) is not None
    return TextTower(f"{prefix}transformer.", owner.token_embedding, _causal_reach(pool_type, causal, eos_id),
                     bool(getattr(transformer, "batch_first", True)))


def text_towers(model: nn.Module) -> list[TextTower]:
    """The text towers of an open_clip model whose sequence maps this module can mask (else none)."""
    if isinstance(getattr(model, "token_embedding", None), nn.Module) and hasattr(model, "transformer"):
        return [_open_clip_tower("", model, getattr(model, "text_pool_type", "argmax"),
                                 getattr(model, "text_eos_id", None))]
    text = getattr(model, "text", None)
    if not isinstance(text, nn.Module):
        return []
    if isinstance(getattr(text, "token_embedding", None), nn.Module) and getattr(text, "cls_emb", None) is None:
        return [_open_clip_tower("text.", text, getattr(text, "pool_type", "argmax"), getattr(text, "eos_id", None))]
    config = getattr(getattr(text, "transformer", None), "config", None)
    pad_id = getattr(config, "pad_token_id", None)
    if pad_id is not None:  # open_clip's HFTextEncoder: attention and pooling skip padding
        return [TextTower("text.transformer.", text, lambda ids: ids != pad_id)]
    return []
