"""The heap keeps freed tensor memory (gnsp_core.models.allocator), so CPU forwards stop page-faulting it back."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from gnsp_core.models.allocator import keep_freed_memory


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_freed_tensor_memory_stays_in_the_process():
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
    size = 200 * 2**20
    block = torch.ones(size // 4)  # touched: resident
    held = resident_bytes()
    del block
    # With glibc's defaults a block this large is an mmap that free() unmaps at once (RSS -200 MiB).
    assert resident_bytes() > held - size // 2
