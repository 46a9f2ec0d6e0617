"""Tests of the resnet_tweaks plugin: the four variants against timm's and torchvision's ResNets
(parameter counts, and equal outputs once the same weights are loaded), the tweaks themselves
(stride placement, deep stem, average-pool shortcut), equal stage shapes across variants, tiny
and large inputs, the choice of architecture from the run, and a short run."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import tricks
from modules import randomize_bn
from tricks.testing import make_ctx, tiny_run
from tricks_resnet_tweaks import (AUTO_IMAGENET_MIN_SIZE, CIFAR_DEPTHS, IMAGENET_DEPTHS, Bottleneck,
                                  ResNetTweaks, ResNetTweaksSettings, create_resnet, resolve_architecture)

VARIANTS = ["A", "B", "C", "D"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def on_meta(build):
    """Build a model on the meta device: shapes and parameter counts without memory or init time."""
    with torch.device("meta"):
        return build()


@functools.lru_cache(maxsize=None)
def meta_resnet(depth: int, variant: str, shape: str = "imagenet") -> nn.Module:
    """One shared meta-device model per architecture, for the tests that only look at it."""
    return on_meta(lambda: create_resnet(depth, variant, shape))


def load_in_order(source: nn.Module, target: nn.Module) -> None:
    """Copy ``source``'s state into ``target`` entry by entry, in registration order; every
    shape must agree, so this fails unless the two networks have the same layers in the same order."""
    theirs, ours = list(source.state_dict().values()), target.state_dict()
    assert len(theirs) == len(ours)
    new = {}
    for (key, mine), value in zip(ours.items(), theirs):
        assert mine.shape == value.shape, f"{key}: {tuple(mine.shape)} vs {tuple(value.shape)}"
        new[key] = value
    target.load_state_dict(new)


def timm_model(name: str, **kwargs):
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


def tv_model(name: str, **kwargs):
    import torchvision

    return getattr(torchvision.models, name)(weights=None, **kwargs)


# --- against timm and torchvision -------------------------------------------------------------


@pytest.mark.parametrize("depth, variant, reference", [
    (50, "D", lambda: timm_model("resnet50d")),
    (50, "C", lambda: timm_model("resnet50c")),
    (50, "B", lambda: tv_model("resnet50")),
    (50, "B", lambda: timm_model("resnet50")),
    (50, "A", lambda: tv_model("resnet50")),
    (101, "D", lambda: timm_model("resnet101d")),
    (101, "B", lambda: tv_model("resnet101")),
    (18, "D", lambda: timm_model("resnet18d")),
    (34, "B", lambda: tv_model("resnet34")),
])
def test_parameter_counts_equal_timm_and_torchvision(depth, variant, reference):
    assert n_params(meta_resnet(depth, variant)) == n_params(on_meta(reference))


def test_the_deep_stem_costs_what_the_paper_implies():
    # C and D replace one 7x7x3x64 conv (+BN 64) by 3x3 convs 3->32->32->64 (+BN 32, 32, 64).
    diff = n_params(meta_resnet(50, "D")) - n_params(meta_resnet(50, "A"))
    assert diff == (9 * (3 * 32 + 32 * 32 + 32 * 64) + 2 * (32 + 32 + 64)) - (49 * 3 * 64 + 2 * 64)
    assert n_params(meta_resnet(50, "C")) == n_params(meta_resnet(50, "D"))


@pytest.mark.parametrize("depth, variant, reference", [
    (50, "D", lambda: timm_model("resnet50d")),
    (50, "B", lambda: tv_model("resnet50")),
    (18, "D", lambda: timm_model("resnet18d")),
])
def test_outputs_equal_the_library_model_with_the_same_weights(depth, variant, reference):
    torch.manual_seed(0)
    theirs = reference()
    randomize_bn(theirs)
    ours = create_resnet(depth, variant)
    load_in_order(theirs, ours)
    theirs.eval(), ours.eval()
    x = torch.randn(2, 3, 35, 35, generator=torch.Generator().manual_seed(1))  # odd side: ceil_mode matters
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_resnet_a_is_not_b_with_the_same_weights():
    # A and B have the same parameters; only where the stride sits differs, and that shows.
    torch.manual_seed(0)
    a = create_resnet(50, "A").eval()
    b = create_resnet(50, "B").eval()
    randomize_bn(a)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x), atol=1e-3)


def test_cifar_a_is_the_projects_resnet_and_cifar_b_its_bottleneck_resnet():
    from tricks.models import create_model

    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    for name, depth, variant in [("resnet20", 20, "A"), ("resnet18", 18, "A"), ("resnet50", 50, "B")]:
        torch.manual_seed(0)
        core = create_model(name, 10, 3)
        randomize_bn(core)
        ours = create_resnet(depth, variant, "cifar", num_classes=10)
        ours.load_state_dict(core.state_dict())  # strict: the same names and shapes
        core.eval(), ours.eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(x), core(x), rtol=1e-5, atol=1e-5)


# --- the tweaks -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["imagenet", "cifar"])
def test_b_moves_the_stride_from_the_1x1_to_the_3x3(shape):
    for variant in VARIANTS:
        model = meta_resnet(50, variant, shape)
        firsts = [stage[0] for stage in model.stages[1:]]
        assert len(firsts) == 3
        for block in firsts:
            assert block.conv1.kernel_size == (1, 1) and block.conv2.kernel_size == (3, 3)
            expected = ((2, 2), (1, 1)) if variant == "A" else ((1, 1), (2, 2))
            assert (block.conv1.stride, block.conv2.stride) == expected, variant
            assert block.conv3.stride == (1, 1)
        # no other block strides anywhere
        others = [b for stage in model.stages for b in list(stage)[1:]] + [model.stages[0][0]]
        assert all(b.conv1.stride == b.conv2.stride == (1, 1) for b in others)


def test_basic_blocks_are_the_same_in_a_and_b():
    for shape in ["imagenet", "cifar"]:
        a = meta_resnet(18, "A", shape)
        b = meta_resnet(18, "B", shape)
        assert str(a) == str(b)  # same layers, strides and shapes
    torch.manual_seed(0)
    a, b = create_resnet(20, "A", "cifar").eval(), create_resnet(20, "B", "cifar").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def _convs(stem):
    return [m for m in stem if isinstance(m, nn.Conv2d)]


def test_c_and_d_have_the_deep_stem():
    for variant in VARIANTS:
        stem = meta_resnet(50, variant, "imagenet").stem
        convs = _convs(stem)
        assert isinstance(stem[-1], nn.MaxPool2d) and stem[-1].kernel_size == 3 and stem[-1].stride == 2
        if variant in ("C", "D"):
            assert [(c.kernel_size, c.stride, c.in_channels, c.out_channels) for c in convs] == [
                ((3, 3), (2, 2), 3, 32), ((3, 3), (1, 1), 32, 32), ((3, 3), (1, 1), 32, 64)]
            assert sum(isinstance(m, nn.BatchNorm2d) for m in stem) == 3 and sum(isinstance(m, nn.ReLU) for m in stem) == 3
        else:
            assert [(c.kernel_size, c.stride, c.in_channels, c.out_channels) for c in convs] == [((7, 7), (2, 2), 3, 64)]
        cifar = _convs(meta_resnet(20, variant, "cifar").stem)
        expected = [(3, 8), (8, 8), (8, 16)] if variant in ("C", "D") else [(3, 16)]
        assert [(c.in_channels, c.out_channels) for c in cifar] == expected
        assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) for c in cifar)


@pytest.mark.parametrize("shape, depth", [("imagenet", 50), ("cifar", 50), ("cifar", 20), ("imagenet", 18)])
def test_d_shortcuts_average_pool_then_a_stride_1_conv(shape, depth):
    for variant in VARIANTS:
        model = meta_resnet(depth, variant, shape)
        for i, stage in enumerate(model.stages):
            for j, block in enumerate(stage):
                stride = 2 if i > 0 and j == 0 else 1
                if block.shortcut is None:
                    assert stride == 1
                    continue
                layers = list(block.shortcut)
                if variant == "D" and stride == 2:
                    pool, conv, bn = layers
                    assert isinstance(pool, nn.AvgPool2d)
                    assert (pool.kernel_size, pool.stride, pool.ceil_mode, pool.count_include_pad) == (2, 2, True, False)
                    assert conv.kernel_size == (1, 1) and conv.stride == (1, 1) and isinstance(bn, nn.BatchNorm2d)
                else:
                    conv, bn = layers
                    assert conv.kernel_size == (1, 1) and conv.stride == (stride, stride)


def test_d_shortcut_computes_the_ceil_mode_average_without_padding():
    torch.manual_seed(0)
    block = Bottleneck(8, 4, stride=2, avg_down=True).eval()
    x = torch.randn(2, 8, 5, 5)  # odd: the last row and column are windows of fewer pixels
    conv, bn = block.shortcut[1], block.shortcut[2]
    # the average by hand: mean over the pixels of each 2x2 window that lie inside the map
    pooled = torch.zeros(2, 8, 3, 3)
    for i in range(3):
        for j in range(3):
            pooled[:, :, i, j] = x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((2, 3))
    with torch.no_grad():
        torch.testing.assert_close(block.shortcut(x), bn(conv(pooled)))
        out = block(x)
    assert out.shape == (2, 16, 3, 3)


# --- shapes and inputs ------------------------------------------------------------------------


@pytest.mark.parametrize("depth, shape, cases", [
    (50, "imagenet", [(224, [(64, 56), (256, 56), (512, 28), (1024, 14), (2048, 7)]),
                      (65, [(64, 17), (256, 17), (512, 9), (1024, 5), (2048, 3)])]),
    (18, "imagenet", [(224, [(64, 56), (64, 56), (128, 28), (256, 14), (512, 7)])]),
    (50, "cifar", [(32, [(64, 32), (256, 32), (512, 16), (1024, 8), (2048, 4)])]),
    (20, "cifar", [(32, [(16, 32), (16, 32), (32, 16), (64, 8)]), (8, [(16, 8), (16, 8), (32, 4), (64, 2)])]),
])
def test_every_stage_has_the_same_shape_in_every_variant(depth, shape, cases):
    for variant in VARIANTS:
        model = meta_resnet(depth, variant, shape)
        for side, expected in cases:
            outs = model.stage_outputs(torch.empty(2, 3, side, side, device="meta"))
            assert [(o.shape[1], o.shape[2]) for o in outs] == expected, (variant, side)
            assert all(o.shape[2] == o.shape[3] for o in outs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_and_backward_on_digits_shaped_input(variant):
    # 8x8, one channel, ten classes: the CIFAR shape keeps 8x8 in the first stage
    torch.manual_seed(0)
    model = create_resnet(8, variant, "cifar", num_classes=10, in_chans=1)
    out = model(torch.randn(4, 1, 8, 8))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("variant", ["A", "D"])  # stride on a 1x1 conv / average pool, on 1x1 maps
def test_the_imagenet_shape_copes_with_digits_shaped_input(variant):
    # the ImageNet stem takes 8x8 to 2x2; the last two stages run on 1x1 maps
    torch.manual_seed(0)
    model = create_resnet(50, variant, "imagenet", num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        outs = model.stage_outputs(torch.randn(2, 1, 8, 8))
    assert [o.shape[-1] for o in outs] == [2, 2, 1, 1, 1]
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_on_cifar_shaped_input(variant):
    torch.manual_seed(0)
    model = create_resnet(20, variant, "cifar", num_classes=10).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_forward_on_imagenet_shaped_input():
    torch.manual_seed(0)
    model = create_resnet(50, "D", "imagenet").eval()
    with torch.no_grad():
        outs = model.stage_outputs(torch.randn(1, 3, 224, 224))
        logits = model.fc(torch.flatten(model.pool(outs[-1]), 1))
    assert [tuple(o.shape[1:]) for o in outs] == [(64, 56, 56), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


def test_channels_last_and_bf16_autocast():
    torch.manual_seed(0)
    model = create_resnet(8, "D", "cifar", num_classes=10).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (4, 10) and torch.isfinite(out.float()).all()


# --- choosing the architecture ------------------------------------------------------------------


def test_resolve_architecture():
    assert resolve_architecture("resnet50", "auto", 224) == (50, "imagenet")
    assert resolve_architecture("resnet50", "auto", AUTO_IMAGENET_MIN_SIZE) == (50, "imagenet")
    assert resolve_architecture("resnet50", "auto", AUTO_IMAGENET_MIN_SIZE - 1) == (50, "cifar")
    assert resolve_architecture("resnet101", "auto", 32) == (101, "cifar")
    assert resolve_architecture("resnet101", "imagenet", 8) == (101, "imagenet")
    assert resolve_architecture("resnet18", "cifar", 224) == (18, "cifar")
    for depth in CIFAR_DEPTHS:
        assert resolve_architecture(f"resnet{depth}", "auto", 224) == (depth, "cifar")
    for depth in IMAGENET_DEPTHS:
        assert resolve_architecture(f"resnet{depth}", "auto", 224) == (depth, "imagenet")


@pytest.mark.parametrize("model", ["timm:resnet50d", "regnetx_002", "resnet", "resnet26", "resnet50d", "vit"])
def test_an_unsupported_model_is_an_error_naming_it_and_the_supported_ones(model):
    with pytest.raises(tricks.TricksError, match=rf"'{model}'.*resnet8, .*resnet101"):
        resolve_architecture(model)


def test_a_cifar_depth_with_the_imagenet_stem_is_an_error():
    with pytest.raises(tricks.TricksError, match=r"resnet20.*stem=cifar"):
        resolve_architecture("resnet20", "imagenet", 224)


@pytest.mark.parametrize("model, image_size, variant, stem, expected", [
    ("resnet20", 8, "D", "auto", lambda: create_resnet(20, "D", "cifar", 10, 1)),
    ("resnet101", 8, "B", "auto", lambda: create_resnet(101, "B", "cifar", 10, 1)),
    ("resnet101", 224, "D", "auto", lambda: create_resnet(101, "D", "imagenet", 10, 1)),
    ("resnet50", 32, "C", "imagenet", lambda: create_resnet(50, "C", "imagenet", 10, 1)),
])
def test_build_model_follows_the_run_and_the_settings(model, image_size, variant, stem, expected):
    ctx = make_ctx(model=model, image_size=image_size)
    with torch.device("meta"):
        built = ResNetTweaks(ResNetTweaksSettings(variant=variant, stem=stem)).build_model(ctx)
    assert str(built) == str(on_meta(expected))
    assert built.variant == variant
    assert ctx.logs and f"-{variant}" in ctx.logs[0]


def test_settings_errors_name_the_key():
    with pytest.raises(tricks.TricksError, match=r"resnet_tweaks\.variant"):
        tricks.resolve(plugins=["resnet_tweaks"], sets=["resnet_tweaks.variant=E"])
    with pytest.raises(tricks.TricksError, match=r"resnet_tweaks\.stem"):
        tricks.resolve(plugins=["resnet_tweaks"], sets=["resnet_tweaks.stem=large"])
    cfg = tricks.resolve(plugins=["resnet_tweaks"], sets=["resnet_tweaks.variant=B"])
    assert cfg.settings["resnet_tweaks"].variant == "B" and cfg.settings["resnet_tweaks"].stem == "auto"


# --- in a run ----------------------------------------------------------------------------------


def test_a_run_trains_the_tweaked_model(tmp_path):
    run = tiny_run(plugins=["resnet_tweaks"], set=["resnet_tweaks.variant=D"], out=tmp_path / "run")
    summary = run.summary()
    # digits: 8x8, one channel, 10 classes -> the CIFAR-shaped ResNet-8-D
    assert summary["params"] == n_params(create_resnet(8, "D", "cifar", num_classes=10, in_chans=1))
    assert summary["params"] != n_params(create_resnet(8, "A", "cifar", num_classes=10, in_chans=1))


def test_a_run_with_an_unsupported_model_fails_with_a_one_line_error(tmp_path):
    with pytest.raises(tricks.TricksError, match="timm:resnet18"):
        tiny_run(plugins=["resnet_tweaks"], model="timm:resnet18", out=tmp_path / "run")
