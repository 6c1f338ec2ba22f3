"""Find the linear maps of a CLIP model and tap their inputs.

GNSP protects a linear map y = W x by keeping ΔW x = 0 for old inputs x, so it needs, for every
protected map, its weight, which side the input multiplies from, and a way to see its input.
open_clip hides some inputs (the final projections are bare `x @ proj` parameters and
`nn.MultiheadAttention` never calls its `out_proj` module), so each kind gets its own tap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from gnsp_core.text_positions import TextTower, text_towers

Side = Literal["right", "left"]
InputSink = Callable[[str, torch.Tensor], None]

SCOPES: dict[str, str] = {
    # The published recipe: every vision MLP linear and the final vision projection.
    "vision_mlp": r"^visual\.(.*\.mlp\.(c_fc|c_proj|fc1|fc2)|proj|head\.proj(\..*)?|head\.mlp\.(fc1|fc2))$",
    # Every linear map of both towers: attention in/out, MLPs, both final projections.
    "all": r".*",
}


@dataclass
class LinearMap:
    """A protected weight. `side="right"`: y = W x (W is [out, in]); `"left"`: y = x W (W is [in, out])."""

    name: str
    weight: nn.Parameter
    side: Side

    @property
    def in_features(self) -> int:
        return self.weight.shape[1] if self.side == "right" else self.weight.shape[0]


@dataclass
class _Tap:
    map: LinearMap
    install: Callable[[InputSink], list[torch.utils.hooks.RemovableHandle]]


def input_tap(name: str, weight: nn.Parameter, side: Side, module: nn.Module) -> _Tap:
    """A map whose input is the first positional input of `module` (for custom models and tests)."""

    def install(sink: InputSink) -> list:
        return [module.register_forward_pre_hook(lambda _m, args: sink(name, args[0]))]

    return _Tap(LinearMap(name, weight, side), install)


def _linear_tap(name: str, module: nn.Linear) -> _Tap:
    return input_tap(name, module.weight, "right", module)


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`nn.MultiheadAttention`'s mask as an additive float mask: a boolean True there means "may not
    attend" (the opposite of `scaled_dot_product_attention`'s booleans); a float mask is added."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _attention_output_before_projection(
    mha: nn.MultiheadAttention, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Recompute the concatenated head outputs that `out_proj` receives (MHA never calls the module).

    Masks follow `nn.MultiheadAttention`: `attn_mask` [L, S] or [B·heads, L, S], `key_padding_mask`
    [B, S]; each boolean (True = may not attend) or float (added to the attention logits).
    """
    if not mha.batch_first:
        x = x.transpose(0, 1)
    batch, length, dim = x.shape
    heads = mha.num_heads
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = (t.view(batch, length, heads, dim // heads).transpose(1, 2) for t in qkv.chunk(3, -1))
    mask = _additive_mask(attn_mask, q.dtype)
    if mask is not None and mask.ndim == 3:
        mask = mask.view(batch, heads, length, length)
    padding = _additive_mask(key_padding_mask, q.dtype)
    if padding is not None:
        padding = padding.view(batch, 1, 1, length)
        mask = padding if mask is None else mask + padding
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = out.transpose(1, 2).reshape(batch, length, dim)
    return out if mha.batch_first else out.transpose(0, 1)


def _attention_taps(name: str, mha: nn.MultiheadAttention) -> list[_Tap]:
    in_map = LinearMap(f"{name}.in_proj", mha.in_proj_weight, "right")
    out_map = LinearMap(f"{name}.out_proj", mha.out_proj.weight, "right")

    def install_in(sink: InputSink) -> list:
        return [mha.register_forward_pre_hook(lambda _m, args, kwargs: sink(in_map.name, args[0]), with_kwargs=True)]

    def install_out(sink: InputSink) -> list:
        def hook(_m, args, kwargs):
            # forward(query, key, value, key_padding_mask, need_weights, attn_mask, ...)
            padding = kwargs.get("key_padding_mask", args[3] if len(args) > 3 else None)
            mask = kwargs.get("attn_mask", args[5] if len(args) > 5 else None)
            sink(out_map.name, _attention_output_before_projection(mha, args[0], mask, padding))

        return [mha.register_forward_pre_hook(hook, with_kwargs=True)]

    return [_Tap(in_map, install_in), _Tap(out_map, install_out)]


def _vision_projection_tap(visual: nn.Module) -> _Tap:
    """`visual.proj` multiplies the pooled `ln_post` output; pool it the way the tower does."""
    proj_map = LinearMap("visual.proj", visual.proj, "left")

    def install(sink: InputSink) -> list:
        def hook(_m, _args, out):
            pooled = visual._global_pool(out)[0] if out.ndim == 3 else out
            sink(proj_map.name, pooled)

        return [visual.ln_post.register_forward_hook(hook)]

    return _Tap(proj_map, install)


def _text_projection_tap(model: nn.Module) -> _Tap:
    """`text_projection` multiplies the `ln_final` output pooled at the end-of-text token."""
    from open_clip.transformer import text_global_pool

    proj_map = LinearMap("text_projection", model.text_projection, "left")
    tokens: dict[str, torch.Tensor] = {}

    def install(sink: InputSink) -> list:
        def keep_tokens(_m, args):
            tokens["ids"] = args[0]

        def hook(_m, _args, out):
            eos = getattr(model, "text_eos_id", None)
            sink(proj_map.name, text_global_pool(out, tokens["ids"], model.text_pool_type, eos_token_id=eos))

        return [model.token_embedding.register_forward_pre_hook(keep_tokens), model.ln_final.register_forward_hook(hook)]

    return _Tap(proj_map, install)


def _all_taps(model: nn.Module) -> list[_Tap]:
    taps: list[_Tap] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            taps.extend(_attention_taps(name, module))
        elif isinstance(module, nn.Linear) and not name.endswith("attn.out_proj"):
            taps.append(_linear_tap(name, module))
    visual = getattr(model, "visual", None)
    if isinstance(getattr(visual, "proj", None), nn.Parameter) and hasattr(visual, "ln_post"):
        taps.append(_vision_projection_tap(visual))
    if isinstance(getattr(model, "text_projection", None), nn.Parameter) and hasattr(model, "ln_final"):
        taps.append(_text_projection_tap(model))
    return taps


class LinearMapSet:
    """The protected linear maps of one model for a scope, in a fixed order (for all-reduce)."""

    def __init__(self, model: nn.Module, scope: str = "vision_mlp") -> None:
        pattern = re.compile(SCOPES.get(scope, scope))
        self.taps = [t for t in _all_taps(model) if pattern.match(t.map.name)]
        if not self.taps:
            raise ValueError(f"scope {scope!r} selects no linear map of this model")
        self.maps = [t.map for t in self.taps]
        self.towers = text_towers(model)

    @classmethod
    def from_taps(cls, taps: list[_Tap], towers: list[TextTower] | None = None) -> "LinearMapSet":
        maps = cls.__new__(cls)
        maps.taps, maps.maps, maps.towers = list(taps), [t.map for t in taps], list(towers or [])
        return maps

    def __iter__(self):
        return iter(self.maps)

    def __len__(self) -> int:
        return len(self.maps)

    def names(self) -> list[str]:
        return [m.name for m in self.maps]

    def parameters(self) -> list[nn.Parameter]:
        return [m.weight for m in self.maps]

    def is_text(self, name: str) -> bool:
        """Whether map `name` belongs to the text tower (everything outside `visual`)."""
        return not name.startswith("visual.")

    def tap_inputs(self, sink: InputSink) -> "_TapContext":
        """Context manager: while open, every forward sends each map's input (as [N, in]) to `sink`.

        A text map's input keeps only the token positions that can reach the pooled text
        embedding (`text_positions`): up to the end-of-text token in CLIP's causal tower.
        """
        return _TapContext(self.taps, self.towers, sink)


class _TapContext:
    def __init__(self, taps: list[_Tap], towers: list[TextTower], sink: InputSink) -> None:
        self.taps, self.towers, self.sink, self.handles = taps, towers, sink, []
        self.ids: dict[int, torch.Tensor] = {}

    def _rows(self, name: str, x: torch.Tensor) -> torch.Tensor:
        for i, tower in enumerate(self.towers):
            if name.startswith(tower.prefix) and i in self.ids:
                return tower.keep_rows(self.ids[i], x)
        return x.reshape(-1, x.shape[-1])

    def __enter__(self) -> "_TapContext":
        for i, tower in enumerate(self.towers):
            def keep_ids(_m, args, i=i):
                self.ids[i] = args[0]

            self.handles.append(tower.ids_module.register_forward_pre_hook(keep_ids))
        flat = lambda name, x: self.sink(name, self._rows(name, x.detach()))  # noqa: E731
        for tap in self.taps:
            self.handles.extend(tap.install(flat))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.ids.clear()
