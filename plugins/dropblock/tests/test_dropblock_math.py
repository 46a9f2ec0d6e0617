"""Tests of DropBlock's math: the invariants of the paper's algorithm, the seed probability,
the measured dropped fractions, equality with torchvision's ``drop_block2d``, the schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tricks_dropblock import (DropBlock2d, apply_block_mask, drop_block, dropblock_gamma, expand_seeds,
                              expected_drop_fraction, linear_keep_prob, stage_keep_prob)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def dropped(x, keep_prob, block_size):
    """The 0/1 mask of the positions DropBlock zeroed in an all-ones input (float64)."""
    out = drop_block(torch.ones_like(x, dtype=torch.float64), keep_prob, block_size)
    return (out == 0).double()


# --- identity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 3, 7])
def test_eval_mode_and_keep_prob_one_are_the_identity(block_size):
    x = torch.randn(4, 8, 9, 9)
    assert drop_block(x, 0.5, block_size, training=False) is x
    assert drop_block(x, 1.0, block_size) is x
    layer = DropBlock2d(block_size, keep_prob=0.5).eval()
    assert layer(x) is x
    layer.train()
    assert not torch.equal(layer(x), x)
    layer.keep_prob = 1.0
    assert layer(x) is x


# --- the shape of what is dropped ---------------------------------------------------------------


@pytest.mark.parametrize("side, block_size", [(16, 7), (16, 4), (9, 3), (12, 2), (7, 7), (10, 1)])
def test_zeros_come_in_whole_squares_inside_the_map(side, block_size):
    x = torch.ones(8, 16, side, side, dtype=torch.float64)
    d = dropped(x, 0.8, block_size)
    assert d.any()
    # every bs x bs square lying inside the map that is entirely dropped ...
    full = F.avg_pool2d(d, block_size, stride=1) == 1
    # ... and the dropped positions are exactly their union: no dropped pixel outside a whole square
    union = torch.zeros_like(d)
    for di in range(block_size):
        for dj in range(block_size):
            union[..., di:di + full.shape[-2], dj:dj + full.shape[-1]] += full.double()
    assert torch.equal(union > 0, d > 0)


def test_masks_differ_per_example_and_per_channel():
    d = dropped(torch.ones(4, 6, 14, 14), 0.7, 3)
    flat = d.flatten(2)  # [N, C, H*W]
    assert not torch.equal(flat[0, 0], flat[0, 1])  # per channel
    assert not torch.equal(flat[0, 0], flat[1, 0])  # per example
    n_distinct = len({tuple(m.tolist()) for m in flat.reshape(-1, 14 * 14)})
    assert n_distinct > 20


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_an_all_ones_input_keeps_mean_one(dtype):
    for side, bs, kp in [(14, 7, 0.9), (8, 3, 0.5), (5, 7, 0.8), (32, 5, 0.75)]:
        out = drop_block(torch.ones(8, 16, side, side, dtype=dtype), kp, bs)
        assert (out == 0).any()
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        assert abs(out.double().mean().item() - 1.0) < tol


def test_renormalization_is_batch_global():
    # one scale for the whole tensor: numel / count(kept), not per example or channel
    x = torch.rand(6, 5, 12, 12, dtype=torch.float64) + 0.5
    out = drop_block(x, 0.7, 3)
    kept = out != 0
    ratios = out[kept] / x[kept]
    torch.testing.assert_close(ratios, torch.full_like(ratios, x.numel() / kept.sum().item()))


def test_apply_block_mask_with_everything_dropped_gives_zeros_not_nan():
    x = torch.randn(2, 3, 4, 4)
    out = apply_block_mask(x, torch.ones_like(x))
    assert torch.equal(out, torch.zeros_like(x))
    for block_size in (1, 4, 9):  # keep_prob 0 with a block as large as the map (or 1): gamma = 1
        assert torch.equal(drop_block(x, 0.0, block_size), torch.zeros_like(x))


def test_expand_seeds_grows_each_seed_into_its_square():
    seeds = torch.zeros(1, 1, 4, 5)
    seeds[0, 0, 1, 2] = 1
    mask = expand_seeds(seeds, 3)
    assert mask.shape == (1, 1, 6, 7) and mask.dtype == torch.bool
    expected = torch.zeros(1, 1, 6, 7, dtype=torch.bool)
    expected[0, 0, 1:4, 2:5] = True
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("block_size", [1, 2, 3, 6, 7])
def test_the_pooling_and_the_shifting_expansion_agree(block_size):
    # CUDA uses max_pool2d, other devices a separable OR of shifted copies: the same mask
    from tricks_dropblock.functional import _expand_by_pooling, _expand_by_shifts

    seeds = torch.empty(3, 5, 9, 6).bernoulli_(0.1)
    by_pool, by_shift = _expand_by_pooling(seeds, block_size), _expand_by_shifts(seeds, block_size)
    assert by_pool.dtype == by_shift.dtype == torch.bool
    assert by_pool.shape == (3, 5, 9 + block_size - 1, 6 + block_size - 1)
    assert torch.equal(by_pool, by_shift) and by_pool.any()
    cl = seeds.contiguous(memory_format=torch.channels_last)
    assert torch.equal(_expand_by_shifts(cl, block_size), by_pool)


# --- gamma and the dropped fraction -----------------------------------------------------------


def test_gamma_is_the_papers_formula():
    for kp, bs, feat in [(0.9, 7, 56), (0.9, 7, 14), (0.75, 5, 28), (0.5, 3, 9)]:
        expected = (1 - kp) / bs**2 * feat**2 / (feat - bs + 1) ** 2
        assert dropblock_gamma(kp, bs, feat, feat) == pytest.approx(expected, rel=1e-12)
    # non-square maps: one factor per side, as torchvision
    assert dropblock_gamma(0.9, 3, 10, 6) == pytest.approx(0.1 / 9 * 60 / (8 * 4), rel=1e-12)


@pytest.mark.parametrize("kp", [0.9, 0.75, 0.5])
def test_a_block_as_large_as_the_map_has_gamma_one_minus_keep_prob(kp):
    assert dropblock_gamma(kp, 7, 7, 7) == pytest.approx(1 - kp, rel=1e-12)
    assert dropblock_gamma(kp, 9, 7, 7) == pytest.approx(1 - kp, rel=1e-12)  # clipped to the map
    # then whole channels are dropped (SpatialDropout) with probability 1 - kp
    d = dropped(torch.ones(200, 100, 7, 7), kp, 7)
    per_channel = d.mean((2, 3))
    assert set(per_channel.unique().tolist()) <= {0.0, 1.0}
    n = per_channel.numel()
    assert abs(per_channel.mean().item() - (1 - kp)) < 5 * math.sqrt(kp * (1 - kp) / n)


@pytest.mark.parametrize("kp", [0.9, 0.7])
def test_block_size_one_is_dropout(kp):
    assert dropblock_gamma(kp, 1, 13, 13) == pytest.approx(1 - kp, rel=1e-12)
    x = torch.rand(64, 32, 13, 13, dtype=torch.float64) + 0.5
    out = drop_block(x, kp, 1)
    d = (out == 0).double()
    n = d.numel()
    assert abs(d.mean().item() - (1 - kp)) < 5 * math.sqrt(kp * (1 - kp) / n)
    # what is kept is scaled like inverted dropout (by the realised kept fraction)
    torch.testing.assert_close(out, x * (1 - d) * n / (1 - d).sum())
    # independent per position: neighbours are dropped together as often as chance says
    both = (d[..., :, 1:] * d[..., :, :-1]).mean().item()
    assert abs(both - (1 - kp) ** 2) < 0.01


# measured (not exact) fractions from the technique's fact sheet: bs 7, feat 56/28/14, kp 0.9; kp 0.75 at 14
SHEET = [(56, 0.9, 0.094), (28, 0.9, 0.096), (14, 0.9, 0.094), (14, 0.75, 0.209)]


@pytest.mark.parametrize("feat, kp, sheet", SHEET)
def test_the_dropped_fraction_is_below_one_minus_keep_prob_and_as_measured(feat, kp, sheet):
    exact = expected_drop_fraction(kp, 7, feat, feat)
    assert exact < 1 - kp  # overlapping blocks drop less than 1 - keep_prob
    assert abs(exact - sheet) < 0.003  # the sheet's sampled values agree with the exact expectation
    maps = 3_200_000 // feat**2
    d = dropped(torch.ones(maps // 64, 64, feat, feat), kp, 7)
    # sampled: a block of 49 positions per seed; standard error < 0.0015 with ~3.2M positions
    assert abs(d.mean().item() - exact) < 0.006
    assert d.mean().item() < 1 - kp


def test_the_expected_fraction_approaches_one_minus_keep_prob_without_overlaps():
    # as gamma -> 0 overlaps vanish and the fraction -> 1 - keep_prob
    ratios = [expected_drop_fraction(kp, 5, 40, 40) / (1 - kp) for kp in (0.5, 0.9, 0.99, 0.999)]
    assert ratios == sorted(ratios) and ratios[-1] > 0.999


# --- equality with torchvision ----------------------------------------------------------------


@pytest.mark.parametrize("shape, block_size", [((4, 8, 15, 13), 3), ((4, 8, 15, 13), 7), ((2, 4, 14, 14), 5),
                                               ((2, 4, 15, 13), 15), ((3, 5, 9, 9), 1)])
@pytest.mark.parametrize("kp", [0.9, 0.6])
def test_equals_torchvision_drop_block2d_from_the_same_generator_state(shape, block_size, kp):
    # torchvision's p is the drop probability, 1 - keep_prob; it takes odd block sizes only.
    # Both draw the seeds with one bernoulli_ call of the same shape, so the same generator state
    # gives the same masks; the only difference is torchvision's eps in the normalization.
    from torchvision.ops import drop_block2d

    x = torch.randn(*shape)
    torch.manual_seed(11)
    theirs = drop_block2d(x, 1 - kp, block_size)
    torch.manual_seed(11)
    ours = drop_block(x, kp, block_size)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours == 0, theirs == 0)


def test_even_block_sizes_which_torchvision_rejects_follow_the_same_math():
    from torchvision.ops import drop_block2d

    with pytest.raises(ValueError):
        drop_block2d(torch.ones(1, 1, 8, 8), 0.1, 4)
    d = dropped(torch.ones(1024, 64, 12, 12), 0.8, 4)
    assert abs(d.mean().item() - expected_drop_fraction(0.8, 4, 12, 12)) < 0.01


# --- dtypes, layouts, devices -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    x = torch.ones(16, 32, 14, 14, dtype=dtype)
    out = drop_block(x, 0.8, 5)
    assert out.dtype == dtype and torch.isfinite(out).all() and (out == 0).any()
    assert abs(out.double().mean().item() - 1) < 0.01


def test_channels_last_is_kept():
    x = torch.randn(4, 16, 10, 10).contiguous(memory_format=torch.channels_last)
    out = drop_block(x, 0.8, 3)
    assert out.is_contiguous(memory_format=torch.channels_last)
    d = (drop_block(torch.ones_like(x), 0.8, 3) == 0).double()
    full = F.avg_pool2d(d, 3, stride=1) == 1
    assert full.any() and d.sum() <= full.sum() * 9


def test_no_host_synchronization():
    # On the meta device any .item(), bool(tensor) or copy to the host raises: the function has none.
    x = torch.empty(4, 16, 14, 14, device="meta")
    out = drop_block(x, 0.9, 7)
    assert out.shape == x.shape and out.device.type == "meta"


def test_autograd_passes_gradient_through_kept_positions_only():
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = drop_block(x, 0.7, 3)
    out.sum().backward()
    kept = out.detach() != 0
    assert torch.equal(x.grad == 0, ~kept)


# --- schedule ---------------------------------------------------------------------------------


def test_linear_schedule_from_one_to_the_target():
    total = 101
    values = [linear_keep_prob(s, total, 0.9) for s in range(total)]
    assert values[0] == 1.0 and values[-1] == pytest.approx(0.9, abs=1e-15)
    assert values[50] == pytest.approx(0.95)
    assert all(a >= b for a, b in zip(values, values[1:]))
    diffs = [a - b for a, b in zip(values, values[1:])]
    assert max(diffs) - min(diffs) < 1e-12  # linear
    assert linear_keep_prob(total + 5, total, 0.9) == pytest.approx(0.9)  # held after the end
    assert linear_keep_prob(0, 1, 0.9) == 0.9  # one step: the target


def test_stage_scaling_as_the_official_code():
    assert stage_keep_prob(0.9, 4, 4) == pytest.approx(0.9)
    assert stage_keep_prob(0.9, 3, 4) == pytest.approx(1 - 0.1 / 4)
    assert stage_keep_prob(0.9, 1, 4) == pytest.approx(1 - 0.1 / 64)
    layer = DropBlock2d(7, rate_scale=0.25)
    layer.set_keep_prob(0.9)
    assert layer.keep_prob == pytest.approx(stage_keep_prob(0.9, 3, 4))
