"""Tests of the complexity count: small cases worked out by hand, the analytic count against a
built network (our forward-hook count and torch's FlopCounterMode), and the vectorized count
against the scalar one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tricks_regnet import AnyNet, anynet_config, complexity, count_model, regnet_config, stagewise_complexity


def meta_anynet(cfg, num_classes=10, in_chans=3, stem="imagenet") -> AnyNet:
    with torch.device("meta"):
        return AnyNet(cfg, num_classes, in_chans, stem)


# --- by hand --------------------------------------------------------------------------------------


def test_one_x_block_at_8x8_by_hand():
    # stem 3 -> 8 (stride 1, 'cifar'), one X block 8 -> 16 (inner 16, group width 8: 2 groups,
    # stride 1), 10 classes, 8x8 input: every map is 8x8 = 64 pixels.
    cfg = anynet_config([1], [16], 1, 8, stem_width=8)
    stem = (9 * 3 * 8 * 64, 9 * 3 * 8 + 2 * 8, 8 * 64)  # flops, params (conv + BN), acts
    conv1 = (8 * 16 * 64, 8 * 16, 16 * 64)  # 1x1 8 -> 16
    conv2 = (9 * 8 * 16 * 64, 9 * 8 * 16, 16 * 64)  # 3x3, each output sees 8 input channels
    conv3 = (16 * 16 * 64, 16 * 16, 16 * 64)  # 1x1 16 -> 16
    bns = (0, 2 * (16 + 16 + 16), 0)
    proj = (8 * 16 * 64, 8 * 16 + 2 * 16, 16 * 64)  # the width changes: 1x1 8 -> 16 + BN
    head = (16 * 10 + 10, 16 * 10 + 10, 10)  # the classifier's multiply-adds and bias adds
    parts = [stem, conv1, conv2, conv3, bns, proj, head]
    flops, params, acts = (sum(p[i] for p in parts) for i in range(3))
    assert (flops, params, acts) == (120490, 2194, 4618)
    cx = complexity(cfg, resolution=8, stem="cifar", num_classes=10)
    assert (cx.flops, cx.params, cx.acts) == (flops, params, acts)
    model = meta_anynet(cfg, stem="cifar")
    assert sum(p.numel() for p in model.parameters()) == params
    assert count_model(model, (1, 3, 8, 8)) == cx


def test_one_y_block_at_8x8_by_hand():
    # the same block with squeeze-excitation: w_se = round(0.25 * 8) = 2 channels, at 1x1
    x = complexity(anynet_config([1], [16], 1, 8, stem_width=8), 8, "cifar", 10)
    y = complexity(anynet_config([1], [16], 1, 8, se=0.25, stem_width=8), 8, "cifar", 10)
    se = 16 * 2 + 2 + 2 * 16 + 16  # 1x1 16 -> 2 with bias, 1x1 2 -> 16 with bias
    assert se == 82
    assert y.flops - x.flops == se and y.params - x.params == se
    assert y.acts - x.acts == 2 + 16


def test_the_imagenet_stem_halves_every_map_by_hand():
    # 8x8 input: the stem (stride 2) gives 4x4, the stage (stride 2) 2x2
    cfg = anynet_config([1], [16], 1, 8, stem_width=8)
    stem = 9 * 3 * 8 * 16
    conv1 = 8 * 16 * 16  # the 1x1 runs before the stride, at 4x4
    conv2 = 9 * 8 * 16 * 4  # the strided 3x3 produces 2x2
    conv3 = 16 * 16 * 4
    proj = 8 * 16 * 4
    head = 16 * 10 + 10
    cx = complexity(cfg, 8, "imagenet", 10)
    assert cx.flops == stem + conv1 + conv2 + conv3 + proj + head
    assert cx.acts == 8 * 16 + 16 * 16 + 16 * 4 * 3 + 10


def test_a_second_block_has_the_identity_shortcut():
    one = complexity(anynet_config([1], [16], 1, 8, stem_width=8), 8, "cifar", 10)
    two = complexity(anynet_config([2], [16], 1, 8, stem_width=8), 8, "cifar", 10)
    block = 16 * 16 * 64 + 9 * 8 * 16 * 64 + 16 * 16 * 64  # 16 -> 16: conv1, conv2, conv3; no projection
    assert two.flops - one.flops == block
    assert two.params - one.params == 16 * 16 + 9 * 8 * 16 + 16 * 16 + 2 * 48


# --- against a built network ----------------------------------------------------------------------


def random_config(rng: np.random.Generator, n_stages: int | None = None, se: float | None = None):
    n = n_stages or int(rng.integers(1, 5))
    depths = rng.integers(1, 4, n).tolist()
    widths = (8 * rng.integers(1, 12, n)).tolist()
    bottlenecks = rng.choice([1, 2, 4], n).tolist()
    groups = rng.choice([1, 2, 4, 8, 16, 32], n).tolist()  # above the inner width: clamped
    se = float(rng.choice([0.0, 0.25])) if se is None else se
    stem_width = int(8 * rng.integers(1, 5))
    return anynet_config(depths, widths, bottlenecks, groups, se, stem_width)


@pytest.mark.parametrize("seed", range(8))
def test_the_count_of_a_built_network_equals_the_analytic_count(seed):
    rng = np.random.default_rng(seed)
    cfg = random_config(rng)
    stem = ["imagenet", "cifar"][seed % 2]
    resolution = int(rng.choice([16, 24, 32]))
    classes = int(rng.integers(2, 20))
    model = meta_anynet(cfg, classes, 3, stem)
    assert count_model(model, (1, 3, resolution, resolution)) == complexity(cfg, resolution, stem, classes)


def test_the_configs_cover_bottlenecks_clamped_groups_and_se():
    cfgs = [random_config(np.random.default_rng(seed)) for seed in range(8)]
    assert {b for c in cfgs for b in c.bottlenecks} == {1.0, 2.0, 4.0}
    assert any(g < 32 and g == inner for c in cfgs for g, inner in zip(c.groups, c.inner_widths))  # clamped
    assert {c.se for c in cfgs} == {0.0, 0.25}


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_the_vectorized_count_equals_the_scalar_one(stem):
    rng = np.random.default_rng(1)
    for n_stages in (1, 2, 4):
        for se in (0.0, 0.25):
            cfgs = [random_config(rng, n_stages, se) for _ in range(6)]
            by_stem = {}
            for cfg in cfgs:
                by_stem.setdefault(cfg.stem_width, []).append(cfg)
            for stem_width, group in by_stem.items():
                arrays = [np.array([getattr(c, k) for c in group]) for k in ("depths", "widths", "inner_widths", "groups")]
                flops, params, acts = stagewise_complexity(*arrays, se, 32, stem, 100, stem_width=stem_width)
                for i, cfg in enumerate(group):
                    cx = complexity(cfg, 32, stem, 100)
                    assert (flops[i], params[i], acts[i]) == (cx.flops, cx.params, cx.acts)


def test_the_vectorized_count_of_the_zoo():
    from tricks_regnet import ZOO

    models = [m for m in ZOO.values() if len(m.depths) == 4]
    for se in (0.0, 0.25):
        group = [m for m in models if m.params.se == se]
        cfgs = [m.config() for m in group]
        arrays = [np.array([getattr(c, k) for c in cfgs]) for k in ("depths", "widths", "inner_widths", "groups")]
        flops, params, _ = stagewise_complexity(*arrays, se, 224, "imagenet", 1000)
        assert flops.tolist() == [m.flops for m in group] and params.tolist() == [m.n_params for m in group]


def _bias_adds(model: nn.Module, input_size) -> int:
    """One add per output element of every layer with a bias (per example)."""
    total = 0

    def hook(module, args, output):
        nonlocal total
        if getattr(module, "bias", None) is not None and isinstance(module, (nn.Conv2d, nn.Linear)):
            total += output.numel() // output.shape[0]

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model.eval()(torch.empty(input_size, device="meta"))
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("cfg, stem, side", [
    (regnet_config(13, 24, 36.44, 2.49, 8), "imagenet", 64),
    (regnet_config(13, 24, 36.44, 2.49, 8, se=0.25), "cifar", 32),
    (anynet_config([2, 1], [32, 48], [2, 4], 4, 0.25, 16), "imagenet", 24),
])
def test_multiply_adds_equal_torchs_flop_counter(cfg, stem, side):
    model = meta_anynet(cfg, 10, 3, stem)
    x = torch.empty(1, 3, side, side, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    torch_flops = counter.get_total_flops()
    cx = complexity(cfg, side, stem, 10)
    assert cx.flops - _bias_adds(model, (1, 3, side, side)) == torch_flops // 2
    assert torch_flops % 2 == 0
