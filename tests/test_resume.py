"""Resume: a CPU run killed with SIGKILL after epoch 2 of 4 and started again with
``--resume RUN_DIR`` ends with the same metrics as an uninterrupted run with the same seed.
Resuming a folder without a run or a finished run, and starting a run in a folder that holds
one, are one-line errors with exit status 2 that leave the folder as it was."""

from __future__ import annotations

import json
import shutil

import pytest

import tricks
from tricks import RunDir
from tricks.errors import TricksError
from tricks.testing import tiny_run

from conftest import TINY, TINY_API
from processes import (cli_in_process, finish, finish_killed, leftovers, one_line_error,
                       one_torch_thread, snapshot, start_cli, start_script)

SEED = 3
EPOCHS = 4
STEPS_PER_EPOCH = TINY_API["train_limit"] // TINY_API["batch_size"]
# Figures that depend on the clock, not on the training.
TIMING = {"epoch_seconds", "images_per_second", "train_seconds", "run_dir"}


def assert_same_rows(got_rows: list[dict], want_rows: list[dict]) -> None:
    """Row by row: the same keys; accuracy and counters exactly equal, float figures to ~1e-6."""
    assert [r["epoch"] for r in got_rows] == [r["epoch"] for r in want_rows]
    for got, want in zip(got_rows, want_rows):
        assert set(got) == set(want)
        for key in set(want) - TIMING:
            if key in ("epoch", "step", "val_acc", "params"):
                assert got[key] == want[key], (got["epoch"], key)
            else:
                assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), (got["epoch"], key)


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    reference, run = tmp_path / "uninterrupted", tmp_path / "killed"
    # The uninterrupted CLI run and the run to kill go side by side, one core each.
    uninterrupted = start_cli("run", "--plugins", "mixup,cosine", "--epochs", str(EPOCHS), "--seed", str(SEED),
                              "--device", "cpu", *TINY, "--out", str(reference), "--json")
    finish_killed(start_script(f"""
        import tricks
        from processes import KillAtEpoch
        tricks.run(plugins=["mixup", "cosine", KillAtEpoch(2)], epochs={EPOCHS}, seed={SEED}, device="cpu",
                   out={str(run)!r}, **{TINY_API!r})
    """))

    # Killed as epoch 3 started: epochs 1-2 are in the checkpoint and the metrics, nothing else.
    checkpoint = RunDir(run).load_checkpoint()
    assert checkpoint["epoch"] == 2
    assert checkpoint["step"] == 2 * STEPS_PER_EPOCH
    assert [r["epoch"] for r in checkpoint["history"]] == [1, 2]
    assert [r["epoch"] for r in RunDir(run).metrics()] == [1, 2]
    assert RunDir(run).summary() is None
    assert leftovers(run) == []

    resumed = start_cli("run", "--resume", str(run), "--json")
    done = finish(uninterrupted)
    assert done.returncode == 0, done.stderr
    done = finish(resumed)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [3, 4]  # only the missing epochs ran

    want_rows = RunDir(reference).metrics()
    assert len(want_rows) == EPOCHS
    assert_same_rows(RunDir(run).metrics(), want_rows)
    assert want_rows[-1]["step"] == EPOCHS * STEPS_PER_EPOCH

    want, got = RunDir(reference).summary(), RunDir(run).summary()
    assert got["epochs"] == EPOCHS
    for key in ("final_val_acc", "best_val_acc", "best_epoch", "params", "seed", "plugins"):
        assert got[key] == want[key], key
    assert got["final_val_loss"] == pytest.approx(want["final_val_loss"], rel=1e-6)
    assert RunDir(run).load_checkpoint()["epoch"] == EPOCHS
    assert leftovers(run) == []


@pytest.mark.slow
def test_a_run_killed_while_writing_its_checkpoint_resumes(tmp_path):
    run = tmp_path / "run"
    finish_killed(start_script(f"""
        import tricks
        from processes import KillWhileSaving
        tricks.run(plugins=["mixup", KillWhileSaving(1)], epochs=2, seed={SEED}, device="cpu", out={str(run)!r},
                   **{TINY_API!r})
    """))
    # The write of epoch 2's checkpoint never reached its rename: epoch 1's is intact beside the temporary file.
    assert RunDir(run).load_checkpoint()["epoch"] == 1
    assert [r["epoch"] for r in RunDir(run).metrics()] == [1]
    stale = leftovers(run)
    assert len(stale) == 1 and stale[0].startswith("checkpoints/.last.pt."), stale

    with one_torch_thread():
        tricks.run(resume=run)
    assert [r["epoch"] for r in RunDir(run).metrics()] == [1, 2]
    assert leftovers(run) == []  # the resumed run removed what the killed one left


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch run."""
    out = tmp_path_factory.mktemp("finished") / "run"
    with one_torch_thread():
        tiny_run(out=out)
    return out


def test_resuming_a_finished_run_is_an_error(finished):
    before = snapshot(finished)
    code, out, err = cli_in_process("run", "--resume", str(finished))
    one_line_error(code, err, str(finished), "--epochs")
    assert snapshot(finished) == before  # nothing rewritten
    with pytest.raises(TricksError, match="finished"):
        tricks.run(resume=finished)


def test_a_finished_run_resumes_for_more_epochs(finished, tmp_path):
    run = shutil.copytree(finished, tmp_path / "run")
    with one_torch_thread():
        summary = tricks.run(resume=run, epochs=2)
    assert summary["epochs"] == 2
    assert [r["epoch"] for r in RunDir(run).metrics()] == [1, 2]


def test_resuming_a_folder_without_a_run_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = cli_in_process("run", "--resume", str(empty))
    one_line_error(code, err, str(empty), "no config.yaml")
    assert list(empty.iterdir()) == []
    with pytest.raises(TricksError, match="no config.yaml"):
        tricks.run(resume=empty)


def test_a_new_run_into_an_existing_run_dir_is_an_error(finished):
    before = snapshot(finished)
    code, out, err = cli_in_process("run", "--plugins", "mixup", "--epochs", "1", *TINY, "--out", str(finished))
    one_line_error(code, err, "already holds a run", "--resume")
    assert snapshot(finished) == before
    with pytest.raises(TricksError, match="already holds a run"):
        tiny_run(out=finished)
