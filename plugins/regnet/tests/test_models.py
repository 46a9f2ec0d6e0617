"""Tests of the AnyNet/RegNet networks, the zoo and the regnet plugin: the zoo against the paper's
table and its code's counts, our networks against timm's (parameter counts, and equal outputs once
the same weights are loaded), shapes with both stems, the X and Y blocks, the protocols that
zero_gamma and dropblock use, the choice of network from the run, and short runs."""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch
from torch import nn

import tricks
from modules import randomize_bn
from tricks.testing import make_ctx, tiny_run
from tricks_regnet import (ALIASES, TINY_ARCH, ZOO, ZOO_NAMES, AnyNet, AnyNetBlock, RegNet, RegNetSettings,
                           SqueezeExcite, anynet_config, build_anynet, check_arch, complexity, create_regnet,
                           regnet_config, resolve_model, resolve_stem)

# The paper's model zoo as its table gives it: d, w0, wa, wm, g -> depths, widths, GF, Mparams.
PAPER = {
    "regnetx_200mf": (13, 24, 36.44, 2.49, 8, [1, 1, 4, 7], [24, 56, 152, 368], 0.199, 2.68),
    "regnetx_400mf": (22, 24, 24.48, 2.54, 16, [1, 2, 7, 12], [32, 64, 160, 384], 0.398, 5.16),
    "regnetx_600mf": (16, 48, 36.97, 2.24, 24, [1, 3, 5, 7], [48, 96, 240, 528], 0.601, 6.20),
    "regnetx_800mf": (16, 56, 35.73, 2.28, 16, [1, 3, 7, 5], [64, 128, 288, 672], 0.800, 7.26),
    "regnetx_1.6gf": (18, 80, 34.01, 2.25, 24, [2, 4, 10, 2], [72, 168, 408, 912], 1.603, 9.19),
    "regnetx_3.2gf": (25, 88, 26.31, 2.25, 48, [2, 6, 15, 2], [96, 192, 432, 1008], 3.177, 15.30),
    "regnety_200mf": (13, 24, 36.44, 2.49, 8, [1, 1, 4, 7], [24, 56, 152, 368], 0.200, 3.16),
    "regnety_400mf": (16, 48, 27.89, 2.09, 8, [1, 3, 6, 6], [48, 104, 208, 440], 0.402, 4.34),
    "regnety_600mf": (15, 48, 32.54, 2.32, 16, [1, 3, 7, 4], [48, 112, 256, 608], 0.601, 6.06),
    "regnety_800mf": (14, 56, 38.84, 2.40, 16, [1, 3, 8, 2], [64, 128, 320, 768], 0.797, 6.26),
    "regnety_1.6gf": (27, 48, 20.71, 2.65, 24, [2, 6, 17, 2], [48, 120, 336, 888], 1.612, 11.20),
    "regnety_3.2gf": (21, 80, 42.63, 2.66, 24, [2, 5, 13, 1], [72, 216, 576, 1512], 3.176, 19.44),
}
SMALL = list(PAPER)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=None)
def meta_regnet(name: str, stem: str = "imagenet") -> AnyNet:
    with torch.device("meta"):
        return create_regnet(name, stem=stem)


@functools.lru_cache(maxsize=None)
def meta_timm_params(name: str) -> int:
    import timm

    with torch.device("meta"):
        return n_params(timm.create_model(name, pretrained=False))


def blocks(model: nn.Module) -> list[AnyNetBlock]:
    return [m for m in model.modules() if isinstance(m, AnyNetBlock)]


# --- the zoo ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SMALL)
def test_the_zoo_is_the_papers_table(name):
    d, w0, wa, wm, g, depths, widths, gf, mparams = PAPER[name]
    m = ZOO[name]
    p = m.params
    assert (p.depth, p.w0, p.wa, p.wm, p.group_width, p.bottleneck) == (d, w0, wa, wm, g, 1.0)
    assert p.se == (0.25 if name.startswith("regnety") else 0.0)
    cfg = m.config()
    assert list(cfg.depths) == depths == list(m.depths)
    assert list(cfg.widths) == widths == list(m.widths)
    assert list(cfg.groups) == [g] * 4 and cfg.bottlenecks == (1.0,) * 4
    assert cfg.depth == d and cfg.stem_width == 32
    cx = complexity(cfg)
    assert cx.flops == m.flops and cx.params == m.n_params  # exactly the paper's code's counts
    assert abs(cx.flops / 1e9 - gf) / gf < 0.02 and round(cx.flops / 1e9, 3) == pytest.approx(gf, abs=0.0015)
    assert abs(cx.params / 1e6 - mparams) / mparams < 0.02 and round(cx.params / 1e6, 2) == mparams


def test_the_larger_models_reproduce_the_papers_counts():
    for name, m in ZOO.items():
        cfg = m.config()
        assert (cfg.depths, cfg.widths) == (m.depths, m.widths), name
        assert sum(cfg.depths) == m.params.depth and all(w % 8 == 0 for w in cfg.widths)
        assert list(cfg.widths) == sorted(cfg.widths)
        cx = complexity(cfg)
        assert (cx.flops, cx.params) == (m.flops, m.n_params), name
    # RegNetX-8.0GF: the group width 120 exceeds the first stage's width 80 and is clamped to it
    assert ZOO["regnetx_8.0gf"].config().groups == (80, 120, 120, 120)


def test_names_and_aliases():
    assert len(ZOO_NAMES) == 24 and set(SMALL) <= set(ZOO_NAMES)
    assert ALIASES["regnetx_1600mf"] == "regnetx_1.6gf" and ALIASES["regnety_3200mf"] == "regnety_3.2gf"
    assert ALIASES["regnetx_4gf"] == "regnetx_4.0gf" and ALIASES["regnety_32000mf"] == "regnety_32gf"
    assert str(create_regnet("regnetx_1600mf", num_classes=10)) == str(create_regnet("regnetx_1.6gf", num_classes=10))
    with pytest.raises(KeyError, match="regnetx_200mf"):
        create_regnet("regnetx_300mf")


# --- against timm ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SMALL + ["regnetx_8.0gf"])
def test_parameter_count_equals_complexity_and_timm(name):
    model = meta_regnet(name)
    assert n_params(model) == complexity(model.cfg).params == ZOO[name].n_params
    assert n_params(model) == meta_timm_params(ZOO[name].timm)


@pytest.mark.parametrize("name", ["regnetx_200mf", "regnety_200mf"])
def test_outputs_equal_timm_with_the_same_weights(name):
    import timm

    torch.manual_seed(0)
    theirs = timm.create_model(ZOO[name].timm, pretrained=False)
    randomize_bn(theirs)
    ours = create_regnet(name)
    mine, values = ours.state_dict(), list(theirs.state_dict().values())
    assert len(mine) == len(values)  # the same layers in the same order, shape by shape
    for (key, a), b in zip(mine.items(), values):
        assert a.shape == b.shape, key
    ours.load_state_dict(dict(zip(mine, values)))
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


# --- shapes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["regnetx_200mf", "regnety_1.6gf"])
def test_imagenet_shapes_at_224(name):
    model = meta_regnet(name)
    outs = model.stage_outputs(torch.empty(2, 3, 224, 224, device="meta"))
    widths = list(ZOO[name].widths)
    assert [(o.shape[1], o.shape[2], o.shape[3]) for o in outs] == [
        (32, 112, 112), (widths[0], 56, 56), (widths[1], 28, 28), (widths[2], 14, 14), (widths[3], 7, 7)]
    assert model(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 1000)


def test_cifar_stem_ends_at_4x4_on_32x32():
    torch.manual_seed(0)
    model = create_regnet("regnetx_200mf", num_classes=10, stem="cifar").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outs = model.stage_outputs(x)
        out = model(x)
    assert [(o.shape[1], o.shape[-1]) for o in outs] == [(32, 32), (24, 32), (56, 16), (152, 8), (368, 4)]
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    # the same layers as the ImageNet network: only the strides of the stem and the first stage change
    imagenet = create_regnet("regnetx_200mf", num_classes=10)
    assert n_params(imagenet) == n_params(model)
    assert model.stem.conv.stride == (1, 1) and imagenet.stem.conv.stride == (2, 2)
    assert model.stages[0][0].conv2.stride == (1, 1) and imagenet.stages[0][0].conv2.stride == (2, 2)
    assert all(s[0].conv2.stride == (2, 2) for s in list(model.stages)[1:])


def test_forward_and_backward_on_digits_shaped_input():
    torch.manual_seed(0)
    model = AnyNet(check_arch(TINY_ARCH), num_classes=10, in_chans=1, stem="cifar")
    out = model(torch.randn(4, 1, 8, 8))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_channels_last_and_bf16_autocast():
    torch.manual_seed(0)
    cfg = regnet_config(6, 16, 8.0, 2.0, 8, se=0.25)
    model = AnyNet(cfg, 10, stem="cifar").to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out.float()).all()


# --- blocks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["regnetx_200mf", "regnety_200mf", "regnety_1.6gf"])
def test_se_only_in_y_and_its_width_is_a_quarter_of_the_block_input(name):
    model = meta_regnet(name)
    ses = [m for m in model.modules() if isinstance(m, SqueezeExcite)]
    if name.startswith("regnetx"):
        assert not ses and all(b.se is None for b in blocks(model))
        return
    assert len(ses) == len(blocks(model)) == ZOO[name].params.depth
    w_in = 32
    for block in blocks(model):
        inner = block.conv1.out_channels
        assert block.se.fc1.in_channels == inner and block.se.fc2.out_channels == inner
        assert block.se.fc1.out_channels == round(0.25 * w_in)
        assert block.se.fc1.bias is not None and block.se.fc2.bias is not None
        w_in = block.conv3.out_channels


def test_the_block_structure():
    block = AnyNetBlock(16, 32, 2, inner=16, group_width=4, w_se=4)
    assert block.conv1.kernel_size == (1, 1) and block.conv1.out_channels == 16
    assert block.conv2.kernel_size == (3, 3) and block.conv2.groups == 4 and block.conv2.stride == (2, 2)
    assert block.conv3.kernel_size == (1, 1) and block.conv3.out_channels == 32
    assert all(c.bias is None for c in (block.conv1, block.conv2, block.conv3))
    conv, bn = block.shortcut
    assert conv.stride == (2, 2) and conv.kernel_size == (1, 1) and conv.bias is None and isinstance(bn, nn.BatchNorm2d)
    assert AnyNetBlock(16, 16, 1, 16, 4).shortcut is None  # same shape: the identity
    assert AnyNetBlock(16, 24, 1, 24, 4).shortcut is not None  # a width change needs a projection
    with pytest.raises(ValueError, match="multiple"):
        AnyNetBlock(16, 20, 1, 20, 8)


def test_the_block_computes_the_formula():
    torch.manual_seed(0)
    block = AnyNetBlock(8, 8, 1, inner=16, group_width=8, w_se=2).eval()
    randomize_bn(block)
    x = torch.randn(2, 8, 5, 5)
    relu = torch.relu
    with torch.no_grad():
        h = relu(block.bn1(block.conv1(x)))
        h = relu(block.bn2(block.conv2(h)))
        s = torch.sigmoid(block.se.fc2(relu(block.se.fc1(h.mean((2, 3), keepdim=True)))))
        expected = relu(block.bn3(block.conv3(h * s)) + x)
        torch.testing.assert_close(block(x), expected)


def test_initialization_follows_the_papers_code():
    torch.manual_seed(0)
    model = create_regnet("regnetx_400mf", num_classes=100)
    conv = model.stages[3][1].conv2  # 3x3, 384 channels in groups of 16
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 384)), rel=0.05)
    conv = model.stages[2][0].conv1
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 160), rel=0.05)
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.05) and not model.fc.bias.any()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bool((b.weight == 1).all()) and not b.bias.any() for b in bns)


def test_zero_init_last_zeroes_the_last_bn():
    block = AnyNetBlock(16, 32, 2, 32, 8, 4)
    block.zero_init_last()
    assert not block.bn3.weight.any() and (block.bn1.weight == 1).all() and (block.bn2.weight == 1).all()
    assert (block.shortcut[1].weight == 1).all()
    # a zero-initialized block is its shortcut followed by a ReLU
    block.eval()
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), torch.relu(block.shortcut(x)))


def test_zero_gamma_finds_every_block():
    from tricks_zero_gamma import find_residual_blocks, zero_gamma

    model = create_regnet("regnety_200mf", num_classes=10)
    found = find_residual_blocks(model)
    assert [b.module for b in found] == blocks(model)
    assert all(b.norms == [b.module.bn3] for b in found)
    zero_gamma(model)
    assert all(not b.bn3.weight.any() and (b.bn2.weight == 1).all() for b in blocks(model))


def test_dropblock_finds_the_blocks_and_stages():
    from tricks_dropblock import DropBlock2d, dropblock_layers, find_stages, insert_dropblock, residual_blocks

    torch.manual_seed(0)
    model = create_regnet("regnety_200mf", num_classes=10, stem="cifar")
    assert find_stages(model) == list(model.stages)
    assert [b for b, _ in residual_blocks(model.stages[3])] == list(model.stages[3])
    done = insert_dropblock(model, block_size=3, stages=[-2, -1])
    assert done.num_stages == 4 and [(g, n) for g, n, _ in done.stages] == [(3, 4), (4, 7)]
    # one layer after the branch and one on the shortcut of each of the 11 blocks
    assert len(done.layers) == 22 == len(dropblock_layers(model))
    first = model.stages[2][0]
    assert isinstance(first.dropblock_branch, DropBlock2d) and isinstance(first.dropblock_shortcut, DropBlock2d)
    assert isinstance(model.stages[2][1].shortcut, DropBlock2d)  # the identity became DropBlock
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        clean = model(x)
    for layer in done.layers:
        layer.set_keep_prob(0.5)
    with torch.no_grad():
        assert torch.equal(model(x), clean)  # eval: DropBlock is the identity
        model.train()
        assert not torch.allclose(model(x), clean)


# --- choosing the network -------------------------------------------------------------------------


def test_resolve_model():
    cfg, label = resolve_model("regnetx_200mf")
    assert label == "regnetx_200mf" and cfg == ZOO["regnetx_200mf"].config()
    assert resolve_model("regnety_3200mf")[1] == "regnety_3.2gf"
    arch = {"depth": 13, "w0": 24, "wa": 36.44, "wm": 2.49, "group_width": 8}
    assert resolve_model("regnet", arch)[0] == ZOO["regnetx_200mf"].config()
    assert resolve_model("anynet", {**arch, "se": 0.25})[0] == ZOO["regnety_200mf"].config()
    per_stage = {"depths": [1, 2], "widths": [24, 56], "bottlenecks": [1, 2], "groups": 8, "se": 0.25}
    assert resolve_model("anynet", per_stage)[0] == anynet_config([1, 2], [24, 56], [1, 2], 8, 0.25)
    for m in ZOO.values():  # a config's own dict (what a sampling job sets) builds the same network
        assert check_arch(m.config().to_dict()) == m.config()


@pytest.mark.parametrize("model, arch, pattern", [
    ("resnet8", None, r"cannot build model 'resnet8'.*regnety_SIZE.*200mf, 400mf, .*32gf.*--set regnet\.arch"),
    ("timm:regnetx_002", None, r"cannot build model 'timm:regnetx_002'"),
    ("regnetx_300mf", None, r"cannot build model 'regnetx_300mf'"),
    ("anynet", None, r"--model anynet needs .*--set regnet\.arch="),
    ("regnet", None, r"--model regnet needs"),
    ("anynet", {"depths": [1, 2], "widths": [8]}, r"bad regnet\.arch.*widths has 1 entries for 2 stages"),
    ("anynet", {"depth": 10, "w0": 24}, r"bad regnet\.arch"),
    ("anynet", {"depths": [1], "widths": [8], "wdith": 3}, r"unknown key 'wdith'"),
    ("regnet", {"depth": 13, "w0": 24, "wa": 36.44, "wm": 0.5}, r"wm > 1"),
    ("regnetx_200mf", {"depths": [1], "widths": [8]}, r"zoo model.*--model anynet"),
])
def test_errors_are_one_line(model, arch, pattern):
    with pytest.raises(tricks.TricksError, match=pattern) as error:
        resolve_model(model, arch)
    assert "\n" not in str(error.value)


def test_settings_validate_the_architecture_and_the_stem():
    with pytest.raises(tricks.TricksError, match=r"regnet\.arch.*widths has 1 entries") as error:
        tricks.resolve(plugins=["regnet"], sets=["regnet.arch={depths: [1, 1], widths: [16]}"])
    assert "\n" not in str(error.value)
    with pytest.raises(tricks.TricksError, match=r"regnet\.stem"):
        tricks.resolve(plugins=["regnet"], sets=["regnet.stem=large"])
    with pytest.raises(ValueError):
        RegNetSettings(arch={"depths": [1], "widths": [8], "se": 2})
    assert RegNetSettings(arch=TINY_ARCH).arch == TINY_ARCH
    assert resolve_stem("auto", 8) == resolve_stem("auto", 32) == resolve_stem("auto", 64) == "cifar"
    assert resolve_stem("auto", 65) == resolve_stem("auto", 224) == "imagenet"
    assert resolve_stem("imagenet", 8) == "imagenet" and resolve_stem("cifar", 224) == "cifar"


@pytest.mark.parametrize("model, arch, stem, image_size, expected", [
    ("regnetx_200mf", None, "auto", 8, lambda: create_regnet("regnetx_200mf", 10, 1, "cifar")),
    ("regnety_1.6gf", None, "auto", 224, lambda: create_regnet("regnety_1.6gf", 10, 1, "imagenet")),
    ("regnetx_400mf", None, "imagenet", 32, lambda: create_regnet("regnetx_400mf", 10, 1, "imagenet")),
    ("anynet", TINY_ARCH, "auto", 8, lambda: build_anynet(check_arch(TINY_ARCH), 10, 1, "cifar")),
])
def test_build_model_follows_the_run_and_the_settings(model, arch, stem, image_size, expected):
    ctx = make_ctx(model=model, image_size=image_size)
    with torch.device("meta"):
        built = RegNet(RegNetSettings(arch=arch, stem=stem)).build_model(ctx)
        reference = expected()
    assert str(built) == str(reference) and n_params(built) == n_params(reference)
    assert len(ctx.logs) == 1 and ctx.logs[0].startswith("regnet: ") and "flops" in ctx.logs[0]


# --- in a run -------------------------------------------------------------------------------------

LIMITS = dict(train_limit=128, val_limit=64)  # tiny_run with 4 steps of 32


class Logs(tricks.Reporter):
    def __init__(self):
        self.lines = []

    def log(self, message):
        self.lines.append(message)


def test_a_run_trains_an_anynet_from_the_settings(tmp_path):
    example = RegNet.example_settings(tmp_path / "example")
    run = tiny_run(plugins=["regnet"], config={"regnet": example}, model=RegNet.example_model, out=tmp_path / "run", **LIMITS)
    assert run.config()["plugins"] == ["regnet"]
    expected = build_anynet(check_arch(TINY_ARCH), num_classes=10, in_chans=1, stem="cifar")
    assert run.summary()["params"] == n_params(expected)


def test_a_run_trains_a_zoo_regnet(tmp_path):
    # as `tricks run --plugins regnet --model regnetx_200mf` on digits (8x8, one channel, 10 classes)
    run = tiny_run(plugins=["regnet"], model="regnetx_200mf", out=tmp_path / "run", **LIMITS)
    assert run.summary()["params"] == n_params(create_regnet("regnetx_200mf", num_classes=10, in_chans=1))
    assert all(math.isfinite(row["train_loss"]) for row in run.metrics())


def test_a_run_with_zero_gamma_and_dropblock(tmp_path):
    # the plugins that change residual blocks find ours, and say what they changed
    logs = Logs()
    sets = [f"regnet.arch={TINY_ARCH}", "dropblock.block_size=3", "dropblock.stages=[2]"]
    run = tiny_run(plugins=["regnet", "zero_gamma", "dropblock"], model="anynet", set=sets, reporter=logs,
                   out=tmp_path / "run", **LIMITS)
    blocks = sum(TINY_ARCH["depths"])
    assert any(re.match(rf"zero_gamma: gamma = 0 in the last BatchNorm of {blocks} residual blocks", m) for m in logs.lines), logs.lines
    assert any(re.match(r"dropblock: [1-9]\d* DropBlock layers", m) for m in logs.lines), logs.lines
    assert all(math.isfinite(row["train_loss"]) for row in run.metrics())


@pytest.mark.parametrize("model, sets, pattern", [
    ("resnet8", [], r"cannot build model 'resnet8'"),
    ("anynet", [], r"needs an architecture"),
])
def test_a_run_that_cannot_build_its_model_fails_with_a_one_line_error(tmp_path, model, sets, pattern):
    with pytest.raises(tricks.TricksError, match=pattern) as error:
        tiny_run(plugins=["regnet"], model=model, set=sets, out=tmp_path / "run", **LIMITS)
    assert "\n" not in str(error.value)
