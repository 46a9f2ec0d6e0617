"""Tests of the tensorboard plugin: real runs, their event files read back with TensorBoard's own
reader and compared with metrics.jsonl, the logdir setting, a resumed run, and rank 0 only."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import tricks
from tricks.testing import make_ctx, tiny_run
from tricks_tensorboard import TensorBoard, TensorBoardSettings, scalars

SMALL = dict(train_limit=128, val_limit=64)  # tiny_run with 4 steps of 32 an epoch


def events(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files of ``logdir``: tag -> [(step, value), ...]."""
    accumulator = EventAccumulator(str(logdir))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def assert_logged(logdir, rows):
    """Each numeric entry of each metrics row is a scalar at step = its epoch, exactly once."""
    logged = events(logdir)
    assert set(logged) == set(scalars(rows[0])) >= {"train_loss", "val_loss", "val_acc", "lr", "step"}
    for tag, points in logged.items():
        assert [step for step, _ in points] == [row["epoch"] for row in rows], tag
        for (_, value), row in zip(points, rows):
            assert value == np.float32(row[tag]), (tag, row["epoch"])  # TensorBoard keeps float32


def test_scalars_are_the_numbers_of_the_row_but_the_epoch():
    row = {"epoch": 3, "step": 24, "train_loss": 0.5, "val_acc": 1, "note": "x", "pruned": True, "lr": np.float32(0.1)}
    assert scalars(row) == {"step": 24.0, "train_loss": 0.5, "val_acc": 1.0, "lr": pytest.approx(0.1)}


def test_a_run_logs_every_metrics_row(tmp_path):
    run = tiny_run(plugins=["tensorboard"], epochs=2, out=tmp_path / "run", **SMALL)
    assert run.config()["plugins"] == ["tensorboard"]
    rows = run.metrics()
    assert len(rows) == 2
    assert_logged(run.path / "tensorboard", rows)


def test_logdir_puts_the_event_files_elsewhere(tmp_path):
    logdir = tmp_path / "board" / "one"
    run = tiny_run(plugins=["tensorboard"], out=tmp_path / "run", set=[f"tensorboard.logdir={logdir}"], **SMALL)
    assert not (run.path / "tensorboard").exists()
    assert_logged(logdir, run.metrics())


class _CheckpointFails(tricks.Plugin):
    """Fails the checkpoint of epoch ``epoch`` (0-based): that epoch was logged, but a resumed run
    trains it again."""

    name = "checkpoint_fails"

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    @tricks.hookimpl
    def state_dict(self, ctx):
        if ctx.epoch == self.epoch:
            raise RuntimeError("the disk is full")


def test_a_resumed_run_shows_each_epoch_once(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(tricks.PluginHookError, match="disk is full"):
        tiny_run(plugins=["tensorboard", _CheckpointFails(2)], epochs=3, out=run, **SMALL)
    first = events(run / "tensorboard")
    assert [step for step, _ in first["val_acc"]] == [1, 2, 3]  # epoch 3 was logged, not checkpointed
    tricks.run(resume=run)
    rows = tricks.RunDir(run).metrics()
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert_logged(run / "tensorboard", rows)  # the first process's epoch 3 is purged


def test_only_the_main_process_writes(tmp_path):
    plugin = TensorBoard(TensorBoardSettings())
    row = {"epoch": 1, "train_loss": 1.0}
    main = dataclasses.replace(make_ctx(), run_dir=tmp_path)  # rank 0
    other = dataclasses.replace(main, rank=1)
    plugin.on_epoch_end(other, 0, row)
    plugin.on_fit_end(other, {})
    assert not (tmp_path / "tensorboard").exists()
    plugin.on_epoch_end(main, 0, row)
    plugin.on_exception(main, RuntimeError())
    assert plugin.writer is None and events(tmp_path / "tensorboard") == {"train_loss": [(1, 1.0)]}
