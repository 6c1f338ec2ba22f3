"""Models: specs, loading any open_clip model, and the embedded offline default gnsp-mini with its recipe."""

from gnsp_core.models.loading import load_model
from gnsp_core.models.spec import (DEFAULT_MODEL, FROZEN_TOWERS, LoadedModel, ModelSpec, available_models,
                                   model_config, recommended_training, register_configs, mark_trainable,
                                   trainable_pattern)

__all__ = [
    "DEFAULT_MODEL", "FROZEN_TOWERS", "LoadedModel", "ModelSpec", "available_models", "load_model",
    "model_config", "recommended_training", "register_configs", "mark_trainable", "trainable_pattern",
]
