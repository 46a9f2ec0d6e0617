"""``tricks new-plugin NAME`` writes a ready package (pyproject with the entry point, a hook
implementation, a README, a passing test) that ``pip install`` takes and ``tricks run --plugins
NAME`` uses at once. The package is installed into a folder of its own (``pip install --target``)
put on ``PYTHONPATH`` of the processes that use it, so this environment stays as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata

import pytest
import yaml

from conftest import TINY
from processes import cli_in_process, finish, one_line_error, start, start_cli

NAME = "noisy_inputs"
CLS = "NoisyInputs"


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """The scaffolded package and the folder it is installed in."""
    root = tmp_path_factory.mktemp("new_plugin")
    code, out, err = cli_in_process("new-plugin", NAME, "--dir", str(root))
    assert code == 0, err
    pkg, site = root / f"tricks-{NAME}", root / "site"
    assert str(pkg) in out.replace("\n", "")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--quiet", "--target", str(site), str(pkg)],
        capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    return pkg, site


def test_the_package_is_complete(package):
    pkg, site = package
    assert '[project.entry-points."tricks.plugins"]' in (pkg / "pyproject.toml").read_text()
    module = (pkg / f"tricks_{NAME}" / "__init__.py").read_text()
    assert "@tricks.hookimpl" in module and f"class {CLS}(tricks.Plugin)" in module
    assert f"tricks run --plugins {NAME}" in (pkg / "README.md").read_text()
    assert (pkg / "tests" / f"test_{NAME}.py").is_file()
    # pip took it: the module and the entry point are in the target folder, and only there.
    (dist,) = metadata.distributions(path=[str(site)])
    assert dist.metadata["Name"] == f"tricks-{NAME}" and dist.version == "0.1.0"
    assert [(ep.group, ep.name, ep.value) for ep in dist.entry_points] == [("tricks.plugins", NAME, f"tricks_{NAME}:{CLS}")]
    assert NAME not in metadata.entry_points(group="tricks.plugins").names


def test_installed_plugin_is_listed_shown_run_and_tested(package, tmp_path):
    pkg, site = package
    env = {"PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    run_dir = tmp_path / "run"
    # Four independent processes, side by side.
    listed = start_cli("plugins", "list", "--json", env=env)
    shown = start_cli("plugins", "show", NAME, env=env)
    ran = start_cli("run", "--plugins", NAME, "--epochs", "1", *TINY, "--device", "cpu", "--out", str(run_dir), "--json", env=env)
    tested = start([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=pkg, env=env)
    listed, shown, ran, tested = (finish(p) for p in (listed, shown, ran, tested))

    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows[NAME]["installed"] and rows[NAME]["third_party"]
    assert rows[NAME]["version"] == "0.1.0" and rows[NAME]["hooks"] == ["on_batch"]
    assert not rows["mixup"]["third_party"]

    assert shown.returncode == 0, shown.stderr
    assert "third-party" in shown.stdout and "yes, 0.1.0" in shown.stdout
    settings = [line for line in shown.stdout.splitlines() if " std " in f" {line} "]
    assert settings and "float" in settings[0] and "0.05" in settings[0], shown.stdout

    assert ran.returncode == 0, ran.stderr
    summary = json.loads(ran.stdout.splitlines()[-1])
    assert summary["plugins"] == [NAME] and summary["versions"][NAME] == "0.1.0"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["plugins"] == [NAME] and config[NAME] == {"std": 0.05}

    assert tested.returncode == 0, tested.stdout + tested.stderr  # 0: tests were collected, and all passed
    assert " passed" in tested.stdout and "skipped" not in tested.stdout, tested.stdout


@pytest.mark.parametrize("name", ["Noisy", "noisy-inputs", "9lives", "class", "mixup"])
def test_a_bad_name_is_an_error(tmp_path, name):
    code, out, err = cli_in_process("new-plugin", name, "--dir", str(tmp_path))
    one_line_error(code, err, name)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_package_folder_is_not_overwritten(tmp_path):
    assert cli_in_process("new-plugin", "twice", "--dir", str(tmp_path))[0] == 0
    readme = (tmp_path / "tricks-twice" / "README.md").read_bytes()
    code, out, err = cli_in_process("new-plugin", "twice", "--dir", str(tmp_path))
    one_line_error(code, err, "already exists")
    assert (tmp_path / "tricks-twice" / "README.md").read_bytes() == readme
