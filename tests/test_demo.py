"""`gnsp demo`: the side-by-side story on the tiny model through the REST service and in this process
(`--local`), its table, its quiet Ray."""

from __future__ import annotations

import logging
import types

import pytest

from service.cli import demo_service
from service.cli.demo_measure import Measures
from service.cli.demo_table import MethodRun, bwt, print_story
from service.cli.main import main
from service.serving.classify_http import classify_app_name

SMALL_DEMO = ("--model", "tiny", "--tasks", "digits,textiles", "--methods", "finetune,gnsp", "--steps", "1",
              "--max-train-per-class", "2", "--max-test-per-class", "2", "--reference", "tests.conftest:reference_pairs")
NOISE = ("Token authentication", "job metrics", "graceful_shutdown", "{'")
"""What the demo must not print. (Not every "(raylet)" line: here the demo joins the test session's
Ray, whose raylet may warn about its own worker start-up on a busy machine; the demo's own Ray does
not forward its logs.)"""


@pytest.mark.integration
@pytest.mark.e2e
def test_rest_demo_tells_the_story(ray_session, tmp_path, capsys):
    """One task per method (the in-process test below covers the learned → end rows of a sequence):
    jobs through the REST API, a version each, the same table, none of Ray's noise."""
    code = main(["demo", *SMALL_DEMO, "--tasks", "digits", "--store", str(tmp_path / "store")])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, out + captured.err
    assert _row(out, "accuracy (%)") == ["accuracy (%)", "chance", "pre-trained", "finetune", "gnsp"]
    assert _row(out, "retrieval R@1 / R@5")[3:] != ["n/a", "n/a"]
    for row in ("| digits (task 1)", "| held-out suite, zero-shot (", "| modality gap ‖Δ‖", "finetune learned digits:",
                "gnsp learned digits:", "versions: pre-trained 1, finetune 2, gnsp 3"):
        assert row in out, out
    for noise in NOISE:  # the story and progress bars only
        assert noise not in out, noise
    for noise in ("job metrics", "graceful_shutdown"):  # stderr also carries the test session's own Ray
        assert noise not in captured.err, noise
    assert ray_session.is_initialized(), "the demo must not shut down a Ray it did not start"
    assert (tmp_path / "store" / "models" / "v000003" / "manifest.json").is_file()  # 1 + two methods x one task


def test_local_demo_tells_the_story_in_this_process(capsys, monkeypatch):
    """`--local`: the library in this process, the same table, and no Ray started for it."""
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **kw: pytest.fail("the in-process demo started Ray"))
    code = main(["demo", "--local", *SMALL_DEMO])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, out + captured.err
    assert _row(out, "accuracy (%)") == ["accuracy (%)", "chance", "pre-trained", "finetune", "gnsp"]
    assert all("→" in cell for cell in _row(out, "digits (task 1)")[3:])
    for row in ("| textiles (task 2)", "| held-out suite, zero-shot (", "| retrieval R@1 / R@5", "| modality gap ‖Δ‖",
                "| BWT", "finetune learned digits:", "gnsp learned textiles:", "done in"):
        assert row in out, out
    for noise in NOISE:
        assert noise not in out, noise


def test_demo_refuses_an_unknown_method(capsys):
    assert main(["demo", "--model", "tiny", "--methods", "finetune,nope"]) == 2
    assert "unknown nope" in capsys.readouterr().err


def _measures(tasks: dict[str, float], heldout: float) -> Measures:
    return Measures(tasks=tasks, heldout=heldout, retrieval={"R@1": heldout / 2, "R@5": heldout}, gap=0.5)


def _row(out: str, label: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith(f"| {label}"))
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_story_shows_each_task_after_learning_and_at_the_end(capsys):
    runs = {"finetune": MethodRun({"a": 95.0, "b": 90.0}, _measures({"a": 40.0, "b": 90.0}, 30.0)),
            "gnsp": MethodRun({"a": 93.0, "b": 85.0}, _measures({"a": 92.0, "b": 85.0}, 49.0))}
    pretrained = _measures({"a": 12.0, "b": 20.0}, 50.0)
    print_story("gnsp-mini", ["a", "b"], {"a": 10.0, "b": 50.0, "heldout": 2.0, "retrieval": 1.5625}, pretrained, runs, 345, 64)
    out = capsys.readouterr().out
    assert _row(out, "a (task 1)") == ["a (task 1): learned → end", "10.0", "12.0", "95.0 → 40.0", "93.0 → 92.0"]
    assert _row(out, "b (task 2)") == ["b (task 2): learned → end", "50.0", "20.0", "90.0", "85.0"]  # last: just learned
    assert _row(out, "held-out") == ["held-out suite, zero-shot (345 items)", "2.0", "50.0", "30.0", "49.0"]
    assert _row(out, "retrieval") == ["retrieval R@1 / R@5 (64 pairs)", "1.6", "25.0 / 50.0", "15.0 / 30.0",
                                      "24.5 / 49.0"]
    assert _row(out, "BWT")[3:] == ["-55.0", "-1.0"]
    assert "finetune: earlier tasks lost 55.0 points through the later ones; held-out zero-shot 50.0 → 30.0 (-20.0)" in out
    assert bwt(runs["gnsp"], ["a"]) is None  # one task: nothing earlier to forget


def test_own_ray_stops_quietly(monkeypatch):
    """On a Ray it started, the demo stops Ray (which ends Serve) instead of serve.shutdown(), whose
    controller call fails by design and is reported to the driver; Ray's token notice is off while it starts."""
    import ray
    from ray import serve
    import ray.serve.context

    calls: list[str] = []
    notice = logging.getLogger(demo_service.AUTH_NOTICE_LOGGER)

    def fake_init(**kwargs):
        calls.append(f"init log_to_driver={kwargs['log_to_driver']} notice={logging.getLevelName(notice.level)}")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("ray.shutdown"))
    monkeypatch.setattr(serve, "start", lambda **kw: calls.append("serve.start"))
    monkeypatch.setattr("service.api.app.run_applications",
                        lambda targets, timeout_s: calls.append("deploy " + ", ".join(t.name for t in targets)))
    monkeypatch.setattr(serve, "delete", lambda name: calls.append(f"serve.delete {name}"))
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append("serve.shutdown"))
    monkeypatch.setattr(ray.serve.context, "_get_global_client",
                        lambda: types.SimpleNamespace(http_config=types.SimpleNamespace(port=8123)))
    monkeypatch.setattr("service.api.app.build_app", lambda settings: "app")
    monkeypatch.setattr("service.api.app.build_classify_app", lambda settings: "classify app")
    before = notice.level
    with demo_service.local_service(settings=None) as url:
        assert url == "http://127.0.0.1:8123"
    classify = classify_app_name(demo_service.APP_NAME)
    assert calls == ["init log_to_driver=False notice=ERROR", "serve.start", f"deploy gnsp-demo, {classify}",
                     f"serve.delete {classify}", "serve.delete gnsp-demo", "ray.shutdown"]
    assert notice.level == before
