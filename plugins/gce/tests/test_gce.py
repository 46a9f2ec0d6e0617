"""Tests of the gce plugin: L_q against its formula, its two limits (the cross-entropy as q -> 0,
1 - p_y at q = 1), its gradient (the cross-entropy's weighted by p_y ** q), soft targets, low
precision, a short run and the refusal of a bad q."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tricks.testing import tiny_run
from tricks_gce import gce_loss

from processes import cli_in_process, one_line_error

K, B = 10, 16


def data(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, K, generator=g, dtype=dtype) * 3, torch.randint(0, K, (B,), generator=g)


@pytest.mark.parametrize("q", [0.1, 0.5, 0.7, 1.0])
def test_lq_equals_its_formula(q):
    z, y = data()
    p = z.softmax(1)[torch.arange(B), y]
    assert torch.allclose(gce_loss(z, y, q).double(), ((1 - p**q) / q).mean(), atol=1e-6)


def test_the_limits_cross_entropy_and_mae():
    z, y = data(1)
    assert torch.allclose(gce_loss(z, y, 1e-7).double(), F.cross_entropy(z, y), atol=1e-5)
    p = z.softmax(1)[torch.arange(B), y]
    assert torch.allclose(gce_loss(z, y, 1.0).double(), (1 - p).mean(), atol=1e-6)
    # the mean absolute error against the one-hot target is 2 (1 - p_y)
    assert torch.allclose(2 * gce_loss(z, y, 1.0).double(), (z.softmax(1) - F.one_hot(y, K)).abs().sum(1).mean(), atol=1e-6)


def test_the_gradient_is_the_cross_entropys_weighted_by_p_to_the_q():
    q = 0.7
    z, y = data(2)
    a = z.clone().float().requires_grad_()
    gce_loss(a, y, q).backward()
    b = z.clone().float().requires_grad_()
    F.cross_entropy(b, y, reduction="none").mul(b.softmax(1)[torch.arange(B), y].detach() ** q).mean().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)
    # an example the model finds unlikely pulls less than under the cross-entropy
    c = z.clone().float().requires_grad_()
    F.cross_entropy(c, y).backward()
    assert (a.grad.norm(dim=1) <= c.grad.norm(dim=1) + 1e-7).all()


def test_soft_targets_are_the_expectation_of_lq():
    z, y = data(3)
    onehot = F.one_hot(y, K).double()
    assert torch.allclose(gce_loss(z, onehot), gce_loss(z, y), atol=1e-6)
    y2 = y.roll(1)
    mixed = 0.3 * onehot + 0.7 * F.one_hot(y2, K).double()
    assert torch.allclose(gce_loss(z, mixed), 0.3 * gce_loss(z, y) + 0.7 * gce_loss(z, y2), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_give_a_finite_loss_and_gradient(dtype):
    z, y = data(4, dtype=torch.float32)
    z = (z * 30).to(dtype).requires_grad_()  # p_y underflows in the low precision itself
    loss = gce_loss(z, y)
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item()) and torch.isfinite(z.grad).all()


def test_a_run_trains_with_it(tmp_path):
    run = tiny_run(plugins=["gce"], out=tmp_path / "run", epochs=2, train_limit=256, val_limit=64, curves=False)
    rows = run.metrics()
    assert all(math.isfinite(r["train_loss"]) and 0 < r["train_loss"] <= 1 / 0.7 for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


@pytest.mark.parametrize("value", ["0", "1.5"])
def test_a_bad_q_is_one_line_with_status_2(tmp_path, value):
    code, _, stderr = cli_in_process("run", "--plugins", "gce", "--set", f"gce.q={value}", "--epochs", "1",
                                     "--out", str(tmp_path / "r"))
    one_line_error(code, stderr, "gce.q")
