"""What GNSP's statistics see: each protected map's inputs, the text tower's useful token positions,
every prompt template of a task, attention masks of either kind, and maps no input reaches."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import colour_task
from torch import nn

from gnsp_core.config import TrainConfig
from gnsp_core.errors import ConfigError, GnspError
from gnsp_core.linear_maps import LinearMapSet, input_tap
from gnsp_core.projection import CovarianceCollector
from gnsp_core.state import ContinualState
from gnsp_core.trainer import learn_task
from gnsp_core.zeroshot import TEMPLATES

TEXT_LAYERS = ("transformer.resblocks.0", "transformer.resblocks.1")
STATS = dict(method="gnsp", steps=1, batch_size=8, lr=1e-4, warmup_steps=1, ref_batch_size=8,
             stats_batch_size=8, stats_augment=False, projection_scope="all", projection_stat_norm="task")


def with_templates(task, templates: tuple[str, ...]):
    if any(f.name == "templates" for f in dataclasses.fields(task)):
        return dataclasses.replace(task, templates=templates)
    task.templates = templates
    return task


class Attention(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)

    def forward(self, x, **masks):
        return self.attn(x, x, x, need_weights=False, **masks)[0]


@pytest.mark.parametrize("batch_first", [True, False])
def test_boolean_and_float_attention_masks_give_the_same_out_proj_input(batch_first):
    model = Attention(batch_first).eval()
    maps = LinearMapSet(model, "all")
    assert maps.names() == ["attn.in_proj", "attn.out_proj"]
    x = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)
    causal_bool = torch.ones(5, 5, dtype=torch.bool).triu(1)  # True: may not attend (MHA's meaning)
    causal_float = torch.zeros(5, 5).masked_fill(causal_bool, float("-inf"))
    padding_bool = torch.zeros(3, 5, dtype=torch.bool)
    padding_bool[0, 3:] = True
    per_item_bool = causal_bool.repeat(3 * 2, 1, 1)  # [batch · heads, L, S]
    per_item_bool[:2, 0, 1] = False
    cases = {
        "causal": ({"attn_mask": causal_bool}, {"attn_mask": causal_float}),
        "per item": ({"attn_mask": per_item_bool},
                     {"attn_mask": torch.zeros(6, 5, 5).masked_fill(per_item_bool, float("-inf"))}),
        "padding": ({"key_padding_mask": padding_bool},
                    {"key_padding_mask": torch.zeros(3, 5).masked_fill(padding_bool, float("-inf"))}),
    }
    for name, (bool_masks, float_masks) in cases.items():
        seen = {}
        for kind, masks in (("bool", bool_masks), ("float", float_masks)):
            with torch.no_grad(), maps.tap_inputs(lambda n, v, kind=kind: seen.__setitem__((kind, n), v)):
                out = model(x, **masks)
            proj = model.attn.out_proj
            recomputed = F.linear(seen[(kind, "attn.out_proj")], proj.weight, proj.bias)
            torch.testing.assert_close(recomputed, out.reshape(-1, 8), msg=f"{name}, {kind} mask")
        torch.testing.assert_close(seen[("bool", "attn.out_proj")], seen[("float", "attn.out_proj")])
    # the mask matters at all: without it the out_proj input differs
    with torch.no_grad(), maps.tap_inputs(lambda n, v: seen.__setitem__(("none", n), v)):
        model(x)
    assert not torch.allclose(seen[("none", "attn.out_proj")], seen[("bool", "attn.out_proj")])


def test_text_maps_see_only_positions_up_to_end_of_text(tiny):
    prompts = ["a photo of a red.", "a much longer prompt about a green thing."]
    tokens = tiny.tokenizer(prompts)
    eot = tokens.argmax(dim=-1)  # CLIP's end-of-text id is the largest
    maps = LinearMapSet(tiny.model, "all")
    seen: dict[str, torch.Tensor] = {}
    with torch.no_grad(), maps.tap_inputs(lambda n, v: seen.__setitem__(n, v)):
        tiny.model.encode_text(tokens)
    assert set(seen) == {n for n in maps.names() if maps.is_text(n)}
    for name in ("transformer.resblocks.0.mlp.c_fc", "transformer.resblocks.1.attn.in_proj",
                 "transformer.resblocks.1.attn.out_proj"):
        assert len(seen[name]) == int((eot + 1).sum()) < tokens.numel(), name
    assert seen["text_projection"].shape == (2, 64)


def layer_inputs_up_to_eot(loaded, prompts: list[str], every_position: bool = False) -> dict[str, torch.Tensor]:
    """By hand: each text MLP's c_fc input (its block's ln_2 output) over every prompt, rows up to EOT."""
    tokens = loaded.tokenizer(prompts)
    keep = torch.arange(tokens.shape[1])[None, :] <= tokens.argmax(dim=-1)[:, None]
    keep |= every_position
    outputs, handles = {}, []
    for layer in TEXT_LAYERS:
        ln_2 = loaded.model.get_submodule(f"{layer}.ln_2")
        handles.append(ln_2.register_forward_hook(lambda _m, _a, out, layer=layer: outputs.__setitem__(layer, out)))
    with torch.no_grad():
        loaded.model.encode_text(tokens)
    for handle in handles:
        handle.remove()
    return {f"{layer}.mlp.c_fc": outputs[layer][keep].double() for layer in TEXT_LAYERS}


def normalised_gram(x: torch.Tensor) -> torch.Tensor:
    gram = x.T @ x
    return gram / gram.norm()


def test_text_statistics_sum_every_template_of_the_task_up_to_end_of_text(tiny, reference):
    templates = ("a photo of a {}.", "a blurry photo of the {} object, seen from far away.", "{}")
    task = with_templates(colour_task("A", ["red", "blue"], n_train=4), templates)
    assert task.templates == templates
    state = learn_task(ContinualState.initial(tiny.model, tiny.spec), tiny, task, TrainConfig().replace(**STATS),
                       reference=reference)
    tiny.model.load_state_dict(state.weights)  # statistics are taken with the model just trained
    prompts = [t.format(c) for t in templates for c in task.classnames]
    by_hand = layer_inputs_up_to_eot(tiny, prompts)
    for name, x in by_hand.items():
        torch.testing.assert_close(state.stats.covariances[name], normalised_gram(x), msg=name)
    # the two choices this replaces give other matrices: the first template only, every position
    first_only = layer_inputs_up_to_eot(tiny, [templates[0].format(c) for c in task.classnames])
    every_position = layer_inputs_up_to_eot(tiny, prompts, every_position=True)
    for name in by_hand:
        assert not torch.allclose(state.stats.covariances[name], normalised_gram(first_only[name]), atol=1e-4)
        assert not torch.allclose(state.stats.covariances[name], normalised_gram(every_position[name]), atol=1e-4)


def test_a_task_without_templates_uses_the_default_ensemble():
    assert colour_task("t", ["red", "blue"], n_train=1).templates == tuple(TEMPLATES)


def test_a_protected_map_no_input_reaches_is_an_error():
    used, unused = nn.Linear(4, 3), nn.Linear(4, 3)
    maps = LinearMapSet.from_taps([input_tap("used", used.weight, "right", used),
                                   input_tap("never.called", unused.weight, "right", unused)])
    collector = CovarianceCollector(maps)
    collector.add_batch(lambda: used(torch.randn(5, 4)))
    with pytest.raises(ConfigError, match="never.called") as err:
        collector.task_matrices()
    assert isinstance(err.value, GnspError) and "used'" not in str(err.value)
    # several workers: decided on the sum, so a worker that saw no input raises only if none did
    other_worker_saw_some = lambda t: t + 1  # noqa: E731  (a fake all-reduce: another worker's rows added)
    matrices = collector.task_matrices(other_worker_saw_some)
    assert set(matrices) == {"used", "never.called"}


def test_statistics_see_inside_a_part_the_feature_cache_skips(tiny, reference):
    """Task 1 trains one tower; the other, frozen, is cached, but with scope `all` its maps are
    protected and need statistics. The text tower's match an uncached run's exactly; the image
    tower's training views were all cached by the one epoch, so without seeing past the cache its
    maps would get no input at all."""
    task = colour_task("A", ["red", "blue"], n_train=4)
    initial = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    runs = {}
    for views in (2, 0):
        tiny.model.load_state_dict(initial)
        config = TrainConfig().replace(**STATS, trainable=r"^visual\.", cache_views=views)
        runs[views] = learn_task(ContinualState.initial(tiny.model, tiny.spec), tiny, task, config,
                                 reference=reference).stats.covariances
    for name in ("transformer.resblocks.0.mlp.c_fc", "text_projection", "visual.proj"):
        assert runs[2][name].norm() > 0, name
        torch.testing.assert_close(runs[2][name], runs[0][name], msg=name)
    tiny.model.load_state_dict(initial)
    config = TrainConfig().replace(**{**STATS, "stats_augment": True}, trainable=r"^(?!visual\.)", cache_views=2)
    stats = learn_task(ContinualState.initial(tiny.model, tiny.spec), tiny, task, config, reference=reference).stats
    assert all(stats.covariances[name].norm() > 0 for name in ("visual.proj", "visual.transformer.resblocks.0.mlp.c_fc"))
