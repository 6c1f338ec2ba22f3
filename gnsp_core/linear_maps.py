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


def _attention_output_before_projection(mha: nn.MultiheadAttention, x: torch.Tensor, attn_mask) -> torch.Tensor:
    """Recompute the concatenated head outputs that `out_proj` receives (MHA never calls the module)."""
    if not mha.batch_first:
        x = x.transpose(0, 1)
    batch, length, dim = x.shape
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = (t.view(batch, length, mha.num_heads, dim // mha.num_heads).transpose(1, 2) for t in qkv.chunk(3, -1))
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return out.transpose(1, 2).reshape(batch, length, dim)


def _attention_taps(name: str, mha: nn.MultiheadAttention) -> list[_Tap]:
    in_map = LinearMap(f"{name}.in_proj", mha.in_proj_weight, "right")
    out_map = LinearMap(f"{name}.out_proj", mha.out_proj.weight, "right")

    def install_in(sink: InputSink) -> list:
        return [mha.register_forward_pre_hook(lambda _m, args, kwargs: sink(in_map.name, args[0]), with_kwargs=True)]

    def install_out(sink: InputSink) -> list:
        def hook(_m, args, kwargs):
            sink(out_map.name, _attention_output_before_projection(mha, args[0], kwargs.get("attn_mask")))

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

    @classmethod
    def from_taps(cls, taps: list[_Tap]) -> "LinearMapSet":
        maps = cls.__new__(cls)
        maps.taps, maps.maps = list(taps), [t.map for t in taps]
        return maps

    def __iter__(self):
        return iter(self.maps)

    def __len__(self) -> int:
        return len(self.maps)

    def names(self) -> list[str]:
        return [m.name for m in self.maps]

    def parameters(self) -> list[nn.Parameter]:
        return [m.weight for m in self.maps]

    def tap_inputs(self, sink: InputSink) -> "_TapContext":
        """Context manager: while open, every forward sends each map's input (as [N, in]) to `sink`."""
        return _TapContext(self.taps, sink)


class _TapContext:
    def __init__(self, taps: list[_Tap], sink: InputSink) -> None:
        self.taps, self.sink, self.handles = taps, sink, []

    def __enter__(self) -> "_TapContext":
        flat = lambda name, x: self.sink(name, x.detach().reshape(-1, x.shape[-1]))  # noqa: E731
        for tap in self.taps:
            self.handles.extend(tap.install(flat))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
