"""An epoch is committed whole: a run killed at any write boundary (just before or just after
every atomic rename it makes) and then continued ends with exactly the files of a run that was
never interrupted, with no temporary file left and no epoch lost or trained twice.

The boundaries are not guessed: an uninterrupted run counts its renames, and the test kills a
fresh run at each of them in turn. The killed runs are forked children of the test process (no
interpreter start-up); each is continued here, as ``tricks run --resume`` would, or started
again when it was killed before its config was written.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch

import tricks
from tricks import RunDir

from conftest import TINY_API
from processes import kill_at_write, leftovers, one_torch_thread
from test_resume import TIMING, assert_same_rows

SEED = 4
EPOCHS = 2
PLUGINS = ["mixup", "cosine"]


def _train(out: str, resume: bool) -> dict:
    if resume:
        return tricks.run(resume=out)
    return tricks.run(plugins=PLUGINS, epochs=EPOCHS, seed=SEED, device="cpu", out=out, **TINY_API)


def _killed(out: str, nth: int, before: bool) -> None:
    torch.set_num_threads(1)
    kill_at_write("*", before=before, nth=nth)
    _train(out, resume=False)
    os._exit(0)  # not killed: the boundary was past the run's last write


def renames(out: Path) -> list[str]:
    """The names of the files an uninterrupted run renames into place, in order."""
    names: list[str] = []
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        names.append(Path(dst).name)
        return real(src, dst, *args, **kwargs)

    os.replace = replace
    try:
        with one_torch_thread():
            _train(str(out), resume=False)
    finally:
        os.replace = real
    return names


def continue_run(out: Path) -> dict:
    """What a job does after a kill (and a user would): nothing for a finished run, resume an
    interrupted one, start again one killed before it wrote its config."""
    if RunDir(out).status() == "finished":
        return RunDir(out).summary()
    with one_torch_thread():
        return _train(str(out), resume=RunDir(out).has_run())


def files(out: Path) -> dict:
    run = RunDir(out)
    checkpoint = run.load_checkpoint()
    return {"metrics": run.metrics(), "summary": run.summary(), "checkpoint": checkpoint,
            "curves": (out / RunDir.CURVES).is_file(), "status": run.status()}


@pytest.mark.slow
def test_a_kill_at_every_write_boundary_resumes_to_the_uninterrupted_result(tmp_path):
    reference = tmp_path / "reference"
    names = renames(reference)
    # config, then per epoch the checkpoint (the commit) and the metrics, then curves and summary
    assert names == ["config.yaml"] + ["last.pt", "metrics.jsonl"] * (EPOCHS - 1) + [
        "last.pt", "metrics.jsonl", "curves.png", "summary.json"]
    want = files(reference)

    fork = multiprocessing.get_context("fork")
    for nth in range(1, len(names) + 1):
        for before in (True, False):
            out = tmp_path / f"killed-{nth}-{'before' if before else 'after'}"
            child = fork.Process(target=_killed, args=(str(out), nth, before))
            child.start()
            child.join()
            where = f"killed {'before' if before else 'after'} renaming {names[nth - 1]} (write {nth})"
            assert child.exitcode == -signal.SIGKILL, where
            summary = continue_run(out)
            got = files(out)
            assert got["status"] == "finished", where
            assert leftovers(out) == [], where
            assert_same_rows(got["metrics"], want["metrics"])
            strip = lambda s: {k: v for k, v in s.items() if k not in TIMING}  # noqa: E731
            assert strip(got["summary"]) == strip(want["summary"]) == strip(summary), where
            assert got["curves"], where
            assert got["checkpoint"]["epoch"] == EPOCHS and got["checkpoint"]["step"] == want["checkpoint"]["step"]
            for key, value in want["checkpoint"]["model"].items():
                torch.testing.assert_close(got["checkpoint"]["model"][key], value, msg=f"{where}: {key}")


def test_a_run_killed_after_its_last_commit_is_completed_not_retrained(tmp_path):
    """The window the issue found: the last checkpoint renamed, the metrics and summary not."""
    out = tmp_path / "run"
    child = multiprocessing.get_context("fork").Process(target=_killed_last, args=(str(out),))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    run = RunDir(out)
    assert run.load_checkpoint()["epoch"] == 1
    assert run.summary() is None and run.metrics() == []
    assert run.status() == "interrupted"  # not "finished": the job resumes it

    seen: list[str] = []

    class Watch(tricks.Reporter):
        def epoch_start(self, epoch, steps):
            seen.append(f"epoch {epoch}")

        def log(self, message):
            seen.append(message)

    summary = tricks.run(resume=out, reporter=Watch())
    assert not any(s.startswith("epoch") for s in seen)  # nothing trained again
    assert any("written from its checkpoint" in s for s in seen)
    assert run.status() == "finished"
    assert [r["epoch"] for r in run.metrics()] == [1]
    assert run.summary() == summary and summary["status"] == "complete"
    with pytest.raises(tricks.TricksError, match="is finished"):
        tricks.run(resume=out)  # now nothing is missing: resuming it again is the usual error


def _killed_last(out: str) -> None:
    torch.set_num_threads(1)
    kill_at_write("last.pt", before=False)
    tricks.run(plugins=["cosine"], epochs=1, seed=SEED, device="cpu", out=out, **TINY_API)
    os._exit(0)
