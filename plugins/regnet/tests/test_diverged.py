"""Networks that diverge (their training loss becomes non-finite): a sampling job records them as
diverged and never retrains them, and ``tricks analyze`` leaves them out of the EDFs and every
statistic while saying, per space, how many of its networks diverged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import tricks
from processes import cli_in_process, one_torch_thread
from tricks_regnet import figures
from tricks_regnet.analysis import edf, load_sweep, report
from tricks_regnet.sweep import sample_job

TINY_SPACE = {"name": "tiny", "kind": "anynet", "stages": 2,
              "params": {"depth": {"values": [1, 2]}, "width": {"low": 8, "high": 24, "step": 8},
                         "bottleneck": {"values": [1]}, "group_width": {"values": [8]}}}
# the digits at their own 8x8 (a sampling job's default on them is 32x32), unaugmented, and enough steps
# that the tiny networks learn (one left at chance would be recorded as diverged): small and fast
RECIPE = dict(dataset="digits", train_limit=1024, val_limit=128, batch_size=32, epochs=2, device="cpu", lr=0.4,
              image_size=8, augment=False)


def _sibling(name: str):
    """A test module beside this one (the tests are imported by path, not as a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"regnet_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


write_sweep = _sibling("test_analysis").write_sweep  # synthetic sweep folders, as the analysis tests make them


def diverge(sweep: Path, ids: list[str], old_style: list[str] = ()) -> None:
    """Record the networks ``ids`` of a sweep folder as diverged, as a sampling job does, and
    ``old_style`` as an older job did: "ok", with the error of a network that guesses, and a
    validation loss that is no number."""
    for ident in ids:
        path = sweep / "results" / f"{ident}.json"
        result = json.loads(path.read_text())
        result.update(status="diverged", error=None, best_error=None, diverged_at={"epoch": 1, "step": 3},
                      message="the training loss became nan at step 3 (epoch 1)")
        path.write_text(json.dumps(result))
    for ident in old_style:
        path = sweep / "results" / f"{ident}.json"
        result = json.loads(path.read_text())
        result.update(status="ok", error=90.0, best_error=90.0, final_val_loss=None)
        path.write_text(json.dumps(result))


def test_analysis_leaves_diverged_networks_out_and_counts_them(tmp_path, monkeypatch):
    a = write_sweep(tmp_path, "a", "anynetx_a", n=12, failed=1, seed=3)
    e = write_sweep(tmp_path, "e", "anynetx_e", n=10, seed=4, shift=-3.0)
    diverge(a, ["0002", "0005"], old_style=["0007"])
    sweep = load_sweep(a)
    assert [r["id"] for r in sweep.diverged] == ["0002", "0005", "0007"]
    assert [r["id"] for r in sweep.failed] == ["0012"] and len(sweep.ok) == 9
    assert sweep.diverged_text == "3 of 13 diverged"
    kept = [json.loads((a / "results" / f"{i:04d}.json").read_text()) for i in range(12)]
    errors = [r["error"] for r in kept if r["status"] == "ok" and r.get("final_val_loss", 0.0) is not None]
    assert np.array_equal(np.sort(sweep.errors), np.sort(errors))
    x, y = edf(sweep.errors)
    assert y[-1] == 1.0 and 90.0 not in x  # the old-style diverged network is not in the curve

    legends = {}

    def keep(fig, path):  # the figures' legends, as drawn
        legends[path.name] = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        legends[path.name] += [t.get_text() for legend in fig.legends for t in legend.get_texts()]

    monkeypatch.setattr(figures, "_save", keep)
    path = report([a, e], tmp_path / "out", top=2)
    assert [t for t in legends["edf.png"] if t.startswith("anynetx_a")] == [
        f"anynetx_a (n=9, min {sweep.errors.min():.2f}, mean {sweep.errors.mean():.2f}, 3 of 13 diverged)"]
    assert not [t for t in legends["edf.png"] if "diverged" in t and t.startswith("anynetx_e")]
    assert "anynetx_a (3 of 13 diverged)" in legends["error_vs_params.png"]
    assert any(t.endswith(", 3 of 13 diverged)") for t in legends["edf_normalized.png"])

    text = path.read_text()
    assert "| a | anynetx_a |" not in text  # labelled by space
    assert ("Diverged networks: anynetx_a 3 of 13 (3 non-finite loss, 0 at chance), anynetx_e 0 of 10; they are "
            "listed below and left out of the EDFs and every statistic.") in text
    assert "Warning: 23% of anynetx_a's networks diverged" in text and "of anynetx_e's" not in text
    assert "Models that diverged are left out of every curve: anynetx_a 3 of 13 diverged." in text
    assert "## Diverged models (3)" in text
    assert "- anynetx_a 0002 (epoch 1, step 3): the training loss became nan at step 3 (epoch 1)" in text
    assert "- anynetx_a 0007: its training loss became non-finite" in text
    assert "## Failed models (1)" in text
    raw = (tmp_path / "out" / "summary.json").read_text()
    assert "NaN" not in raw and "Infinity" not in raw
    summary = json.loads(raw)
    assert [(s["n_ok"], s["n_diverged"], s["n_failed"]) for s in summary["sweeps"]] == [(9, 3, 1), (10, 0, 0)]
    assert [d["id"] for d in summary["diverged"]] == ["0002", "0005", "0007"]
    assert summary["sweeps"][0]["median"] == pytest.approx(float(np.median(errors)))


def test_a_sweep_where_every_network_diverged_is_one_line(tmp_path):
    dead = write_sweep(tmp_path, "dead", n=3)
    diverge(dead, ["0000", "0001", "0002"])
    code, _, err = cli_in_process("analyze", str(dead))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "none of its 3 models finished with an error value (all diverged; first: 0000" in err
    assert not (dead / "analysis").exists()


class BlowsUp(tricks.Plugin):
    """The network ``ident``'s loss becomes NaN at its first step (its input times infinity)."""

    name = "blows_up"

    def __init__(self, ident: str):
        super().__init__()
        self.ident = ident

    @tricks.hookimpl
    def on_batch(self, ctx, batch):
        if ctx.run_dir.name == self.ident:
            batch["input"].mul_(math.inf)


@pytest.mark.slow
def test_a_sampling_job_records_a_diverged_network_and_analyze_counts_it(tmp_path):
    out = tmp_path / "sweep"
    with one_torch_thread():
        summary = sample_job(out, TINY_SPACE, 3, overrides=RECIPE, extra_plugins=[BlowsUp("0001")])
    rows = {p.stem: json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))}
    assert [rows[i]["status"] for i in sorted(rows)] == ["ok", "diverged", "ok"]
    assert rows["0001"]["error"] is None and rows["0001"]["diverged_at"]["step"] == 1
    assert "NaN" not in (out / "results" / "0001.json").read_text()
    assert (summary["ok"], summary["diverged"], summary["failed"], summary["diverged_ids"]) == (2, 1, 0, ["0001"])
    assert summary["median_error"] == pytest.approx((rows["0000"]["error"] + rows["0002"]["error"]) / 2)
    assert json.loads((out / "summary.json").read_text()) == summary

    runs = {str(p): p.read_bytes() for p in sorted((out / "runs").rglob("*")) if p.is_file() and p.name != ".lock"}
    with one_torch_thread():
        again = sample_job(out, TINY_SPACE, 3, overrides=RECIPE, retry_failed=True)
    assert again == summary  # nothing trained again
    assert {str(p): p.read_bytes() for p in sorted((out / "runs").rglob("*")) if p.is_file() and p.name != ".lock"} == runs

    text = report([out], tmp_path / "analysis").read_text()
    assert "Diverged networks: tiny 1 of 3 (1 non-finite loss, 0 at chance)" in text and "| tiny | 2 | 1 of 3 | 0 |" in text


def test_a_network_left_at_chance_is_diverged_unless_kept(tmp_path):
    from tricks_regnet.sweep import CHANCE_MARGIN, chance_error, error_of

    # as a sampling job records it: best error within the margin of chance (10 classes: 90%)
    assert chance_error(10) == pytest.approx(90.0) and CHANCE_MARGIN == 2.0
    stuck = error_of({"status": "ok", "final_val_acc": 0.10, "best_val_acc": 0.115, "epochs": 3}, num_classes=10)
    assert stuck["status"] == "diverged" and stuck["reason"] == "chance" and stuck["diverged_at"]["epoch"] == 3
    assert stuck["error"] == pytest.approx(90.0) and "stayed at chance" in stuck["message"]
    learnt = error_of({"status": "ok", "final_val_acc": 0.15, "best_val_acc": 0.15, "epochs": 3}, num_classes=10)
    assert learnt["status"] == "ok"  # 85%: more than 2 points below chance
    # as an older job's results are read: an "ok" network whose best error is at chance
    a = write_sweep(tmp_path, "a", "anynetx_a", n=12, seed=3)
    e = write_sweep(tmp_path, "e", "anynetx_e", n=10, seed=4, shift=-3.0)
    path = a / "results" / "0004.json"
    result = json.loads(path.read_text())
    result.update(status="ok", error=89.0, best_error=88.5)
    path.write_text(json.dumps(result))
    sweep = load_sweep(a)
    assert [r["id"] for r in sweep.diverged] == ["0004"] and len(sweep.ok) == 11 and sweep.at_chance == 1
    assert 89.0 not in sweep.errors
    kept = load_sweep(a, keep_diverged=True)
    assert len(kept.ok) == 12 and 89.0 in kept.errors and kept.n_diverged == 1
    text = report([a, e], tmp_path / "out", top=2).read_text()
    assert "Diverged networks: anynetx_a 1 of 12 (0 non-finite loss, 1 at chance), anynetx_e 0 of 10" in text
    assert "Warning: 8% of anynetx_a's networks diverged" in text
    text = report([a, e], tmp_path / "kept", top=2, keep_diverged=True).read_text()
    assert "those at chance are kept in the EDFs and statistics (--keep-diverged)" in text
    code, out, err = cli_in_process("analyze", str(a), str(e), "--keep-diverged", "--out", str(tmp_path / "cli"))
    assert code == 0, err
    assert "(--keep-diverged)" in (tmp_path / "cli" / "report.md").read_text()


class HugeLR(tricks.Plugin):
    """The network ``ident`` trains with its learning rate multiplied by 1e4 (to 1000)."""

    name = "huge_lr"

    def __init__(self, ident: str):
        super().__init__()
        self.ident = ident

    @tricks.hookimpl(wrapper=True)
    def configure_optimizer(self, ctx, model):
        optimizer = yield
        if ctx.run_dir.name == self.ident:
            for group in optimizer.param_groups:
                group["lr"] *= 1e4
        return optimizer


@pytest.mark.slow
def test_a_network_trained_at_a_huge_learning_rate_is_diverged_and_out_of_the_edf(tmp_path):
    out = tmp_path / "sweep"
    with one_torch_thread():
        summary = sample_job(out, TINY_SPACE, 3, overrides=RECIPE, extra_plugins=[HugeLR("0002")])
    rows = {p.stem: json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))}
    assert [rows[i]["status"] for i in sorted(rows)] == ["ok", "ok", "diverged"]
    assert rows["0002"]["reason"] in ("non-finite", "chance") and rows["0002"]["diverged_at"]["epoch"] >= 1
    assert (summary["ok"], summary["diverged"], summary["diverged_ids"]) == (2, 1, ["0002"])
    sweep = load_sweep(out)
    assert sorted(sweep.errors) == sorted(rows[i]["error"] for i in ("0000", "0001"))
    text = report([out], tmp_path / "analysis").read_text()
    assert "Diverged networks: tiny 1 of 3" in text and "Warning: 33% of tiny's networks diverged" in text
