"""Circle loss: the class-level form against cross-entropy over modified logits computed here, the
pair-level form against pytorch-metric-learning's CircleLoss (value and gradient) and against the
paper's unified formula, the detached weights, the edge cases (anchors without positives, negatives
below -m, gamma 256 in every precision), soft targets, the cosine classifier, the plugin contract,
a CLI run composed with augmentation and schedule plugins, and the refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import tricks
from tricks.testing import call_wrapper, check_plugin, make_ctx
from tricks_circle_loss import (CircleLoss, CosineClassifier, circle_logits, class_circle_loss, pair_circle_loss,
                                pair_circle_losses, replace_classifier)

from conftest import read_jsonl
from processes import cli_in_process, one_line_error



def cosines(b: int, k: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, k, generator=g, dtype=dtype) * 2 - 1


def expected_logits(s: torch.Tensor, y: torch.Tensor, m: float, gamma: float) -> torch.Tensor:
    """The paper's class-level logits, element by element: target gamma*a_p*(s - (1-m)) with
    a_p = max(0, 1+m-s); others gamma*a_n*(s - m) with a_n = max(0, s+m)."""
    out = torch.empty_like(s)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            v = float(s[i, j])
            if j == int(y[i]):
                out[i, j] = gamma * max(0.0, 1 + m - v) * (v - (1 - m))
            else:
                out[i, j] = gamma * max(0.0, v + m) * (v - m)
    return out


# --- class level ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma, m", [(256.0, 0.25), (64.0, 0.1), (1.0, 0.0)])
def test_class_level_loss_is_cross_entropy_over_the_modified_logits(gamma, m):
    s, y = cosines(12, 7), torch.arange(12) % 7
    want = expected_logits(s, y, m, gamma)
    assert torch.allclose(circle_logits(s, y, m, gamma), want, rtol=0, atol=1e-12)
    assert torch.allclose(class_circle_loss(s, y, m, gamma), F.cross_entropy(want, y), rtol=1e-12, atol=1e-12)


def test_class_level_weights_are_constants_in_the_gradient():
    """With a_p, a_n held constant, d logit / d s = gamma * a: the gradient is (softmax - onehot) * gamma * a."""
    gamma, m = 32.0, 0.25
    s, y = cosines(6, 5, seed=1).requires_grad_(), torch.tensor([0, 1, 2, 3, 4, 0])
    class_circle_loss(s, y, m, gamma).backward()
    z = expected_logits(s.detach(), y, m, gamma)
    own = F.one_hot(y, 5).bool()
    alpha = torch.where(own, (1 + m - s.detach()).clamp(min=0), (s.detach() + m).clamp(min=0))
    want = (z.softmax(1) - own.double()) * gamma * alpha / len(y)
    assert torch.allclose(s.grad, want, atol=1e-12)


def test_soft_targets_weight_the_loss_of_each_class_by_its_probability():
    gamma, m = 256.0, 0.25
    s, y = cosines(8, 6, seed=2), torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])
    one_hot = F.one_hot(y, 6).double()
    assert torch.allclose(class_circle_loss(s, one_hot, m, gamma), class_circle_loss(s, y, m, gamma), atol=1e-9)
    # a mixup target: lam * L(y_a) + (1 - lam) * L(y_b), as mixup's own loss on hard labels
    partner, lam = y.roll(1), 0.3
    mixed = lam * one_hot + (1 - lam) * F.one_hot(partner, 6).double()
    want = lam * class_circle_loss(s, y, m, gamma) + (1 - lam) * class_circle_loss(s, partner, m, gamma)
    assert torch.allclose(class_circle_loss(s, mixed, m, gamma), want, atol=1e-9)
    # a full distribution (label smoothing): the weighted sum of the per-class losses, row by row
    t = torch.softmax(cosines(8, 6, seed=3) * 3, 1)
    per_class = torch.stack([F.cross_entropy(circle_logits(s, torch.full((8,), k), m, gamma),
                                             torch.full((8,), k), reduction="none") for k in range(6)], 1)
    assert torch.allclose(class_circle_loss(s, t, m, gamma), (t * per_class).sum(1).mean(), atol=1e-9)
    # and the gradients of the two forms agree
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    class_circle_loss(a, one_hot, m, gamma).backward()
    class_circle_loss(b, y, m, gamma).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-9)


def test_a_non_target_cosine_below_minus_m_has_zero_gradient():
    m = 0.25
    s = torch.tensor([[0.5, -0.3, -0.2, 0.1]], dtype=torch.float64, requires_grad=True)
    class_circle_loss(s, torch.tensor([0]), m, 64.0).backward()
    assert s.grad[0, 1] == 0  # -0.3 < -m: a_n = 0
    assert s.grad[0, 2] != 0 and s.grad[0, 3] != 0 and s.grad[0, 0] != 0


# --- pair level -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed, gamma, m", [(0, 80.0, 0.4), (1, 256.0, 0.25), (2, 8.0, 0.0)])
def test_pair_level_loss_equals_pytorch_metric_learning(seed, gamma, m):
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (24,), generator=g)
    labels[:2] = torch.tensor([7, 8])  # two anchors without any positive
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = pair_circle_loss(ours, labels, m, gamma)
    b = losses.CircleLoss(m=m, gamma=gamma)(theirs, labels)
    a.backward()
    b.backward()
    assert torch.allclose(a, b.to(a.dtype), rtol=1e-10, atol=1e-12), (a.item(), b.item())
    assert torch.allclose(ours.grad, theirs.grad, rtol=1e-8, atol=1e-12)


def test_each_anchor_follows_the_unified_formula():
    """log(1 + sum_j exp(g*a_n*(s_n - m)) * sum_i exp(-g*a_p*(s_p - (1-m)))), literally, at a small gamma."""
    gamma, m = 4.0, 0.3
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(10, 4, generator=g, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    got = pair_circle_losses(x, labels, m, gamma)
    s = x @ x.T
    for i in range(10):
        pos = [float(s[i, j]) for j in range(10) if j != i and labels[j] == labels[i]]
        neg = [float(s[i, j]) for j in range(10) if labels[j] != labels[i]]
        if not pos:
            assert got[i] == 0
            continue
        sum_n = sum(math.exp(gamma * max(0, v + m) * (v - m)) for v in neg)
        sum_p = sum(math.exp(-gamma * max(0, 1 + m - v) * (v - (1 - m))) for v in pos)
        assert math.isclose(float(got[i]), math.log(1 + sum_n * sum_p), rel_tol=1e-12)


def test_anchors_without_a_positive_give_zero_and_no_nan():
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(4)).requires_grad_()
    lone = pair_circle_losses(x, torch.tensor([0, 0, 1, 2, 3, 4]))
    assert (lone[2:] == 0).all() and (lone[:2] > 0).all()
    # no anchor has a positive: the loss is 0, its gradient 0, nothing NaN
    loss = pair_circle_loss(x, torch.arange(6))
    loss.backward()
    assert loss.item() == 0 and torch.equal(x.grad, torch.zeros_like(x))
    # one label only: no negatives either
    x.grad = None
    loss = pair_circle_loss(x, torch.zeros(6, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(x.grad).all()


def test_a_negative_with_similarity_below_minus_m_has_zero_gradient():
    m = 0.4
    angle = torch.tensor([0.0, 0.3, math.pi, 1.6], dtype=torch.float64)  # anchor, positive, far and near negatives
    x = torch.stack([angle.cos(), angle.sin()], 1).requires_grad_()
    labels = torch.tensor([0, 0, 1, 2])
    pair_circle_loss(x, labels, m=m, gamma=80.0).backward()
    s = x.detach() @ x.detach().T
    assert s[0, 2] < -m and s[1, 2] < -m  # the far negative: below -m for both anchors that see it
    assert torch.equal(x.grad[2], torch.zeros(2, dtype=torch.float64))
    assert x.grad[3].abs().sum() > 0  # the near one (cos ~ -0.03 and 0.27) is pushed away


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gamma_256_is_finite_in_every_precision(dtype):
    # the worst case: every negative at cosine 1 and every positive at -1
    s = torch.full((4, 10), 1.0, dtype=dtype)
    y = torch.arange(4)
    s[torch.arange(4), y] = -1.0
    s.requires_grad_()
    loss = class_circle_loss(s, y, 0.25, 256.0)
    loss.backward()
    assert torch.isfinite(loss) and loss > 1000 and torch.isfinite(s.grad).all()
    soft = class_circle_loss(s.detach(), F.one_hot(y, 10).to(dtype), 0.25, 256.0)
    assert torch.isfinite(soft)
    # pairs: two images of each of two labels pointing the wrong way
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]], dtype=dtype).requires_grad_()
    loss = pair_circle_loss(x, torch.tensor([0, 0, 1, 1]), 0.25, 256.0)
    loss.backward()
    assert torch.isfinite(loss) and loss > 100 and torch.isfinite(x.grad).all()
    # the literal formula overflows there in float32 already
    sn, sp = torch.tensor(1.0), torch.tensor(-1.0)
    literal = torch.log(1 + torch.exp(256 * (sn + 0.25) * (sn - 0.25)) * torch.exp(-256 * (1.25 - sp) * (sp - 0.75)))
    assert not torch.isfinite(literal)


# --- the cosine classifier and the plugin ---------------------------------------------------------


def test_the_last_linear_layer_becomes_a_cosine_classifier():
    from tricks.models import create_model

    model = create_model("resnet8", 10, 1)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert replace_classifier(model, 10, 256.0) == "fc"
    assert isinstance(model.fc, CosineClassifier)
    shapes.pop("fc.bias")
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes  # the weight keeps its name and shape
    x = torch.randn(3, 1, 8, 8)
    out = model(x)
    features = torch.flatten(model.pool(model.stages(model.stem(x))), 1)
    want = 256 * F.normalize(features, dim=1) @ F.normalize(model.fc.weight, dim=1).T
    assert torch.allclose(out, want, atol=1e-4) and out.abs().max() <= 256
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.float32  # the cosines stay float32 under autocast
    with pytest.raises(ValueError, match="no linear layer with 10 outputs"):
        replace_classifier(torch.nn.Sequential(torch.nn.Conv2d(1, 10, 3)), 10, 1.0)


def test_the_plugin_refuses_a_model_without_a_linear_classifier():
    ctx = make_ctx(plugins=["circle_loss"])
    plugin = CircleLoss()
    with pytest.raises(tricks.TricksError, match="last linear layer") as error:
        call_wrapper(plugin.build_model(ctx), torch.nn.Sequential(torch.nn.Conv2d(1, 10, 3), torch.nn.Flatten()))
    assert "\n" not in str(error.value)


def test_the_class_level_loss_reads_the_scaled_cosines_and_the_pair_level_form_refuses_soft_targets():
    plugin = CircleLoss(CircleLoss.Settings(gamma=30.0, m=0.2))
    loss = plugin.build_loss(make_ctx(plugins=["circle_loss"], num_classes=5))
    s, y = cosines(4, 5, seed=5, dtype=torch.float32), torch.tensor([0, 1, 2, 3])
    assert torch.allclose(loss(30.0 * s, {"target": y}), class_circle_loss(s, y, 0.2, 30.0), atol=1e-5)
    with pytest.raises(tricks.TricksError, match="soft targets over 3 classes"):
        loss(s, {"target": torch.full((4, 3), 1 / 3)})
    assert CircleLoss().values(pairs=True) == (80.0, 0.4) and CircleLoss().values(pairs=False) == (256.0, 0.25)


def test_the_plugin_contract():
    check_plugin("circle_loss", precisions=("fp32", "bf16"))


def test_a_cli_run_with_mixup_cosine_and_warmup_in_fp16(tmp_path):
    """The console script's entry point, called in this process (a fresh one only adds its start-up)."""
    out = tmp_path / "run"
    code, stdout, stderr = cli_in_process("run", "--plugins", "circle_loss,mixup,cosine,warmup", "--set", "warmup.steps=2",
                                          "--model", "resnet8", "--dataset", "digits", "--batch-size", "32", "--train-limit",
                                          "128", "--val-limit", "64", "--epochs", "1", "--precision", "fp16", "--out", str(out))
    assert code == 0, stderr
    assert "val_acc" in stdout
    [row] = read_jsonl(out / "metrics.jsonl")
    assert row["step"] == 4 and math.isfinite(row["train_loss"]) and row["train_loss"] > 0
    assert 0 <= row["val_acc"] <= 1 and math.isfinite(row["val_loss"])
    config = tricks.RunDir(out).config()
    assert config["plugins"] == ["circle_loss", "mixup", "cosine", "warmup"]
    weights = tricks.RunDir(out).load_checkpoint()["model"]
    assert "fc.weight" in weights and "fc.bias" not in weights  # the head is the cosine classifier
    assert json.loads((out / "summary.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("args, fragments", [
    (["--set", "circle_loss.gamma=0"], ["circle_loss.gamma", "greater than 0"]),
    (["--set", "circle_loss.m=1.5"], ["circle_loss.m", "less than 1"]),
    (["--task", "detection", "--dataset", "digits_detection", "--model", "fcos:resnet8"], ["circle_loss", "detection"]),
], ids=["gamma", "m", "detection"])
def test_a_refusal_is_one_line(tmp_path, args, fragments):
    code, _, stderr = cli_in_process("run", "--plugins", "circle_loss", *args, "--epochs", "1", "--out", str(tmp_path / "run"))
    one_line_error(code, stderr, *fragments)
