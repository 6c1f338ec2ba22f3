"""Which stored version a task job trains from.

With `--activation auto` every version that passes the quality gate (and its load check) becomes
active, so the active version is the head of the chain and a job trains from it. With `manual`
nothing moves the pointer on its own: training from the active version would make version N+1
forget tasks learned by versions the operator has not activated yet. There a job trains from the
newest version that passed the gate and whose job succeeded, so version N+1 holds every task
learned before it, active or not. A caller who wants another start (a rollback, a branch) names
it as the job's `base_version`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from service.store import ModelStore


def passed_gate(manifest: dict[str, Any]) -> bool:
    """A version without a gate (the base model, one published by hand) counts as passed."""
    return bool((manifest.get("gate") or {}).get("passed", True))


def newest_passed(store: ModelStore, rejected: Iterable[int] = ()) -> int | None:
    """The newest version that passed its quality gate and is not in `rejected` (versions whose
    jobs did not succeed: cancelled, or failed after publishing)."""
    skip = set(rejected)
    for version in reversed(store.versions()):
        if version not in skip and passed_gate(store.manifest(version)):
            return version
    return None


def unsucceeded_versions(records: Iterable[dict[str, Any]]) -> set[int]:
    """Versions published by jobs that ended other than `succeeded`: never a chain's head."""
    return {r["model_version"] for r in records
            if r.get("model_version") is not None and r.get("status") in ("failed", "cancelled")}


def chain_base(store: ModelStore, activation: str, records: Iterable[dict[str, Any]]) -> int | None:
    """The version a job with no `base_version` of its own trains from (see the module docstring)."""
    if activation == "manual":
        return newest_passed(store, unsucceeded_versions(records)) or store.active()
    return store.active()
