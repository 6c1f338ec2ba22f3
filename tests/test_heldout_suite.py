"""The held-out suite: a fixed split of the reference pairs, its sets, and how it is scored."""

from __future__ import annotations

import pytest
from PIL import Image

from gnsp_core.data import ImageSamples, Task
from gnsp_core.data import heldout as hs
from gnsp_core.data import reference as rd
from gnsp_core.evaluation import heldout_metrics, suite_summary, task_accuracy
from tests.conftest import COLOURS, striped_images

needs_reference_data = pytest.mark.skipif(
    not (rd.EMOJI_FONT.exists() and rd.FLAGS_DIR.exists() and rd.ISO_3166.exists()),
    reason=f"reference data not installed: {rd.INSTALL_HINT}",
)


@needs_reference_data
def test_split_is_disjoint_fixed_and_covers_every_pair():
    everything = rd.load_reference_pairs(split="all")
    align, held = rd.load_reference_pairs(), rd.load_reference_pairs(split="heldout")
    assert not set(align.captions) & set(held.captions)
    assert sorted(align.captions + held.captions) == sorted(everything.captions)
    assert 0.15 < len(held) / len(everything) < 0.25
    assert all(rd.is_heldout_caption(c) for c in held.captions)
    assert rd.load_reference_pairs(split="heldout").captions == held.captions
    with pytest.raises(Exception, match="split"):
        rd.load_reference_pairs(split="train")


@needs_reference_data
def test_suite_has_300_items_each_set_over_its_own_labels():
    suite = hs.load_heldout_suite()
    sizes = suite.sizes
    assert sum(n for name, n in sizes.items() if name != hs.PAIRS_NAME) >= 300
    assert sizes[hs.PAIRS_NAME] == sizes["emoji-heldout"] + sizes["flags-heldout"]
    assert set(suite.set_names) == set(sizes) - {hs.PAIRS_NAME}
    tasks = {t.name: t for t in suite.tasks}
    emoji = tasks["emoji-heldout"]
    assert emoji.templates == ("an emoji of {}",) and len(emoji.classnames) == len(emoji.test)
    image, label = emoji.test[3]
    assert image.mode == "RGB" and "an emoji of " + emoji.classnames[label] == suite.pairs.captions[3]
    assert len(tasks["photos"].classnames) == len(rd.HELDOUT_PHOTOS)
    training = set(rd.load_reference_pairs().captions)
    assert not training & set(suite.pairs.captions)


def _pair_suite() -> hs.HeldoutSuite:
    """Six colour swatches as caption pairs in two sets, and a colour photo task."""
    images, captions = [], []
    for i, (name, colour) in enumerate(COLOURS.items()):
        for k, image in enumerate(striped_images(colour, 2, 40 + i)):
            images.append(image)
            captions.append(f"{'a swatch of' if i < 2 else 'a tile of'} {name} {k}")
    pairs = rd.CaptionPairs([Image.fromarray(im) for im in images], captions)
    sets = {"swatches": (0, 4, "a swatch of "), "tiles": (4, 8, "a tile of ")}
    photos = Task("colours", list(COLOURS), ImageSamples([], []),
                     ImageSamples(images, [i // 2 for i in range(8)]))
    return hs.HeldoutSuite(pairs, sets, [photos])


def test_pair_set_accuracy_equals_its_zero_shot_head(tiny):
    suite = _pair_suite()
    metrics = heldout_metrics(tiny, suite)
    for task in suite.tasks:
        assert metrics["heldout_sets"][task.name] == pytest.approx(task_accuracy(tiny, task), abs=1e-6)
    sizes = suite.sizes
    pooled = sum(metrics["heldout_sets"][n] * sizes[n] for n in suite.set_names) / 16
    assert metrics["heldout_acc"] == pytest.approx(pooled)
    assert set(metrics["retrieval"]) == {"i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5"}
    assert metrics["retrieval_r5"] >= metrics["retrieval_r1"]


def test_suite_summary_pools_items_and_averages_directions():
    summary = suite_summary({"a": 50.0, "b": 100.0}, {"a": 30, "b": 10, hs.PAIRS_NAME: 5},
                            {"i2t_R@1": 40.0, "t2i_R@1": 60.0, "i2t_R@5": 80.0, "t2i_R@5": 100.0})
    assert summary["heldout_acc"] == pytest.approx((50 * 30 + 100 * 10) / 40)
    assert summary["retrieval_r1"] == 50.0 and summary["retrieval_r5"] == 90.0


def test_bench_reports_the_suite_for_every_method_and_row(tiny, tmp_path):
    from gnsp_core.bench import run_bench
    from gnsp_core.config import TrainConfig
    from tests.conftest import colour_task

    suite = _pair_suite()
    tasks = [colour_task("rg", ["red", "green"], 4, 2), colour_task("by", ["blue", "yellow"], 4, 2, seed=5)]
    configs = {m: TrainConfig(method=m, steps=2, batch_size=4, lr=1e-3, device="cpu") for m in ("finetune",)}
    results = run_bench(tiny, tasks, [], configs, tmp_path, suite=suite)
    assert results["eval"] == suite.set_names
    assert results["sizes"] == {"rg": 4, "by": 4} | suite.sizes
    for r in results["methods"].values():
        assert all(len(row) == 2 + len(suite.set_names) for row in r["acc"])
        assert all(len(r[k]) == 3 for k in ("heldout_acc", "retrieval_r1", "retrieval_r5", "retrieval"))
        assert r["acc"][0][2:] == [results["methods"]["finetune"]["acc"][0][2 + i] for i in range(3)]
        assert len(r["modality_gap"]) == 3
    table = (tmp_path / "results.md").read_text()
    assert "held-out top-1" in table and "heldout-pairs 8" in table


def test_job_metrics_carry_the_suite_and_its_sizes(tiny):
    from service.versions import heldout_sizes, measure_heldout

    suite = _pair_suite()
    metrics = measure_heldout(tiny, suite)
    assert metrics["heldout_sizes"] == heldout_sizes(suite) == suite.sizes
    assert metrics["heldout_accuracy"] == pytest.approx(heldout_metrics(tiny, suite)["heldout_acc"], abs=1e-3)
    assert {"retrieval_r1", "retrieval_r5", "heldout_sets", "retrieval"} <= set(metrics)
    photos = suite.photo_tasks[0]
    assert measure_heldout(tiny, photos) == {"heldout_accuracy": round(task_accuracy(tiny, photos), 4),
                                             "heldout_sizes": {"colours": 8}}
    assert measure_heldout(tiny, None) == {"heldout_accuracy": None}
