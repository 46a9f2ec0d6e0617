"""One CLI: the core settings as the same options on every command, the ablation grid option,
``plugins list`` on a terminal and through a pipe, and commands that start without torch."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import subprocess
import sys
import typing
from importlib import metadata

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

import tricks.cli.main as cli
from conftest import run_cli
from processes import cli_in_process, one_line_error
from tricks import CoreSettings, TricksError
from tricks.cli.options import core_options


def commands() -> dict:
    """The click commands of ``tricks run``, ``tricks ablate`` and the regnet plugin's ``tricks sample``."""
    group = typer.main.get_command(cli.app)
    (sample,) = [ep for ep in metadata.entry_points(group="tricks.commands") if ep.name == "sample"]
    return {"run": group.commands["run"], "ablate": group.commands["ablate"], "sample": cli._load_command("sample", sample)}


def core_help(command) -> dict:
    """Each core setting's line in the command's help: (flags and type, help text with the default)."""
    ctx = typer.Context(command)
    return {p.name.removeprefix("core__"): p.get_help_record(ctx) for p in command.params if p.name.startswith("core__")}


TYPES = {int: "<int>", float: "<float>", str: "<str>"}


def test_every_core_setting_is_the_same_option_on_every_command():
    found = {name: core_help(command) for name, command in commands().items()}
    fields = CoreSettings.model_fields
    assert list(found["run"]) == list(found["ablate"]) == list(fields)
    assert list(found["sample"]) == [f for f in fields if f not in ("model", "seed")]  # each network is the model; --seed samples
    for name, field in fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            flags = f"{flag} / --no-{flag[2:]}"
        elif typing.get_origin(field.annotation) is typing.Literal:
            flags = f"{flag} <{'|'.join(typing.get_args(field.annotation))}>"
        else:  # X or X | None
            flags = f"{flag} {TYPES[(typing.get_args(field.annotation) or [field.annotation])[0]]}"
        shown = (name if field.default else "no-" + name).replace("_", "-") if field.annotation is bool else field.default
        text = field.description + (f"  [default: {shown}]" if field.default is not None else "")
        for command, records in found.items():
            if command != "sample" or name in records:
                assert records[name] == (flags, text), (command, name)
    for command, needed in (("run", []), ("ablate", ["--plugins", "mixup"]), ("sample", ["--space", "regnet", "--n", "2", "--out", "x"])):
        code, _, err = cli_in_process(command, *needed, "--epochs", "two")
        assert code == 2 and "'--epochs'" in err and "valid integer" in err, (command, err)  # typed the same


def test_no_help_text_spells_out_a_default_by_hand():
    group = typer.main.get_command(cli.app)
    every = [*commands().values(), *(c for n, c in group.commands.items() if n not in ("run", "ablate"))]
    every += list(group.commands["plugins"].commands.values())
    for command in every:
        for param in command.params:
            assert "[default" not in (getattr(param, "help", None) or ""), (command.name, param.name)
    help_text = run_cli("run", "--help").stdout
    assert help_text.count("[default: 20]") == 1 and help_text.count("[default: resnet20]") == 1
    assert "[default: no-download]" in help_text and "[default: fp32]" in help_text
    for flag in ("--train-limit", "--val-limit", "--image-size", "--weight-decay", "--no-nesterov", "--log-every"):
        assert flag in help_text, flag


def test_a_command_gets_only_the_settings_the_user_gave():
    seen = []
    app = typer.Typer()

    @app.command()
    @core_options(exclude=("seed",))
    def train(core: dict, name: str = typer.Option("x", "--name")):
        seen.append((name, core))

    runner = CliRunner()
    result = runner.invoke(app, ["--epochs", "20", "--no-augment", "--precision", "bf16", "--device", "cuda:1",
                                 "--train-limit", "128", "--name", "y"])
    assert result.exit_code == 0, result.output
    assert seen[-1] == ("y", {"epochs": 20, "augment": False, "precision": "bf16", "device": "cuda:1", "train_limit": 128})
    assert runner.invoke(app, []).exit_code == 0 and seen[-1] == ("x", {})  # a recipe's values are kept
    train(core__lr=0.05, name="z")  # called from Python: the settings passed are the ones given
    assert seen[-1] == ("z", {"lr": 0.05})
    assert runner.invoke(app, ["--seed", "1"]).exit_code == 2  # excluded
    bad = runner.invoke(app, ["--epochs", "0"])
    assert isinstance(bad.exception, TricksError) and "--epochs" in str(bad.exception)
    with pytest.raises(ValueError, match="no core setting: sed"):
        core_options(exclude=("sed",))


@pytest.mark.parametrize("command", ["run", "ablate", "sample"])
def test_a_bad_device_is_a_one_line_error_on_every_command(command, tmp_path):
    needed = {"run": [], "ablate": ["--plugins", "mixup"], "sample": ["--space", "regnet", "--n", "2", "--out", str(tmp_path)]}
    code, _, err = cli_in_process(command, *needed[command], "--device", "nonsense")
    one_line_error(code, err, "--device", "'nonsense'", "auto, cpu, cuda or cuda:N")


def test_ablate_passes_the_grid_and_the_core_settings_on(monkeypatch, tmp_path):
    import tricks.ablate

    calls = []
    monkeypatch.setattr(tricks.ablate, "ablate", lambda plugins, **kwargs: calls.append((plugins, kwargs)))
    code, _, err = cli_in_process("ablate", "--plugins", "mixup,cosine", "--grid", "mixup.alpha=0.2,0.4",
                                  "--grid", "core.lr=0.1,0.05", "--epochs", "2", "--device", "cpu", "--train-limit", "64",
                                  "--set", "core.val_limit=32", "--seeds", "2", "--out", str(tmp_path / "abl"))
    assert code == 0, err
    (plugins, kwargs), = calls
    assert plugins == ["mixup", "cosine"]
    assert kwargs["grid"] == ["mixup.alpha=0.2,0.4", "core.lr=0.1,0.05"]
    assert kwargs["overrides"] == {"epochs": 2, "device": "cpu", "train_limit": 64}
    assert kwargs["sets"] == ["core.val_limit=32"] and kwargs["seeds"] == 2 and kwargs["mode"] == "alone"
    cli_in_process("ablate", "--plugins", "mixup", "--out", str(tmp_path / "abl"))
    assert calls[-1][1]["grid"] == [] and calls[-1][1]["overrides"] == {}


def _plugin_names() -> dict[str, list[str]]:
    return {r["name"]: r["hooks"] for r in json.loads(run_cli("plugins", "list", "--json").stdout)}


def _check_table(text: str, plugins: dict[str, list[str]], width: int) -> None:
    """Every plugin's name starts a line of its own, every hook name is a whole word on some line."""
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width, text
    firsts = [line.split()[0] for line in lines if line.strip()]
    words = {w for line in lines for w in line.split()}
    for name, hooks in plugins.items():
        assert name in firsts, (name, text)
        assert all(hook in words for hook in hooks), (name, hooks, text)


@pytest.mark.slow
def test_plugins_list_keeps_names_whole_on_an_80_column_terminal():
    plugins = _plugin_names()
    out = io.StringIO()
    cli.print_plugins(cli.plugin_rows(cli._catalog(None)), Console(file=out, force_terminal=True, width=80, color_system=None))
    _check_table(out.getvalue(), plugins, 80)
    assert "…" in out.getvalue()  # the summaries are what gives way

    # the real command on a pseudo-terminal 80 columns wide
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "80", "LINES": "50", "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tricks.cli.main", "plugins", "list"], stdin=follower,
                            stdout=follower, stderr=subprocess.PIPE, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal is closed when the process ends
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", b"".join(chunks).decode()).replace("\r", "")
    _check_table(text, plugins, 80)


def test_plugins_list_through_a_pipe_is_one_tab_separated_line_per_plugin():
    rows = {r["name"]: r for r in json.loads(run_cli("plugins", "list", "--json").stdout)}
    result = run_cli("plugins", "list", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == sorted(rows)
    for line in lines:
        name, installed, version, hooks, category, summary = line.split("\t")
        r = rows[name]
        assert installed == ("yes" if r["installed"] else "no") and version == (r["version"] or "-")
        assert hooks.split(",") == r["hooks"] and category == r["category"] and summary == r["summary"]
    assert len([line for line in lines if "label_smoothing" in line]) == 1  # what `| grep label_smoothing` finds


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--help"], ["plugins", "list"]])
def test_help_and_plugins_list_import_no_torch(args):
    code = ("import runpy, sys\n"
            f"sys.argv = ['tricks', *{args!r}]\n"
            "try:\n    runpy.run_module('tricks.cli.main', run_name='__main__')\n"
            "except SystemExit as exit_:\n    assert not exit_.code, exit_.code\n"
            "heavy = sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules)\n"
            "print('imported:', heavy)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("imported: []"), result.stdout[-300:]
    if args == ["--help"]:  # the plugins' commands are listed with their help, read without importing them
        assert "Sample networks from a design space" in result.stdout and "Compare design spaces" in result.stdout
