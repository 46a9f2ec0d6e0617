"""Sampling jobs end to end on the bundled digits: results per network, continuing a job, a job
killed mid-network, a failing network, several networks at once, Ray, and the analysis of a
real (small) sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tricks
from conftest import run_cli
from processes import cli_in_process, one_line_error, one_torch_thread, snapshot
from tricks_regnet.complexity import complexity
from tricks_regnet.config import AnyNetConfig
from tricks_regnet.sweep import load_job, sample_job

# Two stages of one or two X blocks, 8 to 24 channels: eight networks, each trains in about a second.
TINY_SPACE = {"name": "tiny", "kind": "anynet", "stages": 2,
              "params": {"depth": {"values": [1, 2]}, "width": {"low": 8, "high": 24, "step": 8},
                         "bottleneck": {"values": [1]}, "group_width": {"values": [8]}}}
# the digits at their own 8x8 (a sampling job's default on them is 32x32), unaugmented, and enough steps
# that the tiny networks learn (one left at chance would be recorded as diverged): small and fast
RECIPE = dict(dataset="digits", train_limit=1024, val_limit=128, batch_size=32, epochs=2, device="cpu", lr=0.4,
              image_size=8, augment=False)
CLI_RECIPE = ["--dataset", "digits", "--train-limit", "1024", "--val-limit", "128", "--batch-size", "32",
              "--epochs", "2", "--device", "cpu", "--lr", "0.4", "--image-size", "8", "--no-augment"]


def results(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))}


@pytest.fixture
def space_file(tmp_path):
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_SPACE))
    return path


@pytest.mark.slow
def test_cli_job_records_each_network_continues_and_is_analysed(tmp_path, space_file):
    out = tmp_path / "sweep"
    done = run_cli("sample", "--space", str(space_file), "--n", "3", "--flops", ":1M", "--out", str(out),
                   "--plugins", "cosine", *CLI_RECIPE)
    assert done.returncode == 0, done.stderr
    assert "3 of 3 networks trained, 0 diverged, 0 failed" in done.stdout
    plan = json.loads((out / "sweep.json").read_text())
    assert plan["space"] == "tiny" and plan["n"] == 3 and plan["stem"] == "cifar" and plan["resolution"] == 8
    # no --config: the default recipe for sampling, with --plugins added (cosine is in it already)
    assert plan["recipe"]["plugins"] == ["linear_scaling", "warmup", "cosine", "zero_gamma", "regnet"]
    assert plan["recipe"]["core"]["weight_decay"] == 5e-5 and plan["recipe"]["warmup"]["epochs"] == 0.5
    rows = results(out)
    assert sorted(rows) == ["0000", "0001", "0002"]
    for ident, r in rows.items():
        assert r["status"] == "ok" and r["space"] == "tiny" and r["epochs"] == 2
        assert 0 <= r["best_error"] <= r["error"] <= 100 and r["time_s"] > 0
        cfg = AnyNetConfig.from_dict(r["config"])
        assert complexity(cfg, 8, "cifar", 10).as_dict() == r["complexity"] and r["complexity"]["flops"] <= 1e6
        metrics = [json.loads(x) for x in (out / "runs" / ident / "metrics.jsonl").read_text().splitlines()]
        assert r["error"] == pytest.approx(100 * (1 - metrics[-1]["val_acc"]), abs=1e-3)
        run_cfg = (out / "runs" / ident / "config.yaml").read_text()
        assert "cosine" in run_cfg and "model: anynet" in run_cfg
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 3 and summary["min_error"] == min(r["error"] for r in rows.values())

    # the same command again: nothing is retrained, nothing rewritten
    before = snapshot(out / "results")
    again = run_cli("sample", "--space", str(space_file), "--n", "3", "--flops", ":1M", "--out", str(out),
                    "--plugins", "cosine", *CLI_RECIPE)
    assert again.returncode == 0, again.stderr
    assert "3 of 3 networks already have a result" in again.stdout
    assert snapshot(out / "results") == before

    # another recipe in the same folder is refused
    code, _, err = cli_in_process("sample", "--space", str(space_file), "--n", "3", "--flops", ":1M", "--out",
                                  str(out), "--plugins", "label_smoothing", *CLI_RECIPE)
    one_line_error(code, err, "another training recipe", "plugins")

    report = run_cli("analyze", str(out))
    assert report.returncode == 0, report.stderr
    folder = out / "analysis"
    assert (folder / "report.md").exists()
    for png in folder.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "edf.png").exists()


class FailOn(tricks.Plugin):
    """Raise when the network ``ident`` starts training."""

    name = "fail_on"

    def __init__(self, ident):
        super().__init__()
        self.ident = ident

    @tricks.hookimpl
    def on_fit_start(self, ctx):
        if ctx.run_dir.name == self.ident:
            raise RuntimeError("this network cannot be trained")


@pytest.mark.slow
def test_a_failing_network_is_recorded_and_the_job_goes_on(tmp_path):
    out = tmp_path / "sweep"
    with one_torch_thread():
        summary = sample_job(out, TINY_SPACE, 3, overrides=RECIPE, extra_plugins=[FailOn("0001")])
    rows = results(out)
    assert [rows[i]["status"] for i in sorted(rows)] == ["ok", "failed", "ok"]
    assert "this network cannot be trained" in rows["0001"]["message"]
    assert rows["0001"]["error"] is None
    assert "RuntimeError" in (out / "runs" / "0001" / "error.txt").read_text()
    assert summary["failed"] == 1 and summary["ok"] == 2
    # continuing keeps the failure; --retry-failed trains it again
    with one_torch_thread():
        sample_job(out, TINY_SPACE, 3, overrides=RECIPE)
        assert results(out)["0001"]["status"] == "failed"
        sample_job(out, TINY_SPACE, 3, overrides=RECIPE, retry_failed=True)
    assert results(out)["0001"]["status"] == "ok"


@pytest.mark.slow
def test_several_networks_at_once_on_one_device(tmp_path):
    out = tmp_path / "pool"
    summary = sample_job(out, TINY_SPACE, 4, overrides=RECIPE, per_gpu=2)
    rows = results(out)
    assert sorted(rows) == ["0000", "0001", "0002", "0003"] and summary["ok"] == 4
    assert {r["device"] for r in rows.values()} == {"cpu"}
    job = load_job(out)
    assert [s.config.to_dict() for s in job.samples] == [rows[i]["config"] for i in sorted(rows)]


@pytest.mark.slow
def test_ray_backend_with_a_local_instance(tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    summary = sample_job(out, TINY_SPACE, 2, overrides=RECIPE, backend="ray")
    rows = results(out)
    assert sorted(rows) == ["0000", "0001"] and summary["ok"] == 2
    assert all(r["status"] == "ok" and r["error"] is not None for r in rows.values())


@pytest.mark.parametrize("args,fragments", [
    (["--space", "anynetx_f"], ["unknown design space 'anynetx_f'", "did you mean"]),
    (["--space", "anynetx_a", "--flops", "400M"], ["--flops", "LOW:HIGH"]),
    (["--space", "anynetx_a", "--flops", "1:2"], ["only 0 of 2 distinct networks", "widen the window"]),
    (["--space", "anynetx_a", "--gpus", "0"], ["--gpus needs CUDA"]),
    (["--space", "anynetx_a", "--backend", "slurm"], ["--backend", "local, ray"]),
    (["--space", "anynetx_a", "--per-gpu", "0"], ["--per-gpu 0"]),
    (["--space", "anynetx_a", "--set", "regnet.arch={depth: 13, w0: 24, wa: 36.44, wm: 2.49, group_width: 8}"],
     ["sets each network's regnet.arch"]),
])
def test_bad_sampling_requests_are_one_line_errors(tmp_path, args, fragments):
    code, _, err = cli_in_process("sample", "--n", "2", "--out", str(tmp_path / "s"), "--dataset", "digits",
                                  "--device", "cpu", *args)
    one_line_error(code, err, *fragments)


def test_analyze_needs_a_sweep(tmp_path):
    code, _, err = cli_in_process("analyze", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_a_job_on_the_embedded_digits_samples_and_trains_at_32x32_and_a_config_replaces_the_recipe(tmp_path):
    from tricks_regnet.sweep import plan

    job = plan(tmp_path / "a", "regnetx", 2, window=None, plugins="label_smoothing", write=False,
               overrides={"device": "cpu"})
    assert job.resolution == 32 and job.recipe["core"]["image_size"] == 32 and job.stem == "cifar"
    assert job.recipe["core"]["augment"] is False  # unless asked for
    asked = plan(tmp_path / "c", "regnetx", 2, write=False, overrides={"device": "cpu", "augment": True})
    assert asked.recipe["core"]["augment"] is True
    assert job.recipe["plugins"] == ["linear_scaling", "warmup", "cosine", "zero_gamma", "label_smoothing", "regnet"]
    own = tmp_path / "own.yaml"
    own.write_text("plugins: [cosine]\ncore: {lr: 0.05}\n")
    job = plan(tmp_path / "b", "regnetx", 2, config=own, write=False, overrides={"device": "cpu", "image_size": 8})
    assert job.resolution == 8 and job.recipe["plugins"] == ["cosine", "regnet"] and job.recipe["core"]["lr"] == 0.05


def test_dry_run_prints_the_networks_and_writes_nothing(tmp_path, space_file):
    out = tmp_path / "dry"
    code, stdout, err = cli_in_process("sample", "--space", str(space_file), "--n", "4", "--flops", ":1M", "--out",
                                       str(out), "--dry-run", "--dataset", "digits", "--device", "cpu", "--image-size", "8")
    assert code == 0, err
    assert "tiny: 4 networks at 8x8 (cifar stem, 10 classes)" in stdout
    assert all(f"000{i}" in stdout for i in range(4)) and not out.exists()


def test_the_cli_and_sample_job_plan_the_same_job(tmp_path, space_file, monkeypatch):
    """``sample_job`` from Python trains exactly what ``tricks sample`` trains, the device's
    defaults included (bf16 and channels_last where CUDA is seen)."""
    import torch

    from tricks_regnet import sweep

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    planned = []
    monkeypatch.setattr(sweep, "run", lambda job, *args, **kwargs: planned.append(job) or
                        {"ok": 0, "n": job.n, "failed": 0, "min_error": None})
    flags = [f for f in CLI_RECIPE if f not in ("--device", "cpu")]
    code, _, err = cli_in_process("sample", "--space", str(space_file), "--n", "3", "--flops", ":1M",
                                  "--out", str(tmp_path / "cli"), "--plugins", "cosine", *flags)
    assert code == 0, err
    recipe = {k: v for k, v in RECIPE.items() if k != "device"}
    sample_job(tmp_path / "python", str(space_file), 3, window=sweep.Window.parse(":1M", None, None),
               plugins="cosine", overrides=recipe)
    cli, python = planned
    assert cli.recipe == python.recipe
    assert (cli.recipe["core"]["precision"], cli.recipe["core"]["channels_last"]) == ("bf16", True)
    assert [s.to_dict() for s in cli.samples] == [s.to_dict() for s in python.samples]
