"""Tests of the warmup plugin: the ramp of the paper, its two ways of wrapping a schedule (each
equal to timm's scheduler with the matching option), and the wrapping in a run."""

from __future__ import annotations

import pytest
import torch

import tricks
from tricks.testing import tiny_run
from tricks_cosine import cosine_lr
from tricks_step import step_lr
from tricks_warmup import Warmup, WarmupSettings, warmup_factor, with_warmup


def constant(step, total, base):
    return base


@pytest.mark.parametrize("m", [1, 5, 40])
def test_the_ramp_of_the_paper_starts_at_zero_and_reaches_the_rate_at_m(m):
    base = 0.4
    lrs = [with_warmup(constant, m)(t, 100, base) for t in range(m + 3)]
    assert lrs[0] == 0.0
    for i in range(m + 1):  # lr_i = i * eta / m
        assert lrs[i] == pytest.approx(i * base / m, rel=1e-12)
    assert lrs[m:] == pytest.approx([base] * 3)


def test_start_factor_and_no_warmup():
    assert warmup_factor(0, 10, 0.25) == 0.25
    assert warmup_factor(5, 10, 0.25) == pytest.approx(0.625)
    assert warmup_factor(10, 10, 0.25) == 1.0
    assert [warmup_factor(t, 0) for t in range(3)] == [1.0, 1.0, 1.0]
    assert with_warmup(constant, 0)(0, 10, 0.1) == 0.1


def test_shift_runs_the_wrapped_cosine_after_warmup_over_the_remaining_steps():
    m, total, base = 7, 50, 0.1
    fn = with_warmup(lambda t, T, b: cosine_lr(t, T, b), m, mode="shift")
    for t in range(m, total + 1):
        assert fn(t, total, base) == pytest.approx(cosine_lr(t - m, total - m, base), rel=1e-12)
    assert fn(m, total, base) == pytest.approx(base)  # the peak is the base rate
    ramp = [fn(t, total, base) for t in range(m + 1)]
    assert all(a < b for a, b in zip(ramp, ramp[1:]))


def test_overlay_keeps_step_milestones_at_their_steps():
    m, total, base, marks = 5, 40, 0.1, [20, 30]
    fn = with_warmup(lambda t, T, b: step_lr(t, marks, b), m, mode="overlay")
    for t in range(m, total):
        assert fn(t, total, base) == pytest.approx(step_lr(t, marks, base))
    assert fn(m - 1, total, base) == pytest.approx(base * (m - 1) / m)


@pytest.mark.parametrize("mode, prefix", [("shift", True), ("overlay", False)])
def test_equals_timm_cosine_scheduler_with_linear_warmup(mode, prefix):
    from timm.scheduler import CosineLRScheduler

    m, total, base = 6, 60, 0.2
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = CosineLRScheduler(optimizer, t_initial=total - m if prefix else total, lr_min=0.0, warmup_t=m,
                              warmup_lr_init=0.0, warmup_prefix=prefix, t_in_epochs=False)
    fn = with_warmup(lambda t, T, b: cosine_lr(t, T, b), m, mode=mode)
    for t in range(total):
        sched.step_update(t)
        assert fn(t, total, base) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9, abs=1e-12), t


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode"):
        with_warmup(constant, 3, mode="sideways")


def test_in_a_run_it_wraps_the_schedule_in_force(tmp_path):
    # 4 epochs of 8 steps; warmup of 1 epoch (8 steps) in front of cosine over the other 24
    run = tiny_run(plugins=["cosine", "warmup"], set=["warmup.epochs=1"], epochs=4, out=tmp_path / "run")
    lrs = [r["lr"] for r in run.metrics()]
    expected = [0.1 * 7 / 8] + [cosine_lr(s - 8, 24, 0.1) for s in (15, 23, 31)]
    assert lrs == pytest.approx(expected)


def test_warmup_in_steps_wraps_the_constant_rate(tmp_path):
    run = tiny_run(plugins=["warmup"], set=["warmup.steps=12"], epochs=2, out=tmp_path / "run")  # 8 steps an epoch
    lrs = [r["lr"] for r in run.metrics()]
    assert lrs == pytest.approx([0.1 * 7 / 12, 0.1])


def test_a_warmup_as_long_as_the_run_is_a_one_line_error(tmp_path):
    with pytest.raises(tricks.TricksError, match=r"warmup of 16 steps .* shorten it"):
        tiny_run(plugins=["warmup"], set=["warmup.epochs=2"], epochs=2, out=tmp_path / "run")


def test_settings_validate():
    assert Warmup().settings == WarmupSettings(epochs=5.0, steps=None, start_factor=0.0, mode="shift")
    with pytest.raises(Exception, match="start_factor"):
        WarmupSettings(start_factor=1.0)
