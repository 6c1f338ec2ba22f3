"""Readers for the raw array formats that datasets ship in: IDX (MNIST family) and numpy pickles.

Pickles are read with an unpickler that only rebuilds plain containers and numpy arrays, so a
tampered dataset file cannot run code when it is loaded.
"""

from __future__ import annotations

import codecs
import gzip
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from gnsp_core.errors import DatasetError

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles from Python 3 store bytes
}


def _open_maybe_gzip(path: Path) -> io.BufferedIOBase:
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format of MNIST and Fashion-MNIST."""
    path = Path(path)
    try:
        with _open_maybe_gzip(path) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read IDX file {path}: {e}") from e
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic number); re-download it")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)) * dtype.itemsize:
        raise DatasetError(f"{path} is truncated: its header declares shape {tuple(dims)}")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file") from None


def load_array_pickle(path: str | Path) -> Any:
    """Unpickle a (optionally gzipped) file holding only dicts, lists, bytes and numpy arrays.

    Python 2 era pickles (CIFAR) are read with latin1 so their byte strings survive.
    """
    path = Path(path)
    try:
        with _open_maybe_gzip(path) as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise DatasetError(f"cannot read pickled arrays from {path}: {e}") from e
