"""Tests of the zero_gamma plugin: the invariant (an identity-shortcut block returns its input at
initialization) on every block family, the number of blocks zeroed in each model family and that
only the last norm of each branch is touched, the rule set's extensibility, the error on a model
without residual blocks, and the wiring in a run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import tricks
from tricks.blocks import BlockFamily, register_block_family, unregister_block_family
from tricks.testing import tiny_run
from tricks_zero_gamma import ZeroGamma, find_residual_blocks, last_norms, zero_gamma


def timm_model(name, **kwargs):
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


def tv_model(name):
    import torchvision

    return getattr(torchvision.models, name)(weights=None)


def core_model(name, num_classes=10, in_chans=3):
    from tricks.models import create_model

    return create_model(name, num_classes, in_chans)


def tweaked(depth, variant="D", shape="cifar"):
    from tricks_resnet_tweaks import create_resnet

    return create_resnet(depth, variant, shape, num_classes=10)


def randomize_bn(model, seed=0):
    """Non-trivial BN gammas and statistics, so that a block is not the identity by accident;
    beta stays 0, as at initialization (the branch then outputs exactly 0 once gamma is 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


# --- the invariant: a block with an identity shortcut starts as the identity ---------------------


def _identity_blocks():
    """(label, block factory, channels) for blocks that keep the shape (identity shortcut)."""
    from tricks.models import BasicBlock as CoreBasic, Bottleneck as CoreBottleneck
    from tricks_resnet_tweaks import BasicBlock as TweakBasic, Bottleneck as TweakBottleneck
    from timm.models.resnet import BasicBlock as TimmBasic, Bottleneck as TimmBottleneck
    from torchvision.models.resnet import BasicBlock as TvBasic, Bottleneck as TvBottleneck

    return [
        ("core basic", lambda: CoreBasic(16, 16), 16),
        ("core bottleneck", lambda: CoreBottleneck(32, 8), 32),
        ("tweaked basic", lambda: TweakBasic(16, 16), 16),
        ("tweaked bottleneck", lambda: TweakBottleneck(32, 8), 32),
        ("torchvision basic", lambda: TvBasic(16, 16), 16),
        ("torchvision bottleneck", lambda: TvBottleneck(32, 8), 32),
        ("timm basic", lambda: TimmBasic(16, 16), 16),
        ("timm bottleneck", lambda: TimmBottleneck(32, 8), 32),
        ("timm regnet", lambda: timm_model("regnetx_002").s4.b2, 368),
    ]


@pytest.mark.parametrize("case", range(9), ids=lambda i: _identity_blocks()[i][0])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_an_identity_shortcut_block_returns_its_input_at_init(case, train):
    label, make, channels = _identity_blocks()[case]
    torch.manual_seed(0)
    block = make()
    randomize_bn(block)
    block.train(train)
    x = torch.relu(torch.randn(4, channels, 6, 6))  # a block's input is post-ReLU: >= 0
    with torch.no_grad():
        assert not torch.allclose(block(x.clone()), x, atol=1e-3), f"{label}: identity before zero-gamma"
        zero_gamma(block)
        assert torch.equal(block(x.clone()), x), label


def test_a_downsampling_block_returns_relu_of_its_shortcut():
    from tricks.models import Bottleneck

    torch.manual_seed(0)
    block = Bottleneck(16, 8, stride=2)
    randomize_bn(block)
    zero_gamma(block)
    x = torch.relu(torch.randn(2, 16, 6, 6))
    with torch.no_grad():
        torch.testing.assert_close(block(x), torch.relu(block.shortcut(x)))


def test_a_zero_gamma_resnet_maps_every_stage_input_through_the_shortcuts_only():
    # With every branch silenced, a CIFAR ResNet is its stem, the projection shortcuts and ReLUs.
    torch.manual_seed(0)
    model = core_model("resnet20").eval()
    randomize_bn(model)
    zero_gamma(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        h = model.stem(x)
        expected = h
        for stage in model.stages:
            for block in stage:
                expected = torch.relu(expected if block.shortcut is None else block.shortcut(expected))
        torch.testing.assert_close(model.stages(h), expected)


# --- counts per model family ----------------------------------------------------------------------


FAMILIES = {
    "core resnet20": (lambda: core_model("resnet20"), 9, "bn2"),
    "core resnet8": (lambda: core_model("resnet8"), 3, "bn2"),
    "core resnet18": (lambda: core_model("resnet18"), 8, "bn2"),
    "core resnet50": (lambda: core_model("resnet50"), 16, "bn3"),
    "resnet_tweaks resnet20-D": (lambda: tweaked(20), 9, "bn2"),
    "resnet_tweaks resnet50-D": (lambda: tweaked(50, "D", "imagenet"), 16, "bn3"),
    "resnet_tweaks resnet101-A": (lambda: tweaked(101, "A", "imagenet"), 33, "bn3"),
    "timm resnet50": (lambda: timm_model("resnet50", zero_init_last=False), 16, "bn3"),
    "timm resnet18d": (lambda: timm_model("resnet18d", zero_init_last=False), 8, "bn2"),
    "torchvision resnet50": (lambda: tv_model("resnet50"), 16, "bn3"),
    "torchvision resnet18": (lambda: tv_model("resnet18"), 8, "bn2"),
    "timm regnetx_002": (lambda: timm_model("regnetx_002", zero_init_last=False), 1 + 1 + 4 + 7, "conv3.bn"),
    "timm resnext26ts": (lambda: timm_model("resnext26ts", zero_init_last=False), 8, "conv3_1x1.bn"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_last_norm_of_every_block_is_zeroed_and_nothing_else(family):
    make, expected, last = FAMILIES[family]
    model = make()
    before = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    assert all(w.any() for w in before.values()), "every gamma starts non-zero"
    blocks = zero_gamma(model)
    assert len(blocks) == expected
    targets = {f"{b.name}.{last}" for b in blocks}
    assert len(targets) == expected
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            if name in targets:
                assert not m.weight.any() and torch.equal(m.bias, torch.zeros_like(m.bias)), name
            else:
                assert torch.equal(m.weight, before[name]), f"{name} should be untouched"


def test_timm_models_start_with_zero_gamma_already_and_the_plugin_says_so():
    model = timm_model("resnet50")  # timm's default: zero_init_last=True
    blocks = zero_gamma(model)
    assert len(blocks) == 16 and all(b.was_zero for b in blocks)
    blocks = zero_gamma(tv_model("resnet50"))
    assert len(blocks) == 16 and not any(b.was_zero for b in blocks)


def test_torchvision_zero_init_residual_zeroes_the_same_norms():
    import torchvision

    ours = tv_model("resnet50")
    zero_gamma(ours)
    theirs = torchvision.models.resnet50(weights=None, zero_init_residual=True)
    zeros = lambda m: sorted(n for n, x in m.named_modules() if isinstance(x, _BatchNorm) and not x.weight.any())
    assert zeros(ours) == zeros(theirs) and len(zeros(ours)) == 16


def test_mobilenet_blocks_count_only_where_they_have_a_skip():
    model = timm_model("mobilenetv3_small_050")
    with_skip = [m for m in model.modules() if getattr(m, "has_skip", False)]
    blocks = zero_gamma(model)
    assert len(blocks) == len(with_skip) > 0
    assert {id(b.module) for b in blocks} == {id(m) for m in with_skip}


def test_a_regnet_block_without_shortcut_is_not_residual():
    block = timm_model("regnetx_002").s2.b1
    assert last_norms(block) == [block.conv3.bn]
    block.downsample = None  # timm: no shortcut at all
    assert last_norms(block) is None


# --- the rule set -------------------------------------------------------------------------------


class _Block(nn.Module):
    """A residual block of unfamiliar names."""

    def __init__(self, c):
        super().__init__()
        self.a, self.na = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.b, self.nb = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.nb(self.b(torch.relu(self.na(self.a(x))))))


class _ProtocolBlock(_Block):
    def zero_init_last(self):
        nn.init.zeros_(self.nb.weight)


def test_an_unknown_block_is_not_a_residual_block_until_registered():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _Block(8), _Block(8))
    with pytest.raises(tricks.TricksError):
        zero_gamma(model)
    register_block_family(BlockFamily("test block", (_Block,), last_norms=lambda b: [b.nb]))
    try:
        blocks = zero_gamma(model)
        assert [b.name for b in blocks] == ["1", "2"]
        assert not model[1].nb.weight.any() and model[1].na.weight.all()
    finally:
        unregister_block_family("test block")


def test_a_block_with_zero_init_last_is_found_by_what_the_method_zeroes():
    block = _ProtocolBlock(4)
    assert last_norms(block) == [block.nb]
    assert block.nb.weight.all()  # finding it did not change the block
    with torch.no_grad():
        block.nb.weight.zero_()
    assert last_norms(block) == [block.nb]  # an already-zero gamma does not hide it
    model = nn.Sequential(_ProtocolBlock(4), _ProtocolBlock(4))
    blocks = zero_gamma(model)
    assert len(blocks) == 2 and not model[0].nb.weight.any() and model[0].na.weight.all()


def test_blocks_inside_blocks_are_not_searched():
    from tricks.models import BasicBlock

    outer = BasicBlock(4, 4)
    outer.conv2 = nn.Conv2d(4, 4, 3, padding=1)
    inner = BasicBlock(4, 4)
    outer.extra = inner
    blocks = find_residual_blocks(nn.Sequential(outer))
    assert [b.module for b in blocks] == [outer]


# --- errors and wiring ----------------------------------------------------------------------------


def test_a_model_without_residual_blocks_is_an_error_naming_it():
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    with pytest.raises(tricks.TricksError, match=r"Sequential.*needs a residual model"):
        zero_gamma(cnn)
    with pytest.raises(tricks.TricksError, match=r"ResNetV2.*needs a residual model"):
        zero_gamma(timm_model("resnetv2_18"))  # pre-activation: no BN ends a branch


class _PlainCNN(tricks.Plugin):
    """An ad-hoc model provider: a CNN with no residual block."""

    @tricks.hookimpl
    def build_model(self, ctx):
        return nn.Sequential(nn.Conv2d(ctx.in_chans, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, ctx.num_classes))


def test_a_run_on_a_plain_cnn_fails_with_a_one_line_error(tmp_path):
    with pytest.raises(tricks.TricksError, match=r"Sequential.*residual") as error:
        tiny_run(plugins=["zero_gamma", _PlainCNN()], out=tmp_path / "run")
    assert "\n" not in str(error.value)


class _Gammas(tricks.Plugin):
    """Records the last BN gamma of every block of the CIFAR ResNet when training starts."""

    def __init__(self):
        super().__init__()
        self.gammas = None

    @tricks.hookimpl
    def on_fit_start(self, ctx):
        self.gammas = [b.bn2.weight.detach().clone() for stage in ctx.model.stages for b in stage]


class _Logs(tricks.Reporter):
    def __init__(self):
        self.lines = []

    def log(self, message):
        self.lines.append(message)


def test_a_run_starts_from_zero_gamma_and_logs_the_count(tmp_path):
    watch, logs = _Gammas(), _Logs()
    run = tiny_run(plugins=["zero_gamma", watch], out=tmp_path / "run", reporter=logs)
    assert len(watch.gammas) == 3 and all(not g.any() for g in watch.gammas)
    assert any("zero_gamma" in line and "3 residual blocks" in line for line in logs.lines), logs.lines
    [row] = run.metrics()
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])


def test_the_plugin_has_no_settings_to_get_wrong():
    with pytest.raises(tricks.TricksError, match=r"zero_gamma\.gamma"):
        tricks.resolve(plugins=["zero_gamma"], sets=["zero_gamma.gamma=0"])
    assert ZeroGamma.Settings.model_fields == {}
