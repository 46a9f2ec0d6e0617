"""``tricks ablate``: the configurations it plans, the table it writes, its errors before any
training, and an ablation killed in the middle of a run resumed without repeating finished runs."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from tricks.ablate import Configuration, RunResult, expand, parse_grid, plan, split_sets, summarize
from tricks.errors import TricksError

from conftest import TINY
from processes import cli_in_process, one_line_error, snapshot

TRICKS = ["warmup", "zero_gamma", "cosine"]
# 2 epochs of 4 steps: warmup needs to be shorter than the run
SMALL = [*TINY, "--set", "core.train_limit=128", "--set", "core.val_limit=64", "--epochs", "2",
         "--set", "warmup.epochs=0.5", "--device", "cpu"]


def test_alone_trains_the_baseline_and_each_trick_on_its_own():
    configs = plan(TRICKS, "alone")
    assert [c.plugins for c in configs] == [[], ["warmup"], ["zero_gamma"], ["cosine"]]
    assert [c.label for c in configs] == ["baseline", "+ warmup", "+ zero_gamma", "+ cosine"]


def test_all_adds_every_trick_at_once_to_the_tricks_alone():
    configs = plan(TRICKS, "alone", all_together=True)
    assert [c.plugins for c in configs][-2:] == [["cosine"], TRICKS]
    assert configs[-1].label == "+ all of them" and configs[-1].slug == "all"
    assert plan(TRICKS, "cumulative", all_together=True) == plan(TRICKS, "cumulative")


def test_cumulative_adds_the_tricks_one_after_another_like_the_papers_tables():
    configs = plan(TRICKS, "cumulative")
    assert [c.plugins for c in configs] == [[], ["warmup"], ["warmup", "zero_gamma"], ["warmup", "zero_gamma", "cosine"]]
    assert configs[-1].label == "+ warmup + zero_gamma + cosine"


def test_both_does_not_repeat_the_first_trick_and_base_plugins_are_everywhere():
    configs = plan(TRICKS, "both", base=["step"])
    assert [c.plugins for c in configs] == [
        ["step"], ["step", "warmup"], ["step", "zero_gamma"], ["step", "cosine"],
        ["step", "warmup", "zero_gamma"], ["step", "warmup", "zero_gamma", "cosine"]]
    assert len({c.slug for c in configs}) == len(configs)
    assert configs[0].label == "baseline (step)"


def test_sets_reach_only_the_configurations_with_their_plugin():
    sets = ["core.lr=0.2", "warmup.epochs=1", "cosine.final_lr=0.001"]
    assert split_sets(sets, ["warmup"]) == ["core.lr=0.2", "warmup.epochs=1"]
    assert split_sets(sets, []) == ["core.lr=0.2"]


def test_the_table_is_the_mean_and_sample_spread_over_seeds_and_the_delta_from_the_baseline():
    configs = [Configuration("baseline", "baseline", []), Configuration("+ cosine", "only-cosine", ["cosine"])]
    accs = {"baseline": [(0.80, 0.82), (0.84, 0.85)], "only-cosine": [(0.90, 0.90), (0.86, 0.91), (0.88, 0.93)]}
    results = [RunResult(c.label, c.slug, seed, final, best, 0.5, 10.0 + seed, "x")
               for c in configs for seed, (final, best) in enumerate(accs[c.slug])]
    rows = summarize(configs, results)
    finals = [100 * a for a, _ in accs["only-cosine"]]
    assert rows[1]["final_acc"] == pytest.approx(statistics.fmean(finals))
    assert rows[1]["final_sd"] == pytest.approx(statistics.stdev(finals))
    assert rows[1]["best_acc"] == pytest.approx(100 * (0.90 + 0.91 + 0.93) / 3)
    assert rows[1]["delta_final"] == pytest.approx(statistics.fmean(finals) - 82.0)
    assert rows[0]["delta_best"] == 0.0 and rows[1]["seconds"] == pytest.approx(11.0)


def test_bad_ablations_stop_before_training_with_one_line(tmp_path):
    out = tmp_path / "abl"
    code, _, err = cli_in_process("ablate", "--plugins", "cosine,step", "--cumulative", "--out", str(out), *SMALL[:-6])
    one_line_error(code, err, "configuration '+ cosine + step'", "conflict")
    code, _, err = cli_in_process("ablate", "--plugins", "cosine,mixupp", "--out", str(out))
    one_line_error(code, err, "mixupp", "mixup")
    code, _, err = cli_in_process("ablate", "--plugins", "cosine", "--set", "mixup.alpha=1", "--out", str(out))
    one_line_error(code, err, "mixup", "--plugins")
    code, _, err = cli_in_process("ablate", "--plugins", "cosine,cosine", "--out", str(out))
    one_line_error(code, err, "cosine", "twice")
    assert not out.exists()
    with pytest.raises(TricksError, match="mode"):
        plan(TRICKS, "sideways")


@pytest.mark.slow
def test_an_ablation_writes_its_table_chart_and_runs_and_refuses_another_plan_in_its_directory(tmp_path):
    out = tmp_path / "abl"
    args = ["ablate", "--plugins", "cosine,label_smoothing", "--seeds", "2", "--out", str(out), *SMALL[:-4],
            "--device", "cpu", "--epochs", "1"]
    code, stdout, err = cli_in_process(*args)
    assert code == 0, err
    assert "ablation directory" in stdout
    table = list(csv.DictReader((out / "table.csv").open()))
    assert [r["configuration"] for r in table] == ["baseline", "+ cosine", "+ label_smoothing"]
    assert all(r["seeds"] == "2" for r in table)
    results = list(csv.DictReader((out / "results.csv").open()))
    assert sorted((r["slug"], r["seed"]) for r in results) == sorted(
        (s, str(k)) for s in ("baseline", "only-cosine", "only-label_smoothing") for k in (0, 1))
    for r in results:  # each result is its run's last epoch
        rows = [json.loads(line) for line in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert float(r["final_val_acc"]) == pytest.approx(rows[-1]["val_acc"], abs=1e-4)
    seeds = [json.loads((Path(r["run_dir"]) / "config.yaml").read_text().split("seed: ")[1].split()[0]) for r in results]
    assert sorted(seeds) == [0, 0, 0, 1, 1, 1]
    md = (out / "table.md").read_text()
    assert "| + label_smoothing | 2 |" in md
    assert (out / "chart.png").read_bytes()[:4] == b"\x89PNG"

    before = snapshot(out / "runs")
    code, stdout, _ = cli_in_process(*args)
    assert code == 0 and "6 of 6 runs already finished" in stdout
    assert snapshot(out / "runs") == before  # nothing retrained

    code, _, err = cli_in_process(*args[:-1], "2")
    one_line_error(code, err, "holds an ablation whose item 'baseline-seed0' differs",
                   "recipe.core.epochs: 1 before, 2 now", "another --out")


def test_a_grid_crosses_each_configuration_with_the_settings_it_has():
    grid = parse_grid(["mixup.alpha=0.2,1.0", "core.lr=0.05,0.1"])
    assert grid == [("mixup.alpha", ["0.2", "1.0"]), ("core.lr", ["0.05", "0.1"])]
    rows = expand(plan(["mixup", "cosine"]), grid)
    # the baseline and cosine have no mixup: one row per learning rate; mixup: one per (alpha, lr)
    assert [(r.base or r.slug, r.point) for r in rows] == [
        ("baseline", {"core.lr": "0.05"}), ("baseline", {"core.lr": "0.1"}),
        ("only-mixup", {"mixup.alpha": "0.2", "core.lr": "0.05"}), ("only-mixup", {"mixup.alpha": "0.2", "core.lr": "0.1"}),
        ("only-mixup", {"mixup.alpha": "1.0", "core.lr": "0.05"}), ("only-mixup", {"mixup.alpha": "1.0", "core.lr": "0.1"}),
        ("only-cosine", {"core.lr": "0.05"}), ("only-cosine", {"core.lr": "0.1"})]
    assert len({r.slug for r in rows}) == len(rows) and len({r.folder for r in rows}) == len(rows)
    assert rows[2].label == "+ mixup [mixup.alpha=0.2, core.lr=0.05]"
    assert rows[2].folder == "only-mixup/mixup.alpha=0.2,core.lr=0.05"
    assert expand(plan(["cosine"]), parse_grid(["mixup.alpha=0.2,1.0"])) == plan(["cosine"])


def test_a_grid_row_is_compared_with_the_baseline_at_the_same_grid_values():
    configs = expand(plan(["cosine"]), parse_grid(["core.lr=0.05,0.1"]))
    finals = {"baseline@core.lr=0.05": 0.50, "baseline@core.lr=0.1": 0.70,
              "only-cosine@core.lr=0.05": 0.60, "only-cosine@core.lr=0.1": 0.65}
    results = [RunResult(c.label, c.slug, 0, finals[c.slug], finals[c.slug], 0.5, 1.0, "x") for c in configs]
    rows = summarize(configs, results)
    assert [r["core.lr"] for r in rows] == ["0.05", "0.1", "0.05", "0.1"]
    assert [r["delta_final"] for r in rows] == pytest.approx([0.0, 0.0, 10.0, -5.0])


@pytest.mark.parametrize("grid, fragments", [
    (["mixup.alpha"], ["--grid 'mixup.alpha'", "expected plugin.key=v1,v2"]),
    (["mixup.alpha="], ["give the values to try"]),
    (["mixup.alpha=0.2,0.2"], ["named twice"]),
    (["mixup.alpha=0.2", "mixup.alpha=0.4"], ["'mixup.alpha' twice", "one --grid"]),
    (["cutout.length=4,8"], ["--grid names 'cutout'", "no configuration"]),
    (["mixup.alpha=0.2,-1"], ["configuration '+ mixup [mixup.alpha=-1]'", "mixup.alpha"]),
])
def test_bad_grids_stop_before_training_with_one_line(tmp_path, grid, fragments):
    out = tmp_path / "abl"
    args = [a for g in grid for a in ("--grid", g)]
    code, _, err = cli_in_process("ablate", "--plugins", "mixup", *args, "--out", str(out), "--device", "cpu")
    one_line_error(code, err, *fragments)
    assert not out.exists()


@pytest.mark.slow
def test_a_grid_ablation_writes_one_row_per_configuration_and_grid_point(tmp_path):
    out = tmp_path / "abl"
    code, stdout, err = cli_in_process("ablate", "--plugins", "label_smoothing", "--grid", "label_smoothing.epsilon=0.1,0.3",
                                       "--out", str(out), *SMALL[:-4], "--device", "cpu", "--epochs", "1")
    assert code == 0, err
    table = list(csv.DictReader((out / "table.csv").open()))
    assert [(r["configuration"], r["label_smoothing.epsilon"]) for r in table] == [
        ("baseline", ""), ("+ label_smoothing [label_smoothing.epsilon=0.1]", "0.1"),
        ("+ label_smoothing [label_smoothing.epsilon=0.3]", "0.3")]
    for r in csv.DictReader((out / "results.csv").open()):
        config = (Path(r["run_dir"]) / "config.yaml").read_text()
        if r["label_smoothing.epsilon"]:
            assert f"epsilon: {r['label_smoothing.epsilon']}" in config
    assert (out / "runs" / "only-label_smoothing" / "label_smoothing.epsilon=0.3" / "seed0" / "summary.json").is_file()
