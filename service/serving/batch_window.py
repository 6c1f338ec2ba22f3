"""How long the classifier's next batch may wait to fill: nothing when idle, one forward when busy.

Ray Serve forms the next batch as soon as its first request arrives, even while a batch is still
running; formed batches then queue for the replica's one batch slot. So with a fixed wait of 0,
every request under load becomes a batch of one that waits its turn anyway; with a fixed wait
above 0, a lone request always pays it. Waiting about one forward's time when other requests are
in the replica gives both: a lone request goes at once, and under load a batch gathers what
arrives while the previous one runs (and closes about when the slot frees).
"""

from __future__ import annotations


class BatchWindow:
    """Counts the requests inside a classifier replica and times its forwards."""

    def __init__(self, max_batch_size: int, idle_wait_s: float = 0.0, busy_max_wait_s: float = 0.25) -> None:
        self.max_batch_size = max_batch_size
        self.idle_wait_s = idle_wait_s
        self.busy_max_wait_s = busy_max_wait_s
        self.in_flight = 0
        self.last_forward_s = 0.0

    def enter(self) -> float:
        """Count a request in; return the wait for a batch that this request would open."""
        busy = self.in_flight > 0
        self.in_flight += 1
        if self.max_batch_size <= 1:
            return 0.0
        if not busy:
            return self.idle_wait_s
        return max(self.idle_wait_s, min(self.busy_max_wait_s, self.last_forward_s))

    def leave(self) -> None:
        self.in_flight -= 1

    def forward_took(self, seconds: float) -> None:
        self.last_forward_s = seconds
