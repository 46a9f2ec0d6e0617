"""``torchrun --nproc-per-node 2`` trains one run data-parallel with torch.distributed: each rank
its shard of the data, metrics reduced across ranks, only rank 0 writes the run directory, and
resume works. Tested on CPU with two processes (gloo)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import tricks
from tricks.builtin import CoreDefaults
from tricks.data import load_data, make_loaders
from tricks.models import create_model
from tricks.testing import make_ctx

from conftest import TINY, TINY_API
from processes import finish, leftovers, one_torch_thread, start

pytestmark = pytest.mark.slow  # every test here trains end to end

STEPS_PER_EPOCH = TINY_API["train_limit"] // TINY_API["batch_size"]
VAL = TINY_API["val_limit"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m tricks.cli.main ARGS`` (a free port, one thread per worker)."""
    proc = finish(start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                         "-m", "tricks.cli.main", *args], env={"TRICKS_DIST_BACKEND": "gloo"}))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def evaluate_checkpoint(run: tricks.RunDir) -> dict:
    """The checkpointed model evaluated here, in one process, on the whole validation set: both
    ranks' shards, in the ranks' batches, with the core's evaluation, the sums added up."""
    cfg = run.run_config()
    device = torch.device("cpu")
    data = load_data(cfg.core)
    model = create_model(cfg.core.model, data.num_classes, data.in_chans)
    model.load_state_dict(run.load_checkpoint()["model"])
    model.eval()
    ctx = make_ctx(precision=cfg.core.precision, device=device)
    total: dict[str, float] = {}
    for rank in (0, 1):
        _, val_loader = make_loaders(data, cfg.core, device, rank=rank, world=2)
        with torch.no_grad(), one_torch_thread():
            for key, value in CoreDefaults().evaluate(ctx, model, val_loader).items():
                total[key] = total.get(key, 0.0) + float(value)
    n = total.pop("n")
    return {f"val_{k}": v / n for k, v in total.items()} | {"n": n}


def test_two_processes_train_one_run_and_resume(tmp_path):
    run = tricks.RunDir(tmp_path / "run")
    proc = torchrun("run", "--plugins", "mixup,cosine", "--epochs", "2", "--device", "cpu", *TINY,
                    "--out", str(run.path), "--json")

    # Only rank 0 reports: one line per epoch, one summary.
    printed = events(proc.stdout)
    assert [e["event"] for e in printed] == ["epoch", "epoch", "summary"]
    assert run.summary()["world_size"] == 2
    assert sorted(p.name for p in run.path.iterdir()) == [".lock", "checkpoints", "config.yaml", "curves.png", "metrics.jsonl", "summary.json"]
    assert leftovers(run.path) == []

    rows = run.metrics()
    assert [r["epoch"] for r in rows] == [1, 2]
    # Each rank took half of every global batch of 32, so an epoch is still 256 // 32 steps: had each
    # rank gone through the whole training set, an epoch would be twice as long.
    assert [r["step"] for r in rows] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    for r in rows:
        assert 0.0 <= r["val_acc"] <= 1.0
        assert r["val_acc"] * VAL == pytest.approx(round(r["val_acc"] * VAL))  # a count out of the whole val set
    # The reduced metrics are those of the checkpointed model on the whole validation set.
    alone = evaluate_checkpoint(run)
    assert alone["n"] == VAL
    assert rows[-1]["val_acc"] == alone["val_acc"]
    assert rows[-1]["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-7)

    proc = torchrun("run", "--resume", str(run.path), "--epochs", "3", "--json")
    assert [e.get("epoch") for e in events(proc.stdout)] == [3, None]  # epoch 3 only, then the summary
    resumed = run.metrics()
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    assert resumed[:2] == rows
    assert resumed[2]["step"] == 3 * STEPS_PER_EPOCH
    summary = run.summary()
    assert summary["world_size"] == 2 and summary["epochs"] == 3
    assert run.load_checkpoint()["epoch"] == 3
    assert resumed[2]["val_acc"] == evaluate_checkpoint(run)["val_acc"]
    assert leftovers(run.path) == []
