"""WiSE-FT (Wortsman et al.): fine-tune, then interpolate the weights with the pre-trained model's."""

from __future__ import annotations

import torch

from gnsp_core.methods.base import Method


class WiSEFT(Method):
    """WiSE-FT: fine-tune, then interpolate every weight with the pre-trained model's."""

    name = "wise-ft"

    @torch.no_grad()
    def end_task(self) -> None:
        alpha = self.cfg.wise_alpha
        base = self.ctx.base_model().state_dict()
        for name, tensor in self.model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_((1 - alpha) * base[name].to(tensor) + alpha * tensor)
