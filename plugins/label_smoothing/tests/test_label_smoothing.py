"""Tests of the label_smoothing plugin: the targets of both forms against the formulas and
torch's ``F.cross_entropy(label_smoothing=...)``, the minimiser's logit gap, commutation with
mixup, equality with timm, the wrapper's wiring around the loss in force, and a short run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tricks
from tricks.builtin import cross_entropy
from tricks.testing import call_wrapper, make_ctx, tiny_run
from tricks_label_smoothing import (
    LabelSmoothing,
    LabelSmoothingSettings,
    minimiser_logit_gap,
    smooth_targets,
    smoothing_values,
    torch_epsilon,
)

K = 10
B = 16
FORMS = ["paper", "torch"]


def labels(seed: int = 0, b: int = B, k: int = K) -> torch.Tensor:
    return torch.randint(0, k, (b,), generator=torch.Generator().manual_seed(seed))


def logits(seed: int = 1, b: int = B, k: int = K, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(b, k, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 3


def ce_soft(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a target distribution, written from its definition."""
    return -(t * F.log_softmax(z, dim=1)).sum(1).mean()


def build(ctx, base, **settings):
    """The plugin's build_loss wrapper around ``base``, as pluggy runs it."""
    return call_wrapper(LabelSmoothing(LabelSmoothingSettings(**settings)).build_loss(ctx), base)


def ctx(k: int = K):
    return make_ctx(num_classes=k)


# --- the targets ---------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.1, 0.25])
def test_paper_form_puts_one_minus_eps_on_the_class_and_eps_over_k_minus_1_elsewhere(eps):
    y = labels()
    t = smooth_targets(y, eps, K, "paper")
    expected = torch.where(F.one_hot(y, K).bool(), 1 - eps, eps / (K - 1)).float()
    torch.testing.assert_close(t, expected)
    assert t.dtype == torch.float32 and t.shape == (B, K)
    torch.testing.assert_close(t.sum(1), torch.ones(B))


@pytest.mark.parametrize("eps", [0.1, 0.25])
def test_torch_form_is_one_minus_eps_times_one_hot_plus_eps_over_k(eps):
    y = labels()
    t = smooth_targets(y, eps, K, "torch")
    torch.testing.assert_close(t, (1 - eps) * F.one_hot(y, K).float() + eps / K)
    torch.testing.assert_close(t.sum(1), torch.ones(B))


@pytest.mark.parametrize("k", [2, 10, 1000])
@pytest.mark.parametrize("eps", [0.05, 0.1, 0.3])
def test_paper_form_loss_equals_torch_cross_entropy_with_eps_times_k_over_k_minus_1(eps, k):
    y, z = labels(2, k=k), logits(3, k=k)
    paper = ce_soft(z, smooth_targets(y, eps, k, "paper").double())
    torch.testing.assert_close(paper, F.cross_entropy(z, y, label_smoothing=eps * k / (k - 1)))
    assert torch_epsilon(eps, k, "paper") == pytest.approx(eps * k / (k - 1))


@pytest.mark.parametrize("k", [2, 10, 1000])
@pytest.mark.parametrize("eps", [0.05, 0.1, 0.3])
def test_torch_cross_entropy_with_label_smoothing_equals_the_torch_form(eps, k):
    y, z = labels(4, k=k), logits(5, k=k)
    torch.testing.assert_close(F.cross_entropy(z, y, label_smoothing=eps),
                               ce_soft(z, smooth_targets(y, eps, k, "torch").double()))
    assert torch_epsilon(eps, k, "torch") == eps


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_torch_form_equals_timm_label_smoothing_cross_entropy(eps):
    from timm.loss import LabelSmoothingCrossEntropy

    y, z = labels(6), logits(7)
    torch.testing.assert_close(LabelSmoothingCrossEntropy(eps)(z, y), ce_soft(z, smooth_targets(y, eps, K, "torch").double()))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("eps,k", [(0.1, 10), (0.1, 1000), (0.3, 5)])
def test_the_minimiser_has_the_predicted_logit_gap(form, eps, k):
    # Minimise CE(z, q) over the logits of one example by gradient descent: softmax(z) -> q,
    # so z_true - z_other -> log(on / off); paper form: log((K - 1)(1 - eps) / eps).
    y = torch.tensor([k // 3])
    q = smooth_targets(y, eps, k, form).double()
    z = torch.zeros(1, k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([z], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ce_soft(z, q)
        loss.backward()
        return loss

    opt.step(closure)
    z = z.detach()[0]
    others = torch.cat([z[: y.item()], z[y.item() + 1:]])
    gap = z[y.item()] - others
    expected = minimiser_logit_gap(eps, k, form)
    if form == "paper":
        assert expected == pytest.approx(math.log((k - 1) * (1 - eps) / eps))
    else:
        assert expected == pytest.approx(math.log((1 - eps + eps / k) / (eps / k)))
    torch.testing.assert_close(gap, torch.full_like(gap, expected), rtol=0, atol=1e-5)


def test_gap_for_imagenet_is_about_9_1():
    assert minimiser_logit_gap(0.1, 1000, "paper") == pytest.approx(9.10, abs=0.005)
    assert minimiser_logit_gap(0.0, 10, "paper") == math.inf


@pytest.mark.parametrize("form", FORMS)
def test_epsilon_zero_is_the_identity(form):
    y = labels(8)
    assert torch.equal(smooth_targets(y, 0.0, K, form), F.one_hot(y, K).float())
    soft = torch.softmax(logits(9, dtype=torch.float32), 1)
    assert torch.equal(smooth_targets(soft, 0.0, K, form), soft)


@pytest.mark.parametrize("form", FORMS)
def test_a_one_hot_float_target_is_smoothed_like_its_class_index(form):
    y = labels(10)
    torch.testing.assert_close(smooth_targets(F.one_hot(y, K).float(), 0.2, K, form), smooth_targets(y, 0.2, K, form))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_soft_targets_stay_distributions_keep_their_dtype_and_are_not_changed_in_place(form, dtype):
    soft = torch.softmax(logits(11, dtype=torch.float32) * 2, 1).to(dtype)
    before = soft.clone()
    t = smooth_targets(soft, 0.1, K, form)
    assert t.dtype == dtype and t.shape == soft.shape
    assert torch.equal(soft, before)
    assert (t > 0).all()  # every class gets at least `off`
    torch.testing.assert_close(t.sum(1).float(), torch.ones(B), atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=0)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("lam", [0.0, 0.3, 0.8])
def test_smoothing_then_mixing_equals_mixing_then_smoothing(form, lam):
    from tricks_mixup import mixup, partner

    x = torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(12))
    y = labels(13)
    torch.manual_seed(0)
    perm = partner(B, "permutation", x.device)
    eps = 0.1
    _, mixed = mixup(x, y, lam, perm, K)
    mixed_then_smoothed = smooth_targets(mixed, eps, K, form)
    _, smoothed_then_mixed = mixup(x, smooth_targets(y, eps, K, form), lam, perm, K)
    torch.testing.assert_close(mixed_then_smoothed, smoothed_then_mixed)
    # and the mixture of smoothed labels, written out
    s = smooth_targets(y, eps, K, form)
    torch.testing.assert_close(mixed_then_smoothed, lam * s + (1 - lam) * s[perm])
    torch.testing.assert_close(mixed_then_smoothed.sum(1), torch.ones(B))


@pytest.mark.parametrize("lam", [0.25, 0.7])
def test_torch_form_after_mixup_equals_timm_mixup_target(lam):
    # timm smooths (torch's form) and then mixes with the reversed batch
    from timm.data.mixup import mixup_target
    from tricks_mixup import mixup, partner

    y = labels(14)
    x = torch.zeros(B, 1, 2, 2)
    _, mixed = mixup(x, y, lam, partner(B, "reverse", x.device), K)
    torch.testing.assert_close(smooth_targets(mixed, 0.1, K, "torch"), mixup_target(y, K, lam=lam, smoothing=0.1))


def test_bad_arguments_of_the_functions():
    with pytest.raises(ValueError, match="form"):
        smoothing_values(0.1, K, "gluon")
    with pytest.raises(ValueError, match="epsilon"):
        smoothing_values(1.0, K)
    with pytest.raises(ValueError, match="2 classes"):
        smoothing_values(0.1, 1)
    with pytest.raises(ValueError, match="expected 10"):
        smooth_targets(torch.full((2, 5), 0.2), 0.1, K)


# --- the plugin ----------------------------------------------------------------------------


class RecordingLoss:
    """A stand-in for the loss in force: records the batches it is given, returns CE."""

    def __init__(self):
        self.batches = []

    def __call__(self, output, batch):
        self.batches.append(batch)
        return cross_entropy(output, batch["target"])


@pytest.mark.parametrize("form", FORMS)
def test_the_wrapper_hands_the_inner_loss_smoothed_targets(form):
    inner = RecordingLoss()
    loss = build(ctx(), inner, epsilon=0.2, form=form)
    y, z = labels(15), logits(16, dtype=torch.float32)
    batch = {"input": torch.zeros(B, 1, 8, 8), "target": y, "extra": "kept"}
    value = loss(z, batch)
    (seen,) = inner.batches
    torch.testing.assert_close(seen["target"], smooth_targets(y, 0.2, K, form))
    assert seen["input"] is batch["input"] and seen["extra"] == "kept"
    assert batch["target"] is y  # the caller's batch is left alone
    torch.testing.assert_close(value, F.cross_entropy(z, y, label_smoothing=torch_epsilon(0.2, K, form)))


def test_the_wrapper_smooths_soft_targets_with_the_same_map():
    inner = RecordingLoss()
    loss = build(ctx(), inner, epsilon=0.1, form="paper")
    soft = torch.softmax(logits(17, dtype=torch.float32), 1)
    loss(logits(18, dtype=torch.float32), {"input": None, "target": soft})
    on, off = smoothing_values(0.1, K, "paper")
    torch.testing.assert_close(inner.batches[0]["target"], off + (on - off) * soft)


def test_epsilon_zero_returns_the_loss_in_force_itself():
    inner = RecordingLoss()
    assert build(ctx(), inner, epsilon=0.0) is inner


def test_settings_errors_name_the_key():
    for bad in ["label_smoothing.epsilon=1", "label_smoothing.epsilon=-0.1", "label_smoothing.epsilon=1.5"]:
        with pytest.raises(tricks.TricksError, match=r"label_smoothing\.epsilon"):
            tricks.resolve(plugins=["label_smoothing"], sets=[bad])
    with pytest.raises(tricks.TricksError, match=r"label_smoothing\.form"):
        tricks.resolve(plugins=["label_smoothing"], sets=["label_smoothing.form=gluon"])
    cfg = tricks.resolve(plugins=["label_smoothing"], sets=["label_smoothing.epsilon=0.2", "label_smoothing.form=torch"])
    assert cfg.settings["label_smoothing"] == LabelSmoothingSettings(epsilon=0.2, form="torch")
    assert LabelSmoothingSettings() == LabelSmoothingSettings(epsilon=0.1, form="paper")


def test_paper_form_that_would_favour_the_wrong_classes_is_refused():
    with pytest.raises(tricks.TricksError, match=r"epsilon <= 0\.5"):
        build(ctx(2), RecordingLoss(), epsilon=0.6, form="paper")
    build(ctx(2), RecordingLoss(), epsilon=0.5, form="paper")  # uniform: allowed
    build(ctx(2), RecordingLoss(), epsilon=0.6, form="torch")  # torch's form never inverts
    with pytest.raises(tricks.TricksError, match="at least 2 classes"):
        build(ctx(1), RecordingLoss(), epsilon=0.1)


# --- in a run ------------------------------------------------------------------------------


class _RecordTargets(tricks.Plugin):
    """An ad-hoc base loss: cross-entropy that keeps the targets it is handed."""

    def __init__(self):
        super().__init__()
        self.targets = []

    @tricks.hookimpl
    def build_loss(self, ctx):
        def loss(output, batch):
            self.targets.append(batch["target"].detach().clone())
            return cross_entropy(output, batch["target"])

        return loss


def test_a_run_with_mixup_trains_on_mixed_then_smoothed_targets(tmp_path):
    record = _RecordTargets()
    tiny_run(plugins=["mixup", "label_smoothing", record], set=["mixup.alpha=1.0"], train_limit=128, val_limit=64,
             out=tmp_path / "run")
    assert len(record.targets) == 4  # 128 digits in batches of 32
    on, off = smoothing_values(0.1, K, "paper")  # the defaults; digits has 10 classes
    for t in record.targets:
        assert t.shape == (32, K)
        torch.testing.assert_close(t.sum(1), torch.ones(32))
        mixed = (t - off) / (on - off)  # undo the smoothing: what mixup handed on
        assert (mixed > -1e-5).all() and (mixed < 1 + 1e-5).all()
        assert ((mixed > 1e-5).sum(1) <= 2).all()  # a mixture of at most two labels
        assert (t.min(1).values >= off - 1e-6).all()
