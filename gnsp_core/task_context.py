"""What a method sees while it learns one task, and what the training loop reports.

Kept apart from the loop (`trainer.py`) so each method module can name its context without
depending on the loop that drives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gnsp_core.config import TrainConfig
from gnsp_core.data.samples import Task
from gnsp_core.feature_cache import REFERENCE, TASK, VAL_VIEW, FeatureCache, image_keys, is_keys
from gnsp_core.models.spec import LoadedModel
from gnsp_core.pretrained_cache import PretrainedFeatures
from gnsp_core.state import ContinualState

AllReduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Distributed:
    """How this process takes part in a multi-worker run (defaults: a single process)."""

    rank: int = 0
    world_size: int = 1
    all_reduce: AllReduce | None = None
    """Sums a tensor over workers in place and returns it."""
    wrap_model: Callable[[nn.Module], nn.Module] | None = None
    """E.g. DistributedDataParallel; gradients of the wrapped forward are averaged across workers."""

    def rank0_decides(self, decision: bool, device: torch.device) -> bool:
        """Rank 0's `decision` on every worker (one all-reduce of a vote only rank 0 casts), so that
        all take the same branch: a worker leaving the loop alone would leave the others waiting in
        their next collective. Every worker must call it at the same points."""
        if self.all_reduce is None or self.world_size == 1:
            return decision
        vote = torch.tensor([1.0 if decision and self.rank == 0 else 0.0], device=device)
        return bool(self.all_reduce(vote).item() > 0)



@dataclass
class Progress:
    task: str
    phase: str
    step: int
    total: int
    loss: float | None = None
    terms: dict[str, float] = field(default_factory=dict)
    samples_per_s: float = 0.0
    eta_s: float | None = None

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / max(1, self.total))


ProgressFn = Callable[[Progress], None]


@dataclass
class TaskContext:
    """What a method sees while it learns one task."""

    model: nn.Module
    forward: nn.Module
    tokenizer: Callable
    task: Task
    config: TrainConfig
    state: ContinualState
    device: torch.device
    loaded: LoadedModel
    reference: "ReferenceStream | None"
    distributed: Distributed
    task_index: int
    pretrained: PretrainedFeatures
    feature_cache: FeatureCache | None = None
    """Set by the trainer after `begin_task`, once it is known which parts of the model train."""

    def base_model(self) -> nn.Module:
        """The frozen pre-trained model (rebuilt from the spec once per run, on first use)."""
        return self.pretrained.model()

    def encode(self, images: list[torch.Tensor], texts: list[torch.Tensor]) -> tuple[list, list]:
        """One forward (through the DDP wrapper) for several image and text groups; normalised features."""
        img = torch.cat(images)
        txt = torch.cat(texts)
        out = self.forward(img, txt)
        img_f, txt_f = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
        img_f = nn.functional.normalize(img_f.float(), dim=-1)
        txt_f = nn.functional.normalize(txt_f.float(), dim=-1)
        return list(img_f.split([len(i) for i in images])), list(txt_f.split([len(t) for t in texts]))

    def tokens(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.device)

    @property
    def caches_images(self) -> bool:
        """Whether the image tower's frozen part is cached this task: images are passed as keys."""
        return self.feature_cache is not None and self.feature_cache.caches_images

    def task_images(self, indices: Sequence[int], view: int) -> torch.Tensor:
        """Training images `indices` as the model takes them: cache keys while the image tower's
        frozen part is cached, else pixels (`VAL_VIEW` unaugmented, any other view augmented)."""
        if self.caches_images:
            return image_keys(TASK, indices, view).to(self.device)
        transform = self.loaded.preprocess_val if view == VAL_VIEW else self.loaded.preprocess_train
        samples = self.task.train.with_transform(transform)
        return torch.stack([samples[i][0] for i in indices]).to(self.device)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels of `images` (keys are rendered; pixels pass through), for models without the cache."""
        if is_keys(images):
            return self.feature_cache.pixels(images).to(self.device)
        return images


class ReferenceStream:
    """An endless, seeded stream of reference (image, caption, index) batches; no augmentation.

    The index lets methods cache the frozen pre-trained model's features of each pair: the pool
    is fixed and unaugmented, so those features never change. With `as_keys` the images are
    cache keys and no pixels are loaded (the feature cache renders the ones it has not seen).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, device: torch.device) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.dataset, self.device, self.as_keys = dataset, device, False
        self.loader = DataLoader(range(len(dataset)), batch_size=batch_size, shuffle=True,
                                 drop_last=len(dataset) > batch_size, generator=gen)
        self._iter: Iterator | None = None

    def next(self) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        if self._iter is None:
            self._iter = iter(self.loader)
        try:
            index = next(self._iter)
        except StopIteration:
            self._iter = iter(self.loader)
            index = next(self._iter)
        if self.as_keys:
            return image_keys(REFERENCE, index.tolist(), VAL_VIEW).to(self.device), self._captions(index), index
        pairs = [self.dataset[i] for i in index.tolist()]
        return torch.stack([image for image, _ in pairs]).to(self.device), [c for _, c in pairs], index

    def _captions(self, index: torch.Tensor) -> list[str]:
        captions = getattr(self.dataset, "captions", None)
        if captions is not None:
            return [captions[i] for i in index.tolist()]
        return [self.dataset[i][1] for i in index.tolist()]
