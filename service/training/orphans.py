"""Placement groups of Ray Train runs whose controller died: found in Ray's own tables and removed.

Ray removes a placement group made by an actor only once that actor and its whole job have ended.
A Ray Train run's controller makes its worker group's and removes it when the run ends or aborts;
a controller that dies instead (its attempt's process killed, its Tune trial stopped mid-task)
leaves the group reserved for as long as the job lives: on the service's cluster, for good, and a
later deployment or run then waits for CPUs that never come. Ray Train's `PlacementGroupCleaner`
removes it when it sees the controller dead, but it asks the State API, which a Ray started without
its dashboard (as `gnsp serve` starts one) does not serve, so there it never acts.

This does the cleaner's job from the tables the GCS keeps anyway (actors, placement groups with
their creator): every placement group whose creator was a Ray Train controller that is now dead is
removed, and that controller's stranded cleaner ended. A live run's group is never touched. Ray
offers no public call for a group's creator, so this reads `ray._private.state` (Ray is pinned).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import ray

CONTROLLER_CLASS = "TrainController"
ATTEMPT_HOST_CLASS = "AttemptHost"
"""service.jobs.host's actor: an in-process run's resources are a group it makes (local_run.reserved)."""
CREATORS = (CONTROLLER_CLASS, ATTEMPT_HOST_CLASS)
CLEANER_CLASS = "PlacementGroupCleaner"
POLL_S = 0.2


def release_orphaned_placement_groups(timeout_s: float = 30.0) -> list[str]:
    """Remove the placement group of every Ray Train run whose controller is dead, and of every
    in-process run whose attempt host is dead (service.training.local_run); returns their ids.

    A controller whose owner (the process that ran `fit()`) has just died is about to die too, and
    one Ray already counts dead may still be running (and retrying its worker group): the sweep
    waits for both, up to `timeout_s`, so a caller that has just killed a run's driver releases
    that run's group, and a group a dying controller makes at the last moment is not left behind."""
    deadline = time.monotonic() + timeout_s
    while True:
        actors = _actors()
        lingering = set(_still_running(actors))
        if not (lingering or _dying_controllers(actors)) or time.monotonic() > deadline:
            break
        time.sleep(POLL_S)
    dead_creators = {actor_id for actor_id, actor in actors.items() if actor_id not in lingering
                     and actor["ActorClassName"] in CREATORS and actor["State"] == "DEAD"}
    released = [placement_group_id for placement_group_id in _groups_created_by(dead_creators)
                if _remove(placement_group_id)]
    _end_stranded_cleaners(_actors())
    return released


def _end_stranded_cleaners(actors: dict[str, dict]) -> None:
    """End the Ray Train cleaners on this node whose controller is gone. A cleaner is a detached
    actor that exits once it has seen its controller dead; without the State API it never sees
    that, and would poll for as long as the cluster lives, a process per killed run. Ray offers no
    handle to an unnamed actor another process made, so this ends the process (only on this node:
    a private Ray, the only kind without the State API that this service starts, is one machine).
    One that has not started yet when this runs is left to the next sweep."""
    here = ray.get_runtime_context().get_node_id()
    gone = _gone_addresses(actors)
    for actor in actors.values():
        if (actor["ActorClassName"] == CLEANER_CLASS and actor["State"] == "ALIVE" and actor.get("Pid")
                and actor["Address"].get("NodeID") == here and _address(actor["OwnerAddress"]) in gone):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(actor["Pid"], signal.SIGKILL)


def _actors() -> dict[str, dict]:
    import ray._private.state

    return ray._private.state.actors()


def _address(address: dict) -> tuple[str, int]:
    return address.get("NodeID", ""), address.get("Port", 0)


def _gone_addresses(actors: dict[str, dict]) -> set[tuple[str, int]]:
    """Addresses of dead actors that no live actor uses (a process gone, not a port reused)."""
    alive = {_address(a["Address"]) for a in actors.values() if a["State"] != "DEAD"}
    return {_address(a["Address"]) for a in actors.values() if a["State"] == "DEAD"} - alive


def _dying_controllers(actors: dict[str, dict]) -> list[str]:
    """Live controllers whose owner's process is gone (an address no live actor uses any more)."""
    gone = _gone_addresses(actors)
    return [actor_id for actor_id, actor in actors.items()
            if actor["ActorClassName"] == CONTROLLER_CLASS and actor["State"] != "DEAD"
            and _address(actor["OwnerAddress"]) in gone]


def _still_running(actors: dict[str, dict]) -> list[str]:
    """Controllers on this node that Ray counts dead (their owner died) whose process still runs: it
    may yet make a new placement group (a worker group it retries), so it is waited for."""
    here = ray.get_runtime_context().get_node_id()
    return [actor_id for actor_id, actor in actors.items()
            if actor["ActorClassName"] == CONTROLLER_CLASS and actor["State"] == "DEAD"
            and actor["Address"].get("NodeID") == here and _process_exists(actor.get("Pid"))]


def _process_exists(pid: int | None) -> bool:
    """Whether `pid` is still a controller's process (Ray titles it `ray::TrainController...`): a pid
    the system has since given to another process is not waited for."""
    if not pid:
        return False
    try:
        return CONTROLLER_CLASS in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _groups_created_by(creators: set[str]) -> list[str]:
    """Hex ids of the placement groups not yet removed whose creator is one of `creators`."""
    import ray._private.state
    from ray.core.generated.gcs_pb2 import PlacementGroupTableData

    if not creators:
        return []
    accessor = ray._private.state.state._connect_and_get_accessor()
    groups = []
    for raw in accessor.get_placement_group_table():
        data = PlacementGroupTableData.FromString(raw)
        if (data.state != PlacementGroupTableData.REMOVED and not data.is_detached
                and data.creator_actor_id.hex() in creators):
            groups.append(data.placement_group_id.hex())
    return groups


def _remove(placement_group_id: str) -> bool:
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(placement_group_id)))
    except Exception:  # removed meanwhile (its job ended), or the GCS refused: nothing to release here
        return False
    return True
