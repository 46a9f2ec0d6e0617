"""``tricks new-plugin NAME``: a ready-to-install plugin package, with a README that is a plugin
card to fill in and tests that call :func:`tricks.testing.check_plugin`."""

from __future__ import annotations

import keyword
import re
from pathlib import Path

from . import atomic
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

This README is the plugin's card: fill in the four sections below. The tests check, through
`tricks.testing.check_plugin`, that they are there.

## The paper

*Fill in:* the paper this plugin implements: its title, authors and year, and its arXiv id with
a link.

## The paper's claim

*Fill in:* what the paper claims the technique does, on which data and model, and by how much
(the table or figure it shows).

## Defaults

| key | default | description |
| --- | --- | --- |
| std | 0.05 | standard deviation of the noise added to the inputs |

*Fill in:* where the defaults come from (the paper's values, or what the data needs) and which
setting matters most.

## What we measured

*Fill in:* your own runs against the baseline: the command, the data, the seeds, and the mean
and spread of the accuracy with and without the plugin.

## Install and use

    pip install -e .
    tricks plugins show {name}
    tricks run --plugins {name} --set {name}.std=0.1

## Test

    pip install -e ".[test]" && pytest

The tests check the function, the hook and a run, and call `tricks.testing.check_plugin`: the
contract every tricks plugin keeps (settings, hooks, this card, training in fp32 and bf16, and an
exact resume), in a few runs of seconds each.
'''

TEST = '''"""Tests of the {title} plugin: the function, the hook, a run, and the contract of tricks plugins."""

import pytest
import torch

import tricks
from tricks.testing import BatchWatcher, check_plugin, make_ctx, tiny_run
from tricks_{name} import {cls}, {cls}Settings, add_noise


def test_noise_has_the_asked_spread():
    torch.manual_seed(0)
    x = torch.zeros(100_000)
    assert abs(add_noise(x, 0.5).std().item() - 0.5) < 0.01
    assert torch.equal(add_noise(x, 0.0), x)


def test_the_hook_adds_noise_to_the_inputs_only():
    torch.manual_seed(0)
    batch = {{"input": torch.zeros(64, 1, 8, 8), "target": torch.arange(64) % 10}}
    out = {cls}({cls}Settings(std=0.5)).on_batch(make_ctx(plugins=["{name}"]), batch)
    assert abs(out["input"].std().item() - 0.5) < 0.05
    assert torch.equal(out["target"], torch.arange(64) % 10)


def test_a_bad_setting_is_an_error_naming_the_key():
    with pytest.raises(tricks.TricksError, match=r"{name}\\.std"):
        tricks.resolve(plugins=["{name}"], sets=["{name}.std=-1"])


def test_in_a_run_the_model_gets_noisier_inputs(tmp_path):
    spread = {{}}
    for std in (0.0, 1.0):
        watcher = BatchWatcher(lambda batch: batch["input"].std().item())  # runs after the plugin
        tiny_run(plugins=["{name}", watcher], set=[f"{name}.std={{std}}"], out=tmp_path / f"std{{std}}")
        spread[std] = watcher.batches
    assert len(spread[1.0]) == 8  # one epoch of 8 steps: the same batches, with and without noise
    assert all(noisy > clean for noisy, clean in zip(spread[1.0], spread[0.0]))


def test_the_plugin_keeps_the_contract(tmp_path):
    check_plugin({cls}, workdir=tmp_path)
'''


NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def write_plugin(name: str, directory: Path) -> Path:
    """Write the package ``DIRECTORY/tricks-NAME`` and return its folder; a bad or taken name, or
    an existing folder, is a TricksError."""
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
    atomic.write_text(root / "pyproject.toml", PYPROJECT.format(**fmt))
    atomic.write_text(root / f"tricks_{name}" / "__init__.py", MODULE.format(**fmt))
    atomic.write_text(root / "README.md", README.format(**fmt))
    atomic.write_text(root / "tests" / f"test_{name}.py", TEST.format(**fmt))
    return root
