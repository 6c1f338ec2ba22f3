"""A worker for tests that need two real processes in one gloo group (spawned: keep imports light)."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed

from gnsp_core.task_context import Distributed


def rank0_decisions(rank: int, store: str, decisions: list[bool], out) -> None:
    """Join a two-rank gloo group and put (rank, what `rank0_decides` returned for each decision)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                                         timeout=timedelta(seconds=120))
    try:
        dist = Distributed(rank, 2, lambda t: (torch.distributed.all_reduce(t), t)[1])
        out.put((rank, [dist.rank0_decides(d, torch.device("cpu")) for d in decisions]))
    finally:
        torch.distributed.destroy_process_group()
