"""Names of Ray runs: stable per output folder, so a re-run finds its runs and two folders never share one."""

from __future__ import annotations

import hashlib
from pathlib import Path


def run_name(out_dir: str | Path) -> str:
    """`<folder name>-<hash of its absolute path>`."""
    out = Path(out_dir).resolve()
    return f"{out.name}-{hashlib.sha1(str(out).encode()).hexdigest()[:8]}"
