"""Tests of the adamw plugin: the optimizer is torch's AdamW at the core's rate and decay (same
trajectory, step for step), its decay is decoupled (and Adam's L2 is not), the SGD-sized rate hint,
and the compositions with no_bias_decay, linear_scaling and warmup in runs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tricks
from tricks.models import create_model
from tricks.testing import make_ctx, tiny_run
from tricks_adamw import AdamW, AdamWSettings


def plugin_optimizer(model, settings=None, **core):
    ctx = make_ctx(plugins=["adamw"], **core)
    return AdamW(settings).configure_optimizer(ctx=ctx, model=model), ctx


def options(optimizer):
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def test_the_optimizer_is_torchs_adamw_at_the_cores_rate_and_decay():
    model = create_model("resnet8", 10, 1)
    settings = AdamWSettings(beta1=0.8, beta2=0.99, eps=1e-6, amsgrad=True)
    opt, _ = plugin_optimizer(model, settings, lr=2e-3, weight_decay=0.05)
    ref = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, amsgrad=True)
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults == ref.defaults and options(opt) == options(ref)
    assert [p for g in opt.param_groups for p in g["params"]] == list(model.parameters())
    default, _ = plugin_optimizer(model, lr=1e-3, weight_decay=0.05)
    g = default.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["betas"], g["eps"], g["amsgrad"]) == (1e-3, 0.05, (0.9, 0.999), 1e-8, False)


def test_the_trajectory_equals_a_hand_built_adamw_exactly():
    torch.manual_seed(0)
    model = create_model("resnet8", 10, 1)
    twin = copy.deepcopy(model)
    opt, _ = plugin_optimizer(model, lr=1e-3, weight_decay=0.05)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-3, weight_decay=0.05)
    data = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(5)]
    for x, y in data:
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    assert not torch.equal(model.fc.weight, create_model("resnet8", 10, 1).fc.weight)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name


def test_weight_decay_is_decoupled_unlike_adam_with_l2():
    """With zero gradients, AdamW's step is the decay alone: w * (1 - lr * wd), exactly. Adam
    with L2 adds wd * w to the gradient and then normalises it: its first step moves every weight
    by about lr * sign(w), whatever wd is, so the decay's strength is divided away."""
    lr = 1e-2
    torch.manual_seed(1)
    w0 = torch.randn(50, 20)
    for wd in (0.05, 0.5):
        w = nn.Parameter(w0.clone())
        opt, _ = plugin_optimizer(nn.ParameterList([w]), lr=lr, weight_decay=wd)
        w.grad = torch.zeros_like(w)
        opt.step()
        assert torch.equal(w.detach(), w0 * (1 - lr * wd))

        v = nn.Parameter(w0.clone())
        adam = torch.optim.Adam([v], lr=lr, weight_decay=wd)
        v.grad = torch.zeros_like(v)
        adam.step()
        # L2: a sign step, up to eps / |wd * w| (at most 1e-3 here) of lr
        assert (w0.abs() * wd).min() > 1e-5
        assert torch.allclose(v.detach(), w0 - lr * torch.sign(w0), rtol=0, atol=1e-5)
        assert not torch.allclose(v.detach(), w.detach(), atol=1e-4)


def test_an_sgd_sized_rate_gets_a_one_line_hint():
    _, ctx = plugin_optimizer(create_model("resnet8", 10, 1), lr=0.1)
    assert len(ctx.logs) == 1 and "\n" not in ctx.logs[0]
    assert ctx.logs[0].startswith("adamw: --lr 0.1 is an SGD-sized rate")
    assert "5e-4 to 1e-3 per 512 images" in ctx.logs[0] and "--lr 1e-3 --weight-decay 0.05" in ctx.logs[0]
    _, ctx = plugin_optimizer(create_model("resnet8", 10, 1), lr=1e-3)
    assert ctx.logs == []


def test_settings_errors_name_the_key():
    assert AdamW().settings == AdamWSettings(beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=False)
    for bad, key in [("adamw.beta1=1", "beta1"), ("adamw.beta2=-0.1", "beta2"), ("adamw.eps=0", "eps")]:
        with pytest.raises(tricks.TricksError, match=rf"adamw\.{key}"):
            tricks.resolve(plugins=["adamw"], sets=[bad])


# --- in runs ----------------------------------------------------------------------------------------


class Keep(tricks.Plugin):
    """Keeps the run's optimizer as training starts."""

    @tricks.hookimpl
    def on_fit_start(self, ctx):
        self.optimizer = ctx.optimizer


def test_with_no_bias_decay_adamw_has_two_groups(tmp_path):
    from tricks_no_bias_decay import split_decay

    keep = Keep()
    run = tiny_run(plugins=["adamw", "no_bias_decay", keep], lr=1e-3, weight_decay=0.05, out=tmp_path / "run")
    opt = keep.optimizer
    assert type(opt) is torch.optim.AdamW
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all((g["lr"], g["betas"], g["eps"]) == (1e-3, (0.9, 0.999), 1e-8) for g in opt.param_groups)
    decay, no_decay = split_decay(create_model("resnet8", 10, 1))
    groups = run.load_checkpoint()["optimizer"]
    assert [len(g["params"]) for g in groups["param_groups"]] == [len(decay), len(no_decay)]
    assert {"exp_avg", "exp_avg_sq"} <= set(next(iter(groups["state"].values())))


def test_with_linear_scaling_the_rate_is_scaled(tmp_path):
    keep = Keep()
    run = tiny_run(plugins=["adamw", "linear_scaling", keep], lr=1e-3, out=tmp_path / "run")  # batches of 32
    assert type(keep.optimizer) is torch.optim.AdamW
    assert [r["lr"] for r in run.metrics()] == pytest.approx([1e-3 * 32 / 256])
    assert keep.optimizer.param_groups[0]["initial_lr"] == pytest.approx(1e-3 * 32 / 256)


def test_with_warmup_the_rate_rises(tmp_path):
    keep = Keep()
    run = tiny_run(plugins=["adamw", "warmup", keep], lr=1e-3, set=["warmup.steps=12"], epochs=2,
                   out=tmp_path / "run")  # 8 steps an epoch
    assert type(keep.optimizer) is torch.optim.AdamW
    assert [r["lr"] for r in run.metrics()] == pytest.approx([1e-3 * 7 / 12, 1e-3])
