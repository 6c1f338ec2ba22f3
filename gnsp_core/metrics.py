"""Continual-learning metrics: MTIL accuracy-matrix summaries, modality gap, retrieval recall.

Names differ between libraries (Avalanche, Mammoth, continuum), so every summary here has its
formula in `METRIC_FORMULAS`: print it beside the number, and always keep the full matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from statistics import fmean

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from gnsp_core.errors import DatasetError

# Datasets are 1-based as in METHODS.md: A[i][j] = accuracy on dataset j after task i, row 0 =
# zero-shot. Columns 1..T are the tasks, T+1..T+E the held-out eval sets (never trained on).
METRIC_FORMULAS: dict[str, str] = {
    "transfer": "mean_{j=2..T} mean_{i=1..j-1} A[i][j]  (task columns only)",
    "avg": "mean_{i=1..T, j=1..T+E} A[i][j]  (all columns: tasks and held-out eval sets)",
    "last": "mean_{j=1..T+E} A[T][j]  (all columns)",
    "bwt": "mean_{j=1..T-1} (A[T][j] - A[j][j])",
    "fwt": "mean_{j=2..T} (A[j-1][j] - A[0][j])",
}


def _check_matrix(acc: Sequence[Sequence[float]], num_tasks: int) -> list[list[float]]:
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    if len(acc) != num_tasks + 1:
        raise ValueError(f"accuracy matrix needs {num_tasks + 1} rows (zero-shot + one per task), got {len(acc)}")
    width = len(acc[0])
    if width < num_tasks or any(len(row) != width for row in acc):
        raise ValueError(f"every row needs the same number of columns, at least {num_tasks}")
    return [[float(x) for x in row] for row in acc]


def _mean_or_none(values: list[float]) -> float | None:
    return fmean(values) if values else None


def mtil_metrics(acc: Sequence[Sequence[float]], num_tasks: int) -> dict[str, float | None]:
    """Transfer, Avg, Last (MTIL, ZSCL ICCV 2023), GEM-style BWT and zero-shot-baseline FWT.

    `acc` has T+1 rows (row 0 before any training, row i after task i) and T+E columns (the T
    tasks in training order, then E held-out eval sets). With A[i][j] for dataset j (1-based):

    - transfer = mean_{j=2..T} mean_{i=1..j-1} A[i][j]: zero-shot ability on tasks not learned yet;
    - avg = mean of A[i][j] over rows 1..T and *all* columns, tasks and held-out sets alike
      (METHODS.md: "all j"; with E = 0 this is exactly ZSCL's Avg);
    - last = mean of row T over all columns;
    - bwt = mean_{j=1..T-1} (A[T][j] - A[j][j]);
    - fwt = mean_{j=2..T} (A[j-1][j] - A[0][j]).

    Transfer, BWT and FWT are None when T = 1 (no pair of tasks to compare).
    """
    a = _check_matrix(acc, num_tasks)
    t = num_tasks
    # dataset j (1-based, as in the formulas) is column j - 1
    return {
        "transfer": _mean_or_none([fmean(a[i][j - 1] for i in range(1, j)) for j in range(2, t + 1)]),
        "avg": fmean(x for row in a[1:] for x in row),
        "last": fmean(a[t]),
        "bwt": _mean_or_none([a[t][j - 1] - a[j][j - 1] for j in range(1, t)]),
        "fwt": _mean_or_none([a[j - 1][j - 1] - a[0][j - 1] for j in range(2, t + 1)]),
    }


def gap_vector(image_features: Tensor, text_features: Tensor) -> Tensor:
    """Δ = mean of normalised image embeddings − mean of normalised text embeddings (differentiable)."""
    return F.normalize(image_features, dim=-1).mean(dim=0) - F.normalize(text_features, dim=-1).mean(dim=0)


def modality_gap(
    image_features: Tensor, text_features: Tensor, reference_gap: Tensor | None = None
) -> dict[str, float | Tensor | None]:
    """The modality gap (Liang et al., 2022) over matched pairs (or images and their class prompts).

    Returns `norm` = ‖Δ‖, `cosine` = cos(Δ, reference_gap) (None without a reference, e.g. the
    pre-trained model's Δ) and `gap` = Δ itself, detached, to serve as a later reference.
    """
    gap = gap_vector(image_features.detach().float(), text_features.detach().float())
    cosine = None
    if reference_gap is not None:
        cosine = F.cosine_similarity(gap, reference_gap.to(gap), dim=0).item()
    return {"norm": gap.norm().item(), "cosine": cosine, "gap": gap}


def same_caption_matrix(captions: Sequence[str] | Tensor) -> Tensor:
    """Boolean [N, N]: entry (i, j) is true when pairs i and j have the same caption (or caption id)."""
    if isinstance(captions, Tensor):
        ids = captions.flatten()
    else:
        index: dict[str, int] = {}
        ids = torch.tensor([index.setdefault(c, len(index)) for c in captions])
    return ids[:, None] == ids[None, :]


def retrieval_recall(
    image_features: Tensor,
    text_features: Tensor,
    ks: Sequence[int] = (1, 5),
    captions: Sequence[str] | None = None,
) -> dict[str, float]:
    """Image→text and text→image Recall@k in percent for matched pairs (pair i matches i).

    R@k = share of queries with a correct item among the k most cosine-similar. With `captions`,
    any pair whose caption is identical to the query pair's also counts as correct (datasets such
    as "a photo of a {class}" repeat captions). k larger than the set is clamped to its size.
    Keys: `i2t_R@k`, `t2i_R@k`.
    """
    sim = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T
    n = sim.shape[0]
    if captions is not None and len(captions) != n:
        raise ValueError(f"{len(captions)} captions for {n} pairs")
    match = torch.eye(n, dtype=torch.bool) if captions is None else same_caption_matrix(captions)
    match = match.to(sim.device)
    out: dict[str, float] = {}
    for k in ks:
        kk = min(k, sim.shape[1])
        for name, scores in (("i2t", sim), ("t2i", sim.T)):
            hits = match.gather(1, scores.topk(kk, dim=1).indices).any(dim=1)
            out[f"{name}_R@{k}"] = 100.0 * hits.float().mean().item()
    return out


def embed_pairs(
    model: nn.Module,
    tokenizer: Callable,
    dataset: Dataset,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> tuple[Tensor, Tensor, list[str]]:
    """Normalised image and caption embeddings [N, D] (on CPU) of `(image, caption)` pairs, and the captions.

    Runs in eval mode without grad and restores the model's mode after. `device` defaults to
    the model's device.
    """
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    images_out, texts_out, captions = [], [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for images, batch_captions in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                images_out.append(F.normalize(model.encode_image(images.to(device)).float(), dim=-1).cpu())
                tokens = tokenizer(list(batch_captions)).to(device)
                texts_out.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
                captions.extend(batch_captions)
    finally:
        model.train(was_training)
    if not captions:
        raise DatasetError("cannot embed an empty dataset of image-caption pairs")
    return torch.cat(images_out), torch.cat(texts_out), captions
