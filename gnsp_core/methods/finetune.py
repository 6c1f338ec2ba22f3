"""Plain fine-tuning: the baseline every other method is measured against."""

from __future__ import annotations

from gnsp_core.methods.base import Method

class Finetune(Method):
    """The task loss on every trainable parameter, nothing kept from earlier tasks."""

    name = "finetune"
