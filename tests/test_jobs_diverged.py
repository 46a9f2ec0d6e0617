"""Jobs and ablations with a run that diverges (its training loss becomes non-finite, through the
real training loop): the run is recorded as ``diverged``, not ``failed``, and never retrained;
its dependants fail naming it; the ablation's tables say "diverged" and leave it out of the
comparison with the baseline. And the job's folder is checked before anything is trained."""

from __future__ import annotations

import csv
import errno
import json
import math
import shutil
from pathlib import Path

import pytest

import tricks
from tricks.ablate import AblationReporter, Configuration, RunResult, ablate, markdown_table, summarize
from tricks.errors import TricksError
from tricks.jobs import Item, Job, JobProgress, check_writable, run_job

from conftest import TINY_API
from processes import cli_in_process, one_line_error, one_torch_thread

FAST = dict(TINY_API, train_limit=128, val_limit=64, epochs=2, device="cpu")


def recipe(**core) -> dict:
    return tricks.resolve(plugins=[], overrides={**FAST, **core}).to_dict()


def trained(folder: Path) -> dict[str, bytes]:
    """Every file of the runs under ``folder`` (their locks aside) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


class BlowsUp(tricks.Plugin):
    """Multiplies the input of every training batch by infinity in the runs whose directory's
    path contains ``part``: their loss is NaN from the first step."""

    name = "blows_up"

    def __init__(self, part: str):
        super().__init__()
        self.part = part

    @tricks.hookimpl
    def on_batch(self, ctx, batch):
        if self.part in ctx.run_dir.as_posix():
            batch["input"].mul_(math.inf)


class Tally(JobProgress):
    def __init__(self):
        self.counts = []

    def start(self, job, total, done, failed, diverged=0):
        self.counts.append((total, done, failed, diverged))


# --- the engine ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_diverged_item_is_recorded_kept_and_its_dependant_fails_naming_it(tmp_path):
    out = tmp_path / "job"
    job = Job(out, "test", [
        Item("ok", recipe()),
        Item("wild", recipe(lr=1e6)),  # diverges on the tiny digits run
        Item("after", recipe(), inputs={"core.init_from": "wild"}),
    ])
    tally = Tally()
    with one_torch_thread():
        results = run_job(job, progress=tally)
    assert {k: r["status"] for k, r in results.items()} == {"ok": "ok", "wild": "diverged", "after": "failed"}
    wild = results["wild"]
    summary = tricks.RunDir(out / "runs" / "wild").summary()
    assert summary["status"] == "diverged" and wild["diverged_at"] == summary["diverged_at"]
    assert wild["message"] == summary["message"] and "the training loss became" in wild["message"]
    assert wild["final_val_acc"] is None and wild["epochs"] == len(tricks.RunDir(out / "runs" / "wild").metrics())
    assert results["after"]["message"] == "it depends on 'wild', which diverged"
    assert not (out / "runs" / "after").exists()
    assert "NaN" not in (out / "results" / "wild.json").read_text()  # strict JSON
    assert not (out / "runs" / "wild" / "error.txt").exists()  # not a failure: no traceback
    assert tally.counts == [(3, 0, 0, 0)]

    # again, even with retry_failed: nothing is trained; the dependant fails again
    before = trained(out / "runs")
    with one_torch_thread():
        again = run_job(job, progress=tally, retry_failed=True)
    assert trained(out / "runs") == before
    assert {k: r["status"] for k, r in again.items()} == {"ok": "ok", "wild": "diverged", "after": "failed"}
    assert tally.counts[-1] == (3, 2, 0, 1)  # 'after' was dropped by retry_failed; 'wild' was kept

    # killed after the runs ended but before their results were written: read, not retrained,
    # and a run whose summary is missing is completed from its checkpoint, not recorded as failed
    (out / "results" / "wild.json").unlink()
    (out / "results" / "ok.json").unlink()
    (out / "runs" / "ok" / "summary.json").unlink()
    metrics = (out / "runs" / "ok" / "metrics.jsonl").read_bytes()
    with one_torch_thread():
        third = run_job(job)
    assert third["wild"] == {**wild, "device": None, "time_s": 0.0}
    assert third["ok"]["status"] == "ok" and third["ok"]["final_val_acc"] == results["ok"]["final_val_acc"]
    assert (out / "runs" / "ok" / "metrics.jsonl").read_bytes() == metrics
    assert tricks.RunDir(out / "runs" / "ok").status() == "finished"


# --- the ablation ----------------------------------------------------------------------------------
class Told(AblationReporter):
    def __init__(self):
        self.diverged, self.ended = [], []

    def run_diverged(self, index, result):
        self.diverged.append((result.slug, result.seed, result.message))

    def run_end(self, index, result):
        self.ended.append((result.slug, result.seed))


@pytest.mark.slow
def test_an_ablation_shows_a_diverged_configuration_as_diverged_and_retrains_nothing(tmp_path):
    out = tmp_path / "abl"
    told = Told()
    with one_torch_thread():
        rows = ablate(["cosine"], overrides=FAST, out=out, reporter=told, extra_plugins=[BlowsUp("only-cosine/")])
    results = {p.stem: json.loads(p.read_text()) for p in (out / "results").glob("*.json")}
    assert {k: r["status"] for k, r in results.items()} == {"baseline-seed0": "ok", "only-cosine-seed0": "diverged"}
    assert told.ended == [("baseline", 0)] and [d[:2] for d in told.diverged] == [("only-cosine", 0)]
    assert rows[1]["status"] == "diverged" and math.isnan(rows[1]["final_acc"]) and math.isnan(rows[1]["delta_final"])

    table = {r["configuration"]: r for r in csv.DictReader((out / "table.csv").open())}
    assert table["+ cosine"]["status"] == "diverged" and table["+ cosine"]["diverged"] == "1"
    assert table["+ cosine"]["final_acc"] == table["+ cosine"]["delta_final"] == ""  # no number, no NaN
    assert table["baseline"]["status"] == "ok" and float(table["baseline"]["final_acc"]) > 0
    per_run = {r["slug"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert per_run["only-cosine"]["status"] == "diverged" and per_run["only-cosine"]["final_val_acc"] == ""
    assert "loss became nan at step 1" in per_run["only-cosine"]["message"] and per_run["baseline"]["status"] == "ok"
    md = (out / "table.md").read_text()
    assert "| + cosine | 0 + 1 diverged | diverged | diverged | – | – | – |" in md
    assert "- + cosine: 1 of 1 seed diverged (seed 0: " in md and "left out of the comparison with the baseline" in md
    assert not [line for line in md.splitlines() if line.startswith("|") and "nan" in line.lower()]
    assert (out / "chart.png").read_bytes()[:4] == b"\x89PNG"

    before = trained(out / "runs")
    with one_torch_thread():
        ablate(["cosine"], overrides=FAST, out=out, retry_failed=True, extra_plugins=[BlowsUp("only-cosine/")])
    assert trained(out / "runs") == before


def test_the_table_leaves_diverged_seeds_out_of_the_figures_and_of_the_comparison():
    configs = [Configuration("baseline", "baseline", []), Configuration("+ mixup", "only-mixup", ["mixup"]),
               Configuration("+ cosine", "only-cosine", ["cosine"])]
    nan = math.nan
    results = [RunResult("baseline", "baseline", 0, 0.80, 0.82, 0.5, 10.0, "x"),
               RunResult("+ mixup", "only-mixup", 0, 0.90, 0.91, 0.4, 12.0, "x"),
               RunResult("+ mixup", "only-mixup", 1, nan, nan, nan, 3.0, "x", "diverged", "loss nan at step 5"),
               RunResult("+ cosine", "only-cosine", 0, 0.70, 0.75, 0.6, 11.0, "x")]
    rows = summarize(configs, results)
    assert [r["status"] for r in rows] == ["ok", "partly diverged", "ok"]
    assert rows[1]["seeds"] == 1 and rows[1]["diverged"] == 1 and rows[1]["final_acc"] == pytest.approx(90.0)
    assert math.isnan(rows[1]["delta_final"]) and rows[2]["delta_final"] == pytest.approx(-10.0)
    assert rows[1]["note"] == ("1 of 2 seeds diverged (seed 1: loss nan at step 5); "
                               "left out of the comparison with the baseline")
    md = markdown_table(rows)
    assert "| + mixup | 1 + 1 diverged | 90.00 ± 0.00 | 91.00 ± 0.00 | – | – | 12 |" in md
    # a baseline that diverged: nothing is compared with it, and each row says why
    base_gone = [RunResult("baseline", "baseline", 0, nan, nan, nan, 1.0, "x", "diverged", "loss inf")] + results[3:]
    rows = summarize(configs, base_gone)
    assert rows[0]["status"] == "diverged" and math.isnan(rows[1]["delta_best"])
    assert rows[1]["note"] == "not compared: its baseline diverged"


# --- the job's folder is checked before any work ----------------------------------------------------
def test_an_out_that_cannot_hold_a_job_is_one_line_before_any_training(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for out, fragment in ((a_file, "is a file, not a folder"), (a_file / "abl", "is a file, so no folder can be made"),
                          (tmp_path / "dangling", "is a broken link")):
        code, _, err = cli_in_process("ablate", "--plugins", "cosine", "--out", str(out), "--device", "cpu")
        one_line_error(code, err, str(out), fragment, "choose another --out")
    assert a_file.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "dangling"]


@pytest.mark.parametrize("code, reason", [(errno.EROFS, "the filesystem is read-only"),
                                          (errno.EACCES, "permission denied"),
                                          (errno.ENOSPC, "no space left on the device")])
def test_a_folder_that_cannot_be_written_is_refused_naming_why(tmp_path, monkeypatch, code, reason):
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(code, "refused")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(TricksError, match=f"--out .*abl/deeper: cannot write in .* \\({reason}\\); choose another --out"):
        check_writable(tmp_path / "abl" / "deeper")
    with pytest.raises(TricksError, match=reason):
        run_job(Job(tmp_path / "job", "test", [Item("a", recipe())]))
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_refused_before_the_job_starts(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1 << 20))
    with pytest.raises(TricksError, match="only 1.0 MiB free on its filesystem, and at least 16 MiB are needed; free some space"):
        ablate(["cosine"], overrides=FAST, out=tmp_path / "abl")
    assert list(tmp_path.iterdir()) == []


def test_a_real_unwritable_folder_is_refused(tmp_path):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user may write anywhere (root)")
        with pytest.raises(TricksError, match="permission denied"):
            check_writable(locked / "abl")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("damage, fragments", [
    (lambda out: (out / "results").write_text(""), ["results is a file", "move the file away"]),
    (lambda out: (out / "runs").write_text(""), ["runs is a file", "move the file away"]),
    (lambda out: (out / "results").mkdir() or (out / "results" / "a.json").write_text("{torn"),
     ["a.json is not a job result (JSONDecodeError", "remove it and run the job again"]),
    (lambda out: (out / "results").mkdir() or (out / "results" / "a.json").write_text('{"status": "fine"}'),
     ["a.json is not a job result (no status ok, diverged, failed)"]),
    (lambda out: (out / "job.json").write_text("[]"), ["job.json is not a job plan", "choose another --out"]),
    (lambda out: (out / "job.json").write_text('{"kind": "test", "meta": [], "items": []}'), ["is not a job plan"]),
    (lambda out: (out / "job.json").write_text('{"kind": "test", "meta": {}, "items": [1]}'), ["is not a job plan"]),
    (lambda out: (out / "job.json").write_bytes(b"\xff\xfe"), ["job.json is not a job plan (not JSON)"]),
])
def test_a_damaged_job_folder_is_one_line_before_any_training(tmp_path, damage, fragments):
    out = tmp_path / "job"
    out.mkdir()
    damage(out)
    with pytest.raises(TricksError) as caught:
        run_job(Job(out, "test", [Item("a", recipe())]))
    message = str(caught.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    assert not (out / "runs" / "a").exists()
