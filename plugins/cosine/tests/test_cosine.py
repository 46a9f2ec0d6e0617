"""Tests of the cosine plugin: the formula, equality with torch's CosineAnnealingLR, and the
schedule the framework applies in a run (every parameter group, every step)."""

from __future__ import annotations

import math

import pytest
import torch

import tricks
from tricks.testing import make_ctx, tiny_run
from tricks_cosine import Cosine, CosineSettings, cosine_lr


@pytest.mark.parametrize("base, final", [(0.1, 0.0), (0.4, 0.001), (1.0, 0.5)])
@pytest.mark.parametrize("total", [1, 2, 7, 100])
def test_endpoints_monotone_and_midpoint(base, final, total):
    lrs = [cosine_lr(t, total, base, final) for t in range(total + 1)]
    assert lrs[0] == pytest.approx(base, rel=1e-12)
    assert lrs[-1] == pytest.approx(final, rel=1e-12, abs=1e-15)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # non-increasing
    if total % 2 == 0:
        assert lrs[total // 2] == pytest.approx((base + final) / 2, rel=1e-12)
    # the cosine is point-symmetric about the midpoint: lr(t) + lr(T - t) = base + final
    for t in range(total + 1):
        assert lrs[t] + lrs[total - t] == pytest.approx(base + final, rel=1e-12)


def test_matches_the_formula_of_the_paper():
    # Bag of Tricks, section 5.1: eta_t = 1/2 (1 + cos(t pi / T)) eta (final rate 0)
    base, total = 0.1, 390
    for t in range(total + 1):
        assert cosine_lr(t, total, base) == pytest.approx(0.5 * (1 + math.cos(t * math.pi / total)) * base, rel=1e-12, abs=1e-18)


def test_steps_outside_the_schedule_are_clamped():
    assert cosine_lr(-5, 10, 0.1, 0.01) == pytest.approx(0.1)
    assert cosine_lr(15, 10, 0.1, 0.01) == pytest.approx(0.01)


@pytest.mark.parametrize("final", [0.0, 0.002])
@pytest.mark.parametrize("total", [10, 97])
def test_equals_torch_cosine_annealing_at_every_step(total, final):
    # two parameter groups with their own base rates: torch anneals each from its own
    bases = [0.1, 0.03]
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in bases]
    opt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, bases)], lr=bases[0])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=final)
    for t in range(total + 1):
        theirs = sched.get_last_lr()
        ours = [cosine_lr(t, total, base, final) for base in bases]
        assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12), f"step {t}"
        opt.step()
        sched.step()


def test_the_plugin_provides_the_schedule_with_its_final_rate():
    schedule = Cosine(CosineSettings(final_lr=0.01)).configure_schedule(ctx=make_ctx(plugins=["cosine"]), optimizer=None)
    for t in range(21):
        assert schedule(t, 20, 0.2) == cosine_lr(t, 20, 0.2, 0.01)


def test_the_loop_applies_it_to_every_parameter_group():
    from tricks.loop import Schedule

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.02}], lr=0.1)
    schedule = Schedule(opt, Cosine(CosineSettings(final_lr=0.001)).configure_schedule(ctx=None, optimizer=opt), 12)
    for step in range(12):
        schedule.apply(step)
        assert [g["lr"] for g in opt.param_groups] == [cosine_lr(step, 12, 0.1, 0.001), cosine_lr(step, 12, 0.02, 0.001)]


def test_settings_errors_name_the_key():
    with pytest.raises(tricks.TricksError, match=r"cosine\.final_lr"):
        tricks.resolve(plugins=["cosine"], sets=["cosine.final_lr=-1"])
    with pytest.raises(tricks.TricksError, match=r"cosine\.final"):
        tricks.resolve(plugins=["cosine"], sets=["cosine.final=0.1"])


class _TwoGroups(tricks.Plugin):
    """An ad-hoc plugin: an optimizer with two parameter groups (the second at a fifth of the
    base rate), and a record of every group's rate at the end of each epoch."""

    def __init__(self):
        super().__init__()
        self.bases, self.seen = [], []

    @tricks.hookimpl
    def configure_optimizer(self, ctx, model):
        params = list(model.parameters())
        lr = ctx.core.lr
        self.bases = [lr, lr / 5]
        groups = [{"params": params[:-1], "lr": self.bases[0]}, {"params": params[-1:], "lr": self.bases[1]}]
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)

    @tricks.hookimpl
    def on_epoch_end(self, ctx, epoch, metrics):
        self.seen.append((ctx.step, [g["lr"] for g in ctx.optimizer.param_groups]))


def test_a_run_decays_every_group_per_step_and_logs_the_rate(tmp_path):
    groups = _TwoGroups()
    epochs, lr, final = 3, 0.05, 0.004
    run = tiny_run(plugins=["cosine", groups], epochs=epochs, lr=lr, set=[f"cosine.final_lr={final}"], out=tmp_path / "run")
    rows = run.metrics()
    assert len(rows) == epochs
    steps_per_epoch = 256 // 32  # tiny_run: 256 digits in batches of 32
    total = epochs * steps_per_epoch
    for epoch, row in enumerate(rows):
        last_step = (epoch + 1) * steps_per_epoch - 1  # the rate of the epoch's last update
        assert row["step"] == last_step + 1
        assert row["lr"] == pytest.approx(cosine_lr(last_step, total, lr, final), rel=1e-12)
        step, group_lrs = groups.seen[epoch]
        assert step == last_step + 1
        assert group_lrs == pytest.approx([cosine_lr(last_step, total, b, final) for b in groups.bases], rel=1e-12)
    # it decays: each epoch ends lower than the one before, and the first group's base is the core's lr
    assert rows[0]["lr"] > rows[1]["lr"] > rows[2]["lr"] > final
    assert groups.bases == [lr, lr / 5]

