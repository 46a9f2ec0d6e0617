"""Tests of the CutMix plugin: the invariants of the technique on the plain functions, the
plugin's wiring to ``on_batch`` (probability, pairing, the switch to mixup), its settings in the
framework, and equality with torchvision's ``v2.CutMix`` (same seed: same lambda, box and
batch) and timm's ``Mixup`` in CutMix mode (same box and pairing)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tricks
from tricks.mixing import mixup, partner, sample_lambda
from tricks.testing import BatchWatcher, make_ctx, tiny_run
from tricks_cutmix import CutMix, CutMixSettings, box_at, box_lambda, cutmix, sample_box

K = 10  # classes
B = 16  # batch size (even: timm needs it)
PAIRINGS = ["permutation", "reverse", "roll"]


def make_batch(seed: int = 0, b: int = B, h: int = 12, w: int = 12, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, h, w, generator=g).to(dtype)
    y = torch.randint(0, K, (b,), generator=g)
    return x, y


def distinct_batch(b: int = B, h: int = 12, w: int = 10):
    """Every value different, so each output pixel says where it came from."""
    return torch.arange(b * 3 * h * w, dtype=torch.float32).view(b, 3, h, w)


CTX = make_ctx(num_classes=K)  # the run context on_batch reads (its classes); made once, the tests call on_batch often


def plugin(**settings) -> CutMix:
    return CutMix(CutMixSettings(**settings))


def inside(box, h, w):
    """bool [h, w]: true inside ``box``, from the box's corners (written independently of the code)."""
    y1, y2, x1, x2 = box
    m = torch.zeros(h, w, dtype=torch.bool)
    for r in range(y1, y2):
        for c in range(x1, x2):
            m[r, c] = True
    return m


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- the box --------------------------------------------------------------------------------


@pytest.mark.parametrize("h,w", [(32, 32), (8, 8), (12, 20), (224, 224)])
def test_the_box_is_torchvisions_for_the_same_seed(h, w):
    # torchvision's CutMix.make_params draws lambda from Beta(1, 1), then the centre (columns,
    # rows) with torch's CPU generator, and clips centre -/+ int(side * sqrt(1 - lam) / 2):
    # the paper's box. The same seed must give the same box and the same adjusted lambda.
    from torchvision.transforms import v2

    theirs = v2.CutMix(alpha=1.0, num_classes=K)
    image = torch.zeros(2, 3, h, w)
    for seed in range(60):
        torch.manual_seed(seed)
        params = theirs.make_params([image])
        torch.manual_seed(seed)
        lam = sample_lambda(1.0)
        y1, y2, x1, x2 = sample_box(h, w, lam)
        assert params["box"] == (x1, y1, x2, y2)
        assert box_lambda((y1, y2, x1, x2), h, w) == pytest.approx(params["lam_adjusted"], abs=1e-12)


def test_box_at_follows_the_papers_formula():
    # corners c -/+ cut // 2, clipped to [0, side]: written out for a few cases by hand
    assert box_at(32, 32, 16, 16, 16, 16) == (8, 24, 8, 24)      # centred, unclipped: 16 x 16
    assert box_at(32, 32, 16, 16, 15, 15) == (9, 23, 9, 23)      # odd side loses a pixel: 14 x 14
    assert box_at(32, 32, 0, 31, 16, 16) == (0, 8, 23, 32)       # corner: clipped to 8 x 9
    assert box_at(8, 8, 3, 4, 0, 0) == (3, 3, 4, 4)              # empty
    assert box_at(8, 8, 3, 4, 8, 8) == (0, 7, 0, 8)              # full side, off centre
    assert box_at(8, 12, 4, 6, 8, 12) == (0, 8, 0, 12)           # the whole image


@pytest.mark.parametrize("h,w", [(32, 32), (8, 8), (12, 20)])
def test_box_is_inside_the_image_and_lambda_only_grows_by_clipping(h, w):
    for _ in range(500):
        lam = sample_lambda(1.0)
        y1, y2, x1, x2 = box = sample_box(h, w, lam)
        assert 0 <= y1 <= y2 <= h and 0 <= x1 <= x2 <= w
        adjusted = box_lambda(box, h, w)
        assert 0.0 <= lam <= adjusted <= 1.0


def test_unclipped_box_area_is_at_most_one_minus_lambda():
    for lam in [0.0, 0.1, 0.37, 0.5, 0.9, 0.999]:
        cut = int(32 * math.sqrt(1 - lam))
        box = box_at(32, 32, 16, 16, cut, cut)
        y1, y2, x1, x2 = box
        assert y2 - y1 == x2 - x1 == 2 * (cut // 2)
        assert (y2 - y1) * (x2 - x1) <= 32 * 32 * (1 - lam) + 1e-9


def test_clipping_raises_lambda_a_lot_in_a_corner():
    lam = 0.2
    cut = int(32 * math.sqrt(1 - lam))
    centred, corner = box_at(32, 32, 16, 16, cut, cut), box_at(32, 32, 0, 0, cut, cut)
    assert box_lambda(centred, 32, 32) < 0.3 and box_lambda(corner, 32, 32) > 0.75


# --- the mixing -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_exact_fraction_from_the_partner_and_bit_identical_regions(seed):
    h, w = 12, 10
    x = distinct_batch(h=h, w=w)
    y = torch.arange(B) % K
    torch.manual_seed(seed)
    lam = sample_lambda(1.0)
    box = sample_box(h, w, lam)
    perm = partner(B, "permutation", x.device)
    out, mixed_y, lam_adj = cutmix(x, y, box, perm, K)
    region = inside(box, h, w)
    # inside the box: the partner's pixels, bit for bit; outside: the image's own
    assert torch.equal(out[..., region], x[perm][..., region])
    assert torch.equal(out[..., ~region], x[..., ~region])
    # the fraction of pixels that came from the partner is exactly 1 - lam_adj (distinct values)
    for i in range(B):
        if perm[i] == i:
            continue
        from_partner = (out[i] == x[perm[i]]).all(0)  # per pixel, all channels
        assert from_partner.sum().item() / (h * w) == pytest.approx(1 - lam_adj, abs=1e-12)
        assert torch.equal(from_partner, region)
    # targets: lam_adj on the own class, 1 - lam_adj on the partner's
    expected = lam_adj * F.one_hot(y, K).float() + (1 - lam_adj) * F.one_hot(y[perm], K).float()
    torch.testing.assert_close(mixed_y, expected)
    torch.testing.assert_close(mixed_y.sum(1), torch.ones(B))


def test_identical_partners_change_nothing_and_identical_labels_stay_one_hot():
    x, _ = make_batch(1)
    same = x[:1].expand(B, -1, -1, -1).contiguous()
    y = torch.randint(0, K, (B,))
    box = (2, 9, 3, 7)
    perm = partner(B, "permutation", x.device)
    out, _, _ = cutmix(same, y, box, perm, K)
    assert torch.equal(out, same)
    same_y = torch.full((B,), 4)
    _, mixed_y, lam = cutmix(x, same_y, box, perm, K)
    assert 0 < lam < 1
    torch.testing.assert_close(mixed_y, F.one_hot(same_y, K).float())


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_empty_box_is_the_identity_and_full_box_the_partner_batch(pairing):
    x, y = make_batch(2)
    perm = partner(B, pairing, x.device)
    h, w = x.shape[-2:]
    lam = 0.9999  # sides int(12 * 0.01) = 0: nothing is cut
    out, mixed_y, lam_adj = cutmix(x, y, sample_box(h, w, lam), perm, K)
    assert lam_adj == 1.0 and torch.equal(out, x) and torch.equal(mixed_y, F.one_hot(y, K).float())
    out, mixed_y, lam_adj = cutmix(x, y, (0, h, 0, w), perm, K)
    assert lam_adj == 0.0 and torch.equal(out, x[perm]) and torch.equal(mixed_y, F.one_hot(y[perm], K).float())


def test_not_in_place_by_default_and_in_place_on_request():
    x, y = make_batch(3)
    x0 = x.clone()
    perm = partner(B, "roll", x.device)
    out, _, _ = cutmix(x, y, (1, 6, 2, 11), perm, K)
    assert torch.equal(x, x0) and not torch.equal(out, x0)
    out2, _, _ = cutmix(x, y, (1, 6, 2, 11), perm, K, inplace=True)
    assert out2 is x and torch.equal(out2, out)


def test_an_explicit_lambda_weighs_the_targets():
    x, y = make_batch(4)
    perm = partner(B, "reverse", x.device)
    _, mixed_y, lam = cutmix(x, y, (0, 6, 0, 6), perm, K, lam=0.3)
    assert lam == 0.3
    torch.testing.assert_close(mixed_y, 0.3 * F.one_hot(y, K).float() + 0.7 * F.one_hot(y[perm], K).float())


def test_soft_targets_in_soft_targets_out():
    # label smoothing (or another mixer) before cutmix: the targets are mixed as they are
    x, y = make_batch(5)
    eps = 0.1
    smooth = F.one_hot(y, K).float() * (1 - eps) + eps / K
    perm = partner(B, "permutation", x.device)
    _, from_soft, lam = cutmix(x, smooth, (2, 8, 2, 8), perm, K)
    _, from_hard, _ = cutmix(x, y, (2, 8, 2, 8), perm, K)
    torch.testing.assert_close(from_soft, lam * smooth + (1 - lam) * smooth[perm])
    torch.testing.assert_close(from_soft, from_hard * (1 - eps) + eps / K)  # smoothing commutes with mixing


@pytest.mark.parametrize("lam", [0.2, 0.7])
def test_soft_target_loss_is_the_papers_weighted_loss(lam):
    x, y = make_batch(6)
    perm = partner(B, "permutation", x.device)
    _, mixed_y, _ = cutmix(x, y, (0, 5, 0, 5), perm, K, lam=lam)
    z = torch.randn(B, K, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    paper = lam * F.cross_entropy(z, y) + (1 - lam) * F.cross_entropy(z, y[perm])
    torch.testing.assert_close(F.cross_entropy(z, mixed_y.double()), paper)


# --- the plugin -----------------------------------------------------------------------------


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_on_batch_uses_the_sampled_box_and_pairing(pairing):
    x, y = make_batch(8)
    torch.manual_seed(11)
    lam = sample_lambda(1.0)
    box = sample_box(12, 12, lam)
    expected = cutmix(x, y, box, partner(B, pairing, x.device), K)
    torch.manual_seed(11)
    out = plugin(pairing=pairing).on_batch(CTX, {"input": x.clone(), "target": y.clone()})
    assert torch.equal(out["input"], expected[0])
    assert torch.equal(out["target"], expected[1])


def test_on_batch_with_the_unclipped_lambda():
    x, y = make_batch(9)
    torch.manual_seed(12)
    lam = sample_lambda(1.0)
    box = sample_box(12, 12, lam)
    perm = partner(B, "permutation", x.device)
    torch.manual_seed(12)
    out = plugin(correct_lam=False).on_batch(CTX, {"input": x.clone(), "target": y.clone()})
    torch.testing.assert_close(out["target"], lam * F.one_hot(y, K).float() + (1 - lam) * F.one_hot(y[perm], K).float())
    assert torch.equal(out["input"], cutmix(x, y, box, perm, K)[0])


@pytest.mark.parametrize("seed", range(5))
def test_on_batch_equals_torchvision_cutmix_with_roll_pairing(seed):
    # Same seed, same draws (lambda, then the box centre): the whole batch must match.
    from torchvision.transforms import v2

    x, y = make_batch(seed, h=16, w=12)
    theirs = v2.CutMix(alpha=1.0, num_classes=K)
    torch.manual_seed(100 + seed)
    their_x, their_y = theirs(x.clone(), y.clone())
    torch.manual_seed(100 + seed)
    out = plugin(pairing="roll").on_batch(CTX, {"input": x.clone(), "target": y.clone()})
    assert torch.equal(out["input"], their_x.as_subclass(torch.Tensor))
    torch.testing.assert_close(out["target"], their_y)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("seed", range(4))
def test_equals_timm_cutmix_given_the_same_box_and_reverse_pairing(seed, smoothing, monkeypatch):
    import timm.data.mixup as timm_mixup

    x, y = make_batch(seed, h=16, w=16)
    torch.manual_seed(seed)
    lam = sample_lambda(1.0)
    box = sample_box(16, 16, lam)
    theirs = timm_mixup.Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=smoothing, mode="batch", num_classes=K)
    # timm draws (lam, use_cutmix) in _params_per_batch and its box in rand_bbox; give it ours.
    # Its own lambda correction (correct_lam=True) then computes the area from our box.
    monkeypatch.setattr(theirs, "_params_per_batch", lambda: (lam, True))
    monkeypatch.setattr(timm_mixup, "rand_bbox", lambda shape, lam_, margin=0.0, count=None: box)
    their_x, their_y = theirs(x.clone(), y.clone())  # timm mixes x in place: give it a copy
    targets = F.one_hot(y, K).float() * (1 - smoothing) + smoothing / K  # timm smooths before mixing
    our_x, our_y, _ = cutmix(x, targets, box, partner(B, "reverse", x.device), K)
    assert torch.equal(our_x, their_x)
    torch.testing.assert_close(our_y, their_y)


def test_prob_zero_never_mixes_and_prob_mixes_that_fraction():
    x, y = make_batch(10)
    assert all(plugin(prob=0.0).on_batch(CTX, {"input": x, "target": y}) is None for _ in range(50))
    p = plugin(prob=0.5)
    n = 400
    mixed = sum(p.on_batch(CTX, {"input": x.clone(), "target": y}) is not None for _ in range(n))
    assert abs(mixed / n - 0.5) < 5 * math.sqrt(0.25 / n)  # 5 binomial sd


def test_switch_prob_one_is_mixup_with_mixup_alpha():
    x, y = make_batch(11)
    torch.manual_seed(13)
    torch.rand(())  # the switch draw
    lam = sample_lambda(0.4)
    expected = mixup(x, y, lam, partner(B, "permutation", x.device), K)
    torch.manual_seed(13)
    out = plugin(switch_prob=1.0, mixup_alpha=0.4).on_batch(CTX, {"input": x.clone(), "target": y.clone()})
    assert torch.equal(out["input"], expected[0]) and torch.equal(out["target"], expected[1])


def test_switch_prob_switches_that_fraction_of_batches():
    # A CutMix batch keeps every pixel of some example (its own or its partner's); a mixup
    # batch with lam strictly inside (0, 1) blends them. Count the blended batches.
    x, y = make_batch(12)
    p = plugin(switch_prob=0.3, mixup_alpha=1.0, pairing="reverse")
    n, switched = 300, 0
    for _ in range(n):
        out = p.on_batch(CTX, {"input": x.clone(), "target": y})
        kept = (out["input"] == x) | (out["input"] == x.flip(0))
        switched += not kept.all().item()
    assert abs(switched / n - 0.3) < 5 * math.sqrt(0.21 / n)


def _devices():
    devices = [torch.device("cpu"), torch.device("meta")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


@pytest.mark.parametrize("device", _devices(), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("switch_prob", [0.0, 1.0])
def test_on_batch_keeps_device_dtype_and_shape(device, dtype, switch_prob):
    x, y = make_batch(13, dtype=dtype)
    out = plugin(switch_prob=switch_prob).on_batch(CTX, {"input": x.to(device), "target": y.to(device)})
    assert out["input"].device.type == device.type and out["input"].dtype == dtype and out["input"].shape == x.shape
    assert out["target"].device.type == device.type and out["target"].shape == (B, K)


def test_channels_last_input_stays_channels_last():
    x, y = make_batch(14)
    x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(3)
    out = plugin().on_batch(CTX, {"input": x.clone(memory_format=torch.channels_last), "target": y})
    assert out["input"].is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(3)
    ref = plugin().on_batch(CTX, {"input": x.contiguous(), "target": y})
    assert torch.equal(out["input"], ref["input"])


def test_a_batch_that_is_not_images_is_a_one_line_error():
    with pytest.raises(tricks.TricksError, match="cutmix needs image batches"):
        plugin().on_batch(CTX, {"input": torch.randn(B, 20), "target": torch.zeros(B, dtype=torch.long)})


def test_settings_errors_name_the_key_and_mixup_conflicts():
    with pytest.raises(tricks.TricksError, match=r"cutmix\.alpha"):
        tricks.resolve(plugins=["cutmix"], sets=["cutmix.alpha=0"])
    with pytest.raises(tricks.TricksError, match=r"cutmix\.switch_prob"):
        tricks.resolve(plugins=["cutmix"], sets=["cutmix.switch_prob=2"])
    with pytest.raises(tricks.TricksError, match=r"cutmix\.pairing"):
        tricks.resolve(plugins=["cutmix"], sets=["cutmix.pairing=shuffle"])
    with pytest.raises(tricks.TricksError, match=r"mixup"):
        tricks.resolve(plugins=["cutmix", "mixup"])
    cfg = tricks.resolve(plugins=["cutmix"], sets=["cutmix.switch_prob=0.5", "cutmix.prob=0.5"])
    assert cfg.settings["cutmix"].switch_prob == 0.5 and cfg.settings["cutmix"].prob == 0.5


# --- in a run -------------------------------------------------------------------------------


def test_a_run_trains_on_cut_and_mixed_batches(tmp_path):
    watch = BatchWatcher()
    run = tiny_run(plugins=["cutmix", watch], train_limit=128, val_limit=64, out=tmp_path / "run")
    assert run.config()["plugins"] == ["cutmix"]
    [row] = run.metrics()
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])
    assert len(watch.batches) == 4  # 128 digits in batches of 32
    for x, t in zip(watch.inputs, watch.targets):
        assert x.shape == (32, 1, 8, 8)  # digits
        assert t.shape == (32, K) and t.is_floating_point()
        torch.testing.assert_close(t.sum(1), torch.ones(32))
    assert any((t.max(1).values < 1).any() for t in watch.targets)  # some rows genuinely mixed
