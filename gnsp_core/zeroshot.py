"""Prompt templates, zero-shot text heads and predictions.

A zero-shot head is one text embedding per class: the mean over prompt templates of the
normalised text embeddings of `template.format(classname)`, renormalised. Logits are
`logit_scale · f(x) · headᵀ` with f(x) the normalised image embedding (CLIP's own recipe).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from gnsp_core.data.samples import DEFAULT_TEMPLATES
from gnsp_core.errors import DatasetError
from gnsp_core.methods.mgclip_head import combine_mgclip

# The ensemble for labels that bring no templates of their own (free-text classify, held-out
# photos): "a photo of a {}." and CLIP's 7 selected ImageNet templates. A task carries its own
# (`Task.templates`, which defaults to these).
TEMPLATES: list[str] = list(DEFAULT_TEMPLATES)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the block, restoring the model's previous mode after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def build_text_head(
    model: nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    device: str | torch.device | None = None,
    batch_size: int = 256,
    normalize: bool = True,
) -> Tensor:
    """Zero-shot head [C, D]: per class, mean over templates of normalised text embeddings.

    head_c = normalise( (1/K) Σ_k normalise(g(template_k(c))) ), computed without grad in eval
    mode, `batch_size` classes at a time. With `normalize=False` raw embeddings are averaged and
    the mean is not renormalised.
    """
    if not classnames or not templates:
        raise ValueError("build_text_head needs at least one class name and one template")
    device = torch.device(device) if device is not None else model_device(model)
    rows = []
    with _inference(model):
        for start in range(0, len(classnames), batch_size):
            chunk = classnames[start : start + batch_size]
            texts = [t.format(c) for c in chunk for t in templates]
            emb = model.encode_text(tokenizer(texts).to(device)).float()
            emb = emb.view(len(chunk), len(templates), -1)
            if normalize:
                emb = F.normalize(emb, dim=-1)
            mean = emb.mean(dim=1)
            rows.append(F.normalize(mean, dim=-1) if normalize else mean)
    return torch.cat(rows)


class TextHeadCache:
    """Bounded LRU of zero-shot heads keyed by (model version key, class names, templates).

    Text heads cost one text-tower pass per class and template; a served model version answers
    many requests with the same labels. Bounded by count and, with `max_rows`, by the class rows
    held in all (a head of 1,000 labels costs 1,000 times one of a single label). Thread-safe; a
    head is built outside the lock.
    """

    def __init__(self, maxsize: int = 64, max_rows: int | None = None) -> None:
        self.maxsize = maxsize
        self.max_rows = max_rows
        self._heads: OrderedDict[tuple, Tensor] = OrderedDict()
        self._rows = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._heads)

    def get(
        self,
        model: nn.Module,
        tokenizer: Callable,
        classnames: Sequence[str],
        templates: Sequence[str],
        key: Hashable,
    ) -> Tensor:
        """The cached head for this model version and label set, building it on a miss."""
        cache_key = (key, tuple(classnames), tuple(templates))
        with self._lock:
            if cache_key in self._heads:
                self._heads.move_to_end(cache_key)
                return self._heads[cache_key]
        head = build_text_head(model, tokenizer, classnames, templates)
        with self._lock:
            if cache_key not in self._heads:
                self._rows += len(head)
            self._heads[cache_key] = head
            self._heads.move_to_end(cache_key)
            while len(self._heads) > 1 and (len(self._heads) > self.maxsize or self._over_rows()):
                self._rows -= len(self._heads.popitem(last=False)[1])
        return head

    def lookup(self, key: Hashable, classnames: Sequence[str], templates: Sequence[str]) -> Tensor | None:
        """The cached head, or None (without building it): lets a caller send only misses to a
        bounded builder while hits answer at once."""
        cache_key = (key, tuple(classnames), tuple(templates))
        with self._lock:
            if cache_key in self._heads:
                self._heads.move_to_end(cache_key)
                return self._heads[cache_key]
        return None

    def _over_rows(self) -> bool:
        return self.max_rows is not None and self._rows > self.max_rows

    def clear(self) -> None:
        with self._lock:
            self._heads.clear()
            self._rows = 0


def _image_features(model: nn.Module, images: Tensor) -> Tensor:
    return F.normalize(model.encode_image(images).float(), dim=-1)


def predict(model: nn.Module, images: Tensor, head: Tensor, logit_scale: float = 100.0) -> Tensor:
    """Class probabilities [N, C] = softmax(logit_scale · f(x) · headᵀ), in eval mode without grad."""
    device = model_device(model)
    with _inference(model):
        features = _image_features(model, images.to(device))
        return (logit_scale * features @ head.to(device).T).softmax(dim=-1)


def evaluate_accuracy(
    model: nn.Module,
    dataset: Dataset,
    head: Tensor,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    compensation: Callable[[Tensor], Tensor] | None = None,
    compensation_weight: float = 4.0,
    logit_scale: float = 100.0,
) -> float:
    """Top-1 accuracy in percent of the zero-shot head on `(image, label)` pairs.

    The label space is the head's classes only (MTIL: the task identity is known). With
    `compensation` (a callable from normalised image features to class probabilities, e.g. an
    MG-CLIP `CosineCompensationHead.probs`), predictions use
    `combine_mgclip(text_probs, compensation(features), compensation_weight)`.
    `device` defaults to the model's device; the model must already be there.
    """
    device = torch.device(device) if device is not None else model_device(model)
    head = head.to(device)
    correct = total = 0
    with _inference(model):
        for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            features = _image_features(model, images.to(device))
            probs = (logit_scale * features @ head.T).softmax(dim=-1)
            if compensation is not None:
                probs = combine_mgclip(probs, compensation(features), compensation_weight)
            correct += (probs.argmax(dim=-1).cpu() == torch.as_tensor(labels)).sum().item()
            total += len(images)
    if total == 0:
        raise DatasetError("cannot evaluate accuracy on an empty dataset")
    return 100.0 * correct / total
