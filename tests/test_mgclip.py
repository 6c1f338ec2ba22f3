"""MG-CLIP's pieces: the gap signal and early stop (training) and the compensation head (evaluation)."""

import math

import pytest
import torch
import torch.nn.functional as F

from gnsp_core.methods.mgclip import GapMonitor, mean_negative_logit
from gnsp_core.methods.mgclip_head import CosineCompensationHead, combine_mgclip


def test_mean_negative_logit_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # image 0 (label 0): negatives cos 0 and 1/√2; image 1 (label 2): negatives cos 0 and 1
    expected = (100 * (0 + 1 / math.sqrt(2)) / 2 + 100 * (0 + 1) / 2) / 2
    assert mean_negative_logit(img, txt, torch.tensor([0, 2])) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):
        mean_negative_logit(img, txt[:1], torch.tensor([0, 0]))


def test_gap_monitor_stops_at_first_move_beyond_alpha():
    monitor = GapMonitor(alpha=0.10)
    with pytest.raises(RuntimeError):
        monitor.should_stop(1.0)
    monitor.record_baseline(20.0)
    per_epoch = [20.5, 21.9, 22.0, 22.1, 25.0]  # 22.0 is exactly 10 %: not beyond
    stops = [monitor.should_stop(v) for v in per_epoch]
    assert stops == [False, False, False, True, True]
    assert stops.index(True) + 1 == 4  # the epoch count reused for later tasks
    assert monitor.should_stop(17.9)  # moving down counts too


def _clustered(num_classes=3, per_class=20, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=gen)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[labels] + 0.8 * torch.randn(len(labels), dim, generator=gen), labels


def test_compensation_head_init_is_class_mean_of_normalised_features():
    features, labels = _clustered()
    head = CosineCompensationHead(dim=8)
    assert head.add_classes(features, labels) == 0
    means = torch.stack([F.normalize(features[labels == c], dim=-1).mean(0) for c in range(3)])
    torch.testing.assert_close(head.weight.detach(), means)
    assert head.add_classes(features[:40], labels[:40]) == 3 and head.num_classes == 5


def test_compensation_head_fit_trains_only_current_rows():
    features, labels = _clustered()
    head = CosineCompensationHead(dim=8)
    head.add_classes(features, labels)
    new_features, new_labels = _clustered(num_classes=2, seed=1)
    first = head.add_classes(new_features, new_labels)
    old_rows = head.weight.detach()[:first].clone()
    before = F.cross_entropy(head(new_features)[:, first:], new_labels).item()
    after = head.fit(new_features, new_labels, first_class=first, epochs=20, lr=1e-2, batch_size=16)
    assert after < before
    torch.testing.assert_close(head.weight.detach()[:first], old_rows)


def test_compensation_head_probs_and_state_dict_round_trip():
    features, labels = _clustered()
    head = CosineCompensationHead(dim=8)
    head.add_classes(features, labels)
    probs = head.probs(features)
    cos = F.normalize(features, dim=-1) @ F.normalize(head.weight.detach(), dim=-1).T
    torch.testing.assert_close(probs, cos.softmax(dim=-1))
    restored = CosineCompensationHead(dim=8)
    restored.load_state_dict(head.state_dict())
    torch.testing.assert_close(restored.probs(features), probs)


def test_combine_mgclip_formula():
    text, comp = torch.tensor([[0.9, 0.1]]), torch.tensor([[0.4, 0.6]])
    torch.testing.assert_close(combine_mgclip(text, comp), torch.tensor([[(0.9 + 1.6) / 5, (0.1 + 2.4) / 5]]))
    torch.testing.assert_close(combine_mgclip(text, comp, weight=1.0), torch.tensor([[0.65, 0.35]]))


# --- MG-CLIP as published: LoRA pairs, compensation weight, one stop decision for all ranks -------

import multiprocessing  # noqa: E402

from conftest import colour_task  # noqa: E402
from distributed_support import rank0_decisions  # noqa: E402

from gnsp_core.config import TrainConfig  # noqa: E402
from gnsp_core.errors import GnspError  # noqa: E402
from gnsp_core.evaluation import task_accuracy  # noqa: E402
from gnsp_core.methods.mgclip import MGCLIP, STEPS_KEY  # noqa: E402
from gnsp_core.methods.mgclip_head import COMPENSATION_WEIGHT_KEY, compensation_weight  # noqa: E402
from gnsp_core.state import ContinualState  # noqa: E402
from gnsp_core.task_context import Distributed  # noqa: E402
from gnsp_core.trainer import learn_task  # noqa: E402
from gnsp_core.zeroshot import build_text_head  # noqa: E402

FAST = dict(method="mgclip", batch_size=8, lr=1e-2, warmup_steps=1, compensation_epochs=1)


def attention_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)}


def test_k_and_v_each_get_their_own_rank_8_pair_never_reset(tiny):
    task = colour_task("A", ["red", "blue"], n_train=8)
    initial = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    config = TrainConfig(steps=4, gap_alpha=1e9, **FAST)  # no early stop
    first = learn_task(ContinualState.initial(tiny.model, tiny.spec), tiny, task, config)
    second = learn_task(first, tiny, colour_task("B", ["green", "yellow"], n_train=8), config)
    modules = attention_modules(tiny.model)
    assert len(modules) == 4  # two blocks in each tower
    lora = {k: v for k, v in second.extras.items() if k.startswith("mgclip.lora.")}
    assert len(lora) == 4 * len(modules)
    for name, mha in modules.items():
        d = mha.embed_dim
        pairs = {part: (lora[f"mgclip.lora.{name}.{part}.A"], lora[f"mgclip.lora.{name}.{part}.B"]) for part in "kv"}
        for a, b in pairs.values():
            assert a.shape == (8, d) and b.shape == (d, 8)
        assert not torch.equal(pairs["k"][0], pairs["v"][0]), "K and V share no factor"
        # the merged weights are the pre-trained ones plus (α/r)·B A on K's and V's rows only,
        # each of rank ≤ 8, after two tasks of one continued LoRA
        delta = second.weights[f"{name}.in_proj_weight"] - initial[f"{name}.in_proj_weight"]
        assert torch.equal(delta[:d], torch.zeros_like(delta[:d])), "Q is not adapted"
        for part, rows in (("k", slice(d, 2 * d)), ("v", slice(2 * d, 3 * d))):
            a, b = pairs[part]
            torch.testing.assert_close(delta[rows], (b @ a) / 8, atol=1e-6, rtol=1e-5)
            assert delta[rows].norm() > 0 and torch.linalg.matrix_rank(delta[rows]) <= 8
        assert torch.linalg.matrix_rank(delta[d:]) > 8, "a joint K/V pair would have rank ≤ 8"
        first_b = first.extras[f"mgclip.lora.{name}.k.B"]
        assert not torch.equal(first_b, pairs["k"][1]) and first_b.norm() > 0


def test_compensation_weight_from_the_config_weighs_predictions_by_the_formula(tiny):
    task = colour_task("A", ["red", "green", "blue"], n_train=4, n_test=6)
    state = learn_task(ContinualState.initial(tiny.model, tiny.spec), tiny, task,
                       TrainConfig(steps=2, compensation_weight=2.5, **FAST))
    assert float(state.extras[COMPENSATION_WEIGHT_KEY]) == 2.5 and compensation_weight({}) == 4.0
    tiny.model.load_state_dict(state.weights)
    images = torch.stack([x for x, _ in task.test.with_transform(tiny.preprocess_val)])
    labels = torch.tensor(task.test.labels)
    with torch.no_grad():
        features = F.normalize(tiny.model.encode_image(images).float(), dim=-1)
    text = build_text_head(tiny.model, tiny.tokenizer, task.classnames, list(task.templates))
    text_probs = (100 * features @ text.T).softmax(dim=-1)
    rows = state.extras["mgclip.comp.A"]
    comp_probs = (features @ F.normalize(rows, dim=-1).T).softmax(dim=-1)
    expected = {}
    for w in (0.0, 1.0, 4.0, 1000.0):
        by_hand = ((text_probs + w * comp_probs) / (1 + w)).argmax(dim=-1)
        expected[w] = 100.0 * (by_hand == labels).float().mean().item()
        extras = {**state.extras, COMPENSATION_WEIGHT_KEY: torch.tensor(w)}
        assert task_accuracy(tiny, task, extras) == pytest.approx(expected[w]), w
    assert len(set(expected.values())) > 1, f"the weight must matter here: {expected}"


class FakeAllReduce:
    """The other rank's part of a sum: `votes[i]` is added at the i-th call."""

    def __init__(self, votes: list[float]) -> None:
        self.votes, self.calls = votes, 0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor += self.votes[self.calls]
        self.calls += 1
        return tensor


def test_every_rank_takes_rank_0s_stop_decision(tiny, monkeypatch):
    task = colour_task("A", ["red", "blue"], n_train=8)
    config = TrainConfig(steps=40, gap_check_every=4, **FAST)
    initial = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    measured: list[int] = []
    gap = iter([10.0, 10.5, 10.5, 20.0, 30.0])  # baseline, then checks: rank 0 stops at the third

    def negative_logit(self):
        measured.append(self.ctx.distributed.rank)
        return next(gap)

    monkeypatch.setattr(MGCLIP, "_negative_logit", negative_logit)
    rank0_reduce = FakeAllReduce([0.0] * 10)  # rank 1 never votes
    rank0 = learn_task(ContinualState.initial(tiny.model, tiny.spec), tiny, task, config,
                       distributed=Distributed(0, 2, rank0_reduce))
    assert rank0.history[-1].steps == 12 and int(rank0.extras[STEPS_KEY]) == 12
    assert rank0_reduce.calls == 3 and measured == [0, 0, 0, 0]
    tiny.model.load_state_dict(initial)
    rank1_reduce = FakeAllReduce([0.0, 0.0, 1.0])  # rank 0's votes: stop at the third check
    rank1 = learn_task(ContinualState.initial(tiny.model, tiny.spec), tiny, task, config,
                       distributed=Distributed(1, 2, rank1_reduce))
    assert rank1.history[-1].steps == 12 and int(rank1.extras[STEPS_KEY]) == 12
    assert measured == [0, 0, 0, 0], "rank 1 never measures: it follows rank 0"


def test_two_processes_agree_on_rank_0s_decision(tmp_path):
    own = {0: [True, False, False, True], 1: [False, True, False, True]}
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    workers = [context.Process(target=rank0_decisions, args=(r, str(tmp_path / "store"), own[r], out)) for r in (0, 1)]
    for w in workers:
        w.start()
    results = dict(out.get(timeout=300) for _ in workers)
    for w in workers:
        w.join(timeout=30)
    assert results[0] == results[1] == own[0]


def test_a_negative_compensation_weight_is_refused(tiny):
    task = colour_task("A", ["red", "blue"], n_train=2)
    with pytest.raises(GnspError, match="compensation_weight"):
        learn_task(ContinualState.initial(tiny.model, tiny.spec), tiny, task,
                   TrainConfig(steps=1, compensation_weight=-1.0, **FAST))
