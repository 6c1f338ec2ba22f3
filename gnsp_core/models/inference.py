"""An image tower made cheaper to run for serving: batch norms folded into their convolutions,
channels-last memory.

A model that only answers requests never updates its batch-norm statistics, so each batch norm
that directly follows a convolution is an affine map that can live in the convolution's weights
and bias: one pass over the activations less per layer. Channels-last memory is the layout CPU
(oneDNN) and GPU convolution kernels are fastest on. On gnsp-mini's EfficientNet-Lite0 the two
together cut the image tower's time on a 2-core CPU by about 1.3x for one image and 1.7x for a
batch of eight (benchmarks/serve_load.py reports the whole classify call both ways). The text tower is left as it is (it runs once per label set).
A server can further run the prepared tower as one traced graph (`traced_tower`), whose ops do
not go back to Python in between, so other Python threads of the process slow it far less.

Which batch norm follows which convolution is read from the module tree (adjacent children of one
parent, as timm and torchvision register them), which is a convention, not a guarantee: the
prepared copy is therefore checked against the original on a probe batch, and kept only if they
agree. Training uses the same copies for the parts of a model that do not train during a task
(feature_cache.py, pretrained_cache.py): frozen and in eval mode, they compute a fixed function.
"""

from __future__ import annotations

import copy
import logging
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)
PROBE_TOLERANCE = 1e-3
"""Largest absolute difference allowed between the prepared and the original tower's features
(unit-scale embeddings; folding changes them by float rounding only, ~1e-6)."""


def is_batch_norm(module: nn.Module) -> bool:
    """A 2-d batch norm in eval form, torch's or timm's (frozen, or fused with an activation)."""
    if isinstance(module, nn.BatchNorm2d):
        return not module.training and module.track_running_stats and module.affine
    fields = ("running_mean", "running_var", "weight", "bias", "eps")
    return "BatchNorm" in type(module).__name__ and all(getattr(module, f, None) is not None for f in fields)


@torch.no_grad()
def fold_batch_norms(module: nn.Module) -> int:
    """Fold every batch norm that directly follows a convolution (adjacent children of one parent)
    into it, in place; the batch norm is replaced by what it applied after normalising (timm's
    fused dropout and activation) or by Identity. Returns how many were folded."""
    folded = 0
    for parent in list(module.modules()):
        names = list(parent._modules)
        for conv_name, norm_name in zip(names, names[1:]):
            conv, norm = parent._modules[conv_name], parent._modules[norm_name]
            if not (isinstance(conv, nn.Conv2d) and norm is not None and is_batch_norm(norm)):
                continue
            if conv.out_channels != norm.running_mean.numel():
                continue
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            conv.weight.mul_(scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
            shift = norm.bias - norm.running_mean * scale
            if conv.bias is not None:
                shift = shift + conv.bias * scale
            conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)
            after = [m for m in (getattr(norm, "drop", None), getattr(norm, "act", None)) if m is not None]
            parent._modules[norm_name] = nn.Sequential(*after) if after else nn.Identity()
            folded += 1
    return folded


@contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """`module` in eval mode for the block, each submodule's own mode restored after it."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def prepared_copy(module: nn.Module, probe: torch.Tensor) -> nn.Module | None:
    """A copy of `module` for inference only (eval mode, batch norms folded, channels-last weights)
    if it has a batch norm to fold and gives the same output as `module` in eval mode on `probe`
    (N, C, H, W); else None (nothing to gain, or its module order does not match its forward).
    The copy takes channels-last input best. `module` itself is left as it was."""
    if not any("BatchNorm" in type(m).__name__ for m in module.modules()):
        return None  # a ViT: nothing to fold, and no copy of a large tower for nothing
    prepared = copy.deepcopy(module).eval()
    folded = fold_batch_norms(prepared)
    if folded == 0:
        return None
    prepared = prepared.to(memory_format=torch.channels_last)
    with evaluating(module):
        expected = module(probe)
    got = prepared(probe.contiguous(memory_format=torch.channels_last))
    if not (isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor) and got.shape == expected.shape):
        return None
    if not within_tolerance(expected, got):
        log.warning("folding %d batch norms changed %s's output by %.3g; keeping it as it is",
                    folded, type(module).__name__, (got.float() - expected.float()).abs().max().item())
        return None
    return prepared


@torch.no_grad()
def traced_tower(module: nn.Module, probe: torch.Tensor) -> torch.jit.ScriptModule | None:
    """`module` (a prepared tower, channels-last input) as one TorchScript graph traced on `probe`,
    if the graph answers as the module does on the probe and on a batch of another size; else None.

    Why serving wants it: an eager forward goes back to Python between every op and needs the GIL
    each time, so beside a busy Python thread in the same process (a version loading, a request
    being read) it waits once per op; the graph runs its ops without that. On gnsp-mini's tower,
    one image: 15 ms against 17 quiet, 34 ms against 67 beside a thread deep-copying modules.
    A trace records one path through `forward`; the two probes catch a path that depended on the
    batch size. Its parameters keep the module's names, so a copy of the trace can take another
    version's weights with `load_state_dict`. (torch marks `torch.jit.trace` deprecated in favour of
    `torch.export`/`torch.compile`; an exported program runs as Python calling each op, which is
    what this avoids, and compiling needs a C++ toolchain at serving time. Should tracing go, the
    tower is served eager: that is this function's None.)"""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)  # the deprecation above, once per architecture
            traced = torch.jit.trace(module, probe, check_trace=False)
    except Exception as exc:  # a forward TorchScript cannot trace: serve the module as it is
        log.info("not tracing %s: %s", type(module).__name__, exc)
        return None
    return traced if answers_alike(traced, module, probe) else None


class TracedTower(nn.Module):
    """A traced graph in an image tower's place: the tower's `image_size` stays readable (open_clip
    and the loaders read it), its forward is the graph's."""

    def __init__(self, graph: torch.jit.ScriptModule, image_size: Any) -> None:
        super().__init__()
        self.graph = graph
        self.image_size = image_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.graph(images)


@torch.no_grad()
def answers_alike(traced: nn.Module, module: nn.Module, probe: torch.Tensor) -> bool:
    """Whether `traced` gives `module`'s output on `probe` and on its first image alone."""
    with evaluating(module):
        for batch in (probe, probe[:1]):
            expected, got = module(batch), traced(batch)
            if not (isinstance(got, torch.Tensor) and got.shape == expected.shape and within_tolerance(expected, got)):
                return False
    return True


def within_tolerance(expected: torch.Tensor, got: torch.Tensor) -> bool:
    """Whether `got` is `expected` up to PROBE_TOLERANCE, relative to the output's scale."""
    difference = (got.float() - expected.float()).abs().max().item()
    return difference <= PROBE_TOLERANCE * max(1.0, expected.float().abs().max().item())


def image_probe(image_size: int, device: torch.device | str, batch: int = 2) -> torch.Tensor:
    """Seeded random pixels to compare an image tower (or a prefix of it) with its prepared copy."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, image_size, image_size, generator=generator).to(device)


def prepare_image_tower(model: nn.Module, image_size: int) -> bool:
    """Replace `model.visual` by its prepared copy (see `prepared_copy`), if it has one. Returns
    whether the tower was replaced. Only for a model that will never train again (a served one)."""
    device = next(model.visual.parameters()).device
    prepared = prepared_copy(model.visual, image_probe(image_size, device))
    if prepared is None:
        return False
    model.visual = prepared
    return True
