"""How `gnsp-mini` is aligned: LiT-style, towers frozen, projections trained on cached features.

Ingredients, all offline: the EfficientNet-Lite0 trunk and its own ImageNet classifier (the
teacher), MiniLM, the 1,000 ImageNet class names (open_clip) in the 8 prompt templates of
`zeroshot.TEMPLATES`, and the `align` split of the emoji + flag caption pairs of `data.reference`
(the `heldout` split, a fixed fifth of them, is never used here: `data.heldout` scores it).

1. **Cache features.** Pooled trunk features of every reference image plus `augmented_views`
   seeded views per image (random crops, colour changes, emoji pasted on other reference images),
   and MiniLM's pooled features of the class prompts and captions. Towers are frozen, so each is
   computed once; training then costs milliseconds per step.
2. **Initialise from the teacher.** Text projection: a seeded orthonormal map (keeps MiniLM's
   cosine geometry). Vision head fc1 rows 0..999 = the ImageNet classifier (bias lowered by
   `init_shift`, so GELU keeps only confident classes), fc2 columns = the class text embeddings:
   an image maps to a GELU-weighted sum of its likely classes' text embeddings, i.e. the teacher
   carried into text space before any step.
3. **Train** fc1, fc2 and the text projection with AdamW (cosine schedule), per step:
   - KL(teacher ImageNet probabilities at `teacher_temperature` ‖ the model's zero-shot ImageNet
     probabilities at logit scale 100), on clean and augmented views;
   - 1 − cos(image embedding, probability-weighted class text embedding), same views;
   - CLIP's symmetric contrastive loss on clean (image, caption) pairs.
   The logit scale is fixed at 100 (GNSP's value). The held-out pairs and photos are never used
   here; the photos only score the result for the build report.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from PIL import Image, ImageEnhance, ImageOps
from torch import Tensor, nn

from gnsp_core.data.reference import heldout_eval_samples, load_reference_pairs
from gnsp_core.zeroshot import TEMPLATES, build_text_head, predict

ProgressFn = Callable[[float, str], None]


@dataclass(frozen=True)
class Recipe:
    """Every knob of the alignment; recorded in the build report."""

    seed: int = 0
    steps: int = 400
    batch_size: int = 128
    lr: float = 1e-3
    teacher_temperature: float = 0.5
    logit_scale: float = 100.0
    init_shift: float = 3.0
    augmented_views: int = 1
    composite_fraction: float = 0.4
    distill_weight: float = 1.0
    cosine_weight: float = 1.0
    contrastive_weight: float = 1.0
    feature_batch: int = 64


@dataclass
class Features:
    """Cached frozen-tower outputs: everything training needs."""

    clean: Tensor  # [N, 1280] trunk features of the reference images
    views: Tensor  # [V, 1280] trunk features of augmented views
    captions: Tensor  # [N, 384] MiniLM features of the captions
    prompts: Tensor  # [1000, 384] mean normalised MiniLM feature of each class's prompts


def _crop_and_colour(image: Image.Image, rng: random.Random) -> Image.Image:
    w, h = image.size
    side = rng.uniform(0.55, 1.0)
    cw, ch = int(w * side), int(h * side)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out = image.crop((x, y, x + cw, y + ch))
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhance(out).enhance(rng.uniform(0.6, 1.4))
    if rng.random() < 0.2:
        out = ImageOps.grayscale(out).convert("RGB")
    return ImageOps.mirror(out) if rng.random() < 0.5 else out


def _composite(images: Sequence[Image.Image], num_emoji: int, rng: random.Random) -> Image.Image:
    """1-3 emoji (white made transparent) pasted at random sizes onto any reference image."""
    canvas = images[rng.randrange(len(images))].resize((224, 224), Image.BICUBIC)
    for _ in range(rng.randint(1, 3)):
        size = rng.randint(60, 160)
        emoji = images[rng.randrange(num_emoji)].resize((size, size), Image.BICUBIC)
        mask = Image.fromarray((np.asarray(emoji.convert("L")) < 247).astype(np.uint8) * 255)
        canvas.paste(emoji, (rng.randint(0, 224 - size), rng.randint(0, 224 - size)), mask)
    return canvas


def augmented_views(images: Sequence[Image.Image], num_emoji: int, recipe: Recipe) -> list[Image.Image]:
    """Seeded extra views (composites or crops), so distillation sees more than the clean images."""
    rng = random.Random(recipe.seed)
    views = []
    for _ in range(recipe.augmented_views):
        for image in images:
            base = _composite(images, num_emoji, rng) if rng.random() < recipe.composite_fraction else image
            views.append(_crop_and_colour(base, rng))
    return views


@torch.no_grad()
def trunk_features(trunk: nn.Module, images: Sequence[Image.Image], preprocess: Callable, batch: int,
                   progress: Callable[[float], None] = lambda _f: None) -> Tensor:
    """Pooled trunk features [N, C] in eval mode (channels-last is about 1.5x faster on CPU)."""
    trunk.eval().to(memory_format=torch.channels_last)
    out = []
    for start in range(0, len(images), batch):
        x = torch.stack([preprocess(im) for im in images[start:start + batch]])
        out.append(trunk(x.to(memory_format=torch.channels_last)))
        progress(min(1.0, (start + batch) / len(images)))
    trunk.to(memory_format=torch.contiguous_format)
    return torch.cat(out)


@torch.no_grad()
def text_features(text: nn.Module, tokenizer: Callable, texts: Sequence[str], batch: int = 256) -> Tensor:
    """MiniLM's pooled features [N, 384], before the projection; padding trimmed per batch (same result, 3x faster)."""
    text.eval()
    out = []
    for start in range(0, len(texts), batch):
        ids = tokenizer(list(texts[start:start + batch]))
        mask = (ids != text.config.pad_token_id).long()
        width = int(mask.sum(1).max())
        ids, mask = ids[:, :width], mask[:, :width]
        out.append(text.pooler(text.transformer(input_ids=ids, attention_mask=mask), mask))
    return torch.cat(out)


def _class_prompt_features(text: nn.Module, tokenizer: Callable) -> Tensor:
    feats = text_features(text, tokenizer, [t.format(c) for c in IMAGENET_CLASSNAMES for t in TEMPLATES])
    feats = F.normalize(feats.view(len(IMAGENET_CLASSNAMES), len(TEMPLATES), -1), dim=-1)
    return F.normalize(feats.mean(1), dim=-1)


@torch.no_grad()
def init_from_teacher(model: nn.Module, classifier: tuple[Tensor, Tensor], prompts: Tensor, recipe: Recipe) -> None:
    """Projections that carry the ImageNet teacher into text space (see the module docstring)."""
    weight, bias = classifier
    gen = torch.Generator().manual_seed(recipe.seed)
    proj = model.text.proj
    proj.weight.copy_(torch.linalg.qr(torch.randn(proj.out_features, proj.in_features, generator=gen))[0])
    fc1, fc2 = model.visual.head.mlp.fc1, model.visual.head.mlp.fc2
    classes = weight.shape[0]
    fc1.weight.normal_(0.0, 0.01, generator=gen)
    fc1.bias.zero_()
    fc1.weight[:classes] = weight
    fc1.bias[:classes] = bias - recipe.init_shift
    fc2.weight.zero_()
    fc2.weight[:, :classes] = F.normalize(proj(prompts), dim=-1).T
    model.logit_scale.fill_(math.log(recipe.logit_scale))


def _losses(model: nn.Module, feats: Features, classifier: tuple[Tensor, Tensor], idx: Tensor, view_idx: Tensor,
            recipe: Recipe) -> dict[str, Tensor]:
    head, proj = model.visual.head, model.text.proj
    distill_in = torch.cat([feats.clean[idx], feats.views[view_idx]])
    image = F.normalize(head(distill_in), dim=-1)
    classes = F.normalize(proj(feats.prompts), dim=-1)
    teacher = torch.softmax(F.linear(distill_in, *classifier) / recipe.teacher_temperature, dim=-1)
    student = F.log_softmax(recipe.logit_scale * image @ classes.T, dim=-1)
    target = F.normalize(teacher @ classes, dim=-1).detach()
    logits = recipe.logit_scale * image[: len(idx)] @ F.normalize(proj(feats.captions[idx]), dim=-1).T
    labels = torch.arange(len(idx))
    return {
        "distill": F.kl_div(student, teacher, reduction="batchmean"),
        "cosine": (1 - (image * target).sum(-1)).mean(),
        "contrastive": (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2,
    }


def train_projections(model: nn.Module, feats: Features, classifier: tuple[Tensor, Tensor], recipe: Recipe,
                      progress: Callable[[float], None]) -> dict[str, list[float]]:
    """AdamW on fc1, fc2 and the text projection; returns each loss term at the first and last step."""
    params = [*model.visual.head.parameters(), *model.text.proj.parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.steps)
    weights = {"distill": recipe.distill_weight, "cosine": recipe.cosine_weight,
               "contrastive": recipe.contrastive_weight}
    gen = torch.Generator().manual_seed(recipe.seed)
    history: dict[str, list[float]] = {k: [] for k in weights}
    for step in range(recipe.steps):
        idx = torch.randperm(len(feats.clean), generator=gen)[: recipe.batch_size]
        view_idx = torch.randint(len(feats.views), (recipe.batch_size,), generator=gen)
        terms = _losses(model, feats, classifier, idx, view_idx, recipe)
        loss = sum(weights[k] * v for k, v in terms.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step in (0, recipe.steps - 1):
            for k, v in terms.items():
                history[k].append(round(v.item(), 4))
        progress((step + 1) / recipe.steps)
    return history


@torch.no_grad()
def _retrieval_r1(model: nn.Module, feats: Features) -> dict[str, float]:
    image = F.normalize(model.visual.head(feats.clean), dim=-1)
    text = F.normalize(model.text.proj(feats.captions), dim=-1)
    sims, truth = image @ text.T, torch.arange(len(image))
    return {"i2t_r1": round(100 * (sims.argmax(1) == truth).float().mean().item(), 2),
            "t2i_r1": round(100 * (sims.argmax(0) == truth).float().mean().item(), 2)}


@torch.no_grad()
def heldout_zero_shot(model: nn.Module, preprocess: Callable, tokenizer: Callable) -> dict[str, float]:
    """Top-1 (%) on the held-out photos, prompt ensemble of `TEMPLATES`, beside chance."""
    images, labels, classnames = heldout_eval_samples()
    head = build_text_head(model, tokenizer, classnames, TEMPLATES)
    probs = predict(model, torch.stack([preprocess(im) for im in images]), head)
    correct = (probs.argmax(1) == torch.tensor(labels)).float().mean().item()
    return {"top1": round(100 * correct, 2), "chance": round(100 / len(classnames), 2), "n": len(images)}


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide the MiniLM load report: it lists BERT's unused pooler weights, expected with mean pooling."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _create(config: dict) -> tuple[nn.Module, Callable, Callable]:
    with _quiet_transformers():
        model = open_clip.CustomTextCLIP(**config["model_cfg"])  # loads the installed MiniLM weights
    pre = config["preprocess_cfg"]
    preprocess = open_clip.image_transform(pre["size"], is_train=False, mean=pre["mean"], std=pre["std"],
                                           interpolation=pre["interpolation"], resize_mode=pre["resize_mode"])
    text_cfg = config["model_cfg"]["text_cfg"]
    tokenizer = open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"],
                                                context_length=text_cfg["context_length"])
    return model.eval(), preprocess, tokenizer


def align(config: dict, trunk_state: dict[str, Tensor], recipe: Recipe, progress: ProgressFn) -> tuple[nn.Module, dict]:
    """Build and align `gnsp-mini` from its towers; returns the model and a build report."""
    torch.manual_seed(recipe.seed)
    times: dict[str, float] = {}
    clock = time.perf_counter()
    model, preprocess, tokenizer = _create(config)
    classifier = (trunk_state.pop("classifier.weight"), trunk_state.pop("classifier.bias"))
    model.visual.trunk.load_state_dict(trunk_state)
    emoji, flags = load_reference_pairs("emoji", split="align"), load_reference_pairs("flags", split="align")
    images = [p.image(i) for p in (emoji, flags) for i in range(len(p))]
    views = augmented_views(images, len(emoji), recipe)
    times["setup_s"] = time.perf_counter() - clock
    progress(0.05, f"encoding {len(images)} reference images and {len(views)} augmented views")
    clock = time.perf_counter()
    pixels = trunk_features(model.visual.trunk, images + views, preprocess, recipe.feature_batch,
                            lambda f: progress(0.05 + 0.7 * f, "encoding images"))
    times["image_features_s"] = time.perf_counter() - clock
    progress(0.75, "encoding class prompts and captions")
    clock = time.perf_counter()
    feats = Features(pixels[: len(images)], pixels[len(images):],
                     text_features(model.text, tokenizer, emoji.captions + flags.captions),
                     _class_prompt_features(model.text, tokenizer))
    times["text_features_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    init_from_teacher(model, classifier, feats.prompts, recipe)
    report = {"init": {"heldout": heldout_zero_shot(model, preprocess, tokenizer), **_retrieval_r1(model, feats)}}
    losses = train_projections(model, feats, classifier, recipe, lambda f: progress(0.85 + 0.12 * f, "aligning"))
    times["train_s"] = time.perf_counter() - clock
    report.update(
        recipe=asdict(recipe), seconds={k: round(v, 1) for k, v in times.items()}, losses=losses,
        data={"emoji": len(emoji), "flags": len(flags), "views": len(views), "imagenet_prompts": 1000 * len(TEMPLATES)},
        heldout=heldout_zero_shot(model, preprocess, tokenizer), reference_retrieval=_retrieval_r1(model, feats),
    )
    return model, report
