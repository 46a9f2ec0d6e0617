"""The command line as a user meets it: the README's first command, help, output modes, listing."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, read_jsonl, run_cli


@pytest.mark.slow
def test_readme_first_command_reaches_98_percent(tmp_path):
    """`tricks run --plugins mixup,cosine` with the default settings, on the bundled digits."""
    result = run_cli("run", "--plugins", "mixup,cosine", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "run directory: runs/" in result.stdout
    assert "┃ epoch ┃ train_loss ┃" in result.stdout  # the per-epoch table
    run_dir = tmp_path / result.stdout.split("run directory: ")[1].split()[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["plugins"] == ["mixup", "cosine"] and summary["epochs"] == 20
    assert summary["final_val_acc"] >= 0.98, summary
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == list(range(1, 21))
    for key in ("epoch", "train_loss", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_second"):
        assert all(key in r for r in rows), key
    assert rows[0]["lr"] > rows[-1]["lr"]  # cosine decayed
    for name in ("config.yaml", "summary.json", "metrics.jsonl", "checkpoints/last.pt", "curves.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in run_dir.rglob("*.tmp")]


@pytest.mark.slow
def test_json_and_quiet_modes(tmp_path):
    result = run_cli("run", "--plugins", "mixup", "--epochs", "2", *TINY, "--out", str(tmp_path / "j"), "--json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in events] == ["epoch", "epoch", "summary"]
    assert events[-1]["run_dir"] == str(tmp_path / "j") and events[-1]["plugins"] == ["mixup"]
    assert events[1]["val_acc"] == read_jsonl(tmp_path / "j" / "metrics.jsonl")[1]["val_acc"]
    result = run_cli("run", "--epochs", "1", *TINY, "--out", str(tmp_path / "q"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "q")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_runs_on_cpu(tmp_path, precision):
    result = run_cli("run", "--plugins", "mixup,cosine", "--epochs", "1", *TINY, "--precision", precision,
                     "--device", "cpu", "--out", str(tmp_path / "r"), "--json")
    assert result.returncode == 0, result.stderr
    row = read_jsonl(tmp_path / "r" / "metrics.jsonl")[0]
    assert row["train_loss"] == row["train_loss"] and row["train_loss"] < 10  # finite, not NaN


def test_run_help_explains_every_option():
    result = run_cli("run", "--help")
    assert result.returncode == 0
    for option in ("--plugins", "--config", "--set", "--epochs", "--batch-size", "--lr", "--model", "--dataset",
                   "--data-dir", "--device", "--precision", "--seed", "--out", "--resume", "--json", "--quiet",
                   "--download", "--registry"):
        assert option in result.stdout, option


@pytest.mark.slow
def test_plugins_list_and_show():
    result = run_cli("plugins", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["mixup"]["installed"] and rows["mixup"]["version"] == "0.1.0"
    assert rows["mixup"]["hooks"] == ["on_batch"] and rows["mixup"]["category"] == "augmentation"
    assert rows["cosine"]["hooks"] == ["configure_schedule"] and not rows["cosine"]["third_party"]
    table = run_cli("plugins", "list")  # through a pipe: a tab-separated line per plugin
    assert "mixup\tyes\t0.1.0\ton_batch\taugmentation\t" in table.stdout
    show = run_cli("plugins", "show", "mixup")
    assert show.returncode == 0, show.stderr
    for needle in ("alpha", "0.2", "Beta(alpha, alpha)", "permutation|reverse|roll", "1710.09412", "conflicts", "order"):
        assert needle in show.stdout, needle
    missing = run_cli("plugins", "show", "mixpu")
    assert missing.returncode == 2 and "did you mean mixup" in missing.stderr
    listed = run_cli("plugins", "show", "kd")  # a default made by a factory is shown as the value it makes
    assert "omit_classes" in listed.stdout and "PydanticUndefined" not in listed.stdout


@pytest.mark.slow
def test_python_api_gives_the_cli_results(tmp_path):
    import tricks

    api = tricks.run(plugins="mixup,cosine", epochs=2, seed=3, set=["mixup.alpha=0.5"], out=tmp_path / "api",
                     model="resnet8", batch_size=32, train_limit=256, val_limit=128)
    result = run_cli("run", "--plugins", "mixup,cosine", "--epochs", "2", "--seed", "3", "--set", "mixup.alpha=0.5",
                     *TINY, "--out", str(tmp_path / "cli"), "--quiet")
    assert result.returncode == 0, result.stderr
    cli = json.loads((tmp_path / "cli" / "summary.json").read_text())
    for key in ("final_val_acc", "final_val_loss", "best_val_acc", "best_epoch", "params", "plugins", "versions"):
        assert api[key] == cli[key], key
    assert (tmp_path / "api" / "config.yaml").read_text() == (tmp_path / "cli" / "config.yaml").read_text()


def test_plugins_add_commands_and_a_broken_one_fails_alone(monkeypatch):
    from importlib import metadata

    from processes import cli_in_process, one_line_error

    code, out, _ = cli_in_process("--help")
    assert code == 0 and "sample" in out and "analyze" in out  # the regnet plugin's commands
    real = metadata.entry_points

    class Broken:
        name, value = "broken-cmd", "tricks_missing.cli:command"

        def load(self):
            raise ImportError("no module named tricks_missing")

    monkeypatch.setattr(metadata, "entry_points",
                        lambda group: [Broken(), *real(group=group)] if group == "tricks.commands" else real(group=group))
    code, out, _ = cli_in_process("--help")
    assert code == 0 and "broken-cmd" in out and "sample" in out  # listed: nothing is imported to list it
    code, _, err = cli_in_process("broken-cmd")
    one_line_error(code, err, "command 'broken-cmd'", "fails to import", "reinstall")
    code, out, _ = cli_in_process("version")
    assert code == 0 and "tricks" in out


def test_curves_can_be_turned_off(tmp_path):
    import tricks

    tricks.run(dataset="digits", model="resnet8", train_limit=128, val_limit=64, epochs=1, curves=False,
               out=tmp_path / "run", reporter=tricks.Reporter())
    assert (tmp_path / "run" / "summary.json").exists() and not (tmp_path / "run" / "curves.png").exists()
