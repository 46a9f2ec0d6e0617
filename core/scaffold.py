"""``tricks new-plugin NAME``: a ready-to-install plugin package."""

from __future__ import annotations

import keyword
import re
from pathlib import Path

from .errors import TricksError

PYPROJECT = '''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "tricks-{name}"
version = "0.1.0"
description = "{title}: a tricks plugin"
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["tricks>=0.1"]

[project.optional-dependencies]
test = ["pytest>=8"]

[project.entry-points."tricks.plugins"]
{name} = "tricks_{name}:{cls}"

[tool.setuptools]
packages = ["tricks_{name}"]
'''

MODULE = '''"""{title}: a tricks plugin.

Replace the example below (Gaussian noise added to each training batch) with your technique.
Keep the math in plain functions, usable without the framework, and let the plugin class
only wire them to hooks.
"""

from __future__ import annotations

import torch

import tricks

__version__ = "0.1.0"


def add_noise(x: torch.Tensor, std: float) -> torch.Tensor:
    """``x + N(0, std^2)``, elementwise."""
    return x + std * torch.randn_like(x)


class {cls}Settings(tricks.Settings):
    std: float = tricks.Field(0.05, ge=0, description="standard deviation of the noise added to the inputs")


class {cls}(tricks.Plugin):
    """Add Gaussian noise to every training batch."""

    Settings = {cls}Settings
    summary = "Add Gaussian noise to every training batch (example plugin)."
    category = "augmentation"

    @tricks.hookimpl
    def on_batch(self, ctx, batch):
        batch["input"] = add_noise(batch["input"], self.settings.std)
        return batch
'''

README = '''# tricks-{name}

A plugin for [tricks](https://pypi.org/project/tricks/): {summary}

## Install and use

    pip install -e .
    tricks plugins show {name}
    tricks run --plugins {name} --set {name}.std=0.1

## Settings

| key | default | description |
| --- | --- | --- |
| std | 0.05 | standard deviation of the noise added to the inputs |

## Test

    pip install -e ".[test]" && pytest
'''

TEST = '''import torch

import tricks
from tricks_{name} import {cls}, add_noise


def test_noise_has_the_asked_spread():
    torch.manual_seed(0)
    x = torch.zeros(100_000)
    assert abs(add_noise(x, 0.5).std().item() - 0.5) < 0.01
    assert torch.equal(add_noise(x, 0.0), x)


def test_bad_setting_is_rejected():
    try:
        tricks.resolve(plugins=["{name}"], sets=["{name}.std=-1"])
    except tricks.TricksError as error:
        assert "{name}.std" in str(error)
    else:
        raise AssertionError("a negative std was accepted")


def test_runs_in_tricks(tmp_path):
    summary = tricks.run(plugins=["{name}"], epochs=1, model="resnet8", train_limit=256, val_limit=128,
                         out=tmp_path / "run")
    assert summary["plugins"] == ["{name}"]
    assert 0.0 <= summary["final_val_acc"] <= 1.0
'''

NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def write_plugin(name: str, directory: Path) -> Path:
    if not NAME.match(name) or keyword.iskeyword(name):
        raise TricksError(f"plugin name '{name}' must be lowercase letters, digits and underscores, starting with a letter")
    from .registry import Catalog

    taken = Catalog().plugins.get(name)
    if taken is not None:
        owner = "an installed third-party plugin" if taken.third_party else "a plugin of the registry"
        raise TricksError(f"plugin name '{name}' is taken by {owner}; choose another name")
    root = Path(directory) / f"tricks-{name}"
    if root.exists():
        raise TricksError(f"{root} already exists; choose another name or --dir")
    cls = "".join(part.capitalize() for part in name.split("_"))
    title = name.replace("_", " ")
    fmt = dict(name=name, cls=cls, title=title, summary="add Gaussian noise to every training batch (an example to edit).")
    (root / f"tricks_{name}").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "pyproject.toml").write_text(PYPROJECT.format(**fmt))
    (root / f"tricks_{name}" / "__init__.py").write_text(MODULE.format(**fmt))
    (root / "README.md").write_text(README.format(**fmt))
    (root / "tests" / f"test_{name}.py").write_text(TEST.format(**fmt))
    return root
