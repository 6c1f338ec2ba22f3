"""Learn one task in one process: the loop every method shares.

`learn_task` takes the continual state of version N and returns version N+1. Ray Train calls the
same function in each worker, passing a `Distributed` (rank, all-reduce, model wrapper) and a
checkpoint callback; nothing here knows about Ray.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from gnsp_core.config import TrainConfig
from gnsp_core.data.samples import ImageSamples, Task
from gnsp_core.errors import DatasetError
from gnsp_core.feature_cache import (REFERENCE, TASK, VAL_VIEW, FeatureCache, PixelSource, eval_untrained_modules,
                                     image_keys)
from gnsp_core.frozen_outputs import FrozenOutputFiles
from gnsp_core.methods.registry import build_method
from gnsp_core.models.loading import resolve_device
from gnsp_core.models.spec import LoadedModel, mark_trainable
from gnsp_core.pretrained_cache import pretrained_features
from gnsp_core.state import ContinualState, TaskRecord
from gnsp_core.task_context import Distributed, Progress, ProgressFn, ReferenceStream, TaskContext


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor


class _TaskKeys(Dataset):
    """(cache key of view `view`, label) per training image: the loader's items under the feature cache."""

    def __init__(self, labels: list[int], view: int) -> None:
        self.labels, self.view = labels, view

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([TASK, index, self.view]), self.labels[index]


def _task_loader(ctx: TaskContext, epoch: int) -> DataLoader:
    """One epoch, in an order that depends only on the seed and the epoch (keys or pixels alike)."""
    task, cfg, dist = ctx.task, ctx.config, ctx.distributed
    if ctx.caches_images:
        dataset, workers = _TaskKeys(task.train.labels, epoch % cfg.cache_views), 0
    else:
        dataset, workers = task.train.with_transform(ctx.loaded.preprocess_train), cfg.num_workers
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    if dist.world_size > 1:
        sampler = DistributedSampler(dataset, dist.world_size, dist.rank, shuffle=True, seed=cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
        # Every rank gets len(sampler) items, so ranks agree on the number of batches either way.
        return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                          drop_last=len(sampler) > cfg.batch_size)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                      num_workers=workers, drop_last=len(dataset) > cfg.batch_size)


def _batches(ctx: TaskContext) -> Iterator:
    epoch = 0
    while True:
        loader = _task_loader(ctx, epoch)
        if len(loader) == 0:  # an empty epoch would spin here forever
            raise DatasetError(f"task {ctx.task.name!r} has {len(ctx.task.train)} training images, "
                               f"too few for {ctx.distributed.world_size} workers")
        yield from loader
        epoch += 1


def learn_task(
    state: ContinualState,
    loaded: LoadedModel,
    task: Task,
    config: TrainConfig,
    *,
    reference: Dataset | None = None,
    progress: ProgressFn | None = None,
    distributed: Distributed | None = None,
    resume: dict[str, Any] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_every: int = 0,
    frozen_outputs: str | Path | None = None,
) -> ContinualState:
    """Learn `task` starting from `state`; return the next state (weights, statistics, history).

    `frozen_outputs`: a folder where the frozen parts' outputs for the reference pairs are
    kept between processes (gnsp_core.frozen_outputs), e.g. node-local scratch of a service."""
    config.validate()
    dist = distributed or Distributed()
    device = resolve_device(config.device)
    seed_everything(config.seed + 7919 * len(state.history) + dist.rank)
    model = loaded.model.to(device)
    model.load_state_dict(state.weights)
    model.train()
    ref = None
    if reference is not None:
        ref = ReferenceStream(reference.with_transform(loaded.preprocess_val), config.ref_batch_size,
                              config.seed + dist.rank, device)
    ctx = TaskContext(model, model, loaded.tokenizer, task, config, state, device, loaded, ref, dist,
                      len(state.history), pretrained_features(state.spec, device, reference))
    method = build_method(ctx)
    method.begin_task()
    eval_untrained_modules(model)
    params = method.trainable_parameters()
    ctx.forward = dist.wrap_model(model) if dist.wrap_model else model
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total = method.total_steps()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, total))
    start = 0
    if resume is not None:
        start = _restore(resume, model, optimizer, scheduler, method)
    _open_feature_cache(ctx, reference, frozen_outputs)
    try:
        step = _train_loop(ctx, method, optimizer, scheduler, start, total, progress, on_checkpoint, checkpoint_every)
        method.end_task()
    finally:
        if ctx.feature_cache is not None:
            ctx.feature_cache.close()
    record = TaskRecord(task.name, list(task.classnames), config.method, step)
    return ContinualState(
        spec=state.spec,
        weights={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
        stats=method.statistics(),
        extras=method.extras(),
        history=[*state.history, record],
        config=config.to_dict(),
    )


@torch.no_grad()
def prime_frozen_outputs(loaded: LoadedModel, config: TrainConfig, reference: Dataset, folder: str | Path,
                         batch_size: int = 64) -> dict[str, int]:
    """Save in `folder` the frozen parts' outputs for every reference pair, as a task of `config`
    on this model would compute them on first use (gnsp_core.frozen_outputs), so that no job on
    this node pays for them. Returns the rows computed per part (0s when the files were there).

    The parts that `config.trainable` leaves frozen are patched for the call only; the model's
    weights, modes and trainable flags are as they were after it."""
    model = loaded.model
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {module: module.training for module in model.modules()}
    mark_trainable(model, config.trainable, loaded.spec.name)
    dataset = reference.with_transform(loaded.preprocess_val)
    pixels = PixelSource(ImageSamples([], []), loaded.preprocess_train, loaded.preprocess_val, dataset, config.seed)
    device = next(model.parameters()).device
    cache = FeatureCache(model, pixels, device, run=reference,
                         files=FrozenOutputFiles(folder, dataset, loaded.preprocess_val))
    try:
        eval_untrained_modules(model)
        captions = getattr(dataset, "captions", None) or [dataset[i][1] for i in range(len(dataset))]
        for start in range(0, len(dataset), batch_size):
            items = list(range(start, min(start + batch_size, len(dataset))))
            if cache.caches_images:
                model.encode_image(image_keys(REFERENCE, items, VAL_VIEW).to(device))
            model.encode_text(loaded.tokenizer([captions[i] for i in items]).to(device))
    finally:
        cache.close()
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(flags[name])
        for module, training in modes.items():
            module.training = training
    return dict(cache.computed)


def _open_feature_cache(ctx: TaskContext, reference: Dataset | None, folder: str | Path | None) -> None:
    """Cache the outputs of what does not train this task (known only after `begin_task`)."""
    if ctx.config.cache_views < 1:
        return
    pixels = PixelSource(ctx.task.train, ctx.loaded.preprocess_train, ctx.loaded.preprocess_val,
                         None if ctx.reference is None else ctx.reference.dataset,
                         ctx.config.seed + 7919 * ctx.task_index)
    files = None
    if folder is not None and ctx.reference is not None:
        files = FrozenOutputFiles(folder, ctx.reference.dataset, ctx.loaded.preprocess_val,
                                  writable=ctx.distributed.rank == 0)
    ctx.feature_cache = FeatureCache(ctx.model, pixels, ctx.device, run=reference, files=files)
    if ctx.reference is not None:
        ctx.reference.as_keys = ctx.caches_images


def _train_loop(ctx, method, optimizer, scheduler, start, total, progress, on_checkpoint, every) -> int:
    cfg, device = ctx.config, ctx.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.amp)
    batches = _batches(ctx)
    for _ in range(start):  # keep the data order of an uninterrupted run
        next(batches)
    t0, step = time.perf_counter(), start
    while step < total:
        images, labels = next(batches)
        with autocast:
            terms = method.loss(images.to(device), labels.to(device))
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.after_backward()
        method.before_step()
        optimizer.step()
        method.after_step(step)
        scheduler.step()
        step += 1
        if progress is not None:
            rate = (step - start) * len(images) * ctx.distributed.world_size / (time.perf_counter() - t0)
            eta = (total - step) * (time.perf_counter() - t0) / (step - start)
            progress(Progress(ctx.task.name, "train", step, total, float(loss.detach()),
                              {k: float(v.detach()) for k, v in terms.items()}, rate, eta))
        if on_checkpoint is not None and every and (step % every == 0 or step == total):
            on_checkpoint(_checkpoint(ctx.model, optimizer, scheduler, method, step))
        if method.stop_early(step):
            break
    return step


def _checkpoint(model, optimizer, scheduler, method, step: int) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "method": method.checkpoint_state(), "step": step}


def _restore(ckpt: dict[str, Any], model, optimizer, scheduler, method) -> int:
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    method.load_checkpoint_state(ckpt.get("method", {}))
    return int(ckpt["step"])
