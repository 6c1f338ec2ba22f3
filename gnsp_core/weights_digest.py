"""One digest of a module's weights, for everything that names remembered outputs by the weights
that computed them (the training feature cache, the evaluation memo, the files of both)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

_DIGESTS: dict[tuple, str] = {}
_MAX_REMEMBERED = 64


def weights_digest(module: nn.Module) -> str:
    """The SHA-1 of a module's parameters and buffers (names and bytes), hashed again only when a
    tensor was replaced or written in place (a load_state_dict, an optimiser step): torch counts
    in-place writes in `_version`, so a frozen module is hashed once however often it is asked."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    fingerprint = tuple((name, id(t), t.data_ptr(), t._version) for name, t in tensors)
    if fingerprint not in _DIGESTS:
        digest = hashlib.sha1()
        for name, tensor in tensors:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        if len(_DIGESTS) >= _MAX_REMEMBERED:
            _DIGESTS.clear()
        _DIGESTS[fingerprint] = digest.hexdigest()
    return _DIGESTS[fingerprint]
