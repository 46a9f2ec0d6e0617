"""Tests of the step plugin: the formula, equality with torch's MultiStepLR, and the schedule in a
run with milestones in epochs and as fractions."""

from __future__ import annotations

import pytest
import torch

import tricks
from tricks.testing import tiny_run
from tricks_step import StepSettings, step_lr


def test_the_papers_baseline_divides_by_ten_at_30_60_90():
    per_epoch, base = 100, 0.1
    marks = [30 * per_epoch, 60 * per_epoch, 90 * per_epoch]
    for epoch, expected in [(0, 0.1), (29, 0.1), (30, 0.01), (59, 0.01), (60, 0.001), (90, 0.0001), (119, 0.0001)]:
        assert step_lr(epoch * per_epoch, marks, base) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("gamma", [0.1, 0.2, 0.5])
def test_equals_torch_multisteplr_stepped_every_batch(gamma):
    marks, base = [7, 15, 16, 40], 0.3
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = torch.optim.lr_scheduler.MultiStepLR(optimizer, marks, gamma=gamma)
    for t in range(50):
        assert step_lr(t, marks, base, gamma) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
        optimizer.step()
        sched.step()


def test_in_a_run_milestones_in_epochs(tmp_path):
    run = tiny_run(plugins=["step"], set=["step.milestones=[1, 3]"], epochs=4, out=tmp_path / "run")
    lrs = [r["lr"] for r in run.metrics()]
    assert lrs == pytest.approx([0.1, 0.01, 0.01, 0.001])


def test_in_a_run_milestones_as_fractions(tmp_path):
    run = tiny_run(plugins=["step"], set=["step.fractions=[0.5]", "step.gamma=0.2"], epochs=4, out=tmp_path / "run")
    lrs = [r["lr"] for r in run.metrics()]
    assert lrs == pytest.approx([0.1, 0.1, 0.02, 0.02])


def test_step_and_cosine_both_provide_the_schedule_so_they_conflict():
    with pytest.raises(tricks.TricksError, match="cosine"):
        tricks.resolve(plugins=["step", "cosine"])


def test_bad_fractions_are_a_one_line_error(tmp_path):
    with pytest.raises(tricks.TricksError, match="fractions"):
        tiny_run(plugins=["step"], set=["step.fractions=[1.5]"], out=tmp_path / "run")
    with pytest.raises(Exception, match="gamma"):
        StepSettings(gamma=0)
