"""Hostile but ordinary input to recipes, registries, core settings and the plugin listing: each is
refused before any work with one line that names the file (with the line and column where the
problem is), the problem and the fix; exit status 2, no traceback. And what is allowed stays
allowed: aliases that share a value, merge keys, a byte-order mark, ``plugins: a,b``."""

from __future__ import annotations

import importlib.metadata as md
import sys
from pathlib import Path

import pytest

import tricks
from processes import cli_in_process, one_line_error
from tricks.config import MAX_DEPTH, read_recipe
from tricks.errors import TricksError
from tricks.registry import Catalog


def write(path: Path, content: str | bytes) -> str:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def run_error(tmp_path, *args: str, fragments=()) -> str:
    """``tricks run ARGS`` in this process: exit 2 with one line holding ``fragments``, and no run folder."""
    out = tmp_path / "never"
    line = one_line_error(*cli_in_process("run", *args, "--out", str(out))[::2], *fragments)
    assert not out.exists(), args
    return line


def laughs(levels: int = 9) -> str:
    """A recipe of a few hundred bytes whose aliases expand to 9**levels strings in core.model."""
    lines = ['  a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"  a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "anchors:\n" + "\n".join(lines) + f"\ncore:\n  model: *a{levels - 1}\n"


# --- the YAML itself -------------------------------------------------------------------------------
def test_a_billion_laughs_recipe_is_refused_while_it_is_read(tmp_path):
    recipe = write(tmp_path / "laughs.yaml", laughs())
    assert (tmp_path / "laughs.yaml").stat().st_size < 500
    line = run_error(tmp_path, "--config", recipe, fragments=("laughs.yaml", "line ", "column ", "aliases"))
    assert "100,000" in line
    with pytest.raises(TricksError, match="aliases are expanded"):
        tricks.resolve(recipe=recipe)


def test_a_deeply_nested_recipe_is_one_line_not_a_recursion_error(tmp_path):
    recipe = write(tmp_path / "deep.yaml", "core:\n  model: " + "[" * 3000 + "]" * 3000 + "\n")
    run_error(tmp_path, "--config", recipe, fragments=("deep.yaml", "line 2, column", f"deeper than {MAX_DEPTH}"))


@pytest.mark.parametrize("content, fragments", [
    (b"core:\n  model: r\xe9snet8\n", ("latin.yaml", "not UTF-8", "byte 0xe9 at line 2, column 11", "save it as UTF-8")),
    (bytes(range(256)), ("latin.yaml", "not UTF-8", "byte 0x80 at line 2, column 118")),  # a binary file given by mistake
    (b"core:\n  epochs: 1\x00\n", ("latin.yaml", "line 2, column 12", "#x0000")),
])
def test_bytes_that_are_not_text_name_the_file_and_the_place(tmp_path, content, fragments):
    run_error(tmp_path, "--config", write(tmp_path / "latin.yaml", content), fragments=fragments)


@pytest.mark.parametrize("content, fragments", [
    ("core:\n  model: [resnet8, resnet20\n  lr: 0.1\n", ("line 3, column 5", "flow sequence at line 2, column 10")),
    ("core:\n\tepochs: 1\n", ("line 2, column 1", "indent with spaces, not tabs")),
    ("core:\n  epochs: 1\n  epochs: 2\n", ("line 3, column 3", "'epochs' appears twice", "first at line 2", "keep one")),
    ("core: {}\n---\ncore: {}\n", ("line 2, column 1", "single document")),
    ("core:\n  model: *nowhere\n", ("line 2, column 10", "undefined alias")),
    ("core: &c\n  model: *c\n", ("line 2, column 10", "cycle")),
])
def test_yaml_errors_keep_their_line_and_column(tmp_path, content, fragments):
    run_error(tmp_path, "--config", write(tmp_path / "bad.yaml", content), fragments=("bad.yaml", *fragments))


def test_a_recipe_cannot_construct_python_objects(tmp_path):
    marker = tmp_path / "ran"
    recipe = write(tmp_path / "evil.yaml", f"core: !!python/object/apply:os.system ['touch {marker}']\n")
    run_error(tmp_path, "--config", recipe, fragments=("evil.yaml", "line 1, column 7", "python/object/apply"))
    assert not marker.exists()


@pytest.mark.parametrize("content, fragments", [
    ("- mixup\n- cosine\n", ("must be a mapping at the top level", "but it is a list")),
    ("plugins: 5\n", ("line 1, column 1", "plugins must be a list of plugin names, not a number", "plugins: [mixup, cosine]")),
    ("plugins: [[mixup]]\n", ("line 1, column 11", "plugins[0] must be a plugin name, not a list")),
    ("plugins: [mixup, null]\n", ("line 1, column 18", "plugins[1] must be a plugin name")),
    ("core: 5\n", ("line 1, column 1", "section 'core' must be a mapping of settings", "core: {epochs: 10")),
    ("plugins: [mixup]\nmixup: 0.2\n", ("line 2, column 1", "section 'mixup' must be a mapping of settings")),
    ("core: {1: 2}\n", ("line 1, column 1", "section 'core' has the key 1")),
    ("1: {}\n", ("line 1, column 1", "section names are plugin names or core")),
])
def test_a_recipe_of_the_wrong_shape_names_the_place_and_the_fix(tmp_path, content, fragments):
    run_error(tmp_path, "--config", write(tmp_path / "shape.yaml", content), fragments=("shape.yaml", *fragments))


def test_a_plugins_string_is_a_comma_separated_list_as_on_the_command_line(tmp_path):
    recipe = write(tmp_path / "r.yaml", "plugins: mixup, cosine\n")
    assert read_recipe(recipe)["plugins"] == ["mixup", "cosine"]
    assert tricks.resolve(recipe=recipe).plugins == ["mixup", "cosine"]
    assert tricks.resolve(recipe={"plugins": "mixup"}).plugins == ["mixup"]  # not m, i, x, u, p
    with pytest.raises(TricksError, match=r"^recipe: plugins must be a list"):
        tricks.resolve(recipe={"plugins": 5})


def test_sections_and_settings_are_named_at_their_line(tmp_path):
    typo = write(tmp_path / "typo.yaml", "plugins: [mixup]\nmixpu:\n  alpha: 0.4\n")
    run_error(tmp_path, "--plugins", "mixup", "--config", typo,
              fragments=("typo.yaml, line 2, column 1", "section 'mixpu' names no plugin", "did you mean mixup?"))
    key = write(tmp_path / "key.yaml", "plugins: [mixup]\nmixup:\n  alpah: 0.4\n")
    run_error(tmp_path, "--config", key, fragments=("key.yaml, line 3, column 3", "unknown setting 'mixup.alpah'",
                                                    "did you mean mixup.alpha?"))
    value = write(tmp_path / "value.yaml", "core:\n  epochs: 1\n  lr: .inf\n")
    run_error(tmp_path, "--config", value, fragments=("value.yaml, line 3, column 3", "'core.lr'", "finite number > 0"))
    # the same value given on the command line is named as such, not at the recipe's line
    line = run_error(tmp_path, "--config", value, "--set", "core.lr=-1", fragments=("'core.lr'",))
    assert "value.yaml" not in line


def test_empty_bom_utf16_aliases_and_merge_keys_are_ordinary_recipes(tmp_path):
    assert read_recipe(write(tmp_path / "empty.yaml", "# nothing yet\n")) == {}
    assert read_recipe(write(tmp_path / "bom.yaml", "\ufeffcore: {epochs: 3}\n".encode()))["core"] == {"epochs": 3}
    assert read_recipe(write(tmp_path / "u16.yaml", "core: {epochs: 4}\n".encode("utf-16")))["core"] == {"epochs": 4}
    shared = write(tmp_path / "shared.yaml", "plugins: [mixup]\nmixup: {alpha: &a 0.3}\ncore: {lr: *a}\n")
    assert tricks.resolve(recipe=shared).core.lr == 0.3
    merged = write(tmp_path / "merge.yaml", "plugins: [mixup]\nmixup:\n  <<: {alpha: 0.3, prob: 0.5}\n  alpha: 0.4\n")
    cfg = tricks.resolve(recipe=merged)
    assert (cfg.settings["mixup"].alpha, cfg.settings["mixup"].prob) == (0.4, 0.5)
    ordinary = write(tmp_path / "ok.yaml", laughs(levels=4))  # 9**4 values: an alias-heavy but modest file
    assert len(read_recipe(ordinary)["core"]["model"]) == 9


def test_a_folder_or_a_missing_file_as_config(tmp_path):
    run_error(tmp_path, "--config", str(tmp_path), fragments=("is a folder without a config.yaml", "run directory"))
    run_error(tmp_path, "--config", str(tmp_path / "missing.yaml"), fragments=("missing.yaml", "does not exist"))
    write(tmp_path / "file.yaml", "core: {}\n")
    run_error(tmp_path, "--config", str(tmp_path / "file.yaml" / "config.yaml"), fragments=("cannot be read",))


# --- core settings ---------------------------------------------------------------------------------
@pytest.mark.parametrize("args, fragments", [
    (["--lr", "inf"], ("--lr inf", "must be a finite number > 0")),
    (["--lr", "nan"], ("--lr nan", "must be a finite number > 0")),
    (["--lr", "-1"], ("--lr -1.0", "must be a finite number > 0")),
    (["--lr", "1e400"], ("--lr inf", "finite")),
    (["--epochs", "0"], ("--epochs 0", "must be a whole number >= 1")),
    (["--epochs", "-3"], ("--epochs -3", "must be a whole number >= 1")),
    (["--batch-size", "0"], ("--batch-size 0", "must be a whole number >= 1")),
    (["--momentum", "1"], ("--momentum 1.0", ">= 0 and < 1")),
    (["--set", "core.weight_decay=.inf"], ("'core.weight_decay'", "must be a finite number >= 0")),
    (["--set", "core.weight_decay=nan"], ("'core.weight_decay'", "must be a finite number >= 0")),
    (["--set", "core.epochs="], ("'core.epochs'", "whole number >= 1")),
])
def test_numeric_core_settings_out_of_range_say_the_range(tmp_path, args, fragments):
    run_error(tmp_path, *args, fragments=fragments)


@pytest.mark.parametrize("item, fragments", [
    ("lr", ("--set 'lr'", "expected section.key=value")),
    ("=3", ("expected section.key=value",)),
    ("a.b.c=1", ("more than one dot",)),
    ("core.model=" + "[" * 3000, ("--set core.model=[[[", "deeper than")),
    ("core.model=&a [*a]", ("cycle",)),
])
def test_set_values_are_read_within_the_same_bounds(tmp_path, item, fragments):
    line = run_error(tmp_path, "--set", item, fragments=fragments)
    assert len(line) < 400  # a long value is shortened in the message


# --- registries ------------------------------------------------------------------------------------
ENTRY = ("    distribution: tricks-{n}\n    entry_point: tricks_mixup:Mixup\n    path: plugins/{n}\n"
         "    hooks: [on_batch]\n    category: test\n    summary: a test entry\n")


def entry(name: str, extra: str = "") -> str:
    return f"  {name}:\n" + ENTRY.format(n=name) + extra


@pytest.mark.parametrize("content, fragments", [
    ("- mixup\n", ("must be a mapping at the top level", "plugins:")),
    ("", ("but it is empty",)),
    ("plugins:\n  - distribution: x\n", ("line 1, column 1", "plugins must be a mapping of name -> entry")),
    ("plugin: {}\n", ("line 1, column 1", "unknown top-level key 'plugin'")),
    ("version: 2\nplugins: {}\n", ("line 1, column 1", "version 2", "write version: 1")),
    ("plugins:\n" + entry("core"), ("line 2, column 3", "'core' is a section of every config", "rename it")),
    ("plugins:\n" + entry("my plugin"), ("line 2, column 3", "letters, digits")),
    ("plugins:\n  foo: bar\n", ("line 2, column 3", "entry 'foo' must be a mapping of fields")),
    ("plugins:\n" + entry("foo", "    after: mixup\n"), ("line 9, column 5", "field 'after'", "after: [a, b]")),
    ("plugins:\n" + entry("foo", "    after: [mixpu]\n"),
     ("line 9, column 5", "entry 'foo' names 'mixpu' in after, which is no plugin", "did you mean mixup?")),
    ("plugins:\n" + entry("foo", "    before: [foo]\n"), ("line 9, column 5", "names itself in before")),
    ("plugins:\n" + entry("foo") + entry("foo"), ("line 9, column 3", "'foo' appears twice")),
    (b"plugins: {}\n# caf\xe9\n", ("not UTF-8", "line 2, column 6")),
])
def test_a_bad_registry_names_the_file_the_place_and_the_fix(tmp_path, content, fragments):
    registry = write(tmp_path / "extra.yaml", content)
    one_line_error(*cli_in_process("plugins", "list", "--registry", registry)[::2], "extra.yaml", *fragments)


def test_a_missing_registry_from_the_environment_says_where_it_came_from(tmp_path, monkeypatch):
    monkeypatch.setenv("TRICKS_REGISTRY", str(tmp_path / "gone.yaml"))
    one_line_error(*cli_in_process("plugins", "list")[::2], "TRICKS_REGISTRY", "gone.yaml", "does not exist")


def installed_catalog(*registries: str) -> Catalog:
    """A catalog of these registries in which every plugin counts as installed (as the mixup class)."""
    catalog = Catalog(list(registries))
    for info in catalog.plugins.values():
        info.entry_point = info.entry_point or md.EntryPoint(info.name, "tricks_mixup:Mixup", "tricks.plugins")
    return catalog


def test_a_cycle_names_its_plugins_the_files_and_the_fix(tmp_path):
    one = write(tmp_path / "one.yaml", "plugins:\n" + entry("foo", "    after: [bar]\n") + entry("baz", "    after: [foo]\n"))
    two = write(tmp_path / "two.yaml", "plugins:\n" + entry("bar", "    after: [qux]\n") + entry("qux"))
    three = write(tmp_path / "three.yaml", "plugins:\n" + entry("loop", "    after: [foo]\n    before: [bar]\n"))
    catalog = installed_catalog(one, two, three)
    assert [i.name for i in catalog.resolve(["foo", "bar", "qux", "baz"])] == ["qux", "bar", "foo", "baz"]
    assert [i.name for i in catalog.resolve(["foo", "cosine"])] == ["foo", "cosine"]  # bar is not in the run
    with pytest.raises(TricksError) as error:
        catalog.resolve(["baz", "loop", "foo", "bar"])
    message = str(error.value)
    assert message.startswith("plugins foo, bar, loop have circular after/before constraints: ")
    assert f"foo after bar (registry {one}, line 9, column 5)" in message
    assert f"loop before bar (registry {three}, line 10, column 5)" in message
    assert f"loop after foo (registry {three}, line 9, column 5)" in message
    assert message.endswith("; remove one of these after/before entries") and "baz" not in message


# --- the plugin listing ----------------------------------------------------------------------------
GOOD = '''import tricks


class Good(tricks.Plugin):
    """A third-party plugin that works."""

    @tricks.hookimpl
    def on_batch(self, ctx, batch):
        return batch
'''


@pytest.fixture
def site(tmp_path, monkeypatch):
    """``install(dist, entry_points, module=None, source=None, version="0.3")``: a distribution
    installed for this test only (a dist-info folder on ``sys.path``), with its module if given."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    modules = []

    def install(dist: str, entry_points: str, module: str | None = None, source: str = "",
                version: str | None = "0.3") -> None:
        info = folder / f"{dist}-{version or '0'}.dist-info"
        info.mkdir()
        meta = f"Metadata-Version: 2.1\nName: {dist}\n" + (f"Version: {version}\n" if version else "")
        (info / "METADATA").write_text(meta + f"Summary: the {dist} distribution\n")
        (info / "entry_points.txt").write_text(f"[tricks.plugins]\n{entry_points}\n")
        if module:
            (folder / f"{module}.py").write_text(source)
            modules.append(module)

    yield install
    for module in modules:
        sys.modules.pop(module, None)


def test_a_broken_third_party_plugin_is_a_row_and_the_rest_are_listed(site):
    site("tp_good", "tpgood = tp_good_mod:Good", "tp_good_mod", GOOD)
    site("tp_boom", "tpboom = tp_boom_mod:Boom", "tp_boom_mod", "raise ImportError('needs libfoo')\n")
    site("tp_exit", "tpexit = tp_exit_mod:Exit", "tp_exit_mod", "import sys\nsys.exit(3)\n")
    site("tp_odd", "tpodd = tp_good_mod:Good", version=None)  # no version in its metadata
    site("tp_core", "core = tp_good_mod:Good")  # a name no plugin can have
    code, out, err = cli_in_process("plugins", "list")
    assert code == 0, err
    rows = {line.split("\t")[0]: line.split("\t") for line in out.splitlines()}
    assert rows["tpgood"][1:5] == ["yes", "0.3", "on_batch", "third-party"]
    assert rows["tpboom"][3:5] == ["-", "broken"] and "ImportError: needs libfoo" in rows["tpboom"][5]
    assert rows["tpexit"][4] == "broken" and "SystemExit: 3" in rows["tpexit"][5]
    assert rows["tpodd"][1:3] == ["yes", "-"]
    assert "mixup" in rows and "cosine" in rows and "core" not in rows
    notes = err.strip().splitlines()
    assert "note: plugin 'tpboom' is broken: see its row" in notes
    assert any("'core'" in n and "rename it" in n for n in notes) and "Traceback" not in err
    one_line_error(*cli_in_process("plugins", "show", "tpboom")[::2], "plugin 'tpboom'", "fails to import",
                   "needs libfoo", "reinstall it")


def test_plugins_list_imports_third_party_plugins_only_when_asked(site, tmp_path):
    marker = tmp_path / "imported"
    site("tp_loud", "tploud = tp_loud_mod:Good", "tp_loud_mod", f"open({str(marker)!r}, 'w').close()\n" + GOOD)
    code, out, err = cli_in_process("plugins", "list", "--no-import", "--json")
    assert code == 0, err
    row = next(r for r in __import__("json").loads(out) if r["name"] == "tploud")
    assert row["summary"] == "the tp_loud distribution" and row["hooks"] == [] and row["error"] is None
    assert not marker.exists() and "tp_loud_mod" not in sys.modules
    assert cli_in_process("plugins", "list")[0] == 0 and marker.exists()  # the default describes it from its class
    code, out, _ = cli_in_process("plugins", "list", "--help")
    assert "imported" in " ".join(out.split()) and "--no-import" in out


def test_a_third_party_class_that_names_plugins_badly(site):
    site("tp_after", "tpafter = tp_after_mod:After", "tp_after_mod",
         "import tricks\nclass After(tricks.Plugin):\n    after = 'mixup'\n")
    site("tp_ghost", "tpghost = tp_ghost_mod:Ghost", "tp_ghost_mod",
         "import tricks\nclass Ghost(tricks.Plugin):\n    before = ('mixpu',)\n")
    with pytest.raises(TricksError, match=r"class tp_after_mod.After has after = 'mixup', which is not a tuple"):
        tricks.resolve(plugins="tpafter")
    with pytest.raises(TricksError, match=r"names 'mixpu' in before, which is no plugin \(did you mean mixup\?\)"):
        tricks.resolve(plugins="tpghost")
