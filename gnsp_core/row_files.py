"""Files of keyed rows (a frozen part's outputs, one row per input), written and read back whole.

Both kinds of outputs kept between processes use this format: the reference pairs' frozen outputs
(gnsp_core.frozen_outputs, keyed by pool position or token ids) and evaluation's trunk rows
(gnsp_core.trunk_memo, keyed by content digests). A file holds `keys`, an integer tensor [N, K],
and `rows`, one tensor [N, ...] or a dict of them (a Hugging Face output's fields). It is written
atomically; a file that is torn or not of this format is ignored (and logged): it costs a
recomputation, never a wrong row.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gnsp_core.atomic_files import write_bytes_atomic

log = logging.getLogger(__name__)

Row = Tensor | dict[str, Tensor]


def write_rows(path: Path, keys: Tensor, rows: list[Row]) -> None:
    """Write `keys` [N, K] and their `rows` (all tensors, or all dicts with the same fields) to `path`."""
    if isinstance(rows[0], dict):
        stacked: Any = {name: torch.stack([row[name].detach().cpu() for row in rows]) for name in rows[0]}
    else:
        stacked = torch.stack([row.detach().cpu() for row in rows])
    buffer = io.BytesIO()
    torch.save({"keys": keys, "rows": stacked}, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def read_rows(path: Path, what: str) -> tuple[list[list[int]], list[Row]]:
    """The keys (lists of ints) and rows of `path`; none when it is missing, torn or foreign
    (`what` names the file in the warning)."""
    if not path.is_file():
        return [], []
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        keys, rows = saved["keys"], saved["rows"]
        columns = rows if isinstance(rows, dict) else {None: rows}
        if keys.ndim != 2 or any(len(column) != len(keys) for column in columns.values()):
            raise ValueError(f"{len(keys)} keys do not match the rows")
    except Exception as exc:
        log.warning("ignoring saved %s %s: %s", what, path, exc)
        return [], []
    if isinstance(rows, dict):
        return keys.tolist(), [{name: column[i] for name, column in rows.items()} for i in range(len(keys))]
    return keys.tolist(), list(rows)


def output_rows(output: Any) -> list[dict[str, Tensor]]:
    """A Hugging Face model output as one dict of its tensor fields per input row (cloned, so a
    kept row does not hold its whole batch's storage)."""
    fields = {name: value for name, value in output.items() if isinstance(value, Tensor)}
    count = len(next(iter(fields.values())))
    return [{name: value[j].clone() for name, value in fields.items()} for j in range(count)]


def stacked_output(output_type: type, rows: list[dict[str, Tensor]]) -> Any:
    """The model output of type `output_type` whose rows are `rows` (the inverse of `output_rows`)."""
    return output_type(**{name: torch.stack([row[name] for row in rows]) for name in rows[0]})
