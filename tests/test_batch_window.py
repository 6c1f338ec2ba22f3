"""The classifier's adaptive batch wait: none for a lone request, about one forward under load."""

import asyncio
import time

import pytest
from ray import serve

from service.serving.batch_window import BatchWindow


def test_a_lone_request_opens_a_batch_that_does_not_wait():
    window = BatchWindow(max_batch_size=16, idle_wait_s=0.0, busy_max_wait_s=0.25)
    window.forward_took(0.08)
    assert window.enter() == 0.0
    window.leave()
    assert window.enter() == 0.0  # the replica emptied in between


def test_under_load_a_batch_waits_one_forward_capped():
    window = BatchWindow(max_batch_size=16, idle_wait_s=0.001, busy_max_wait_s=0.25)
    assert window.enter() == 0.001
    window.forward_took(0.08)
    assert window.enter() == 0.08
    window.forward_took(0.9)
    assert window.enter() == 0.25
    window.forward_took(0.0)
    assert window.enter() == 0.001  # never below the configured idle wait
    for _ in range(4):
        window.leave()
    assert window.in_flight == 0


def test_without_batching_nothing_waits():
    window = BatchWindow(max_batch_size=1, idle_wait_s=0.01, busy_max_wait_s=0.25)
    window.forward_took(0.08)
    assert window.enter() == 0.0 and window.enter() == 0.0


def forward_model(busy_max_wait_s: float):
    """A classifier stand-in: Serve's own batching over a 50 ms forward, with the replica's wait rule.
    A class per call: Serve keeps a batch method's queue on the function, bound to one event loop."""

    class Forward:
        def __init__(self) -> None:
            self.window = BatchWindow(max_batch_size=16, idle_wait_s=0.0, busy_max_wait_s=busy_max_wait_s)
            self.sizes: list[int] = []

        async def classify(self, item: int) -> int:
            self.batch.set_batch_wait_timeout_s(self.window.enter())
            try:
                return await self.batch(item)
            finally:
                self.window.leave()

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
        async def batch(self, items: list[int]) -> list[int]:
            self.sizes.append(len(items))
            start = time.perf_counter()
            await asyncio.sleep(0.05)
            self.window.forward_took(time.perf_counter() - start)
            return items

    return Forward()


async def burst(model) -> list[int]:
    """One request alone, then one followed by ten more arriving 2 ms apart while it runs."""
    await model.classify(0)
    first = asyncio.create_task(model.classify(1))
    await asyncio.sleep(0.005)
    rest = []
    for item in range(2, 12):
        rest.append(asyncio.create_task(model.classify(item)))
        await asyncio.sleep(0.002)
    assert await asyncio.gather(first, *rest) == list(range(1, 12))
    return model.sizes


@pytest.fixture
def outside_a_replica(monkeypatch):
    """Serve's batch queue asks its replica for max_ongoing_requests (only to log a warning)."""
    from ray.serve import batching

    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda self: None)


def test_requests_arriving_during_a_forward_share_the_next_batch(outside_a_replica):
    assert asyncio.run(burst(forward_model(busy_max_wait_s=0.25))) == [1, 1, 10]


def test_with_a_fixed_zero_wait_serve_runs_them_one_by_one(outside_a_replica):
    """What the window is for: Serve forms each batch as its first request arrives, even while the
    previous batch runs, so without a wait every request under load is a batch of one."""
    sizes = asyncio.run(burst(forward_model(busy_max_wait_s=0.0)))
    assert sizes[:2] == [1, 1] and max(sizes[2:]) <= 2 and len(sizes) >= 8
