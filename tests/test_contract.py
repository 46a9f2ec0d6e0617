"""The contract every registered plugin keeps, and the registry's own validation.

``test_plugin_contract`` runs :func:`tricks.testing.check_plugin` once per plugin named in
registry.yaml: a plugin joins it by being registered, without a test file of its own for the
contract. The other tests here show that ``check_plugin`` fails, naming the plugin and the point,
on plugins that break each part of the contract.
"""

from __future__ import annotations

import re
import sys

import pytest
import yaml

import tricks
from tricks.registry import default_registry_file, load_registry_file
from tricks.testing import check_plugin

from conftest import ROOT

REGISTRY = default_registry_file()
NAMES = sorted(load_registry_file(REGISTRY))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_plugin_contract(name, tmp_path):
    check_plugin(name, workdir=tmp_path)


# --- check_plugin on plugins that break the contract ----------------------------------------------

CARD = """# tricks-{name}

## The paper's claim

Nothing yet.

## Defaults

The defaults.

## What we measured

Nothing yet.
"""

NOISE = """
import torch
import tricks


class NoiseSettings(tricks.Settings):
    std: float = tricks.Field(0.1, ge=0, description="standard deviation of the noise")


class Noise(tricks.Plugin):
    \"\"\"Add Gaussian noise to the inputs.\"\"\"

    Settings = NoiseSettings
"""


@pytest.fixture
def install(tmp_path, monkeypatch):
    """``install(name, body, readme=CARD)``: a third-party plugin ``tricks_NAME.Noise`` (the source
    ``NOISE`` plus ``body``) installed for this test only: its module and a dist-info folder with
    the entry point and the README as long description, in a folder put on ``sys.path``."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    modules = []

    def install(name: str, body: str, readme: str = CARD) -> str:
        module = f"tricks_{name}"
        (site / f"{module}.py").write_text(NOISE + body)
        info = site / f"tricks_{name}-0.1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tricks-{name}\nVersion: 0.1.0\n\n"
                                       + readme.format(name=name))
        (info / "entry_points.txt").write_text(f"[tricks.plugins]\n{name} = {module}:Noise\n")
        modules.append(module)
        return name

    yield install
    for module in modules:
        sys.modules.pop(module, None)


ON_BATCH = """
    @tricks.hookimpl
    def on_batch(self, ctx, batch):
        batch["input"] = batch["input"] + self.settings.std * torch.randn_like(batch["input"])
"""

WRAPPER = """
    @tricks.hookimpl(wrapper=True)
    def on_batch(self, ctx, batch):
        batch = yield
        return batch
"""


def test_a_plugin_class_without_an_entry_point_is_not_installed():
    class Loose(tricks.Plugin):
        @tricks.hookimpl
        def on_batch(self, batch):
            pass

    with pytest.raises(AssertionError, match=r"plugin 'Loose': installed: no entry point .*Loose"):
        check_plugin(Loose)
    with pytest.raises(AssertionError, match=r"plugin 'nowhere': installed: no entry point 'nowhere'"):
        check_plugin("nowhere")


@pytest.mark.parametrize("body, pattern", [
    ("", r"hooks: the class implements no hook"),
    (ON_BATCH.replace("(self, ctx, batch)", "(self, ctx, batch, extra)"), r"hooks: .*'extra'"),
    (WRAPPER, r"hooks: plugin 'hooky' implements 'on_batch' as a wrapper"),
    (ON_BATCH.replace("def on_batch", "def on_step"), r"hooks: on_step is not a hook of tricks"),
    (ON_BATCH + "\n    summary = ''\n    __doc__ = None\n", r"description: .*summary"),
    (ON_BATCH + "\n    provides = 'schedule'\n", r"description: class attribute provides must be a tuple"),
], ids=["no hook", "unknown argument", "wrapper of a chained hook", "unknown hook", "no summary", "provides"])
def test_hooks_and_description(install, body, pattern):
    name = install("hooky", body)
    with pytest.raises(AssertionError, match="plugin 'hooky': " + pattern):
        check_plugin(name, resume=False, precisions=())


def test_a_setting_without_a_description(install):
    body = ON_BATCH + "\n\nclass VagueSettings(tricks.Settings):\n    std: float = 0.1\n\n\nNoise.Settings = VagueSettings\n"
    with pytest.raises(AssertionError, match=r"plugin 'vague': settings: vague\.std has no description"):
        check_plugin(install("vague", body), resume=False, precisions=())


def test_a_readme_without_what_we_measured(install):
    readme = CARD.replace("What we measured", "Results")
    with pytest.raises(AssertionError, match=r"plugin 'unmeasured': README: .*what we measured"):
        check_plugin(install("unmeasured", ON_BATCH, readme), resume=False, precisions=())


FAILING = """
    @tricks.hookimpl
    def on_batch(self, ctx, batch):
        raise ValueError("no batch for me")
"""


def test_a_run_that_fails(install):
    with pytest.raises(AssertionError, match=r"plugin 'broken': 1 epoch in fp32: .*'on_batch'.*no batch for me"):
        check_plugin(install("broken", FAILING), resume=False, precisions=("fp32",))


# Noise that grows with every step: the count of steps must be in the checkpoint.
COUNTING = """
    def __init__(self, settings=None):
        super().__init__(settings)
        self.steps = 0

    @tricks.hookimpl
    def on_batch(self, ctx, batch):
        self.steps += 1
        batch["input"] = batch["input"] + self.steps / 10 * torch.randn_like(batch["input"])
"""
KEPT = """
    @tricks.hookimpl
    def state_dict(self, ctx):
        return {"steps": self.steps}

    @tricks.hookimpl
    def load_state_dict(self, ctx, state):
        self.steps = state["steps"]
"""


@pytest.mark.slow
def test_resume_fails_for_state_left_out_of_the_checkpoint_and_passes_with_it(install):
    with pytest.raises(AssertionError, match=r"plugin 'forgetful': resume \(fp32\): epoch 2: train_loss is"):
        check_plugin(install("forgetful", COUNTING), precisions=())
    check_plugin(install("careful", COUNTING + KEPT), precisions=())


def test_the_registry_validates():
    entries = load_registry_file(REGISTRY)
    assert entries, "the registry lists no plugin"
    assert REGISTRY.read_text() == (ROOT / "registry.yaml").read_text()  # the shipped file is the project's
    for name, (entry, root) in entries.items():
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), f"{name}: not a short name"
        assert (root / entry.path).is_dir(), f"{name}: path {entry.path} is not a folder"
        assert entry.entry_point.split(":")[0] == f"tricks_{name}", f"{name}: module is not tricks_{name}"


def _entry(**changes):
    raw = yaml.safe_load(REGISTRY.read_text())["plugins"][NAMES[0]]
    raw = {**raw, **changes}
    return {k: v for k, v in raw.items() if v is not None}


MALFORMED = {
    "missing summary": (_entry(summary=None), "summary"),
    "unknown hook": (_entry(hooks=["on_batch", "before_everything"]), "hooks"),
    "entry point without colon": (_entry(entry_point="tricks_broken.Broken"), "entry_point"),
    "unknown field": (_entry(colour="red"), "colour"),
    "paper without title": (_entry(paper={"year": 2020}), "paper.title"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_registry_names_the_entry_and_the_field(case, tmp_path):
    raw, field = MALFORMED[case]
    path = tmp_path / "extra.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "plugins": {"broken": raw}}))
    with pytest.raises(tricks.TricksError) as error:
        tricks.resolve(plugins=[], registries=[path])
    message = str(error.value)
    assert "'broken'" in message and field in message, message
    if case == "unknown hook":
        assert "before_everything" in message


def test_the_cli_reports_a_malformed_registry(tmp_path, monkeypatch, capsys):
    from tricks.cli.main import main

    path = tmp_path / "extra.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "plugins": {"broken": _entry(summary=None)}}))
    monkeypatch.setattr("sys.argv", ["tricks", "plugins", "list", "--registry", str(path)])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "'broken'" in err and "summary" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
