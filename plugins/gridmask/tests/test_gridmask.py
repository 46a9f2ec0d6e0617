"""Tests of the GridMask plugin: equality with the paper's procedure (stripes drawn on a
diagonal-sized canvas, rotated with PIL, centre crop; written here one image at a time), the
invariants of the technique, the probability ramp, the plugin's wiring and settings, and a run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tricks
from tricks.testing import BatchWatcher, make_ctx, tiny_run
from tricks_gridmask import (GridMask, GridMaskSettings, d_range, grid_mask, gridmask, ramp_prob, sample_grids,
                             stripe_width)

B = 16


def make_batch(seed: int = 0, b: int = B, c: int = 3, h: int = 32, w: int = 32, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(b, c, h, w, generator=g) + 0.5).to(dtype)  # no zeros: a zero means dropped
    y = torch.randint(0, 10, (b,), generator=g)
    return x, y


def canvas_reference(h: int, w: int, d: int, start_y: int, start_x: int, angle: int, ratio: float, mode: int):
    """The paper's procedure for one image: a square canvas of the diagonal's side, stripes of
    width ceil(d * r) every d pixels from start_y (rows) and start_x (columns) set to 0 in a
    mask of ones, rotated by ``angle`` degrees with PIL (nearest), the central h x w cut out,
    inverted in mode 1. Returns the dropped pixels (mask 0), bool [h, w]."""
    from PIL import Image

    hh = math.ceil(math.sqrt(h * h + w * w))
    l = math.ceil(d * ratio)
    mask = np.ones((hh, hh), np.float32)
    for i in range(-1, hh // d + 1):
        s, t = d * i + start_y, d * i + start_y + l
        mask[max(min(s, hh), 0):max(min(t, hh), 0), :] = 0
        s, t = d * i + start_x, d * i + start_x + l
        mask[:, max(min(s, hh), 0):max(min(t, hh), 0)] = 0
    mask = np.asarray(Image.fromarray(np.uint8(mask)).rotate(angle))
    top, left = (hh - h) // 2, (hh - w) // 2
    mask = mask[top:top + h, left:left + w]
    if mode == 1:
        mask = 1 - mask
    return torch.from_numpy(mask == 0)


def ctx(epoch: int = 300, epochs: int = 300):
    return make_ctx(epoch=epoch, epochs=epochs)


def plugin(**settings) -> GridMask:
    return GridMask(GridMaskSettings(**settings))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- equality with the paper's procedure ----------------------------------------------------


def _compare(h, w, angles, mode, draws=6):
    """Our mask and the canvas reference for the same d, start and angle. The canvas's
    centre is the image's when the diagonal minus each side is even (32x32: 46, 32x24: 40);
    canvas row ``top + i`` is image row ``i``, so our offset is ``(top - start) mod d``."""
    hh = math.ceil(math.sqrt(h * h + w * w))
    top, left = (hh - h) // 2, (hh - w) // 2
    rng = np.random.default_rng(h * 100 + w + mode)
    mismatches = []
    for angle in angles:
        for _ in range(draws):
            d = int(rng.integers(3, max(h, w) + 4))
            sy, sx = int(rng.integers(d)), int(rng.integers(d))
            ours = grid_mask(h, w, torch.tensor([d]), torch.tensor([(top - sy) % d]), torch.tensor([(left - sx) % d]),
                             torch.tensor([angle]), ratio=0.6, mode=mode)[0]
            ref = canvas_reference(h, w, d, sy, sx, angle, 0.6, mode)
            mismatches.append((ours != ref).sum().item())
    return mismatches


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("h,w", [(32, 32), (32, 24)])
def test_unrotated_and_right_angles_equal_the_canvas_reference_exactly(h, w, mode):
    assert max(_compare(h, w, [0, 90, 180, 270], mode)) == 0


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("h,w", [(32, 32), (32, 24)])
def test_rotated_masks_equal_the_canvas_reference_up_to_rounding(h, w, mode):
    # PIL rotates in double precision, we in float32: a pixel centre that lands within
    # rounding of a stripe edge may fall the other way. Nothing else may differ.
    angles = [7, 30, 45, 61, 137, 200, 333, 359]
    mismatches = _compare(h, w, angles, mode)
    assert max(mismatches) <= 0.005 * h * w
    assert sum(mismatches) <= 0.001 * h * w * len(mismatches)


# --- invariants -----------------------------------------------------------------------------


@pytest.mark.parametrize("rotate", [1, 360])
@pytest.mark.parametrize("mode", [0, 1])
def test_output_is_the_input_or_zero_with_one_mask_for_all_channels(rotate, mode):
    x, _ = make_batch(1)
    out = gridmask(x, rotate=rotate, mode=mode)
    zero = out == 0
    assert torch.equal(out[~zero], x[~zero])                       # elementwise x or 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))          # the same in every channel
    assert zero.any() and not zero.all()


def test_inputs_are_left_unchanged_by_the_plain_function():
    x, _ = make_batch(2)
    x0 = x.clone()
    gridmask(x)
    assert torch.equal(x, x0)


@pytest.mark.parametrize("d", [3, 5, 7, 12, 20, 31])
@pytest.mark.parametrize("ratio", [0.4, 0.6])
def test_unrotated_dropped_fraction_over_all_offsets_is_one_minus_l_over_d_squared(d, ratio):
    # Over all d x d offsets every pixel is dropped in exactly (d - l)^2 of them.
    h = w = 24
    oy, ox = torch.meshgrid(torch.arange(d), torch.arange(d), indexing="ij")
    n = d * d
    mask = grid_mask(h, w, torch.full((n,), d), oy.flatten(), ox.flatten(), torch.zeros(n, dtype=torch.long), ratio=ratio)
    l = min(max(math.ceil(d * ratio), 1), d - 1)
    assert mask.double().mean().item() == pytest.approx((1 - l / d) ** 2, abs=1e-12)
    per_pixel = mask.double().mean(0)
    assert torch.allclose(per_pixel, torch.full_like(per_pixel, (1 - l / d) ** 2))
    assert abs((1 - l / d) ** 2 - (1 - ratio) ** 2) <= 2 / d  # and close to (1 - r)^2


@pytest.mark.parametrize("rotate", [1, 360])
def test_sampled_dropped_fraction_is_close_to_one_minus_r_squared(rotate):
    # The paper's setting: 224-pixel images, d in [96, 224), r = 0.6: about 0.16 dropped; the
    # rotation moves the grid but keeps its density. 64 images: the spread over offsets and
    # d is a few per cent per image.
    x = torch.ones(64, 1, 224, 224)
    out = gridmask(x, ratio=0.6, rotate=rotate)
    dropped = (out == 0).double().mean().item()
    assert abs(dropped - 0.16) < 0.02


def test_unrotated_masks_are_periodic_with_period_d_and_squares_of_side_d_minus_l():
    d_all, oy, ox, _ = sample_grids(32, 3, 20, 1)
    mask = grid_mask(40, 40, d_all, oy, ox, torch.zeros(32, dtype=torch.long))
    for i in range(32):
        d, m = int(d_all[i]), mask[i]
        assert torch.equal(m[d:], m[:-d]) and torch.equal(m[:, d:], m[:, :-d])
        l = int(stripe_width(d_all[i:i + 1], 0.6))
        # rows and columns of squares: (r + oy) mod d >= l; the mask is their outer product
        rows = (torch.arange(40) + oy[i]) % d >= l
        cols = (torch.arange(40) + ox[i]) % d >= l
        assert torch.equal(m, rows[:, None] & cols[None, :])
        assert rows[:d].sum() == d - l


def test_mode_zero_keeps_the_squares_mode_one_drops_them():
    params = sample_grids(8, 4, 16, 360)
    assert torch.equal(grid_mask(16, 16, *params, mode=0), ~grid_mask(16, 16, *params, mode=1))


def test_stripe_width_is_ceil_of_r_d_kept_inside_one_and_d_minus_one():
    d = torch.arange(2, 300)
    l = stripe_width(d, 0.6)
    assert ((l >= 1) & (l <= d - 1)).all()
    for di, li in zip(d.tolist(), l.tolist()):
        if di >= 3:  # 0.6 * d <= d - 1 from d = 3 on: the paper's ceil, unchanged
            assert li == math.ceil(0.6 * di)
    assert stripe_width(torch.tensor([10]), 0.95).item() == 9   # ceil would give 10: no squares left
    assert stripe_width(torch.tensor([10]), 0.01).item() == 1


def test_d_range_is_relative_to_the_side_with_pixels_overriding():
    assert d_range(224) == (96, 224)     # the paper's ImageNet range
    assert d_range(32) == (14, 32)
    assert d_range(8) == (3, 8)
    assert d_range(3) == (2, 3)          # at least 2 pixels
    assert d_range(224, d_min_pixels=10, d_max_pixels=40) == (10, 40)
    assert d_range(32, d_min=0.5, d_max_pixels=20) == (16, 20)
    d, oy, ox, angle = sample_grids(4000, 14, 32, 360)
    assert d.min() == 14 and d.max() == 31
    assert ((oy >= 0) & (oy < d) & (ox >= 0) & (ox < d)).all()
    assert angle.min() >= 0 and angle.max() <= 359 and angle.max() > 350
    assert (sample_grids(50, 3, 8, 1)[3] == 0).all() and (sample_grids(50, 3, 8, 0)[3] == 0).all()


# --- the ramp -------------------------------------------------------------------------------


def test_ramp_probability():
    assert ramp_prob(0, 0.8, 240) == 0.0
    assert ramp_prob(120, 0.8, 240) == pytest.approx(0.4)
    assert ramp_prob(240, 0.8, 240) == pytest.approx(0.8)
    assert ramp_prob(299, 0.8, 240) == pytest.approx(0.8)
    assert ramp_prob(0, 0.8, 0) == 0.8
    p = plugin()  # ramp 0.8 of the run's epochs: 240 of 300, as the paper
    assert p.probability(ctx(0, 300)) == 0.0
    assert p.probability(ctx(60, 300)) == pytest.approx(0.2)
    assert p.probability(ctx(240, 300)) == pytest.approx(0.8)
    assert plugin(ramp=0.5).probability(ctx(5, 20)) == pytest.approx(0.4)
    assert plugin(ramp_epochs=10).probability(ctx(5, 300)) == pytest.approx(0.4)
    assert plugin(ramp=0, prob=0.6).probability(ctx(0, 10)) == pytest.approx(0.6)


def test_epoch_zero_and_p_zero_are_the_identity():
    x, y = make_batch(3)
    assert plugin().on_batch(ctx(0, 300), {"input": x, "target": y}) is None
    assert plugin(prob=0.0, ramp=0).on_batch(ctx(5, 10), {"input": x, "target": y}) is None
    assert torch.equal(x, make_batch(3)[0])


@pytest.mark.parametrize("epoch,expected", [(60, 0.2), (120, 0.4), (280, 0.8)])
def test_the_share_of_masked_images_follows_the_ramp(epoch, expected):
    n = 1500
    x = torch.ones(n, 1, 16, 16)
    out = plugin().on_batch(ctx(epoch, 300), {"input": x, "target": torch.zeros(n, dtype=torch.long)})
    masked = (out["input"] == 0).flatten(1).any(1).double().mean().item()
    assert abs(masked - expected) < 5 * math.sqrt(expected * (1 - expected) / n)


# --- the plugin -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0, 1])
def test_on_batch_equals_the_functions_and_changes_the_batch_in_place(mode):
    x, y = make_batch(4)
    torch.manual_seed(5)
    params = sample_grids(B, *d_range(32), 360)
    chosen = torch.rand(B) < 0.4
    assert 0 < chosen.sum() < B
    expected = x.masked_fill((grid_mask(32, 32, *params, ratio=0.5, mode=mode) & chosen.view(-1, 1, 1)).unsqueeze(1), 0)
    torch.manual_seed(5)
    batch = {"input": x.clone(), "target": y}
    out = plugin(ratio=0.5, prob=0.4, ramp=0, mode=mode).on_batch(ctx(), batch)
    assert out is batch and torch.equal(out["input"], expected)


@pytest.mark.parametrize("mode", [0, 1])
def test_apply_leaves_the_other_images_alone(mode):
    params = sample_grids(12, 3, 16, 360)
    apply = torch.tensor([True, False] * 6)
    full = grid_mask(16, 16, *params, mode=mode)
    masked = grid_mask(16, 16, *params, mode=mode, apply=apply)
    assert torch.equal(masked, full & apply.view(-1, 1, 1))
    assert not masked[~apply].any() and full[~apply].any()


def _devices():
    devices = [torch.device("cpu"), torch.device("meta")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


@pytest.mark.parametrize("device", _devices(), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_batch_keeps_device_dtype_shape_and_memory_format(device, dtype):
    x, y = make_batch(6, h=8, w=12, dtype=dtype)
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    out = plugin(ramp=0).on_batch(ctx(), {"input": x, "target": y.to(device)})
    assert out["input"].device.type == device.type and out["input"].dtype == dtype and out["input"].shape == x.shape
    assert out["input"].is_contiguous(memory_format=torch.channels_last)


def test_tiny_images_get_a_grid():
    # 8x8 digits: d in [3, 8), stripes ceil(0.6 d), squares of 1-3 pixels. Unrotated, a whole
    # period fits in the image, so every image loses at least one square.
    x = torch.ones(64, 1, 8, 8)
    out = plugin(ramp=0, prob=1.0, rotate=1).on_batch(ctx(), {"input": x, "target": torch.zeros(64, dtype=torch.long)})
    dropped = (out["input"] == 0).flatten(1).sum(1)
    assert (dropped > 0).all() and (dropped < 64).all()


def test_a_batch_that_is_not_images_is_a_one_line_error():
    with pytest.raises(tricks.TricksError, match="gridmask needs image batches"):
        plugin(ramp=0).on_batch(ctx(), {"input": torch.randn(B, 20), "target": torch.zeros(B, dtype=torch.long)})


def test_settings_errors_name_the_key_and_gridmask_runs_before_the_mixers():
    with pytest.raises(tricks.TricksError, match=r"gridmask\.d_max.*d_min"):
        tricks.resolve(plugins=["gridmask"], sets=["gridmask.d_min=0.5", "gridmask.d_max=0.4"])
    with pytest.raises(tricks.TricksError, match=r"gridmask\.d_max_pixels"):
        tricks.resolve(plugins=["gridmask"], sets=["gridmask.d_min_pixels=40", "gridmask.d_max_pixels=20"])
    with pytest.raises(tricks.TricksError, match=r"gridmask\.ratio"):
        tricks.resolve(plugins=["gridmask"], sets=["gridmask.ratio=1"])
    with pytest.raises(tricks.TricksError, match=r"gridmask\.mode"):
        tricks.resolve(plugins=["gridmask"], sets=["gridmask.mode=2"])
    cfg = tricks.resolve(plugins=["cutmix", "gridmask"], sets=["gridmask.ramp=0.5", "gridmask.d_min_pixels=4"])
    assert cfg.settings["gridmask"].ramp == 0.5 and cfg.settings["gridmask"].d_min_pixels == 4
    assert cfg.plugins.index("gridmask") < cfg.plugins.index("cutmix")


# --- in a run -------------------------------------------------------------------------------


def test_a_run_trains_on_masked_images(tmp_path):
    watch = BatchWatcher(lambda batch: (batch["input"] == 0).flatten(1).any(1))  # which images lost pixels
    tiny_run(plugins=["gridmask", watch], set=["gridmask.ramp=0", "gridmask.prob=1.0"], train_limit=128, val_limit=64,
             out=tmp_path / "run")
    assert len(watch.batches) == 4  # 128 digits in batches of 32
    # Rotated, a grid of small squares can fall between the pixel centres of an 8x8 image
    # (about 1 image in 700): nearly every image, not every one, loses pixels.
    hit = torch.cat(watch.batches)
    assert hit.double().mean() > 0.95
