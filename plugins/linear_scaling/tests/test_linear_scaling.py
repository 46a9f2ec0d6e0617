"""Tests of the linear_scaling plugin: the rule of the paper, every group scaled, the effective rate
in a run and in its log."""

from __future__ import annotations

import pytest
import torch

import tricks
from tricks.testing import tiny_run
from tricks_linear_scaling import scale_optimizer, scaled_lr


def test_the_papers_examples():
    assert scaled_lr(0.1, 256) == pytest.approx(0.1)
    assert scaled_lr(0.1, 1024) == pytest.approx(0.4)
    assert scaled_lr(0.1, 64) == pytest.approx(0.025)
    assert scaled_lr(0.1, 64, reference_batch=128) == pytest.approx(0.05)


def test_every_group_keeps_its_ratio():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([{"params": [a], "lr": 0.2}, {"params": [b], "lr": 0.02}], lr=0.1)
    assert scale_optimizer(optimizer, 512) == 2.0
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.4, 0.04])


class Log(tricks.Reporter):
    def __init__(self):
        self.lines = []

    def log(self, message):
        self.lines.append(message)


def test_in_a_run_the_rate_is_scaled_and_logged(tmp_path):
    log = Log()
    run = tiny_run(plugins=["linear_scaling"], lr=0.4, out=tmp_path / "run", reporter=log)  # batches of 32
    assert [r["lr"] for r in run.metrics()] == pytest.approx([0.4 * 32 / 256])
    assert "linear_scaling: lr 0.4 x 32/256 = 0.05" in log.lines


def test_composes_with_cosine_and_no_bias_decay(tmp_path):
    run = tiny_run(plugins=["linear_scaling", "no_bias_decay", "cosine"], set=["linear_scaling.reference_batch=64"],
                   out=tmp_path / "run")
    assert run.config()["linear_scaling"]["reference_batch"] == 64
    groups = run.load_checkpoint()["optimizer"]["param_groups"]
    assert len(groups) == 2 and all(g["initial_lr"] == pytest.approx(0.1 * 32 / 64) for g in groups)
