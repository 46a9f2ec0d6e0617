"""The contract every registered plugin keeps, and the registry's own validation.

``test_plugin_contract`` runs once per plugin named in registry.yaml: a plugin joins it by
being registered, without a test file of its own for the contract. What it checks:

* the plugin is installed (an entry point in ``tricks.plugins`` from the registry's distribution);
* the registry's ``hooks`` list is exactly the hooks its class implements, each a declared hookspec
  whose arguments the implementation accepts;
* every setting has a default and a description, and the defaults validate;
* its README, at the registry's ``path``, names the paper (title and arXiv id) and has the
  sections a plugin card needs (see README_SECTIONS);
* a one-epoch run with only this plugin (and its ``example_settings``) completes with a finite loss.
"""

from __future__ import annotations

import math
import re
from importlib import metadata
from pathlib import Path

import pluggy
import pytest
import yaml

import tricks
from tricks import hookspecs
from tricks.plugin import implemented_hooks
from tricks.registry import Catalog, default_registry_file, load_registry_file

from conftest import ROOT, TINY_API

REGISTRY = default_registry_file()
NAMES = sorted(load_registry_file(REGISTRY))

# The headings a plugin README needs (searched for, case-insensitively, in its headings).
README_SECTIONS = {
    "the paper's claim": r"\bclaims?\b",
    "the defaults": r"\bdefaults?\b",
    "what we measured": r"^what we measured\b",
}


def _headings(text: str) -> list[str]:
    """The Markdown headings of ``text``, leaving out ``#`` lines inside fenced code."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6}\s+(.+)$", prose, flags=re.MULTILINE)]


@pytest.mark.parametrize("name", NAMES)
def test_plugin_contract(name, tmp_path):
    catalog = Catalog()
    info = catalog.plugins[name]
    entry = info.entry

    # installed, from the distribution and entry point the registry names
    assert info.installed, f"{name} is registered but not installed: {info.install_command()}"
    assert info.entry_point.value == entry.entry_point, f"{name}: entry point differs from the registry's"
    assert metadata.distribution(entry.distribution).entry_points.select(group="tricks.plugins", name=name), (
        f"{name}: distribution {entry.distribution} does not declare the entry point")
    cls = info.load()

    # hooks: the registry's list is what the class implements, and each is a declared hookspec
    implemented = implemented_hooks(cls)
    assert sorted(entry.hooks) == implemented, f"{name}: registry hooks {entry.hooks} != implemented {implemented}"
    declared = {n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), hookspecs.PROJECT + "_spec")}
    assert set(implemented) <= declared, f"{name}: implements undeclared hooks {set(implemented) - declared}"
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(cls(), name=name)  # raises when an implementation takes arguments its spec lacks
    pm.check_pending()

    # settings: every field has a default and a description, and the defaults validate
    for key, field in cls.Settings.model_fields.items():
        assert not field.is_required(), f"{name}.{key} has no default"
        assert field.description and field.description.strip(), f"{name}.{key} has no description"
    defaults = cls.Settings()
    assert cls.Settings(**defaults.model_dump()) == defaults
    assert tricks.resolve(plugins=[name]).settings[name] == defaults

    # README: at the registry's path; names the paper; has the card's sections
    readme = info.root / entry.path / "README.md"
    assert readme.is_file(), f"{name}: no README at {readme}"
    text = readme.read_text()
    assert entry.paper is not None, f"{name}: the registry names no paper"
    assert entry.paper.title.lower() in text.lower(), f"{name}: README does not name the paper {entry.paper.title!r}"
    if entry.paper.arxiv:
        assert entry.paper.arxiv in text, f"{name}: README does not give arXiv {entry.paper.arxiv}"
    headings = [h.lower() for h in _headings(text)]
    for section, pattern in README_SECTIONS.items():
        assert any(re.search(pattern, h) for h in headings), f"{name}: README lacks a section on {section}"

    # a short run with only this plugin
    example = cls.example_settings(tmp_path / "example")
    sets = [f"{name}.{key}={value}" for key, value in example.items()]
    model = cls.example_model or TINY_API["model"]
    summary = tricks.run(plugins=[name], set=sets, epochs=1, out=tmp_path / "run", **{**TINY_API, "model": model})
    assert summary["status"] == "complete"
    assert math.isfinite(summary["final_val_loss"])
    assert summary["plugins"] == [name]


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
