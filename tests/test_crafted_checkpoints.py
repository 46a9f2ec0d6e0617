"""Checkpoints that cannot run code: a checkpoint file whose pickle would run code when loaded
(a payload built with ``__reduce__`` that makes a marker folder) is refused wherever tricks reads
a checkpoint: ``tricks run --resume``, an interrupted ``tricks ablate`` run again, a kd teacher
given as a run directory, a file or timm weights, ``core.init_from`` and ``RunDir.build_model``.
Each is one line naming the file (exit status 2 on the command line, a TricksError from the
API), the marker is never made, and the files of the run directory are left as they were.
Files that are not checkpoints at all (empty, random bytes, truncated, ...) are one line too."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

import tricks
from tricks.testing import tiny_run

from processes import cli_in_process, one_line_error, snapshot

SMALL = {"train_limit": 128, "val_limit": 64}  # 4 steps of 32
SMALL_CLI = ["--model", "resnet8", "--batch-size", "32", "--set", "core.train_limit=128", "--set", "core.val_limit=64",
             "--epochs", "1", "--device", "cpu"]
LAST = tricks.RunDir.CHECKPOINT


class RunsCode:
    """Pickles into a call of ``os.mkdir(marker)``: a file holding it makes ``marker`` when it is
    unpickled with ``weights_only=False``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def craft(path: Path, marker: Path, base: dict) -> Path:
    """Write at ``path`` the checkpoint ``base`` with a payload that makes ``marker`` when loaded unsafely."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**base, "plugins": {**(base.get("plugins") or {}), "crafted": RunsCode(marker)}}, path)
    return path


def unchanged(before: dict[str, bytes], folder: Path, may_appear: tuple[str, ...] = (".lock",)) -> None:
    """Every file of ``before`` is still in ``folder`` with the same bytes; the only files that
    may have appeared are named ``may_appear`` (a run directory's lock)."""
    after = snapshot(folder)
    assert {name: after.get(name) for name in before} == before
    new = set(after) - set(before)
    assert all(Path(name).name in may_appear for name in new), sorted(new)


def refused(code: int, out: str, err: str, path: Path, marker: Path) -> str:
    """The CLI's answer to a crafted file: the payload not run, exit 2, one line naming the file
    and saying it holds objects, no traceback."""
    assert not marker.exists(), "loading the checkpoint ran the code in it"
    assert "Traceback" not in out + err
    line = one_line_error(code, err, str(path))
    assert "objects" in line, line
    return line


class StopAtSecondEpoch(tricks.Plugin):
    """Stops the run as its second epoch starts: its checkpoint holds the first."""

    @tricks.hookimpl
    def on_epoch_start(self, ctx, epoch):
        if epoch == 1:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A finished one-epoch run and a two-epoch run interrupted after its first epoch."""
    root = tmp_path_factory.mktemp("crafted")
    finished = tiny_run(out=root / "finished", **SMALL).path
    with pytest.raises(KeyboardInterrupt):
        tiny_run(plugins=[StopAtSecondEpoch()], out=root / "interrupted", epochs=2, **SMALL)
    return {"finished": finished, "interrupted": root / "interrupted"}


def copy_run(runs: dict[str, Path], which: str, to: Path) -> Path:
    shutil.copytree(runs[which], to)
    return to


def test_the_crafted_payload_runs_when_unpickled_unsafely(runs, tmp_path):
    # What every test below guards against: the payload is live.
    base = tricks.RunDir(runs["finished"]).load_checkpoint()
    path = craft(tmp_path / "crafted.pt", tmp_path / "ran", base)
    torch.load(path, map_location="cpu", weights_only=False)
    assert (tmp_path / "ran").is_dir()


def test_the_interrupted_run_is_one_to_resume(runs):
    run = tricks.RunDir(runs["interrupted"])
    assert run.status() == "interrupted" and run.load_checkpoint()["epoch"] == 1


# --- (a) tricks run --resume --------------------------------------------------------------------


def test_resume_refuses_a_crafted_last_checkpoint(runs, tmp_path):
    run = copy_run(runs, "interrupted", tmp_path / "run")
    path = craft(run / LAST, tmp_path / "ran", tricks.RunDir(run).load_checkpoint())
    before = snapshot(run)
    code, out, err = cli_in_process("run", "--resume", str(run))
    refused(code, out, err, path, tmp_path / "ran")
    unchanged(before, run)


# --- (b) an interrupted ablation run again ----------------------------------------------------------


def test_an_ablation_refuses_a_crafted_checkpoint_in_a_run_it_resumes(tmp_path):
    out = tmp_path / "abl"
    args = ["ablate", "--plugins", "cosine", "--out", str(out), *SMALL_CLI]
    code, _, err = cli_in_process(*args)
    assert code == 0, err
    results = {r["slug"]: r for r in csv.DictReader((out / "results.csv").open())}
    run = Path(results["only-cosine"]["run_dir"])
    # As if killed during that run: no summary, no result, and a crafted checkpoint.
    (run / tricks.RunDir.SUMMARY).unlink()
    result = [p for p in (out / "results").glob("*.json") if "cosine" in p.name]
    assert len(result) == 1
    result[0].unlink()
    path = craft(run / LAST, tmp_path / "ran", torch.load(run / LAST, weights_only=True))
    before = snapshot(out / "runs")
    code, stdout, err = cli_in_process(*args)
    assert not (tmp_path / "ran").exists(), "loading the checkpoint ran the code in it"
    unchanged(before, out / "runs", (".lock", "error.txt"))  # a failed job item keeps its traceback
    recorded = json.loads(result[0].read_text())
    assert recorded["status"] == "failed" and str(path) in recorded["message"] and "objects" in recorded["message"]
    assert "Traceback" not in stdout + err
    # The user is told, and a script sees it in the exit status.
    refused(code, stdout, err, path, tmp_path / "ran")


# --- (c, d, e) a kd teacher ----------------------------------------------------------------------


def test_kd_refuses_a_crafted_teacher_run_directory(runs, tmp_path):
    teacher = copy_run(runs, "finished", tmp_path / "teacher")
    path = craft(teacher / LAST, tmp_path / "ran", tricks.RunDir(teacher).load_checkpoint())
    before = snapshot(teacher)
    code, out, err = cli_in_process("run", "--plugins", "kd", "--set", f"kd.teacher={teacher}",
                                    "--out", str(tmp_path / "student"), *SMALL_CLI)
    refused(code, out, err, path, tmp_path / "ran")
    unchanged(before, teacher)
    assert not tricks.RunDir(tmp_path / "student").has_run()  # --out is left free for the next try


def test_kd_refuses_a_crafted_teacher_checkpoint_file(runs, tmp_path):
    path = craft(tmp_path / "teacher.pt", tmp_path / "ran", tricks.RunDir(runs["finished"]).load_checkpoint())
    before = snapshot(tmp_path)
    code, out, err = cli_in_process("run", "--plugins", "kd", "--set", f"kd.teacher={path}",
                                    "--out", str(tmp_path / "student"), *SMALL_CLI)
    refused(code, out, err, path, tmp_path / "ran")
    assert snapshot(tmp_path)["teacher.pt"] == before["teacher.pt"]
    assert not tricks.RunDir(tmp_path / "student").has_run()  # --out is left free for the next try


def test_kd_refuses_crafted_timm_teacher_weights(tmp_path):
    import timm

    state = timm.create_model("resnet18", num_classes=10, in_chans=1).state_dict()
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": state, "epoch": 3, "args": RunsCode(tmp_path / "ran")}, path)
    before = path.read_bytes()
    code, out, err = cli_in_process("run", "--plugins", "kd", "--set", "kd.teacher=timm:resnet18",
                                    "--set", f"kd.teacher_weights={path}", "--out", str(tmp_path / "student"), *SMALL_CLI)
    refused(code, out, err, path, tmp_path / "ran")
    assert path.read_bytes() == before
    assert not tricks.RunDir(tmp_path / "student").has_run()  # --out is left free for the next try


def test_kd_distils_from_a_finished_run_of_the_new_kind(runs, tmp_path):
    # The control of the three above: the same teacher, untouched, teaches.
    before = snapshot(runs["finished"])
    code, _, err = cli_in_process("run", "--plugins", "kd", "--set", f"kd.teacher={runs['finished']}",
                                  "--out", str(tmp_path / "student"), *SMALL_CLI)
    assert code == 0, err
    assert tricks.RunDir(tmp_path / "student").status() == "finished"
    unchanged(before, runs["finished"])


# --- (f) core.init_from, (g) RunDir.build_model --------------------------------------------------


def test_init_from_refuses_a_crafted_checkpoint(runs, tmp_path):
    source = copy_run(runs, "finished", tmp_path / "source")
    path = craft(source / LAST, tmp_path / "ran", tricks.RunDir(source).load_checkpoint())
    before = snapshot(source)
    code, out, err = cli_in_process("run", "--set", f"core.init_from={source}", "--out", str(tmp_path / "tuned"), *SMALL_CLI)
    refused(code, out, err, path, tmp_path / "ran")
    unchanged(before, source)
    assert not tricks.RunDir(tmp_path / "tuned").has_run()


def test_build_model_refuses_a_crafted_checkpoint(runs, tmp_path):
    run = copy_run(runs, "finished", tmp_path / "run")
    reference = tricks.RunDir(run).build_model()  # the checkpoint as the run wrote it
    assert isinstance(reference, torch.nn.Module)
    path = craft(run / LAST, tmp_path / "ran", tricks.RunDir(run).load_checkpoint())
    before = snapshot(run)
    with pytest.raises(tricks.TricksError) as caught:
        tricks.RunDir(run).build_model()
    message = str(caught.value)
    assert str(path) in message and "objects" in message and "\n" not in message
    assert not (tmp_path / "ran").exists()
    unchanged(before, run)


# --- files that are not checkpoints ----------------------------------------------------------------


def _zip_not_torch() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("last.txt", "epoch 1")
    return buffer.getvalue()


# name -> what replaces checkpoints/last.pt, built from the real checkpoint (its bytes, its dict):
# bytes are written as they are, anything else with torch.save.
NOT_CHECKPOINTS = {
    "empty": lambda raw, ck: b"",
    "random bytes": lambda raw, ck: bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                        dtype=torch.uint8).tolist()),
    "truncated": lambda raw, ck: raw[: len(raw) // 2],
    "text": lambda raw, ck: b"epoch: 1\n",
    "a zip that is not a torch file": lambda raw, ck: _zip_not_torch(),
    "a gzip of the checkpoint": lambda raw, ck: gzip.compress(raw),
    "a list": lambda raw, ck: [ck["model"]],
    "a state dict alone": lambda raw, ck: ck["model"],
    "model not a mapping": lambda raw, ck: {**ck, "model": torch.zeros(3)},
    "config not a mapping": lambda raw, ck: {**ck, "config": "resnet8"},
    "numpy arrays": lambda raw, ck: {**ck, "model": {k: v.numpy() for k, v in ck["model"].items()}},
    "a wrong shape": lambda raw, ck: {**ck, "model": {**ck["model"], "fc.weight": torch.zeros(10, 3)}},
    "structure entries not mappings": lambda raw, ck: {**ck, "structure": [["prune", 1]]},
    "a structure change by no installed plugin": lambda raw, ck: {
        **ck, "structure": [{"plugin": "no_such_pruner", "epoch": 0, "change": {}, "settings": {}}]},
}
# Not pickles at all: a message about pickled objects would send the user the wrong way.
NOT_PICKLES = {"empty", "random bytes", "truncated", "text", "a zip that is not a torch file", "a gzip of the checkpoint"}
# The file itself is sound; what it asks for is not here: the message names that, not the file.
SOUND_FILES = {"a structure change by no installed plugin"}


@pytest.mark.parametrize("kind", list(NOT_CHECKPOINTS))
def test_a_last_checkpoint_that_is_not_a_checkpoint_is_one_line_on_resume(runs, tmp_path, kind):
    run = copy_run(runs, "interrupted", tmp_path / "run")
    raw = (run / LAST).read_bytes()
    content = NOT_CHECKPOINTS[kind](raw, tricks.RunDir(run).load_checkpoint())
    if isinstance(content, bytes):
        (run / LAST).write_bytes(content)
    else:
        torch.save(content, run / LAST)
    before = snapshot(run)
    code, out, err = cli_in_process("run", "--resume", str(run))
    assert "Traceback" not in out + err
    line = one_line_error(code, err, *(() if kind in SOUND_FILES else (str(run / LAST),)))
    if kind in NOT_PICKLES:
        assert "pickled objects" not in line, line
    unchanged(before, run)
