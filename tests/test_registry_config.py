"""Registry validation, plugin resolution, and config sources (defaults < recipe < flags < --set)."""

from __future__ import annotations

import textwrap

import pytest
import yaml

import tricks
from tricks.config import parse_set
from tricks.errors import TricksError
from tricks.registry import Catalog

from conftest import TINY, read_jsonl, run_cli
from processes import cli_in_process, one_line_error

ENTRY = dict(distribution="tricks-{n}", entry_point="tricks_{n}:P", path="plugins/{n}", hooks=["on_batch"],
             category="test", summary="a test entry")


def write_registry(tmp_path, entries: dict) -> str:
    plugins = {}
    for name, fields in entries.items():
        entry = {k: (v.format(n=name) if isinstance(v, str) else v) for k, v in ENTRY.items()}
        entry.update(fields)
        plugins[name] = entry
    path = tmp_path / "extra.yaml"
    path.write_text(yaml.safe_dump({"plugins": plugins}))
    return str(path)


def test_unknown_plugin_suggests_close_names():
    with pytest.raises(TricksError, match=r"unknown plugin 'mixpu': did you mean mixup\b"):
        tricks.resolve(plugins="mixpu")


def test_registered_but_not_installed_prints_install_command(tmp_path):
    (tmp_path / "plugins" / "ghost").mkdir(parents=True)
    reg = write_registry(tmp_path, {"ghost": {}})
    with pytest.raises(TricksError, match=r"plugin 'ghost' is registered but not installed: run `pip install -e .*ghost`"):
        tricks.resolve(plugins="ghost", registries=[reg])
    result = run_cli("run", "--plugins", "ghost", "--registry", reg)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "pip install -e" in result.stderr


def test_two_schedules_conflict(tmp_path):
    # A second plugin providing a schedule, pointing at an installed class so it resolves.
    reg = write_registry(tmp_path, {"othersched": {"entry_point": "tricks_cosine:Cosine", "provides": ["schedule"],
                                                   "hooks": ["configure_schedule"]}})
    import importlib.metadata as md

    catalog = Catalog([reg])
    catalog.plugins["othersched"].entry_point = md.EntryPoint("othersched", "tricks_cosine:Cosine", "tricks.plugins")
    with pytest.raises(TricksError, match=r"plugins 'cosine' and 'othersched' conflict: both provide the schedule"):
        tricks.resolve(plugins="cosine,othersched", catalog=catalog)


def test_explicit_conflicts_requirements_and_order(tmp_path):
    import importlib.metadata as md

    reg = write_registry(tmp_path, {
        "a": {"conflicts": ["b"]},
        "b": {},
        "g": {"conflicts": ["b"], "reasons": {"b": "g needs what b takes away"}},
        "c": {"requires": ["d"]},
        "d": {"after": ["e"]},
        "e": {},
        "f": {"before": ["e"]},
        "x": {"after": ["y"]},
        "y": {"after": ["x"]},
    })
    catalog = Catalog([reg])
    for info in catalog.plugins.values():
        info.entry_point = info.entry_point or md.EntryPoint(info.name, "tricks_mixup:Mixup", "tricks.plugins")
    with pytest.raises(TricksError, match=r"plugins 'a' and 'b' conflict: use one of them$"):
        catalog.resolve(["a", "b"])
    # a reason declared by either side is printed, whichever order the plugins are named in
    for names in (["g", "b"], ["b", "g"]):
        with pytest.raises(TricksError, match=r"conflict: g needs what b takes away; use one of them$"):
            catalog.resolve(names)
    with pytest.raises(TricksError, match=r"plugin 'c' requires 'd': add it to --plugins"):
        catalog.resolve(["c"])
    assert [i.name for i in catalog.resolve(["d", "e", "c"])] == ["e", "d", "c"]
    assert [i.name for i in catalog.resolve(["e", "f"])] == ["f", "e"]
    assert [i.name for i in catalog.resolve(["mixup", "cosine"])] == ["mixup", "cosine"]
    assert [i.name for i in catalog.resolve(["cosine", "mixup"])] == ["cosine", "mixup"]
    with pytest.raises(TricksError, match="circular"):
        catalog.resolve(["x", "y"])
    with pytest.raises(TricksError, match="named twice"):
        catalog.resolve(["e", "e"])


@pytest.mark.parametrize("fields, message", [
    ({"summary": None}, r"entry 'bad': field 'summary'"),
    ({"hooks": ["on_batchh"]}, r"entry 'bad': field 'hooks.*unknown hook 'on_batchh'"),
    ({"entry_point": "nocolon"}, r"entry 'bad': field 'entry_point'.*module:Object"),
    ({"colour": "red"}, r"entry 'bad': field 'colour'"),
    ({"reasons": {"mixup": "why"}}, r"entry 'bad'.*reasons names 'mixup', which is not in conflicts"),
])
def test_malformed_registry_names_entry_and_field(tmp_path, fields, message):
    entry = {"distribution": "d", "entry_point": "m:O", "path": "p", "hooks": ["on_batch"], "category": "c", "summary": "s"}
    entry.update(fields)
    entry = {k: v for k, v in entry.items() if v is not None}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"plugins": {"bad": entry}}))
    with pytest.raises(TricksError, match=message):
        Catalog([path])


def test_set_parsing():
    assert parse_set("mixup.alpha=0.4") == ("mixup", "alpha", 0.4)
    assert parse_set("epochs=3") == ("core", "epochs", 3)
    assert parse_set("core.data_dir=some/dir") == ("core", "data_dir", "some/dir")
    assert parse_set("core.augment=false") == ("core", "augment", False)
    with pytest.raises(TricksError, match="expected section.key=value"):
        parse_set("mixup.alpha")


def test_bad_settings_name_the_key():
    with pytest.raises(TricksError, match=r"bad value for 'mixup.alpha': Input should be greater than 0"):
        tricks.resolve(plugins="mixup", sets=["mixup.alpha=-1"])
    with pytest.raises(TricksError, match=r"unknown setting 'mixup.alfa' \(did you mean mixup.alpha\?\); mixup accepts: alpha"):
        tricks.resolve(plugins="mixup", sets=["mixup.alfa=1"])
    with pytest.raises(TricksError, match=r"bad value for 'core.epochs'"):
        tricks.resolve(overrides={"epochs": 0})
    with pytest.raises(TricksError, match=r"bad value for 'core.precision'"):
        tricks.resolve(sets=["core.precision=fp8"])
    with pytest.raises(TricksError, match=r"'cosine' is not a plugin of this run"):
        tricks.resolve(plugins="mixup", sets=["cosine.final_lr=0.1"])


def test_sources_later_wins(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent("""\
        plugins: [mixup, cosine]
        core: {epochs: 7, lr: 0.05, seed: 3}
        mixup: {alpha: 0.5}
        """))
    cfg = tricks.resolve(recipe=recipe)
    assert cfg.plugins == ["mixup", "cosine"]
    assert (cfg.core.epochs, cfg.core.lr, cfg.core.seed, cfg.core.batch_size) == (7, 0.05, 3, 64)
    assert cfg.settings["mixup"].alpha == 0.5 and cfg.settings["mixup"].prob == 1.0
    cfg = tricks.resolve(recipe=recipe, overrides={"epochs": 2}, sets=["core.epochs=4", "mixup.alpha=0.3"])
    assert cfg.core.epochs == 4 and cfg.settings["mixup"].alpha == 0.3
    cfg = tricks.resolve(plugins="mixup", recipe=recipe)  # --plugins replaces the recipe's list
    assert cfg.plugins == ["mixup"] and cfg.settings["mixup"].alpha == 0.5
    bad = tmp_path / "bad.yaml"
    bad.write_text("plugins: [mixup]\ncosine: {final_lr: 0.1}\n")
    with pytest.raises(TricksError, match="config section 'cosine' names no plugin of this run"):
        tricks.resolve(recipe=bad)


@pytest.mark.slow
def test_cli_errors_are_one_line_exit_2(tmp_path):
    cases = [
        (["--plugins", "mixpu"], "did you mean mixup"),
        (["--plugins", "mixup", "--set", "mixup.alpha=-1"], "mixup.alpha"),
        (["--plugins", "mixup", "--set", "mixup.alfa=1"], "mixup.alfa"),
        (["--model", "resnet21"], "unknown model 'resnet21'"),
        (["--dataset", "npz"], "--data-dir"),
        (["--dataset", "npz", "--data-dir", str(tmp_path)], "npz shards in"),
        (["--config", str(tmp_path / "missing.yaml")], "does not exist"),
        (["--batch-size", "4096"], "larger than the training set"),
        (["--resume", str(tmp_path / "nothing")], "no config.yaml"),
    ]
    for args, needle in cases:
        out = [] if "--resume" in args else ["--out", str(tmp_path / "never")]
        one_line_error(*cli_in_process("run", *args, "--epochs", "1", *out)[::2], needle)
        assert not (tmp_path / "never").exists(), args  # nothing written for a run that never started
    # and once in a process of its own, as a user meets it
    result = run_cli("run", "--plugins", "mixup", "--set", "mixup.alpha=-1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    one_line_error(result.returncode, result.stderr, "mixup.alpha")


@pytest.mark.slow
def test_config_repeats_the_run(tmp_path):
    first = run_cli("run", "--plugins", "mixup,cosine", "--epochs", "2", "--seed", "5", *TINY,
                    "--set", "mixup.alpha=0.4", "--out", str(tmp_path / "a"), "--quiet")
    assert first.returncode == 0, first.stderr
    config = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert config["plugins"] == ["mixup", "cosine"] and config["core"]["seed"] == 5
    assert config["mixup"]["alpha"] == 0.4 and set(config["versions"]) == {"tricks", "mixup", "cosine"}
    again = run_cli("run", "--config", str(tmp_path / "a" / "config.yaml"), "--out", str(tmp_path / "b"), "--quiet")
    assert again.returncode == 0, again.stderr
    a, b = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("epoch_seconds", "images_per_second")} for r in rows]
    assert strip(a) == strip(b)
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text()) == config


def test_version_drift_of_a_recipe_is_reported():
    cfg = tricks.resolve(plugins="mixup,cosine")
    assert cfg.version_drift(cfg.versions) == []
    assert cfg.version_drift({"mixup": "0.0.9", "cosine": cfg.versions["cosine"], "gone": "1.0"}) == [
        f"mixup 0.0.9 -> {cfg.versions['mixup']}"]
    assert cfg.version_drift(None) == []


def test_a_model_name_brings_the_plugin_that_builds_it():
    assert tricks.resolve(overrides={"model": "regnetx_200mf"}).plugins == ["regnet"]
    assert tricks.resolve(plugins="cosine", sets=["core.model=regnety_1.6gf"]).plugins == ["cosine", "regnet"]
    assert tricks.resolve(recipe={"core": {"model": "anynet"}}).plugins == ["regnet"]
    assert tricks.resolve(plugins="regnet", overrides={"model": "regnetx_400mf"}).plugins == ["regnet"]
    assert tricks.resolve(overrides={"model": "resnet20"}).plugins == []
    # a plugin that provides the model itself is left to build (or refuse) the name
    assert tricks.resolve(plugins="resnet_tweaks", overrides={"model": "regnetx_200mf"}).plugins == ["resnet_tweaks"]
    assert Catalog().model_provider("regnetx_3.2gf") == "regnet" and Catalog().model_provider("resnet50") is None


def test_registry_models_field_is_validated(tmp_path):
    path = tmp_path / "extra.yaml"
    path.write_text(textwrap.dedent("""
        version: 1
        plugins:
          mine:
            distribution: tricks-mine
            entry_point: tricks_mine:Mine
            path: mine
            hooks: [build_model]
            category: model
            summary: x
            models: mynet_*
    """))
    with pytest.raises(TricksError, match="models"):
        Catalog([path])
