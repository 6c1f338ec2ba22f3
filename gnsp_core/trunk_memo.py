"""Evaluation's trunk outputs, remembered by content for as long as the trunk's weights stay the same.

Every evaluation of a version runs the same held-out suite (hundreds of images and captions), and
a benchmark measures every task's test split after every task of every method. On a model whose
trunks do not train (gnsp-mini under `trainable=auto`: only the heads after its image and text
trunks learn), the trunks compute the same outputs for those inputs every time: ~90 % of an
evaluation's time. `remembered_trunks(model)` patches the image trunk (a timm tower's trunk, else
the whole image tower) and a Hugging Face text trunk for a block: each input row is looked up by
the digest of its content (the preprocessed pixels, the token ids) in a memo named by the part's
weights, and only rows never seen run through the part. The memo lives for the process (bounded),
and in `folder` when one is given, so a later process (the next job's evaluation) starts with it.

Keys are content digests, never positions: a row can only ever answer for the very input it was
computed from, by the very weights (a trunk that trained gets another memo), and it is what the
part's own forward gave for it (in eval mode without grad, as evaluation runs), so a measure is
the same whether its rows were remembered or not.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from gnsp_core.row_files import Row, output_rows, read_rows, stacked_output, write_rows
from gnsp_core.weights_digest import weights_digest

log = logging.getLogger(__name__)
MAX_BYTES = 256 * 2**20
"""Bytes of rows one memo keeps in memory (the least recently used go first)."""
MAX_MEMOS = 4
"""Memos the process keeps (one per part and weights; a trunk that trains makes a new one each time)."""
MAX_FILES = 4
"""Files a folder keeps per part, the most recently used: a model whose trunk trains writes one per
version, gnsp-mini (whose trunks never train) one in all."""
KEY_BYTES = 16


class _Memo:
    def __init__(self) -> None:
        self.rows: OrderedDict[bytes, Row] = OrderedDict()
        self.bytes = 0
        self.computed = 0
        self.on_file = 0
        self.read_from: set[str] = set()
        self.output_type: type | None = None

    def lookup(self, keys: list[bytes], compute: Callable[[list[int]], list[Row]]) -> list[Row]:
        missing = list(dict.fromkeys(k for k in keys if k not in self.rows))
        if missing:
            position = {k: i for i, k in enumerate(keys)}
            with torch.no_grad():
                self.add(zip(missing, compute([position[k] for k in missing])))
            self.computed += len(missing)
        for key in keys:
            self.rows.move_to_end(key)
        found = [self.rows[k] for k in keys]
        while self.bytes > MAX_BYTES and len(self.rows) > len(keys):
            self.bytes -= _nbytes(self.rows.popitem(last=False)[1])
        return found

    def add(self, rows: Iterable[tuple[bytes, Row]]) -> None:
        for key, row in rows:
            if key not in self.rows:
                self.rows[key] = row
                self.bytes += _nbytes(row)


def _nbytes(row: Row) -> int:
    return sum(t.nbytes for t in row.values()) if isinstance(row, dict) else row.nbytes


_MEMOS: OrderedDict[tuple[str, str], _Memo] = OrderedDict()
_PATCHED: set[int] = set()
"""ids of the modules patched now: a nested block (an evaluation inside a measured one) keeps the outer patch."""


def content_keys(batch: Tensor) -> list[bytes]:
    """One digest per row of `batch` (its dtype, shape and bytes)."""
    rows = batch.detach().cpu().contiguous()
    header = f"{rows.dtype}|{tuple(rows.shape[1:])}".encode()
    return [hashlib.blake2b(header + row.numpy().tobytes(), digest_size=KEY_BYTES).digest() for row in rows]


def memo_counts() -> dict[str, int]:
    """Rows computed so far per part (every memo of the process), for tests and benchmarks."""
    counts: dict[str, int] = {}
    for (part, _digest), memo in _MEMOS.items():
        counts[part] = counts.get(part, 0) + memo.computed
    return counts


@contextmanager
def remembered_trunks(model: nn.Module, folder: str | Path | None = None) -> Iterator[None]:
    """For the block, `model`'s image trunk and Hugging Face text trunk answer inputs they saw
    before from memory (see the module's docstring); with `folder`, memos are read from and saved
    to files there (atomically)."""
    installed: list[tuple[nn.Module, str, Any, bool, str, str, _Memo]] = []
    try:
        for part, module in _parts(model):
            if id(module) in _PATCHED:
                continue
            digest = weights_digest(module)
            memo = _memo(part, digest, folder)
            had_own, previous = "forward" in module.__dict__, module.__dict__.get("forward")
            module.forward = _patched(part, module, memo)
            _PATCHED.add(id(module))
            installed.append((module, "forward", previous, had_own, part, digest, memo))
        yield
    finally:
        for module, attribute, previous, had_own, part, digest, memo in reversed(installed):
            _PATCHED.discard(id(module))
            if had_own:
                setattr(module, attribute, previous)
            else:
                delattr(module, attribute)
            if folder is not None and len(memo.rows) > memo.on_file:
                _save(_path(folder, part, digest), memo)
                memo.on_file = len(memo.rows)


def _parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    parts = []
    visual = getattr(model, "visual", None)
    if isinstance(visual, nn.Module):
        trunk = getattr(visual, "trunk", None)
        parts.append(("image-trunk", trunk) if isinstance(trunk, nn.Module) else ("image-tower", visual))
    transformer = getattr(getattr(model, "text", None), "transformer", None)
    if isinstance(transformer, nn.Module) and hasattr(transformer, "config"):
        parts.append(("text-hf-transformer", transformer))
    return parts


def _memo(part: str, digest: str, folder: str | Path | None) -> _Memo:
    memo = _MEMOS.get((part, digest))
    if memo is None:
        memo = _MEMOS[(part, digest)] = _Memo()
        while len(_MEMOS) > MAX_MEMOS:
            _MEMOS.popitem(last=False)
    _MEMOS.move_to_end((part, digest))
    if folder is not None and str(folder) not in memo.read_from:
        memo.add(_load(_path(folder, part, digest)).items())
        memo.read_from.add(str(folder))
        memo.on_file = len(memo.rows)
    return memo


def _patched(part: str, module: nn.Module, memo: _Memo) -> Callable[..., Any]:
    original = module.forward
    if part.startswith("image"):
        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            if args or kwargs or module.training or torch.is_grad_enabled():
                return original(x, *args, **kwargs)  # not evaluation: run it as it is
            compute = lambda rows: [row.clone() for row in original(x[rows])]  # noqa: E731
            return torch.stack(memo.lookup(content_keys(x), compute))

        return forward

    def text_forward(*args: Any, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                     **kwargs: Any) -> Any:
        ids = input_ids if input_ids is not None else (args[0] if args else None)
        if ids is None or attention_mask is None or module.training or torch.is_grad_enabled() or len(args) > 1:
            return original(*args, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

        def compute(rows: list[int]) -> list[dict[str, Tensor]]:
            out = original(input_ids=ids[rows], attention_mask=attention_mask[rows], **kwargs)
            memo.output_type = type(out)
            return output_rows(out)

        rows = memo.lookup(content_keys(torch.cat([ids, attention_mask], dim=1)), compute)
        if memo.output_type is None:  # every row came from a file: one row's forward names the type
            compute([0])
        return stacked_output(memo.output_type, rows)

    return text_forward


def _path(folder: str | Path, part: str, digest: str) -> Path:
    return Path(folder) / f"eval-{part}-{digest[:20]}.pt"


def _load(path: Path) -> dict[bytes, Row]:
    if path.is_file():
        path.touch()  # recently used: the last to be pruned
    keys, rows = read_rows(path, "trunk outputs")
    return {bytes(key): row for key, row in zip(keys, rows) if len(key) == KEY_BYTES}


def _save(path: Path, memo: _Memo) -> None:
    keys = list(memo.rows)
    try:
        write_rows(path, torch.tensor([list(k) for k in keys], dtype=torch.uint8), [memo.rows[k] for k in keys])
        _prune(path)
    except OSError as exc:  # a full or read-only disk costs the next process a recomputation
        log.warning("could not save trunk outputs to %s: %s", path, exc)


def _prune(written: Path) -> None:
    """Keep the MAX_FILES most recently used files of `written`'s part (the one just written among them)."""
    part = written.name.rsplit("-", 1)[0]
    files = [p for p in written.parent.glob(f"{part}-*.pt") if p != written]
    files.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in files[MAX_FILES - 1:]:
        stale.unlink(missing_ok=True)
