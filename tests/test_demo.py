"""`gnsp demo` through the REST service, on the tiny model and a few images: exit 0 and the table."""

from __future__ import annotations

import pytest

from service.cli.main import main

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def test_rest_demo_prints_the_table(ray_session, tmp_path, capsys):
    code = main(["demo", "--model", "tiny", "--tasks", "digits", "--steps", "2", "--max-train-per-class", "3",
                 "--max-test-per-class", "2", "--reference", "tests.conftest:reference_pairs",
                 "--store", str(tmp_path / "store")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "through the REST service" in out
    for row in ("| task", "digits (learned)", "held-out suite", "retrieval R@1", "modality gap ‖Δ‖", "sources:"):
        assert row in out, out
    assert ray_session.is_initialized(), "the demo must not shut down a Ray it did not start"
    assert (tmp_path / "store" / "models" / "v000002" / "manifest.json").is_file()
