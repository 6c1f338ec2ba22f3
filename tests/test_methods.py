"""Methods end to end on the tiny config: GNSP's exactness claim, and every method learns."""

from __future__ import annotations

import pytest
import torch
from conftest import colour_task

from gnsp_core.config import TrainConfig, preset
from gnsp_core.evaluation import accuracy_row
from gnsp_core.linear_maps import LinearMapSet
from gnsp_core.methods.registry import METHODS
from gnsp_core.models import ModelSpec, load_model
from gnsp_core.state import ContinualState
from gnsp_core.trainer import learn_task

VISION = r"^visual\."  # every vision linear map: attention in/out, MLPs, final projection
FAST = dict(batch_size=8, lr=1e-3, warmup_steps=2, ref_batch_size=8, stats_batch_size=8)


def exact_config(steps: int = 12) -> TrainConfig:
    return preset("gnsp-exact", steps=steps, projection_scope=VISION, projection_stat_norm="task",
                  stats_augment=False, **FAST)


def layer_inputs(loaded, maps: LinearMapSet, task) -> dict[str, torch.Tensor]:
    images = torch.stack([x for x, _ in task.train.with_transform(loaded.preprocess_val)])
    inputs: dict[str, torch.Tensor] = {}
    with torch.no_grad(), maps.tap_inputs(lambda name, x: inputs.__setitem__(name, x.double())):
        loaded.model.encode_image(images)
    return inputs


def layer_output(weight: torch.Tensor, side: str, x: torch.Tensor) -> torch.Tensor:
    w = weight.detach().double()
    return x @ w.T if side == "right" else x @ w


@torch.no_grad()
def embeddings(loaded, task) -> torch.Tensor:
    images = torch.stack([x for x, _ in task.train.with_transform(loaded.preprocess_val)])
    return torch.nn.functional.normalize(loaded.model.encode_image(images), dim=-1)


def learn_two_tasks(tiny, reference, config: TrainConfig, task_a, task_b, progress=None):
    state = learn_task(ContinualState.initial(tiny.model, tiny.spec), tiny, task_a, config, reference=reference)
    tiny.model.load_state_dict(state.weights)
    before = {"state": state, "embeddings": embeddings(tiny, task_a)}
    after = learn_task(state, tiny, task_b, config, reference=reference, progress=progress)
    tiny.model.load_state_dict(after.weights)
    return before, after


def test_exact_projection_keeps_every_old_layer_output(tiny, reference):
    # One image per class keeps task A's inputs rank-deficient (34 tokens < 64 dims), so the
    # null space is not empty and the exactness claim can be tested at all.
    task_a = colour_task("A", ["red", "green"], n_train=1)
    task_b = colour_task("B", ["blue", "yellow"], n_train=8, seed=5)
    config = exact_config()
    state_a = learn_task(ContinualState.initial(tiny.model, tiny.spec), tiny, task_a, config, reference=reference)
    tiny.model.load_state_dict(state_a.weights)
    maps = LinearMapSet(tiny.model, VISION)
    inputs = layer_inputs(tiny, maps, task_a)
    weights_a = {m.name: m.weight.detach().clone() for m in maps}
    ce: list[float] = []
    state_b = learn_task(state_a, tiny, task_b, config, reference=reference,
                         progress=lambda p: ce.append(p.terms["ce"]))
    tiny.model.load_state_dict(state_b.weights)
    for m in LinearMapSet(tiny.model, VISION):
        old = layer_output(weights_a[m.name], m.side, inputs[m.name])
        new = layer_output(m.weight, m.side, inputs[m.name])
        assert (new - old).norm() / old.norm() < 1e-4, m.name
        assert (m.weight - weights_a[m.name]).norm() > 1e-4, f"{m.name} did not move: the update must be non-zero"
    assert sum(ce[-3:]) < sum(ce[:3]), f"task B's loss must fall: {ce}"


def test_embedding_drift_on_old_task_by_method(tiny, reference):
    task_a = colour_task("A", ["red", "green"], n_train=1)
    task_b = colour_task("B", ["blue", "yellow"], n_train=8, seed=5)
    initial = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    variants = {
        "gnsp (paper preset)": preset("gnsp", steps=12, **FAST),
        "gnsp exact (update projection)": exact_config(),
        "finetune": TrainConfig(method="finetune", steps=12, **FAST),
    }
    drift = {}
    for name, config in variants.items():
        tiny.model.load_state_dict(initial)
        before, _ = learn_two_tasks(tiny, reference, config, task_a, task_b)
        cos = (embeddings(tiny, task_a) * before["embeddings"]).sum(-1)
        drift[name] = float((1 - cos).mean())
    print("\nwhole-model image-embedding drift on task A after task B (mean 1 - cos):")
    for name, value in drift.items():
        print(f"  {name:32s} {value:.2e}")
    assert drift["gnsp exact (update projection)"] < 1e-5
    assert drift["finetune"] > 100 * drift["gnsp exact (update projection)"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_lowers_the_task_loss(method, tiny, reference):
    task = colour_task("A", ["red", "blue"], n_train=8)
    config = TrainConfig(method=method, steps=16, gap_check_every=8, **FAST)
    ce: list[float] = []
    state = learn_task(ContinualState.initial(tiny.model, tiny.spec), tiny, task, config, reference=reference,
                       progress=lambda p: ce.append(p.terms["ce"]))
    assert state.history[-1].name == "A" and state.history[-1].method == method
    assert sum(ce[-2:]) < sum(ce[:2]), ce
    tiny.model.load_state_dict(state.weights)
    assert 0.0 <= accuracy_row(tiny, [task], state.extras)[0] <= 100.0


def test_finetune_and_gnsp_reach_high_accuracy(tiny, reference):
    task = colour_task("A", ["red", "blue"], n_train=8)
    initial = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    for method in ("finetune", "gnsp"):
        tiny.model.load_state_dict(initial)
        config = TrainConfig(method=method, steps=16, **FAST)
        state = learn_task(ContinualState.initial(tiny.model, tiny.spec), tiny, task, config, reference=reference)
        tiny.model.load_state_dict(state.weights)
        assert accuracy_row(tiny, [task], state.extras)[0] >= 75.0, method


def test_learning_is_deterministic_under_a_seed(reference):
    task = colour_task("A", ["red", "blue"], n_train=8)
    config = TrainConfig(method="gnsp", steps=4, **FAST)
    runs = []
    for _ in range(2):
        loaded = load_model(ModelSpec(name="tiny"))
        runs.append(learn_task(ContinualState.initial(loaded.model, loaded.spec), loaded, task, config, reference=reference))
    assert all(torch.equal(runs[0].weights[k], runs[1].weights[k]) for k in runs[0].weights)
    assert all(torch.equal(runs[0].stats.covariances[k], runs[1].stats.covariances[k]) for k in runs[0].stats.covariances)


def test_pretrained_features_are_computed_once_per_run(reference, monkeypatch):
    """Two tasks against one reference pool load the pre-trained model once and reuse its features,
    which stay exactly those of a freshly loaded pre-trained model."""
    import gnsp_core.pretrained_cache as pretrained_cache
    from gnsp_core.pretrained_cache import pretrained_features

    loads = []
    real_load = pretrained_cache.load_model
    monkeypatch.setattr(pretrained_cache, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    loaded = real_load(ModelSpec(name="tiny"))
    state = ContinualState.initial(loaded.model, loaded.spec)
    config = TrainConfig(method="gnsp", steps=3, **FAST)
    for task in (colour_task("A", ["red", "blue"], n_train=8), colour_task("B", ["green", "yellow"], n_train=8)):
        state = learn_task(state, loaded, task, config, reference=reference)
    assert len(loads) == 1
    cache = pretrained_features(loaded.spec, torch.device("cpu"), reference)
    assert len(cache._pairs) == len(reference)
    fresh = real_load(ModelSpec(name="tiny")).model.eval()
    pairs = reference.with_transform(loaded.preprocess_val)
    images = torch.stack([pairs[i][0] for i in range(len(pairs))])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(fresh.encode_image(images), dim=-1)
    got = torch.stack([cache._pairs[i][0] for i in range(len(pairs))])
    assert torch.allclose(got, expected, atol=1e-5)


def test_loading_a_model_leaves_the_callers_rng_alone():
    """A run that loads the pre-trained model mid-task (once per run now) must draw the same data."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    load_model(ModelSpec(name="tiny", seed=7))
    assert torch.equal(before, torch.get_rng_state())
