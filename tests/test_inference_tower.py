"""Preparing an image tower for serving: batch norms folded into their convolutions give the same
features, and a tower whose module order does not match its forward is left as it was."""

import copy

import torch
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d
from torch import nn

from gnsp_core.models.inference import fold_batch_norms, prepare_image_tower, prepared_copy


def with_statistics(module: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters in every batch norm, seeded."""
    generator = torch.Generator().manual_seed(1)
    for norm in module.modules():
        if hasattr(norm, "running_var") and norm.running_var is not None:
            n = norm.running_var.numel()
            norm.running_mean.copy_(torch.randn(n, generator=generator))
            norm.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            norm.weight.data.copy_(torch.randn(n, generator=generator))
            norm.bias.data.copy_(torch.randn(n, generator=generator))
    return module.eval()


class Tower(nn.Module):
    """A small CNN in timm's style: conv, then a batch norm (some fused with an activation)."""

    def __init__(self, norm_after_activation: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, bias=False)
        self.bn1 = BatchNormAct2d(8, act_layer=nn.ReLU6)
        self.dw = nn.Conv2d(8, 8, 3, groups=8, bias=True)
        self.bn2 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1, bias=False)
        self.bn3 = FrozenBatchNormAct2d(16, act_layer=nn.SiLU)
        self.norm_after_activation = norm_after_activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.stem(x))
        x = self.dw(x)
        x = self.bn2(torch.relu(x) if self.norm_after_activation else x)
        return self.bn3(self.pw(x)).mean(dim=(2, 3))


class Holder(nn.Module):
    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual


def test_folding_gives_the_same_features_and_removes_every_batch_norm():
    tower = with_statistics(Tower())
    folded = copy.deepcopy(tower)
    images = torch.randn(4, 3, 32, 32)
    assert fold_batch_norms(folded) == 3
    assert not any("BatchNorm" in type(m).__name__ for m in folded.modules())
    assert isinstance(folded.bn1[-1], nn.ReLU6) and isinstance(folded.bn3[-1], nn.SiLU)
    with torch.no_grad():
        assert torch.allclose(folded(images), tower(images), atol=1e-5)


def test_prepared_tower_replaces_the_original_only_when_it_agrees():
    good = Holder(with_statistics(Tower()))
    original = good.visual
    assert prepare_image_tower(good, image_size=32)
    assert good.visual is not original
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = good.visual(images.contiguous(memory_format=torch.channels_last))
        assert torch.allclose(got, original(images), atol=1e-5)

    # bn2 is registered after dw but applied after a ReLU: folding it would change the features.
    wrong = Holder(with_statistics(Tower(norm_after_activation=True)))
    original = wrong.visual
    assert not prepare_image_tower(wrong, image_size=32)
    assert wrong.visual is original


def test_a_tower_without_batch_norms_is_left_as_it_is(tiny):
    model = copy.deepcopy(tiny.model).eval()
    visual = model.visual
    assert not prepare_image_tower(model, tiny.image_size)
    assert model.visual is visual


def test_a_training_module_is_compared_in_eval_mode_and_left_training():
    tower = with_statistics(Tower()).train()
    running_mean = tower.bn2.running_mean.clone()
    prepared = prepared_copy(tower, torch.randn(2, 3, 32, 32))
    assert prepared is not None and not prepared.training
    assert tower.training and tower.bn2.training
    assert torch.equal(tower.bn2.running_mean, running_mean)  # the probe did not update its statistics


class BatchDependent(nn.Module):
    """A forward whose path depends on the batch size: a trace records one path only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        return pooled * 2 if x.shape[0] > 1 else pooled


def test_a_traced_tower_answers_as_the_module_for_any_batch_and_takes_other_weights():
    from gnsp_core.models.inference import image_probe, traced_tower

    tower = prepared_copy(with_statistics(Tower()), torch.randn(2, 3, 32, 32))
    probe = image_probe(32, "cpu").contiguous(memory_format=torch.channels_last)
    traced = traced_tower(tower, probe)
    assert isinstance(traced, torch.jit.ScriptModule)
    with torch.no_grad():
        for batch in (1, 5):
            images = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
            assert torch.equal(traced(images), tower(images))
        other = copy.deepcopy(tower)
        for parameter in other.parameters():
            parameter.mul_(1.5)
        copied = copy.deepcopy(traced)
        copied.load_state_dict(other.state_dict())
        images = torch.randn(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        assert torch.equal(copied(images), other(images))
        assert not torch.equal(copied(images), traced(images))


def test_a_forward_whose_path_depends_on_the_batch_size_is_not_traced():
    from gnsp_core.models.inference import image_probe, traced_tower

    assert traced_tower(BatchDependent(), image_probe(32, "cpu")) is None
