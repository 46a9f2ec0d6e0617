"""``tricks new-plugin NAME`` writes a ready package (pyproject with the entry point, a hook
implementation, a README that is a plugin card to fill in, tests that call
``tricks.testing.check_plugin``) that ``pip install -e`` takes and ``tricks run --plugins NAME``
uses at once.

The package is installed with pip into a folder of its own (``pip install --target``), which the
tests put on the path of this process and of the processes they start: the shared environment,
where other tests run beside these, is never changed (the fixture checks that nothing of the
package is in it)."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from tricks.registry import GROUP, Catalog

from conftest import TINY
from processes import cli_in_process, finish, one_line_error, start, start_cli

NAME = "noisy_inputs"
CLS = "NoisyInputs"
DIST = f"tricks-{NAME}"
MENTIONS = re.compile(r"noisy[-_]inputs", re.IGNORECASE)


def pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def environment_files() -> set[str]:
    """What an install can leave in this environment: the entries of site-packages (and of its
    ``__pycache__``) and of the scripts folder."""
    folders = {Path(sysconfig.get_path(key)) for key in ("purelib", "platlib", "scripts")}
    folders |= {f / "__pycache__" for f in folders}
    return {str(p) for f in folders if f.is_dir() for p in f.iterdir()}


def installed_here() -> bool:
    try:
        metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        return NAME in metadata.entry_points(group=GROUP).names
    return True


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """The scaffolded package, installed into a folder on the path until the module ends."""
    assert not installed_here(), f"{DIST} is installed already; pip uninstall {DIST}"
    root = tmp_path_factory.mktemp("new_plugin")
    code, out, err = cli_in_process("new-plugin", NAME, "--dir", str(root))
    assert code == 0, err
    pkg = root / f"tricks-{NAME}"
    assert str(pkg) in out.replace("\n", "")
    site = root / "site"
    before = environment_files()
    pip("install", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(site), str(pkg))
    assert sorted(p.name for p in site.iterdir() if MENTIONS.search(p.name))  # the module and its metadata
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        yield pkg, {"PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    finally:
        sys.path.remove(str(site))
        sys.modules.pop(f"tricks_{NAME}", None)
        importlib.invalidate_caches()
    # The shared environment never held it.
    assert not installed_here()
    assert not sorted(p for p in environment_files() - before if MENTIONS.search(Path(p).name))


@pytest.mark.slow
def test_the_package_is_complete_and_installed_as_third_party(package):
    pkg, _ = package
    assert '[project.entry-points."tricks.plugins"]' in (pkg / "pyproject.toml").read_text()
    module = (pkg / f"tricks_{NAME}" / "__init__.py").read_text()
    assert "@tricks.hookimpl" in module and f"class {CLS}(tricks.Plugin)" in module
    readme = (pkg / "README.md").read_text()
    assert f"tricks run --plugins {NAME}" in readme
    for heading in ("## The paper", "## The paper's claim", "## Defaults", "## What we measured"):
        assert f"\n{heading}\n" in readme, heading
    assert f"check_plugin({CLS}, workdir=tmp_path)" in (pkg / "tests" / f"test_{NAME}.py").read_text()
    # pip took it: the distribution and its entry point, and the catalogue lists it as third-party.
    dist = metadata.distribution(DIST)
    assert dist.version == "0.1.0"
    assert [(ep.group, ep.name, ep.value) for ep in dist.entry_points] == [(GROUP, NAME, f"tricks_{NAME}:{CLS}")]
    info = Catalog().plugins[NAME]
    assert info.installed and info.third_party and info.version == "0.1.0"


@pytest.mark.slow
def test_installed_plugin_is_listed_shown_run_and_passes_its_tests(package, tmp_path):
    pkg, env = package
    run_dir = tmp_path / "run"
    # Four independent processes, side by side; the package's tests call check_plugin on it.
    listed = start_cli("plugins", "list", "--json", env=env)
    shown = start_cli("plugins", "show", NAME, env=env)
    ran = start_cli("run", "--plugins", NAME, "--epochs", "1", *TINY, "--device", "cpu", "--out", str(run_dir), "--json",
                    env=env)
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
    assert "5 passed" in tested.stdout and "skipped" not in tested.stdout, tested.stdout


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
