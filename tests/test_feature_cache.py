"""The feature cache: a cached task equals an uncached one on unaugmented data, for every method,
and the frozen parts run once per input instead of at every step."""

from __future__ import annotations

import dataclasses

import open_clip
import pytest
import torch

import gnsp_core.feature_cache as feature_cache
from conftest import SPLIT_MODEL, colour_task, reference_pairs
from gnsp_core.config import TrainConfig
from gnsp_core.methods.registry import METHODS
from gnsp_core.models import ModelSpec, load_model
from gnsp_core.state import ContinualState
from gnsp_core.trainer import learn_task, prime_frozen_outputs

HEADS_ONLY = r"^(visual\.head\.|text\.proj)"
FAST = dict(steps=3, batch_size=8, ref_batch_size=8, warmup_steps=1, lr=1e-3, stats_batch_size=8,
            ensemble_every=1, gap_check_every=1, compensation_epochs=1)


def unaugmented(name: str):
    loaded = load_model(ModelSpec(name=name, seed=0))
    return dataclasses.replace(loaded, preprocess_train=loaded.preprocess_val)


def learn_two_tasks(loaded, method: str, cache_views: int, trainable: str, monkeypatch):
    """Two tasks; returns the loss and the gradients (relative to nothing: as the optimiser gets
    them) of every step, and the final state."""
    losses: list[float] = []
    gradients: list[list[torch.Tensor]] = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        gradients.append([p.grad.clone() for group in self.param_groups for p in group["params"] if p.grad is not None])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    config = TrainConfig(method=method, trainable=trainable, cache_views=cache_views, **FAST)
    state = ContinualState.initial(loaded.model, loaded.spec)
    for task in (colour_task("A", ["red", "blue"], n_train=6), colour_task("B", ["green", "yellow"], n_train=6, seed=3)):
        state = learn_task(state, loaded, task, config, reference=reference_pairs(2),
                           progress=lambda p: losses.append(p.loss))
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    return losses, gradients, state


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture()
def opened_caches(monkeypatch):
    caches: list[feature_cache.FeatureCache] = []
    real_init = feature_cache.FeatureCache.__init__

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        caches.append(self)

    monkeypatch.setattr(feature_cache.FeatureCache, "__init__", recording_init)
    return caches


@pytest.mark.parametrize("method", list(METHODS))
def test_cached_tasks_equal_uncached_and_every_method_uses_the_cache(method, split_model_registered, opened_caches,
                                                                    monkeypatch):
    """Same losses and gradients at every step, cached or not. The first step starts from the same
    weights and agrees exactly; later ones agree to float32 rounding, which AdamW's normalised step
    carries into the weights (a coordinate with a near-zero gradient moves by about lr either way):
    at lr 1e-3 that drift reached a relative 1.1e-4 by task B's last step (LwF, two torch threads),
    at the lr used here it stays about 10x under the bound."""
    monkeypatch.setitem(FAST, "lr", 1e-5)
    cached_losses, cached_grads, _ = learn_two_tasks(unaugmented(split_model_registered), method, 1, HEADS_ONLY,
                                                     monkeypatch)
    assert opened_caches and all(c.caches_images for c in opened_caches)  # the timm trunk never trains here
    # (MG-CLIP adapts attention only, and this trunk has none: its whole image tower is cached)
    image_rows = [sum(n for name, n in c.computed.items() if name.startswith("image:")) for c in opened_caches]
    assert all(rows > 0 for rows in image_rows)
    plain_losses, plain_grads, _ = learn_two_tasks(unaugmented(split_model_registered), method, 0, HEADS_ONLY,
                                                   monkeypatch)
    torch.testing.assert_close(torch.tensor(cached_losses), torch.tensor(plain_losses), atol=1e-5, rtol=1e-5)
    assert len(cached_grads) == len(plain_grads)
    errors = [[relative_error(a, b) for a, b in zip(cs, ps)] for cs, ps in zip(cached_grads, plain_grads)]
    assert max(errors[0]) < 1e-5
    assert max(max(e) for e in errors) < 1e-4


def test_frozen_parts_run_once_per_input(split_model_registered, opened_caches):
    """12 task images at 1 view and 8 reference pairs: the trunk sees each once, over 3 steps of 8 + 8."""
    loaded = unaugmented(split_model_registered)
    config = TrainConfig(method="gnsp", trainable=HEADS_ONLY, cache_views=1, first_task_full_finetune=True,
                         **{**FAST, "steps": 6})
    state = ContinualState.initial(loaded.model, loaded.spec)
    learn_task(state, loaded, colour_task("A", ["red", "blue"], n_train=6), config, reference=reference_pairs(2))
    (cache,) = opened_caches
    assert cache.computed["image:trunk"] == 12 + 8  # task images + reference images, once each
    assert cache.computed["text:hf-transformer"] == 2 + 4  # two class prompts + four distinct captions


def test_whole_tower_frozen_is_cached_on_any_model(tiny, opened_caches):
    """open_clip's own CLIP (tiny): training only the text side caches the whole image tower."""
    text_only = r"^(transformer|token_embedding|positional_embedding|ln_final|text_projection)"
    config = TrainConfig(method="finetune", trainable=text_only, cache_views=1, **FAST)
    before = {k: v.clone() for k, v in tiny.model.state_dict().items() if k.startswith("visual.")}
    state = learn_task(ContinualState.initial(tiny.model, tiny.spec), tiny, colour_task("A", ["red", "blue"], 6), config)
    (cache,) = opened_caches
    assert cache.computed == {"image:visual": 12}
    assert all(torch.equal(state.weights[k], v) for k, v in before.items())
    assert "forward" not in tiny.model.visual.__dict__  # the patch is gone after the task


def test_keys_and_pixels_both_pass_a_patched_tower(tiny):
    tiny.model.requires_grad_(False)
    samples = colour_task("A", ["red", "blue"], n_train=2).train
    pixels = feature_cache.PixelSource(samples, tiny.preprocess_val, tiny.preprocess_val, None, seed=0)
    cache = feature_cache.FeatureCache(tiny.model, pixels, torch.device("cpu"))
    try:
        keys = feature_cache.image_keys(feature_cache.TASK, [0, 1, 0], feature_cache.VAL_VIEW)
        from_keys = tiny.model.encode_image(keys)
        from_pixels = tiny.model.encode_image(pixels(keys))
        torch.testing.assert_close(from_keys, from_pixels)
        assert cache.memos["image:visual"].computed == 2
    finally:
        cache.close()


def test_augmented_views_are_fixed_per_item_and_view():
    from torchvision import transforms

    samples = colour_task("A", ["red"], n_train=1).train
    crop = transforms.Compose([transforms.RandomResizedCrop(16), transforms.ToTensor()])
    pixels = feature_cache.PixelSource(samples, crop, transforms.ToTensor(), None, seed=0)
    view0 = feature_cache.image_keys(feature_cache.TASK, [0], 0)
    view1 = feature_cache.image_keys(feature_cache.TASK, [0], 1)
    assert torch.equal(pixels(view0), pixels(view0))
    assert not torch.equal(pixels(view0), pixels(view1))


def test_reference_outputs_are_reused_by_the_next_task_of_a_run(split_model_registered, opened_caches):
    """Same reference pool, same frozen trunk: the second task computes only its own images."""
    loaded = unaugmented(split_model_registered)
    config = TrainConfig(method="zscl", trainable=HEADS_ONLY, cache_views=1, **{**FAST, "steps": 6})
    reference = reference_pairs(2)
    state = ContinualState.initial(loaded.model, loaded.spec)
    for task in (colour_task("A", ["red", "blue"], n_train=6), colour_task("B", ["green", "yellow"], n_train=5)):
        state = learn_task(state, loaded, task, config, reference=reference)
    first, second = (c.computed["image:trunk"] for c in opened_caches)
    assert (first, second) == (12 + 8, 10)
    assert opened_caches[1].computed["text:hf-transformer"] == 2  # only the new class prompts


def test_the_pretrained_model_reads_the_trunks_it_shares_from_the_cache(split_model_registered, opened_caches,
                                                                        monkeypatch):
    """Distillation's frozen pre-trained model has the very trunks of the model being trained (only
    the heads train): its reference features come from the task's memos, not a second pass."""
    from gnsp_core.pretrained_cache import PretrainedFeatures

    own_passes, pairs = [], []
    features = PretrainedFeatures.features

    def spy(self, *args, **kwargs):
        out = features(self, *args, **kwargs)
        pairs.append(len(self._pairs))
        return out

    monkeypatch.setattr(PretrainedFeatures, "features", spy)
    monkeypatch.setattr(PretrainedFeatures, "_encode_image", lambda self, pixels: own_passes.append(len(pixels)))
    loaded = unaugmented(split_model_registered)
    config = TrainConfig(method="gnsp", trainable=HEADS_ONLY, cache_views=1, **{**FAST, "steps": 6})
    state = ContinualState.initial(loaded.model, loaded.spec)
    learn_task(state, loaded, colour_task("A", ["red", "blue"], n_train=6), config, reference=reference_pairs(2))
    (cache,) = opened_caches
    assert pairs and pairs[-1] == 8  # the pre-trained features of every reference pair were read
    assert own_passes == []  # and none needed the pre-trained model's own trunk
    assert cache.computed["image:trunk"] == 12 + 8 and cache.computed["text:hf-transformer"] == 2 + 4


def test_reference_outputs_saved_in_a_folder_serve_the_next_process(split_model_registered, opened_caches, tmp_path):
    """A job in fresh processes reads the trunks' rows that the last one saved (each reference pool
    is a new object here, as in a new process), with the same result; a file that does not belong
    to the pool or the weights is never used."""
    config = TrainConfig(method="gnsp", trainable=HEADS_ONLY, cache_views=1, **{**FAST, "steps": 6})
    folder = tmp_path / "frozen"

    def job(reference) -> dict:
        loaded = unaugmented(split_model_registered)
        state = ContinualState.initial(loaded.model, loaded.spec)
        learned = learn_task(state, loaded, colour_task("A", ["red", "blue"], n_train=6), config,
                             reference=reference, frozen_outputs=folder)
        return learned.weights

    first = job(reference_pairs(2))
    assert sorted(f.name.split("-")[0] for f in folder.iterdir()) == ["image", "text"]
    second = job(reference_pairs(2))
    # the 8 reference images, the 4 captions and the 2 class prompts are read back
    assert [c.computed["image:trunk"] for c in opened_caches] == [12 + 8, 12]
    assert [c.computed["text:hf-transformer"] for c in opened_caches] == [2 + 4, 0]
    assert all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)

    other = reference_pairs(2)
    other.captions[0] = "another caption"  # another pool: its own files, nothing read
    job(other)  # its 8 pairs have 5 distinct captions (the first was one of 4 shared ones)
    assert opened_caches[-1].computed == {"image:trunk": 12 + 8, "text:hf-transformer": 2 + 5}
    assert len(list(folder.iterdir())) == 4

    for path in folder.iterdir():
        path.write_bytes(b"torn")  # a file cut short: recomputed and rewritten, never read as rows
    job(reference_pairs(2))
    assert opened_caches[-1].computed == {"image:trunk": 12 + 8, "text:hf-transformer": 2 + 4}
    rewritten = {p.name.split("-")[0]: torch.load(p, weights_only=True)["keys"].shape[0]
                 for p in folder.iterdir() if p.read_bytes() != b"torn"}
    assert rewritten == {"image": 8, "text": 2 + 4}


def test_primed_reference_outputs_leave_a_job_only_its_own_inputs(split_model_registered, opened_caches, tmp_path):
    """A node primed before its first job (the service does it when it starts): the job computes
    only its task images and class prompts, and learns what an unprimed job learns."""
    config = TrainConfig(method="gnsp", trainable=HEADS_ONLY, cache_views=1, **{**FAST, "steps": 6})
    task = colour_task("A", ["red", "blue"], n_train=6)
    loaded = unaugmented(split_model_registered)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    primed = prime_frozen_outputs(loaded, config, reference_pairs(2), tmp_path)
    assert primed == {"image:trunk": 8, "text:hf-transformer": 4}
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    assert all(p.requires_grad for p in loaded.model.parameters())  # its flags as they were

    def job(folder) -> dict:
        fresh = unaugmented(split_model_registered)
        state = ContinualState.initial(fresh.model, fresh.spec)
        return learn_task(state, fresh, task, config, reference=reference_pairs(2), frozen_outputs=folder).weights

    learned = job(tmp_path)
    assert opened_caches[-1].computed == {"image:trunk": 12, "text:hf-transformer": 2}
    unprimed = job(tmp_path / "empty")
    assert all(torch.allclose(learned[k], unprimed[k], atol=1e-6) for k in learned)

