"""The states of a job (a task job or a search): the one list the queues, the API and clients share."""

from __future__ import annotations

from typing import Literal, get_args

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATUSES: tuple[str, ...] = get_args(JobStatus)
ENDED: tuple[str, ...] = STATUSES[2:]
"""A job in one of these states never changes again."""
