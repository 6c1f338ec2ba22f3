"""What a method sees while it learns one task, and what the training loop reports.

Kept apart from the loop (`trainer.py`) so each method module can name its context without
depending on the loop that drives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gnsp_core.config import TrainConfig
from gnsp_core.data.samples import Task
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


class _Indexed(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, caption = self.dataset[index]
        return image, caption, index


class ReferenceStream:
    """An endless, seeded stream of reference (image, caption, index) batches; no augmentation.

    The index lets methods cache the frozen pre-trained model's features of each pair: the pool
    is fixed and unaugmented, so those features never change.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, device: torch.device) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.loader = DataLoader(_Indexed(dataset), batch_size=batch_size, shuffle=True,
                                 drop_last=len(dataset) > batch_size, generator=gen, collate_fn=_collate_pairs)
        self.device = device
        self._iter: Iterator | None = None

    def next(self) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        if self._iter is None:
            self._iter = iter(self.loader)
        try:
            images, captions, index = next(self._iter)
        except StopIteration:
            self._iter = iter(self.loader)
            images, captions, index = next(self._iter)
        return images.to(self.device), captions, index


def _collate_pairs(batch: list) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch], torch.tensor([b[2] for b in batch])
