"""``tricks compare``: real tiny runs, an ablation and a sampling job, compared; the table against
the runs' own metrics, the labels, the picture, and the one-line errors of bad input."""

from __future__ import annotations

import csv
import shutil
import statistics

import pytest
import typer

import tricks
from processes import cli_in_process, one_line_error, one_torch_thread
from tricks.ablate import ablate
from tricks.compare import COLUMNS, _curve, _lines, compare, find_runs

pytestmark = pytest.mark.slow  # every test here trains end to end

TINY = dict(epochs=2, model="resnet8", batch_size=32, train_limit=128, val_limit=64, device="cpu")
# Two stages of one or two X blocks, 8 to 16 channels: networks that train in about a second.
TINY_SPACE = {"name": "tiny", "kind": "anynet", "stages": 2,
              "params": {"depth": {"values": [1, 2]}, "width": {"low": 8, "high": 16, "step": 8},
                         "bottleneck": {"values": [1]}, "group_width": {"values": [8]}}}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Two loose runs (baseline; mixup at another rate), an ablation of mixup over two seeds and
    a sampling job of two networks, all in one folder."""
    from tricks_regnet.sweep import sample_job

    root = tmp_path_factory.mktemp("compare")
    with one_torch_thread():
        tricks.run(out=root / "loose" / "a", **TINY)
        tricks.run(plugins=["mixup"], out=root / "loose" / "b", **{**TINY, "lr": 0.05})
        ablate(["mixup"], seeds=2, overrides=TINY, out=root / "ablation")
        sample_job(root / "sweep", TINY_SPACE, 2, overrides={k: v for k, v in TINY.items() if k != "model"})
    return root


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_table_holds_each_runs_final_and_best_metrics(work, tmp_path):
    out = tmp_path / "cmp"
    rows = compare([work / "loose", work / "ablation", work / "sweep"], out)
    labels = [r["label"] for r in rows]
    assert labels == ["baseline [core.lr=0.1]", "mixup [core.lr=0.05]",
                      "baseline seed 0", "baseline seed 1", "+ mixup seed 0", "+ mixup seed 1", "0000", "0001"]
    written = read_csv(out / "compare.csv")
    assert list(written[0]) == COLUMNS and [w["label"] for w in written] == labels
    for row, w in zip(rows, written):
        run = tricks.RunDir(w["run_dir"])
        metrics = run.metrics()
        assert len(metrics) == 2 and int(w["epochs"]) == 2
        accs = [m["val_acc"] for m in metrics]
        assert float(w["final_val_acc"]) == metrics[-1]["val_acc"]
        assert float(w["best_val_acc"]) == max(accs)
        assert int(w["best_epoch"]) == metrics[accs.index(max(accs))]["epoch"]
        assert float(w["final_val_loss"]) == metrics[-1]["val_loss"]
        assert int(w["params"]) == run.summary()["params"]
        assert float(w["train_seconds"]) == pytest.approx(run.summary()["train_seconds"], rel=1e-9)
        assert {k: type(v)(w[k]) for k, v in row.items()} == row  # what compare() returns is what it wrote
    # the ablation's runs are the ones its plan names; the sampling job's networks by their ids
    assert rows[2]["run_dir"].endswith("runs/baseline/seed0") and rows[7]["run_dir"].endswith("runs/0001")

    markdown = (out / "compare.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert len(table) == 1 + len(rows)
    for row, line in zip(rows, table[1:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row["label"] and cells[1] == f"{100 * row['final_val_acc']:.2f}"
        assert cells[2] == f"{100 * row['best_val_acc']:.2f}" and cells[4] == f"{row['final_val_loss']:.4f}"

    png = (out / "compare.png").read_bytes()
    assert png[:8] == PNG
    import matplotlib.image

    assert matplotlib.image.imread(out / "compare.png").shape[2] in (3, 4)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_seeds_of_a_configuration_are_one_line_with_their_mean(work):
    runs = find_runs([work / "ablation", work / "loose" / "a"])
    lines = dict(_lines(runs))
    assert list(lines) == ["baseline (mean ± sd, 2 seeds)", "+ mixup (mean ± sd, 2 seeds)", "baseline"]
    seeds = lines["+ mixup (mean ± sd, 2 seeds)"]
    epochs, mean, sd = _curve(seeds, "val_acc", 100.0)
    assert epochs == [1, 2]
    for i, epoch in enumerate(epochs):
        values = [100 * r.rows[i]["val_acc"] for r in seeds]
        assert mean[i] == pytest.approx(statistics.fmean(values)) and sd[i] == pytest.approx(statistics.stdev(values))
    assert _curve(lines["baseline"], "val_acc", 100.0)[2] is None  # a lone run has no band


def test_a_folder_is_searched_below_and_each_run_counted_once(work, tmp_path):
    rows = compare([work, work / "ablation" / "runs" / "baseline" / "seed0"], tmp_path / "all")
    assert len(rows) == 8 and len({r["run_dir"] for r in rows}) == 8
    # two runs of the same settings are told apart by their folders
    for copy in ("x", "y"):
        shutil.copytree(work / "loose" / "a", tmp_path / copy / "a")
    rows = compare([tmp_path / "x", tmp_path / "y"], tmp_path / "twins")
    assert [r["label"] for r in rows] == ["baseline (x/a)", "baseline (y/a)"]


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bad_input_is_a_one_line_error(work, tmp_path):
    with pytest.raises(tricks.TricksError) as error:
        compare([], tmp_path / "out")
    assert "name at least one run directory" in one_line(error)
    with pytest.raises(tricks.TricksError) as error:
        compare([tmp_path / "missing"], tmp_path / "out")
    assert "does not exist" in one_line(error)
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    with pytest.raises(tricks.TricksError) as error:
        compare([work / "loose", tmp_path / "empty"], tmp_path / "out")
    assert "empty holds no run" in one_line(error) and "name a run directory" in one_line(error)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(tricks.TricksError) as error:
        compare([work / "loose"], tmp_path / "file.txt")
    assert "is a file" in one_line(error) and "name a folder" in one_line(error)
    started = tmp_path / "started"
    started.mkdir()
    shutil.copy(work / "loose" / "a" / "config.yaml", started / "config.yaml")
    with pytest.raises(tricks.TricksError) as error:
        compare([started], tmp_path / "out")
    assert "has not finished an epoch" in one_line(error)
    assert not (tmp_path / "out").exists()  # nothing is written before the input is known good


@pytest.fixture
def cli(monkeypatch):
    """``tricks compare`` in the CLI (registered here too, should cli/main.py not yet have it)."""
    from tricks.cli import main
    from tricks.cli.compare import compare as command

    monkeypatch.setenv("COLUMNS", "200")  # room for the table's labels on one line each
    if not any((c.name or c.callback.__name__) == "compare" for c in main.app.registered_commands):
        monkeypatch.setattr(main.app, "registered_commands",
                            [*main.app.registered_commands, typer.models.CommandInfo(name="compare", callback=command)])
    return cli_in_process


def test_the_command_prints_the_table_and_the_folder(work, tmp_path, cli):
    out = tmp_path / "cmp"
    code, stdout, stderr = cli("compare", str(work / "ablation"), str(work / "loose" / "b"), "--out", str(out))
    assert code == 0, stderr
    for label in ("baseline seed 0", "+ mixup seed 1", "mixup"):
        assert label in stdout
    assert f"5 runs compared in {out}" in stdout
    assert len(read_csv(out / "compare.csv")) == 5

    code, _, stderr = cli("compare", str(tmp_path / "nowhere"), "--out", str(out))
    one_line_error(code, stderr, "nowhere does not exist")
