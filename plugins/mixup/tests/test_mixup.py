"""Tests of the mixup plugin: the invariants of the technique on the plain functions, the
plugin's wiring to ``on_batch``, its settings in the framework, and equality with the
mixup of torchvision and timm when the same lambda and pairing are used."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tricks
from tricks.testing import BatchWatcher, make_ctx, tiny_run
from tricks_mixup import Mixup, MixupSettings, mixup, partner, sample_lambda, soft_targets

K = 10  # classes
B = 16  # batch size (even: timm's batch mode needs it)
PAIRINGS = ["permutation", "reverse", "roll"]


def make_batch(seed: int = 0, b: int = B, k: int = K, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 8, 8, generator=g).to(dtype)
    y = torch.randint(0, k, (b,), generator=g)
    return x, y


CTX = make_ctx(num_classes=K)  # the run context on_batch reads (its classes); made once, the tests call on_batch often


def plugin(**settings) -> Mixup:
    return Mixup(MixupSettings(**settings))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global generator state (lambda and permutations use it)."""
    torch.manual_seed(0)


# --- the plain functions ---------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.77, 1.0])
def test_identical_inputs_give_the_input_and_identical_labels_the_one_hot(lam):
    x, _ = make_batch()
    same_x = x[:1].expand(B, -1, -1, -1).contiguous()
    y = torch.randint(0, K, (B,), generator=torch.Generator().manual_seed(1))
    perm = partner(B, "permutation", x.device)
    mixed_x, _ = mixup(same_x, y, lam, perm, K)
    torch.testing.assert_close(mixed_x, same_x)

    same_y = torch.full((B,), 3)
    _, mixed_y = mixup(x, same_y, lam, perm, K)
    torch.testing.assert_close(mixed_y, F.one_hot(same_y, K).float())


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_lambda_one_is_the_identity_and_zero_the_partner_batch(pairing):
    x, y = make_batch()
    torch.manual_seed(0)
    perm = partner(B, pairing, x.device)
    x1, y1 = mixup(x, y, 1.0, perm, K)
    assert torch.equal(x1, x)
    assert torch.equal(y1, F.one_hot(y, K).float())
    x0, y0 = mixup(x, y, 0.0, perm, K)
    assert torch.equal(x0, x[perm])
    assert torch.equal(y0, F.one_hot(y[perm], K).float())


@pytest.mark.parametrize("lam", [0.1, 0.5, 0.9])
def test_lambda_weighted_hard_losses_equal_the_soft_target_loss(lam):
    # The paper's code trains with lam*CE(z, y_a) + (1-lam)*CE(z, y_b); the plugin hands the
    # loss soft targets instead. CE is linear in the target, so the two are the same.
    x, y = make_batch(2)
    perm = partner(B, "permutation", x.device)
    _, mixed_y = mixup(x, y, lam, perm, K)
    z = torch.randn(B, K, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    paper = lam * F.cross_entropy(z, y) + (1 - lam) * F.cross_entropy(z, y[perm])
    torch.testing.assert_close(F.cross_entropy(z, mixed_y.double()), paper)
    # and the core's default loss, which the run uses, agrees
    from tricks.builtin import cross_entropy

    torch.testing.assert_close(cross_entropy(z, mixed_y.double()).double(), paper, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_targets_are_distributions_and_shapes_and_dtypes_are_kept(dtype):
    x, y = make_batch(4, dtype=dtype)
    perm = partner(B, "permutation", x.device)
    mixed_x, mixed_y = mixup(x, y, 0.37, perm, K)
    assert mixed_x.shape == x.shape and mixed_x.dtype == dtype
    assert mixed_y.shape == (B, K) and mixed_y.is_floating_point()
    assert (mixed_y >= 0).all()
    torch.testing.assert_close(mixed_y.sum(1), torch.ones(B))
    assert not torch.equal(mixed_x, x)  # it did mix


def test_inputs_are_not_changed_in_place():
    x, y = make_batch()
    x0, y0 = x.clone(), y.clone()
    mixup(x, y, 0.4, partner(B, "permutation", x.device), K)
    assert torch.equal(x, x0) and torch.equal(y, y0)


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_sampled_lambda_follows_the_symmetric_beta(alpha):
    torch.manual_seed(0)
    n = 1500
    lam = torch.tensor([sample_lambda(alpha) for _ in range(n)], dtype=torch.float64)
    assert ((lam >= 0) & (lam <= 1)).all()
    # Beta(a, a) has mean 1/2, variance v = 1/(4(2a+1)) and kurtosis k = 3 - 6/(2a+3).
    # Tolerances are 5 standard errors, so a correct sampler passes for any seed:
    # the sample mean's is sqrt(v/n); the sample variance's, relative to v, sqrt((k-1)/n).
    v = 1 / (4 * (2 * alpha + 1))
    k = 3 - 6 / (2 * alpha + 3)
    assert abs(lam.mean().item() - 0.5) < 5 * math.sqrt(v / n)
    # the variance rules out a constant 0.5, which the mean alone would not
    assert abs(lam.var().item() / v - 1) < 5 * math.sqrt((k - 1) / n)
    # symmetric about 1/2: as many draws below as above (binomial sd sqrt(n)/2; 5 sd)
    assert abs((lam < 0.5).sum().item() - n / 2) < 5 * math.sqrt(n) / 2


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_non_positive_alpha_gives_lambda_one(alpha):
    assert sample_lambda(alpha) == 1.0


def test_pairings_do_what_they_say():
    n = 7
    torch.manual_seed(0)
    perm = partner(n, "permutation", torch.device("cpu"))
    assert sorted(perm.tolist()) == list(range(n))
    torch.manual_seed(0)
    assert torch.equal(partner(n, "permutation", torch.device("cpu")), perm)  # seeded
    draws = {tuple(partner(n, "permutation", torch.device("cpu")).tolist()) for _ in range(20)}
    assert len(draws) > 1  # random: 20 draws of 7! orders are not all the same
    assert partner(n, "reverse", torch.device("cpu")).tolist() == [6, 5, 4, 3, 2, 1, 0]
    assert partner(n, "roll", torch.device("cpu")).tolist() == [6, 0, 1, 2, 3, 4, 5]
    x, _ = make_batch(b=n)
    assert torch.equal(x[partner(n, "reverse", x.device)], x.flip(0))
    assert torch.equal(x[partner(n, "roll", x.device)], x.roll(1, 0))
    with pytest.raises(ValueError, match="pairing"):
        partner(n, "shuffle", x.device)


def test_soft_targets_pass_through_so_label_smoothing_commutes_with_mixing():
    x, y = make_batch(5)
    eps, lam = 0.1, 0.3
    perm = partner(B, "permutation", x.device)
    one_hot = F.one_hot(y, K).float()

    def smooth(t):  # torch's form: (1 - eps) * t + eps / K
        return (1 - eps) * t + eps / K

    torch.testing.assert_close(soft_targets(smooth(one_hot), K), smooth(one_hot))
    _, smoothed_then_mixed = mixup(x, smooth(one_hot), lam, perm, K)
    _, mixed = mixup(x, y, lam, perm, K)
    torch.testing.assert_close(smoothed_then_mixed, smooth(mixed))
    torch.testing.assert_close(smoothed_then_mixed, lam * smooth(one_hot) + (1 - lam) * smooth(one_hot)[perm])


# --- the plugin -----------------------------------------------------------------------------


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_on_batch_mixes_with_the_sampled_lambda_and_the_chosen_pairing(pairing):
    x, y = make_batch(6)
    torch.manual_seed(11)
    expected = mixup(x, y, sample_lambda(0.4), partner(B, pairing, x.device), K)
    torch.manual_seed(11)
    out = plugin(alpha=0.4, pairing=pairing).on_batch(CTX, {"input": x.clone(), "target": y.clone()})
    assert torch.equal(out["input"], expected[0])
    assert torch.equal(out["target"], expected[1])


def test_prob_zero_leaves_batches_unchanged_and_prob_one_mixes_every_batch():
    p0, p1 = plugin(prob=0.0, alpha=1.0), plugin(prob=1.0, alpha=1.0)
    torch.manual_seed(0)
    for seed in range(50):
        x, y = make_batch(seed)
        batch = {"input": x.clone(), "target": y.clone()}
        out = p0.on_batch(CTX, batch)
        out = batch if out is None else out
        assert torch.equal(out["input"], x) and torch.equal(out["target"], y)
        out = p1.on_batch(CTX, {"input": x.clone(), "target": y.clone()})
        assert out["target"].shape == (B, K)
        assert not torch.equal(out["input"], x)


def test_prob_mixes_that_fraction_of_batches():
    p = plugin(prob=0.3, alpha=1.0)
    torch.manual_seed(0)
    n, mixed = 600, 0
    x, y = make_batch()
    for _ in range(n):
        out = p.on_batch(CTX, {"input": x, "target": y})
        mixed += out is not None and out["target"].is_floating_point()
    # binomial(600, 0.3): sd 0.019; 5 sd
    assert abs(mixed / n - 0.3) < 0.095


def _devices():
    devices = [torch.device("cpu"), torch.device("meta")]  # meta: a device other than the CPU, everywhere
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


@pytest.mark.parametrize("device", _devices(), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pairing", PAIRINGS)
def test_on_batch_keeps_the_device_and_dtype_of_the_input(device, dtype, pairing):
    x, y = make_batch(7, dtype=dtype)
    out = plugin(pairing=pairing).on_batch(CTX, {"input": x.to(device), "target": y.to(device)})
    assert out["input"].device.type == device.type and out["input"].dtype == dtype
    assert out["input"].shape == x.shape
    assert out["target"].device.type == device.type and out["target"].shape == (B, K)


def test_settings_errors_name_the_key():
    with pytest.raises(tricks.TricksError, match=r"mixup\.alpha"):
        tricks.resolve(plugins=["mixup"], sets=["mixup.alpha=-1"])
    with pytest.raises(tricks.TricksError, match=r"mixup\.alhpa.*mixup\.alpha"):
        tricks.resolve(plugins=["mixup"], sets=["mixup.alhpa=0.4"])
    with pytest.raises(tricks.TricksError, match=r"mixup\.prob"):
        tricks.resolve(plugins=["mixup"], sets=["mixup.prob=1.5"])
    with pytest.raises(tricks.TricksError, match=r"mixup\.pairing"):
        tricks.resolve(plugins=["mixup"], sets=["mixup.pairing=shuffle"])
    cfg = tricks.resolve(plugins=["mixup"], sets=["mixup.alpha=1.0", "mixup.pairing=roll"])
    assert cfg.settings["mixup"].alpha == 1.0 and cfg.settings["mixup"].pairing == "roll"


# --- equality with popular implementations --------------------------------------------------


@pytest.mark.parametrize("lam", [0.2, 0.65])
def test_equals_torchvision_mixup_with_roll_pairing(lam, monkeypatch):
    from torchvision.transforms import v2

    x, y = make_batch(8)
    theirs = v2.MixUp(alpha=1.0, num_classes=K)
    # torchvision draws lam in make_params from its Beta; force the same lam for both
    monkeypatch.setattr(theirs, "make_params", lambda flat_inputs: {"lam": lam})
    their_x, their_y = theirs(x.clone(), y.clone())
    our_x, our_y = mixup(x, y, lam, partner(B, "roll", x.device), K)
    torch.testing.assert_close(our_x, their_x.as_subclass(torch.Tensor))
    torch.testing.assert_close(our_y, their_y)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("lam", [0.2, 0.65])
def test_equals_timm_batch_mixup_with_reverse_pairing(lam, smoothing, monkeypatch):
    from timm.data import Mixup as TimmMixup

    x, y = make_batch(9)
    theirs = TimmMixup(mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=smoothing, mode="batch", num_classes=K)
    # timm draws (lam, use_cutmix) per batch in _params_per_batch; force the same lam
    monkeypatch.setattr(theirs, "_params_per_batch", lambda: (lam, False))
    their_x, their_y = theirs(x.clone(), y.clone())  # timm mixes x in place: give it a copy
    # timm smooths before mixing (torch's form); soft targets pass through ours unchanged
    targets = F.one_hot(y, K).float() * (1 - smoothing) + smoothing / K
    our_x, our_y = mixup(x, targets, lam, partner(B, "reverse", x.device), K)
    torch.testing.assert_close(our_x, their_x)
    torch.testing.assert_close(our_y, their_y)


# --- in a run -------------------------------------------------------------------------------


def test_a_run_trains_on_mixed_soft_targets(tmp_path):
    watch = BatchWatcher()
    run = tiny_run(plugins=["mixup", watch], set=["mixup.alpha=1.0"], train_limit=128, val_limit=64,
                   out=tmp_path / "run")
    assert run.config()["plugins"] == ["mixup"]
    [row] = run.metrics()
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])
    assert len(watch.targets) == 4  # 128 digits in batches of 32
    for t in watch.targets:
        assert t.shape == (32, K) and t.is_floating_point()  # digits: 10 classes
        torch.testing.assert_close(t.sum(1), torch.ones(32))
        assert (t.max(1).values < 1).any()  # some rows are genuinely mixed
