"""The batch-mixing plugins stand alone: the math they share lives in the core (``tricks.mixing``),
neither declares a dependency on another plugin distribution, ``cutmix`` imports and mixes with
``tricks_mixup`` unavailable, and ``tricks_mixup`` still exports the shared functions."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"


def _name(requirement: str) -> str:
    """The normalized distribution name of a requirement string (``"tricks-mixup>=0.1"`` -> ``tricks-mixup``)."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)).lower()


def _project(plugin: str) -> dict:
    return tomllib.loads((PLUGINS / plugin / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("plugin", ["mixup", "cutmix"])
def test_a_mixing_plugin_declares_no_other_plugin_as_a_dependency(plugin):
    plugins = {_name(_project(p.parent.name)["name"]) for p in PLUGINS.glob("*/pyproject.toml")}
    assert {"tricks-mixup", "tricks-cutmix"} <= plugins
    project = _project(plugin)
    extras = [r for group in project.get("optional-dependencies", {}).values() for r in group]
    declared = {_name(r) for r in [*project.get("dependencies", []), *extras]}
    assert "tricks" in declared
    assert not declared & (plugins - {_name(project["name"])}), f"{plugin} depends on {declared & plugins}"


@pytest.mark.slow
def test_cutmix_imports_and_mixes_with_mixup_unavailable():
    code = """
import sys
sys.modules["tricks_mixup"] = None  # any import of it now fails
import torch
from types import SimpleNamespace
import tricks_cutmix
from tricks_cutmix import CutMix, CutMixSettings
torch.manual_seed(0)
x, y = torch.rand(8, 3, 6, 6), torch.arange(8) % 4
ctx = SimpleNamespace(num_classes=4)
for switch in (0.0, 1.0):  # CutMix, then its switch to mixup
    out = CutMix(CutMixSettings(switch_prob=switch)).on_batch(ctx, {"input": x.clone(), "target": y.clone()})
    assert out["target"].shape == (8, 4) and torch.allclose(out["target"].sum(1), torch.ones(8))
assert "tricks_mixup" not in {m for m, v in sys.modules.items() if v is not None}
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_mixup_reexports_the_shared_functions():
    import tricks.mixing
    import tricks_cutmix
    import tricks_mixup

    for name in ("mixup", "partner", "sample_lambda", "soft_targets"):
        assert getattr(tricks_mixup, name) is getattr(tricks.mixing, name)
    assert tricks_cutmix.partner is tricks.mixing.partner and tricks_cutmix.mixup is tricks.mixing.mixup
