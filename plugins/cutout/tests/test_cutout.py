"""Tests of the Cutout plugin: the invariants of the technique, equality with a per-image
reference written from the paper's description (loops and slices, one image at a time), the
distribution of the holes, the plugin's wiring to ``on_batch`` and its settings, and a run."""

from __future__ import annotations

import math

import pytest
import torch

import tricks
from tricks.testing import BatchWatcher, make_ctx, tiny_run
from tricks_cutout import Cutout, CutoutSettings, apply_mask, cutout, cutout_mask, sample_centres

B = 16


def make_batch(seed: int = 0, b: int = B, c: int = 3, h: int = 12, w: int = 12, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(b, c, h, w, generator=g) + 0.5).to(dtype)  # no zeros: a zero means erased
    y = torch.randint(0, 10, (b,), generator=g)
    return x, y


def reference(x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, length: int) -> torch.Tensor:
    """Cutout as the paper describes it, one image at a time: for each hole, rows
    ``clip(y - L // 2, 0, h) : clip(y + L // 2, 0, h)`` and the same columns are set to 0 in a
    mask of ones shared by the channels, and the image is multiplied by the mask."""
    out = x.clone()
    _, _, h, w = x.shape
    for i in range(x.shape[0]):
        mask = torch.ones(h, w)
        for n in range(cy.shape[1]):
            y, xc = int(cy[i, n]), int(cx[i, n])
            y1, y2 = min(max(y - length // 2, 0), h), min(max(y + length // 2, 0), h)
            x1, x2 = min(max(xc - length // 2, 0), w), min(max(xc + length // 2, 0), w)
            mask[y1:y2, x1:x2] = 0.0
        out[i] = x[i] * mask
    return out


def plugin(**settings) -> Cutout:
    return Cutout(CutoutSettings(**settings))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- equality with the per-image reference ---------------------------------------------------


@pytest.mark.parametrize("length", [1, 2, 3, 4, 7, 8, 16, 40])
@pytest.mark.parametrize("n_holes", [1, 3])
@pytest.mark.parametrize("h,w", [(12, 12), (8, 13)])
def test_equals_the_per_image_reference(length, n_holes, h, w):
    x, _ = make_batch(length + n_holes, h=h, w=w)
    cy, cx = sample_centres(B, n_holes, h, w)
    ours = apply_mask(x, cutout_mask(cy, cx, length, h, w))
    assert torch.equal(ours, reference(x, cy, cx, length))


def test_every_centre_and_the_borders_against_the_reference():
    h = w = 8
    cy, cx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cy, cx = cy.reshape(-1, 1), cx.reshape(-1, 1)  # one image per centre: all 64
    x, _ = make_batch(1, b=h * w, h=h, w=w)
    for length in (2, 3, 5, 6):
        assert torch.equal(apply_mask(x, cutout_mask(cy, cx, length, h, w)), reference(x, cy, cx, length))


# --- invariants -----------------------------------------------------------------------------


@pytest.mark.parametrize("length", [3, 4, 8, 9])
@pytest.mark.parametrize("n_holes", [1, 2])
def test_zeroed_count_shared_mask_and_untouched_rest(length, n_holes):
    x, _ = make_batch(2, h=16, w=16)
    cy, cx = sample_centres(B, n_holes, 16, 16)
    mask = cutout_mask(cy, cx, length, 16, 16)
    out = apply_mask(x, mask)
    zero = out == 0
    # every channel has the same zeros, and they are the mask
    assert torch.equal(zero, mask.unsqueeze(1).expand_as(zero))
    # at most L^2 zeroed pixels per hole, per channel
    assert (zero.sum((2, 3)) <= n_holes * length**2).all()
    # everything outside the holes is bit-identical
    assert torch.equal(out[~zero], x[~zero])


@pytest.mark.parametrize("length,side", [(4, 4), (8, 8), (3, 2), (7, 6), (1, 0)])
def test_even_length_cuts_l_by_l_and_odd_length_l_minus_one(length, side):
    h = w = 32
    cy = torch.full((1, 1), 16)
    cx = torch.full((1, 1), 15)
    mask = cutout_mask(cy, cx, length, h, w)[0]
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    assert mask.sum().item() == side * side
    if side:
        assert rows.tolist() == list(range(16 - length // 2, 16 - length // 2 + side))
        assert cols.tolist() == list(range(15 - length // 2, 15 - length // 2 + side))


def test_holes_at_the_border_are_clipped():
    # L = 6: rows cy - 3 <= r < cy + 3, clipped to 0..9
    h = w = 10
    cy, cx = torch.tensor([[0], [9], [0]]), torch.tensor([[0], [9], [9]])
    mask = cutout_mask(cy, cx, 6, h, w)
    assert mask[0].sum() == 3 * 3 and mask[0, :3, :3].all()      # rows 0-2, columns 0-2
    assert mask[1].sum() == 4 * 4 and mask[1, 6:, 6:].all()      # rows 6-9, columns 6-9
    assert mask[2].sum() == 3 * 4 and mask[2, :3, 6:].all()      # rows 0-2, columns 6-9


def test_a_length_larger_than_twice_the_image_erases_everything():
    x, _ = make_batch(3, h=8, w=8)
    out = cutout(x, length=16)
    assert (out == 0).all()
    out = cutout(x, length=15)  # half 7 < 8: a hole centred at row 7 leaves row 0
    assert not (out == 0).all()


def test_centres_are_uniform_over_all_pixels():
    # P(pixel r erased along rows) = #{cy : r - L//2 < cy <= r + L//2, 0 <= cy < H} / H; the same
    # for columns; independent. A centre restricted to the interior would fail at the corners.
    h = w = 8
    length, n = 4, 4000
    cy, cx = sample_centres(n, 1, h, w)
    freq = cutout_mask(cy, cx, length, h, w).double().mean(0)
    half = length // 2
    p_row = torch.tensor([sum(1 for c in range(h) if r - half < c <= r + half) / h for r in range(h)], dtype=torch.float64)
    p_col = torch.tensor([sum(1 for c in range(w) if r - half < c <= r + half) / w for r in range(w)], dtype=torch.float64)
    expected = p_row[:, None] * p_col[None, :]
    sd = (expected * (1 - expected) / n).sqrt()
    assert ((freq - expected).abs() <= 5 * sd + 1e-9).all()


def test_the_plain_function_draws_centres_on_the_input_device_and_keeps_its_input():
    x, _ = make_batch(4)
    x0 = x.clone()
    g = torch.Generator().manual_seed(5)
    out = cutout(x, length=6, n_holes=2, generator=g)
    assert torch.equal(x, x0)
    g = torch.Generator().manual_seed(5)
    cy, cx = sample_centres(B, 2, 12, 12, generator=g)
    assert torch.equal(out, reference(x, cy, cx, 6))


# --- the plugin -----------------------------------------------------------------------------


def test_on_batch_equals_the_functions_and_changes_the_batch_in_place():
    x, y = make_batch(6)
    torch.manual_seed(7)
    cy, cx = sample_centres(B, 2, 12, 12)
    expected = reference(x, cy, cx, 5)
    torch.manual_seed(7)
    batch = {"input": x.clone(), "target": y}
    out = plugin(length=5, n_holes=2).on_batch(make_ctx(), batch)
    assert out is batch and torch.equal(out["input"], expected) and out["target"] is y


def test_on_batch_with_prob_cuts_the_chosen_images_only():
    x, y = make_batch(12)
    torch.manual_seed(8)
    cy, cx = sample_centres(B, 1, 12, 12)
    chosen = torch.rand(B) < 0.5
    assert 0 < chosen.sum() < B
    expected = torch.where(chosen.view(-1, 1, 1, 1), reference(x, cy, cx, 6), x)
    torch.manual_seed(8)
    out = plugin(length=6, prob=0.5).on_batch(make_ctx(), {"input": x.clone(), "target": y})
    assert torch.equal(out["input"], expected)


def test_prob_zero_is_the_identity_and_prob_cuts_that_fraction_of_images():
    x, y = make_batch(8)
    assert plugin(prob=0.0).on_batch(make_ctx(), {"input": x, "target": y}) is None
    n = 2000
    xs, _ = make_batch(9, b=n, h=8, w=8)
    out = plugin(prob=0.3, length=4).on_batch(make_ctx(), {"input": xs, "target": torch.zeros(n, dtype=torch.long)})
    cut = (out["input"] == 0).flatten(1).any(1).double().mean().item()
    assert abs(cut - 0.3) < 5 * math.sqrt(0.21 / n)  # a hole of side 4 always covers some pixel


def test_a_length_that_erases_everything_is_logged_once():
    ctx = make_ctx()
    p = plugin()  # length 16 on 8x8 digits
    x, y = make_batch(10, h=8, w=8, c=1)
    for _ in range(3):
        p.on_batch(ctx, {"input": x.clone(), "target": y})
    assert len(ctx.logs) == 1 and "cutout.length=4" in ctx.logs[0]
    ctx = make_ctx()
    plugin(length=4).on_batch(ctx, {"input": x.clone(), "target": y})
    assert ctx.logs == []


def _devices():
    devices = [torch.device("cpu"), torch.device("meta")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


@pytest.mark.parametrize("device", _devices(), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_on_batch_keeps_device_dtype_shape_and_memory_format(device, dtype):
    x, y = make_batch(11, dtype=dtype)
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    out = plugin(length=4, prob=0.5).on_batch(make_ctx(), {"input": x, "target": y.to(device)})
    assert out["input"].device.type == device.type and out["input"].dtype == dtype and out["input"].shape == x.shape
    assert out["input"].is_contiguous(memory_format=torch.channels_last)


def test_a_batch_that_is_not_images_is_a_one_line_error():
    with pytest.raises(tricks.TricksError, match="cutout needs image batches"):
        plugin().on_batch(make_ctx(), {"input": torch.randn(B, 20), "target": torch.zeros(B, dtype=torch.long)})


def test_settings_errors_name_the_key_and_cutout_runs_before_the_mixers():
    with pytest.raises(tricks.TricksError, match=r"cutout\.length"):
        tricks.resolve(plugins=["cutout"], sets=["cutout.length=0"])
    with pytest.raises(tricks.TricksError, match=r"cutout\.n_holes"):
        tricks.resolve(plugins=["cutout"], sets=["cutout.n_holes=0"])
    with pytest.raises(tricks.TricksError, match=r"cutout\.prob"):
        tricks.resolve(plugins=["cutout"], sets=["cutout.prob=1.5"])
    cfg = tricks.resolve(plugins=["mixup", "cutout"], sets=["cutout.length=8"])
    assert cfg.settings["cutout"].length == 8
    assert cfg.plugins.index("cutout") < cfg.plugins.index("mixup")


# --- in a run -------------------------------------------------------------------------------


def test_a_run_trains_on_cut_images(tmp_path):
    watch = BatchWatcher()
    tiny_run(plugins=["cutout", watch], set=["cutout.length=4"], train_limit=128, val_limit=64, out=tmp_path / "run")
    assert len(watch.inputs) == 4  # 128 digits in batches of 32
    for x in watch.inputs:
        zero = (x == 0).flatten(1).sum(1)
        assert ((zero >= 1) & (zero <= 16)).all()  # every image has a hole of at most 4 x 4 (digits: 1 channel)
