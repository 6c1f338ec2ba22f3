"""The maths of the null-space projector, checked exactly."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from gnsp_core.config import TrainConfig
from gnsp_core.errors import ConfigError
from gnsp_core.linear_maps import LinearMapSet, input_tap
from gnsp_core.projection import (
    NullSpaceProjector, ProjectionConfig, ProjectorStatistics, collect_statistics, null_space_basis,
)


class OneLayer(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.fc(x)


class LeftLayer(nn.Module):
    """y = x W with W [in, out], the form of CLIP's final projections."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(d_in, d_out, dtype=torch.float64))

    def forward(self, x):
        return x @ self.proj


def low_rank_inputs(n: int, d: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, d, generator=g, dtype=torch.float64)


def test_energy_rule_keeps_largest_tail_below_threshold():
    cov = torch.diag(torch.tensor([50.0, 30.0, 10.0, 6.0, 3.0, 1.0], dtype=torch.float64))
    v1, v2 = null_space_basis(cov, "energy", 0.15)
    # tail sums: 1, 4, 10, 20 -> the largest tail under 15 (15 % of 100) is the last three (10/100)
    assert v2.shape[1] == 3 and v1.shape[1] == 3
    assert torch.allclose(v2.abs().sum(0), torch.ones(3, dtype=torch.float64))
    assert set(v2.abs().argmax(0).tolist()) == {3, 4, 5}


def test_cutoff_rule_takes_numerically_zero_eigenvalues():
    x = low_rank_inputs(40, 12, rank=5)
    v1, v2 = null_space_basis(x.T @ x, "cutoff", 10.0)
    assert (v1.shape[1], v2.shape[1]) == (5, 7)
    assert (x @ v2).abs().max() < 1e-8


@pytest.mark.parametrize("target", ["gradient", "update"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_projected_step_leaves_old_outputs_unchanged_float64(target, side):
    torch.manual_seed(0)
    layer = OneLayer(16, 8).double() if side == "right" else LeftLayer(16, 8)
    maps = LinearMapSet(layer, "all") if side == "right" else LinearMapSet.from_taps(
        [input_tap("proj", layer.proj, "left", layer)])
    old = low_rank_inputs(30, 16, rank=6)
    task = collect_statistics(maps, [old[:15], old[15:]], layer, stat_norm="task")
    stats = ProjectorStatistics()
    stats.add_task(task)
    projector = NullSpaceProjector(maps, stats, ProjectionConfig(scope="all", target=target, rule="cutoff", threshold=10))
    weight = maps.maps[0].weight
    before_out, before_w = layer(old).detach(), weight.detach().clone()
    # Gradient projection is exact under plain SGD; update projection is exact under AdamW with decay.
    optimizer = (torch.optim.SGD([weight], lr=0.01) if target == "gradient"
                 else torch.optim.AdamW([weight], lr=0.1, weight_decay=0.1))
    new = torch.randn(20, 16, dtype=torch.float64)
    for _ in range(5):
        optimizer.zero_grad()
        layer(new).pow(2).sum().backward()
        projector.project_gradients() if target == "gradient" else None
        projector.snapshot() if target == "update" else None
        optimizer.step()
        projector.project_updates() if target == "update" else None
    change = (layer(old) - before_out).norm() / before_out.norm()
    assert (weight - before_w).norm() > 1e-2, "the update must not be zero"
    assert change < 1e-10


def test_gradient_projection_under_adamw_is_only_approximate():
    """Why the `update` target exists: Adam's per-coordinate scaling and weight decay leave the null space."""
    torch.manual_seed(0)
    layer = OneLayer(16, 8).double()
    maps = LinearMapSet(layer, "all")
    old = low_rank_inputs(30, 16, rank=6)
    stats = ProjectorStatistics()
    stats.add_task(collect_statistics(maps, [old], layer, stat_norm="task"))
    projector = NullSpaceProjector(maps, stats, ProjectionConfig(scope="all", rule="cutoff", threshold=10))
    before = layer(old).detach()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        layer(torch.randn(20, 16, dtype=torch.float64)).pow(2).sum().backward()
        projector.project_gradients()
        optimizer.step()
    assert (layer(old) - before).norm() / before.norm() > 1e-3


def test_cheaper_factorisation_gives_the_same_projection():
    x = low_rank_inputs(50, 20, rank=15)
    cov = x.T @ x
    v1, v2 = null_space_basis(cov, "cutoff", 10.0)
    g = torch.randn(7, 20, dtype=torch.float64)
    assert torch.allclose(g @ v2 @ v2.T, g - g @ v1 @ v1.T, atol=1e-10)


def test_statistics_sum_over_tasks():
    a, b = torch.eye(3, dtype=torch.float64), 2 * torch.eye(3, dtype=torch.float64)
    stats = ProjectorStatistics()
    stats.add_task({"m": a})
    stats.add_task({"m": b})
    assert stats.num_tasks == 2 and torch.equal(stats.covariances["m"], 3 * a)


def test_renormalise_old_scales_only_matching_maps_before_adding():
    """Paper: running(visual.proj) = old / ‖old‖_F + task; every other map adds as-is."""
    old = torch.diag(torch.tensor([3.0, 4.0], dtype=torch.float64))  # ‖old‖_F = 5
    new = torch.diag(torch.tensor([0.0, 1.0], dtype=torch.float64))
    stats = ProjectorStatistics({"visual.proj": old, "visual.mlp": old}, 1)
    stats.add_task({"visual.proj": new, "visual.mlp": new}, renormalise_old=ProjectionConfig().renormalise_old)
    assert torch.equal(stats.covariances["visual.proj"], torch.diag(torch.tensor([0.6, 1.8], dtype=torch.float64)))
    assert torch.equal(stats.covariances["visual.mlp"], torch.diag(torch.tensor([3.0, 5.0], dtype=torch.float64)))
    plain = ProjectorStatistics({"visual.proj": old}, 1)
    plain.add_task({"visual.proj": new}, renormalise_old="")
    assert torch.equal(plain.covariances["visual.proj"], old + new)


def test_renormalisation_is_on_by_default_for_visual_proj_only():
    pattern = re.compile(ProjectionConfig().renormalise_old)
    assert pattern.match("visual.proj")
    assert not pattern.match("visual.transformer.resblocks.0.mlp.c_fc") and not pattern.match("text_projection")


@pytest.mark.parametrize("rule,threshold", [("energy", 0.0), ("energy", 1.0), ("energy", 1.01), ("energy", -0.1),
                                            ("energy", float("nan")), ("cutoff", 0.5), ("cutoff", 0.0),
                                            ("cutoff", float("inf"))])
def test_thresholds_outside_their_rule_are_refused(rule, threshold):
    with pytest.raises(ConfigError, match=f"out of range for the {'energy' if rule == 'energy' else 'cut-off'} rule"):
        ProjectionConfig(rule=rule, threshold=threshold)


@pytest.mark.parametrize("rule,threshold", [("energy", 1e-6), ("energy", 0.15), ("energy", 0.999),
                                            ("cutoff", 1.0), ("cutoff", 10.0)])
def test_thresholds_inside_their_rule_are_accepted(rule, threshold):
    assert ProjectionConfig(rule=rule, threshold=threshold).threshold == threshold


def test_train_config_reports_a_bad_threshold_as_a_config_error():
    with pytest.raises(ConfigError, match="0 < ρ < 1"):
        TrainConfig().replace(projection_threshold=1.5)
    with pytest.raises(ConfigError, match="a ≥ 1"):
        TrainConfig.from_dict({"projection": {"rule": "cutoff", "threshold": 0.5}})
    assert TrainConfig().replace(projection_rule="cutoff", projection_threshold=10.0).projection.stored_as == "float64"


def test_storage_settings_are_checked():
    assert ProjectionConfig().stored_as == "float32"
    with pytest.raises(ConfigError, match="cut-off rule"):
        ProjectionConfig(rule="cutoff", threshold=10, storage="eigen")
    with pytest.raises(ConfigError, match="keep more"):
        ProjectionConfig(storage="eigen", storage_energy=0.8, threshold=0.15)
    with pytest.raises(ConfigError, match="storage must be"):
        ProjectionConfig(storage="float16")


def test_tiny_clip_maps_and_scopes(tiny):
    paper = LinearMapSet(tiny.model, "vision_mlp").names()
    assert paper == [
        "visual.transformer.resblocks.0.mlp.c_fc", "visual.transformer.resblocks.0.mlp.c_proj",
        "visual.transformer.resblocks.1.mlp.c_fc", "visual.transformer.resblocks.1.mlp.c_proj", "visual.proj",
    ]
    everything = LinearMapSet(tiny.model, "all").names()
    assert "text_projection" in everything and "transformer.resblocks.1.attn.out_proj" in everything
