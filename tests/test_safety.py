"""Nothing lost, nothing run: the run directory's lock, divergence, resume that refuses changes
it cannot honour, and the environment's errors (a file as --out, a folder that cannot be
written, a full disk, a corrupt checkpoint), each one line with its fix, exit status 2 (3 for
divergence), no traceback, and the run directory as it was."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

import tricks
from tricks import RunDir

from conftest import TINY, TINY_API
from processes import (cli_in_process, finish, leftovers, one_line_error, one_torch_thread, snapshot,
                       start_cli)

SEED = 6
STEPS_PER_EPOCH = TINY_API["train_limit"] // TINY_API["batch_size"]


def tiny(out: Path, *plugins, epochs: int = 2, **overrides) -> dict:
    with one_torch_thread():
        return tricks.run(plugins=list(plugins), epochs=epochs, seed=SEED, device="cpu", out=out,
                          **{**TINY_API, **overrides})


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished two-epoch run, copied by the tests that change it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    tiny(out, "cosine")
    return out


@pytest.fixture
def interrupted(finished, tmp_path) -> Path:
    """The finished run cut back to what a kill during its second epoch leaves: the epoch-1 state."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    run = RunDir(out)
    checkpoint = run.load_checkpoint()
    (out / RunDir.SUMMARY).unlink()
    run.write_metrics(checkpoint["history"][:1])
    return out


# --- the lock ---------------------------------------------------------------------------------
def test_a_run_directory_in_use_is_refused_with_the_holders_pid(tmp_path):
    out = tmp_path / "run"
    handle = RunDir(out).lock()
    try:
        code, _, err = cli_in_process("run", *TINY, "--epochs", "1", "--device", "cpu", "--out", str(out))
        one_line_error(code, err, str(out), f"in use by process {os.getpid()}", "choose another --out")
        assert not RunDir(out).has_run()
    finally:
        handle.close()
    assert tiny(out, epochs=1)["status"] == "complete"  # released: the folder is usable again


@pytest.mark.slow
def test_two_runs_started_together_on_one_folder_one_is_refused(tmp_path):
    out = tmp_path / "run"
    args = ["run", *TINY, "--epochs", "2", "--seed", str(SEED), "--device", "cpu", "--out", str(out), "--quiet"]
    first, second = start_cli(*args), start_cli(*args)
    results = sorted((finish(first), finish(second)), key=lambda r: r.returncode)
    assert [r.returncode for r in results] == [0, 2], [r.stderr for r in results]
    line = one_line_error(2, results[1].stderr, "in use by process")
    assert "already holds a run" not in line  # refused while the other trained, not after
    assert RunDir(out).status() == "finished" and len(RunDir(out).metrics()) == 2


# --- divergence -------------------------------------------------------------------------------
class PoisonAt(tricks.Plugin):
    """Makes the inputs of one training step NaN (a stand-in for an exploding learning rate)."""

    def __init__(self, step: int):
        super().__init__()
        self.at = step

    @tricks.hookimpl
    def on_batch(self, ctx, batch):
        if ctx.step == self.at:
            batch["input"] = batch["input"] * float("nan")
        return batch


def test_a_non_finite_loss_stops_the_run_at_that_step_and_keeps_the_last_good_epoch(tmp_path):
    out = tmp_path / "run"
    step = STEPS_PER_EPOCH + 3  # the fourth step of epoch 2
    with pytest.raises(tricks.Diverged) as caught:
        tiny(out, "cosine", PoisonAt(step), epochs=3)
    error = caught.value
    assert (error.epoch, error.step) == (1, step + 1)
    assert f"at step {step + 1} (epoch 2)" in str(error) and "inputs were already non-finite" in str(error)
    assert "\n" not in str(error)
    run = RunDir(out)
    assert run.status() == "diverged"
    assert run.load_checkpoint()["epoch"] == 1  # the last good checkpoint
    rows = run.metrics()
    assert [r["epoch"] for r in rows] == [1] and all(math.isfinite(r["train_loss"]) for r in rows)
    summary = json.loads((out / RunDir.SUMMARY).read_text())  # strict JSON
    assert summary["status"] == "diverged" and summary["diverged_at"] == {"epoch": 2, "step": step + 1}
    assert leftovers(out) == []
    # Resuming a diverged run is refused: it would diverge again.
    code, _, err = cli_in_process("run", "--resume", str(out))
    one_line_error(code, err, "diverged", "lower --lr")


def test_an_exploding_learning_rate_exits_3_with_one_line_and_strict_json(tmp_path):
    out = tmp_path / "run"
    code, _, err = cli_in_process("run", *TINY, "--epochs", "2", "--lr", "1e6", "--device", "cpu", "--out", str(out))
    assert code == 3, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the training loss became") and "core.lr=1e+06" in lines[0]
    summary = (out / RunDir.SUMMARY).read_text()
    assert json.loads(summary, parse_constant=pytest.fail)["status"] == "diverged"
    metrics = out / RunDir.METRICS
    for line in (metrics.read_text().splitlines() if metrics.is_file() else []):
        json.loads(line, parse_constant=pytest.fail)
    assert RunDir(out).status() == "diverged"


def test_json_files_never_hold_bare_nan(tmp_path):
    from tricks import atomic

    atomic.write_json(tmp_path / "a.json", {"x": float("nan"), "y": [float("inf"), 1.5]})
    atomic.write_jsonl(tmp_path / "b.jsonl", [{"x": float("-inf")}])
    assert json.loads((tmp_path / "a.json").read_text(), parse_constant=pytest.fail) == {"x": None, "y": [None, 1.5]}
    assert json.loads((tmp_path / "b.jsonl").read_text(), parse_constant=pytest.fail) == {"x": None}


# --- resume refuses what it cannot honour -------------------------------------------------------
@pytest.mark.parametrize("change, fragments", [
    (["--plugins", "mixup,cosine"], ["cannot change the plugins", "cosine -> mixup,cosine"]),
    (["--model", "resnet14"], ["cannot change core.model", "'resnet8' -> 'resnet14'"]),
    (["--lr", "0.05"], ["cannot change core.lr"]),
    (["--train-limit", "128"], ["cannot change core.train_limit"]),
    (["--set", "cosine.final_lr=0.01"], ["cannot change cosine."]),
])
def test_resume_refuses_changes_it_cannot_honour(interrupted, change, fragments):
    before = snapshot(interrupted)
    code, _, err = cli_in_process("run", "--resume", str(interrupted), *change)
    one_line_error(code, err, *fragments, "start a new run", f"core.init_from={interrupted}")
    assert snapshot(interrupted) == before


def test_resume_may_train_longer_and_elsewhere(interrupted):
    with one_torch_thread():
        summary = tricks.run(resume=interrupted, epochs=3, device="cpu")
    assert summary["epochs"] == 3 and [r["epoch"] for r in RunDir(interrupted).metrics()] == [1, 2, 3]


# --- the environment ---------------------------------------------------------------------------
def test_out_naming_a_file_is_refused_before_any_work(tmp_path):
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    code, _, err = cli_in_process("run", *TINY, "--out", str(out))
    one_line_error(code, err, str(out), "is a file", "choose another --out")
    assert out.read_text() == "keep me"


def test_an_out_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    if os.geteuid() == 0:
        parent = Path("/sys/tricks-cannot-write")  # root writes anywhere but the kernel's read-only trees
        if parent.exists() or os.access("/sys", os.W_OK) and not _refused(parent):
            pytest.skip("no folder this user cannot write")
    else:
        parent = tmp_path / "locked"
        parent.mkdir()
        parent.chmod(0o555)
    code, _, err = cli_in_process("run", *TINY, "--out", str(parent / "run"))
    one_line_error(code, err, "cannot write the run directory", str(parent / "run"), "--out")


def _refused(path: Path) -> bool:
    try:
        path.mkdir()
    except OSError:
        return True
    path.rmdir()
    return False


def test_too_little_free_space_is_refused_before_training(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1 << 10))
    code, _, err = cli_in_process("run", *TINY, "--epochs", "1", "--device", "cpu", "--out", str(out))
    one_line_error(code, err, "MiB free", "free space there or choose another --out")
    assert not out.exists()  # nothing was started: the folder it made is gone again


class DiskFullAt(tricks.Plugin):
    """From the end of epoch ``epoch`` (0-based), every fsync fails as on a full disk."""

    def __init__(self, epoch: int, monkeypatch):
        super().__init__()
        self.epoch, self.monkeypatch = epoch, monkeypatch

    @tricks.hookimpl
    def on_epoch_end(self, ctx, epoch, metrics):
        if epoch == self.epoch:
            def full(fd):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.monkeypatch.setattr(os, "fsync", full)


def test_a_full_disk_mid_run_is_one_line_and_keeps_the_last_epoch(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with pytest.raises(tricks.TricksError, match="No space left on device") as caught:
        tiny(out, "cosine", DiskFullAt(1, monkeypatch), epochs=3)
    assert "last.pt" in str(caught.value) and "resume" in str(caught.value)
    monkeypatch.undo()
    run = RunDir(out)
    assert run.load_checkpoint()["epoch"] == 1 and len(run.metrics()) == 1
    assert leftovers(out) == []
    with one_torch_thread():
        assert tricks.run(resume=out)["status"] == "complete"
    assert [r["epoch"] for r in run.metrics()] == [1, 2, 3]


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "folder", "not-a-checkpoint"])
def test_a_corrupt_checkpoint_on_resume_is_one_line(interrupted, damage):
    path = interrupted / RunDir.CHECKPOINT
    data = path.read_bytes()
    path.unlink()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        path.write_bytes(os.urandom(4096))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "folder":
        path.mkdir()
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    before = snapshot(interrupted)
    code, _, err = cli_in_process("run", "--resume", str(interrupted))
    one_line_error(code, err, str(path))
    assert "Traceback" not in err and snapshot(interrupted) == before


def test_a_run_that_failed_in_its_first_epoch_does_not_block_its_folder(tmp_path):
    class Boom(tricks.Plugin):
        @tricks.hookimpl
        def on_batch(self, ctx, batch):
            raise RuntimeError("boom")

    out = tmp_path / "run"
    with pytest.raises(tricks.PluginHookError):
        tiny(out, Boom(), epochs=1)
    assert RunDir(out).status() == "started"
    assert tiny(out, epochs=1)["status"] == "complete"  # the same --out starts again


class SlowEvent:
    """A device event whose copy lands only every third time it is asked (as on a busy GPU)."""

    def __init__(self):
        self.asked = 0

    def record(self):
        pass

    def query(self):
        self.asked += 1
        return self.asked % 3 == 0

    def synchronize(self):
        pass


def test_the_gpu_check_finds_the_first_bad_step_without_waiting_for_each():
    from tricks.loop import FiniteLoss
    from tricks.testing import make_ctx

    ctx = make_ctx()
    losses = [1.0, 2.0, float("inf"), float("nan"), 3.0, 4.0, 5.0, 6.0, 7.0]
    watch = FiniteLoss(ctx, lazy=True, event=SlowEvent())
    with pytest.raises(tricks.Diverged) as caught:
        for step, value in enumerate(losses):
            watch.step(torch.tensor(value), 0, step)
    assert caught.value.step == 3  # the first bad step (1-based), found a few steps later
    # A bad loss in the last steps of an epoch is found by the end-of-epoch check.
    watch = FiniteLoss(ctx, lazy=True, event=SlowEvent())
    for step, value in enumerate([1.0, 2.0, float("nan")]):
        watch.step(torch.tensor(value), 0, step)
    with pytest.raises(tricks.Diverged, match="at step 3"):
        watch.check(0)
    watch = FiniteLoss(ctx, lazy=True, event=SlowEvent())
    for step in range(5):
        watch.step(torch.tensor(1.0), 0, step)
    watch.check(0)  # all finite: nothing raised
