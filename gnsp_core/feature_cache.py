"""Outputs of the frozen parts of a model, computed once per input instead of at every step.

When a whole tower, or a prefix of it, has no trainable parameter during a task (gnsp-mini's two
pre-trained trunks under `trainable=auto`; the text tower of GNSP after task 1; any tower a
`trainable` regex leaves frozen), its output for a given input never changes: only the parts
after it need to run each step. `FeatureCache` patches the `forward` of each frozen part with a
memo for the task's duration:

- images are passed as *keys*, int64 rows `(pool, item, view)`, instead of pixels: pool `TASK`
  (the task's training images) or `REFERENCE` (the reference pairs); view `v >= 0` is the v-th
  seeded train-augmented view of the item (`config.cache_views` of them per image, so an epoch
  of data cycles through a fixed set of augmentations), `VAL_VIEW` the unaugmented one. A key's
  output is computed on its first use, from pixels rendered by `PixelSource`;
- token rows (text has no augmentation) are their own keys;
- any other input (pixels, as evaluation and the pre-trained model pass) goes through the real
  forward, so a patched model still runs everywhere.

Frozen parts run in eval mode throughout a task (`eval_untrained_modules`): a module that does
not train computes one fixed function, dropout included, so caching it is exact.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from gnsp_core.data.samples import ImageSamples
from gnsp_core.frozen_outputs import REFERENCE_POOL, FrozenOutputFiles
from gnsp_core.models.inference import image_probe, prepared_copy
from gnsp_core.row_files import output_rows, stacked_output
from gnsp_core.weights_digest import weights_digest

TASK, REFERENCE = 0, REFERENCE_POOL
VAL_VIEW = -1
_CHUNK = 64
_RENDERED_REFERENCES = 128
"""Reference images kept rendered: the memo and the pre-trained model's cache ask for the same ones in turn."""


def is_keys(x: Any) -> bool:
    """Whether `x` is a batch of image keys rather than pixels."""
    return isinstance(x, Tensor) and x.dtype == torch.long and x.ndim == 2 and x.shape[1] == 3


def image_keys(pool: int, items: Sequence[int], view: int | Sequence[int]) -> Tensor:
    """Key rows `(pool, item, view)` for `items` (one view for all, or one per item)."""
    views = [view] * len(items) if isinstance(view, int) else list(view)
    return torch.tensor([[pool, int(i), int(v)] for i, v in zip(items, views)], dtype=torch.long).reshape(-1, 3)


def _frozen(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def eval_untrained_modules(model: nn.Module) -> None:
    """Put every module with parameters, none of them trainable, in eval mode (dropout off, batch
    statistics fixed): it computes one function for the whole task, cached or not."""
    for module in model.modules():
        if module.training and _frozen(module):
            module.eval()


@dataclass
class PixelSource:
    """Renders the pixels behind image keys: seeded augmented views of task images, reference images."""

    train: ImageSamples
    train_transform: Callable
    val_transform: Callable
    reference: Dataset | None
    seed: int
    _rendered: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._raw = self.train.with_transform(None)

    def __call__(self, keys: Tensor) -> Tensor:
        return torch.stack([self._one(*row) for row in keys.tolist()])

    def _one(self, pool: int, item: int, view: int) -> Tensor:
        if pool == REFERENCE:
            return self._reference(item)
        if view == VAL_VIEW:
            return self.val_transform(self._raw[item][0])
        with torch.random.fork_rng(devices=[]):  # view v of item i is the same crop every time
            torch.manual_seed(hash((self.seed, item, view)) % 2**63)
            return self.train_transform(self._raw[item][0])

    def _reference(self, item: int) -> Tensor:
        if self.reference is None:
            raise ValueError("a reference key without reference pairs")
        if item in self._rendered:
            self._rendered.move_to_end(item)
            return self._rendered[item]
        image = self._rendered[item] = self.reference[item][0]
        if len(self._rendered) > _RENDERED_REFERENCES:
            self._rendered.popitem(last=False)
        return image


class _Memo:
    """Per-input outputs of one frozen module, with the module's own forward for what is missing."""

    def __init__(self) -> None:
        self.rows: dict[tuple, Any] = {}
        self.computed = 0
        """Inputs whose output was computed (each once, over the memo's life); the rest were hits."""
        self.output_type: type | None = None

    def lookup(self, keys: list[tuple], compute: Callable[[list[int]], list[Any]]) -> list[Any]:
        missing = list(dict.fromkeys(k for k in keys if k not in self.rows))
        position = {k: i for i, k in enumerate(keys)}
        for start in range(0, len(missing), _CHUNK):
            chunk = missing[start:start + _CHUNK]
            with torch.no_grad():
                outputs = compute([position[k] for k in chunk])
            self.rows.update(zip(chunk, outputs))
            self.computed += len(chunk)
        return [self.rows[k] for k in keys]


_SHARED: "weakref.WeakKeyDictionary[object, dict[tuple, _Memo]]" = weakref.WeakKeyDictionary()
class FeatureCache:
    """Patches the frozen parts of `model` for one task; `close()` restores them.

    With a `run` object (the reference pool a run's tasks share), outputs of reference images and
    of token rows are kept for as long as that object lives and reused by later tasks whose frozen
    part has the very same weights; task images are per task."""

    def __init__(self, model: nn.Module, pixels: PixelSource, device: torch.device, run: object | None = None,
                 files: FrozenOutputFiles | None = None) -> None:
        self.pixels, self.device, self.run = pixels, device, run
        self.files = files if run is not None else None
        """Where the reference rows of the _FILE_BACKED memos are read from and saved to (frozen_outputs.py)."""
        self._saved: dict[str, int] = {}
        """Per memo backed by `files`: the rows on file."""
        self._digests: dict[str, str] = {}
        """Weight digests of the patched parts, by memo name (hashed once per task)."""
        self._restore: list[Callable[[], None]] = []
        self._installed: list[tuple[nn.Module, str, Callable]] = []
        self._parts: list[tuple[str, str, nn.Module, Callable]] = []
        """(memo name, path of the patched module in the model, the module, its patched attribute)."""
        self._hidden: set[int] = set()
        """ids of the parameters inside a patched part: their modules do not run on cached inputs."""
        self.memos: dict[str, _Memo] = {}
        self._computed_before: dict[str, int] = {}
        self.computed: dict[str, int] = {}
        """Per frozen part, the inputs this task computed (filled by `close`)."""
        image_part = _frozen_image_part(model)
        if image_part is not None:
            self._patch_images(*image_part, image_size=_image_size(model))
            self._hidden.update(id(p) for p in image_part[1].parameters())
            self._parts.append((f"image:{image_part[0]}", _PATHS[image_part[0]], image_part[1], "forward"))
        text_part = _frozen_text_part(model)
        if text_part is not None:
            self._patch_text(*text_part)
            self._hidden.update(id(p) for p in _text_part_parameters(model, *text_part))
            name, module, attribute = text_part
            if name != "clip-text":  # that part is the whole model's encode_text: nothing to lend
                self._parts.append((f"text:{name}", _PATHS[name], module, attribute))

    @property
    def caches_images(self) -> bool:
        return any(name.startswith("image:") for name in self.memos)

    def hides(self, parameter: nn.Parameter) -> bool:
        """Whether `parameter` sits in a patched part (its module does not run on cached inputs)."""
        return id(parameter) in self._hidden

    @contextmanager
    def lent_to(self, other: nn.Module) -> Iterator[set[str]]:
        """For the block, run each part of `other` that is the very function of one of this cache's
        frozen parts (same place in the model, same weights) through this cache's memo: the frozen
        pre-trained model that distillation reads shares its trunks with the model being trained
        (gnsp-mini), and each reference pair is then encoded by them once, not twice. Yields the
        lent memo names ("image:..." among them means `other` takes this cache's image keys)."""
        lent: set[str] = set()
        restore: list[Callable[[], None]] = []
        try:
            for name, path, module, attribute in self._parts:
                theirs = _module_at(other, path)
                if theirs is None or theirs is module or not self._same_weights(name, module, theirs):
                    continue
                had_own, previous = attribute in theirs.__dict__, theirs.__dict__.get(attribute)
                setattr(theirs, attribute, getattr(module, attribute))
                restore.append(lambda m=theirs, a=attribute, h=had_own, p=previous:
                               setattr(m, a, p) if h else delattr(m, a))
                lent.add(name)
            yield lent
        finally:
            for undo in reversed(restore):
                undo()

    def _same_weights(self, name: str, ours: nn.Module, theirs: nn.Module) -> bool:
        """Whether two parts hold the same weights (both frozen for the task, so each is hashed once)."""
        return weights_digest(theirs) == self._digest(name, ours)

    def _digest(self, name: str, module: nn.Module) -> str:
        if name not in self._digests:
            self._digests[name] = weights_digest(module)
        return self._digests[name]

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """The real forwards for the block (every module runs, e.g. for hooks that must see inside a
        frozen part; inputs must be pixels, not keys); the memos are kept for afterwards."""
        for restore in reversed(self._restore):
            restore()
        try:
            yield
        finally:
            for module, attribute, replacement in self._installed:
                setattr(module, attribute, replacement)

    def close(self) -> None:
        self.computed = {name: memo.computed - self._computed_before[name] for name, memo in self.memos.items()}
        for name, on_file in self._saved.items():
            rows = self.memos[name].rows
            worth = sum(k[0] == REFERENCE for k in rows) if name.startswith("image:") else len(rows)
            if self.files is not None and worth > on_file:
                self.files.save(name, self._digests[name], rows)
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()
        self._installed.clear()

    def _memo(self, name: str, module: nn.Module) -> _Memo:
        if self.run is None:
            memo = _Memo()
        else:
            memos = _SHARED.setdefault(self.run, {})
            digest = self._digest(name, module)
            memo = memos.setdefault((name, digest, str(self.device)), _Memo())
            if name.startswith("image:"):  # keys (pool, item, view): the previous task's images go
                for key in [k for k in memo.rows if k[0] == TASK]:
                    del memo.rows[key]
            if self.files is not None and name in _FILE_BACKED:
                self._read_saved(name, digest, memo)
        self.memos[name] = memo
        self._computed_before[name] = memo.computed
        return memo

    def _read_saved(self, name: str, digest: str, memo: _Memo) -> None:
        saved = self.files.load(name, digest)
        for key, row in saved.items():
            memo.rows.setdefault(key, {k: v.to(self.device) for k, v in row.items()} if isinstance(row, dict)
                                 else row.to(self.device))
        self._saved[name] = len(saved)

    # --- images -----------------------------------------------------------------------------------

    def _patch_images(self, name: str, module: nn.Module, image_size: int | None) -> None:
        original = module.forward
        memo = self._memo(f"image:{name}", module)
        # Missing outputs are computed by a copy prepared for inference (batch norms folded,
        # channels-last) when the part has one: the same function, about half the time on gnsp-mini.
        fast = None if image_size is None else prepared_copy(module, image_probe(image_size, self.device))

        def outputs(pixels: Tensor) -> list[Tensor]:
            if fast is None:
                return list(original(pixels))
            return list(fast(pixels.contiguous(memory_format=torch.channels_last)))

        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            if not is_keys(x):
                return original(x, *args, **kwargs)
            keys = [tuple(row) for row in x.tolist()]
            compute = lambda rows: outputs(self.pixels(x[rows]).to(self.device))  # noqa: E731
            return torch.stack(memo.lookup(keys, compute))

        self._install(module, "forward", forward)

    # --- text ---------------------------------------------------------------------------------------

    def _patch_text(self, name: str, module: nn.Module, attribute: str) -> None:
        original = getattr(module, attribute)
        memo = self._memo(f"text:{name}", module)
        if name == "hf-transformer":
            def forward(*args: Any, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                        **kwargs: Any) -> Any:
                ids = input_ids if input_ids is not None else args[0]

                def compute(rows: list[int]) -> list[dict[str, Tensor]]:
                    out = original(input_ids=ids[rows], attention_mask=attention_mask[rows], **kwargs)
                    memo.output_type = type(out)
                    return output_rows(out)

                rows = memo.lookup([tuple(r) for r in ids.tolist()], compute)
                if memo.output_type is None:  # every row came from a file: one row's forward names the type
                    with torch.no_grad():
                        compute([0])
                return stacked_output(memo.output_type, rows)
        else:
            def forward(text: Tensor, *args: Any, **kwargs: Any) -> Tensor:
                flags = tuple(sorted(kwargs.items())) + args
                keys = [(tuple(r), flags) for r in text.tolist()]
                return torch.stack(memo.lookup(keys, lambda rows: list(original(text[rows], *args, **kwargs))))

        self._install(module, attribute, forward)

    def _install(self, module: nn.Module, attribute: str, replacement: Callable) -> None:
        had_own = attribute in module.__dict__
        previous = module.__dict__.get(attribute)
        setattr(module, attribute, replacement)
        self._installed.append((module, attribute, replacement))

        def restore() -> None:
            if had_own:
                setattr(module, attribute, previous)
            else:
                delattr(module, attribute)

        self._restore.append(restore)


_FILE_BACKED = {"image:visual", "image:trunk", "text:hf-transformer"}
"""Memos whose reference rows are kept on file between processes (gnsp_core.frozen_outputs): the
image parts, and a Hugging Face text trunk (its rows are keyed by token ids alone)."""

_PATHS = {"visual": "visual", "trunk": "visual.trunk", "text": "text", "hf-transformer": "text.transformer"}
"""Where each kind of frozen part sits in an open_clip model."""


def _module_at(model: nn.Module, path: str) -> nn.Module | None:
    module: Any = model
    for attribute in path.split("."):
        module = getattr(module, attribute, None)
    return module if isinstance(module, nn.Module) else None


def _image_size(model: nn.Module) -> int | None:
    size = getattr(getattr(model, "visual", None), "image_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0] if len(set(size)) == 1 else None
    return int(size) if isinstance(size, int) else None


def _frozen_image_part(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The frozen part of the image tower that is memoised: a timm tower's trunk when it is frozen
    (even when its small head is too: the trunk's rows are the ones that other tasks, the frozen
    pre-trained model and later processes share), else the whole tower when it is frozen."""
    visual = getattr(model, "visual", None)
    if visual is None:
        return None
    trunk = getattr(visual, "trunk", None)
    if isinstance(trunk, nn.Module) and _frozen(trunk):
        return "trunk", trunk
    if _frozen(visual):
        return "visual", visual
    return None


def _frozen_text_part(model: nn.Module) -> tuple[str, nn.Module, str] | None:
    """(name, owner, attribute) of the frozen part of the text tower that is memoised: a Hugging
    Face trunk when it is frozen (as for images: its rows are the shared ones), else the whole tower."""
    text = getattr(model, "text", None)
    if isinstance(text, nn.Module):  # open_clip CustomTextCLIP: the tower is a module of its own
        transformer = getattr(text, "transformer", None)
        if isinstance(transformer, nn.Module) and hasattr(transformer, "config") and _frozen(transformer):
            return "hf-transformer", transformer, "forward"
        if _frozen(text):
            return "text", text, "forward"
        return None
    parts = [getattr(model, n, None) for n in ("token_embedding", "transformer", "ln_final")]
    projection = getattr(model, "text_projection", None)
    if all(isinstance(p, nn.Module) for p in parts) and all(_frozen(p) for p in parts) and not (
            isinstance(projection, nn.Parameter) and projection.requires_grad) and not (
            isinstance(getattr(model, "positional_embedding", None), nn.Parameter)
            and model.positional_embedding.requires_grad):
        return "clip-text", model, "encode_text"  # open_clip CLIP: the tower's modules sit on the model
    return None


def _text_part_parameters(model: nn.Module, name: str, owner: nn.Module, _attribute: str) -> list[nn.Parameter]:
    """The parameters a patched text part skips: the owner's, or for open_clip's CLIP (whose text
    modules sit on the model) every parameter outside the image tower."""
    if name != "clip-text":
        return list(owner.parameters())
    visual = {id(p) for p in getattr(model, "visual", nn.Module()).parameters()}
    return [p for p in model.parameters() if id(p) not in visual]
