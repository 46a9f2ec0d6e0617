"""``tricks``: run experiments, list and show plugins, start a plugin of your own.

Plugins add commands through the entry point group ``tricks.commands``; :class:`TricksGroup` imports
a plugin's command only when it runs or its help is asked for, so that ``tricks --help`` and
``tricks plugins list`` start in a fraction of a second, without torch.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from tricks.cli import options
from tricks.cli.compare import compare
from tricks.cli.ensemble import ensemble
from tricks.cli.options import SectionedCommand, core_options
from tricks.errors import Diverged, PluginHookError, TricksError

PLUGIN_SECTION = "Commands from plugins"


class TricksGroup(TyperGroup):
    """The ``tricks`` commands, then those that installed plugins add, each loaded on first use."""

    def _plugin_commands(self, ctx) -> dict:
        """Entry points of the group ``tricks.commands`` by name, built-in names excluded (read once per invocation)."""
        if "tricks.commands" not in ctx.meta:
            from importlib import metadata

            eps = {}
            for ep in metadata.entry_points(group="tricks.commands"):
                if ep.name not in self.commands and ep.name not in eps:
                    eps[ep.name] = ep
            ctx.meta["tricks.commands"] = eps
        return ctx.meta["tricks.commands"]

    def list_commands(self, ctx):
        return [*super().list_commands(ctx), *sorted(self._plugin_commands(ctx))]

    def get_command(self, ctx, name):
        """A built-in command, or a plugin command's stand-in that only describes it (for listings)."""
        command = super().get_command(ctx, name)
        ep = self._plugin_commands(ctx).get(name) if command is None else None
        if ep is not None:
            command = TyperCommand(name=name, help=_summary(ep))
            command.entry_point = ep
        return command

    def format_commands(self, ctx, formatter) -> None:
        """The built-in commands, then those from plugins, each with its one-line help."""
        sections: dict[str, list[tuple[str, str]]] = {}
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                title = PLUGIN_SECTION if hasattr(command, "entry_point") else "Commands"
                sections.setdefault(title, []).append((name, command.get_short_help_str(formatter.width - 6 - len(name))))
        for title, rows in sections.items():
            with formatter.section(title):
                formatter.write_dl(rows)

    def resolve_command(self, ctx, args):
        """The command to run: a plugin's command is imported here, when it is the one invoked."""
        name, command, rest = super().resolve_command(ctx, args)
        ep = getattr(command, "entry_point", None)
        return name, (_load_command(name, ep) if ep is not None else command), rest


def _summary(ep) -> str:
    """The first paragraph of the docstring of an entry point's function, read from its source
    without importing it: a plugin's module may import torch, which takes seconds."""
    try:
        module, _, attr = ep.value.partition(":")
        parts = module.split(".")
        spec = importlib.util.find_spec(parts[0])  # a top-level name: found, not imported
        for i in range(1, len(parts)):
            spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:i + 1]), spec.submodule_search_locations)
        for node in ast.parse(Path(spec.origin).read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name == attr:
                return " ".join((ast.get_docstring(node) or "").split("\n\n")[0].split())
    except Exception:  # no source to read: the command is listed without a description
        pass
    return ""


def _load_command(name: str, ep):
    """The click command of a plugin's function, or one that fails with a one-line error when the
    plugin does not import (a broken plugin must not break the other commands)."""
    try:
        fn = ep.load()
    except Exception as error:
        message = (f"command '{name}' comes from a plugin that fails to import "
                   f"({type(error).__name__}: {error}); reinstall that plugin")

        def fn():
            raise TricksError(message)

        fn.__doc__ = f"Unavailable: {message}"
    single = typer.Typer(rich_markup_mode=None, add_completion=False, pretty_exceptions_enable=False)
    single.command(name, cls=SectionedCommand)(fn)
    return typer.main.get_command(single)


# Plain help (rich_markup_mode=None): click's layout reflows to the terminal and keeps option names whole.
app = typer.Typer(cls=TricksGroup, rich_markup_mode=None, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False, help="Train image classifiers with composable bag-of-tricks plugins.")
plugins_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True, help="List and inspect plugins.")
app.add_typer(plugins_app, name="plugins")
console = Console()
err_console = Console(stderr=True)


@app.command(cls=SectionedCommand)
@core_options()
def run(
    core: dict,
    plugins: Optional[str] = typer.Option(None, "--plugins", "-p", help="Comma-separated plugin names, e.g. mixup,cosine (replaces the recipe's list)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A YAML recipe, or a run directory's config.yaml, to start from."),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override one setting: plugin.key=value or core.key=value (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory to create (when not given: runs/TIME-PLUGINS)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory from its last checkpoint."),
    registry: Optional[List[Path]] = typer.Option(None, "--registry", help="An extra registry file (repeatable; also TRICKS_REGISTRY)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object per epoch and the summary, nothing else."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the run directory at the end."),
):
    """Train a model with the named plugins and write a run directory.

    The run directory holds config.yaml (the resolved config: repeat the run with
    --config RUN_DIR/config.yaml), metrics.jsonl, summary.json, checkpoints/last.pt and
    curves.png. Settings come from the plugins' defaults, then --config, then the flags,
    then --set.
    """
    import tricks
    from tricks.config import read_recipe

    from .reporters import JsonReporter, QuietReporter, RichReporter

    if resume is not None and config is not None:
        raise TricksError("--resume continues a run with its own config; drop --config (flags and --set still apply)")
    if resume is not None and out is not None and out != resume:
        raise TricksError("--resume writes into the run directory it continues; drop --out")
    if resume is not None and not tricks.RunDir(resume).has_run():
        raise TricksError(f"{resume} holds no run (no {tricks.RunDir.CONFIG}); start one with --out {resume}")
    if json_out and quiet:
        raise TricksError("choose one of --json and --quiet")
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        reporter = tricks.Reporter()
    elif json_out:
        reporter = JsonReporter()
    elif quiet:
        reporter = QuietReporter()
    else:
        reporter = RichReporter(console)
    recipe = read_recipe(resume) if resume is not None else (read_recipe(config) if config is not None else None)
    cfg = tricks.resolve(plugins=plugins, recipe=recipe, overrides=core, sets=set_, registries=registry)
    drift = cfg.version_drift((recipe or {}).get("versions"))
    if drift and rank == 0:
        err_console.print(f"note: the recipe was written with other versions ({', '.join(drift)}); "
                          "results may differ", markup=False, highlight=False, soft_wrap=True)
    tricks.run(cfg, out=resume or out, resume=resume, reporter=reporter)


@app.command(cls=SectionedCommand)
@core_options()
def ablate(
    core: dict,
    plugins: str = typer.Option(..., "--plugins", "-p", help="The tricks to add to the baseline, comma-separated, in order."),
    cumulative: bool = typer.Option(False, "--cumulative", help="Add the tricks one after another, as the paper's tables do (without it: each trick alone)."),
    both: bool = typer.Option(False, "--both", help="Train each trick alone and the cumulative sequence."),
    all_together: bool = typer.Option(False, "--all", help="With each trick alone: also train every trick at once."),
    grid: Optional[List[str]] = typer.Option(None, "--grid", help="A sweep over one or more settings, crossed with the "
                                             "configurations and seeds: plugin.key=v1,v2,... or core.key=v1,v2,... (repeatable)."),
    seeds: int = typer.Option(1, "--seeds", help="Seeds per configuration: the core seed, +1, ..."),
    base: Optional[str] = typer.Option(None, "--base", help="Plugins in every configuration, the baseline included, e.g. step."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A YAML recipe every configuration starts from (its plugin list is replaced)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="plugin.key=value or core.key=value, applied to every configuration that has the plugin (repeatable)."),
    out: Path = typer.Option(Path("ablation"), "--out", "-o", help="The ablation directory; run the same command again to resume it."),
    registry: Optional[List[Path]] = typer.Option(None, "--registry", help="An extra registry file (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the ablation directory at the end."),
    gpus: Optional[str] = options.gpus_option(),
    per_gpu: int = options.per_gpu_option(),
    backend: str = options.backend_option(),
    address: Optional[str] = options.address_option(),
    retry_failed: bool = options.retry_failed_option(),
):
    """Train the baseline and the baseline with each trick added, over seeds, and tabulate.

    Writes OUT/table.md and table.csv (per configuration: mean and spread of the final and best
    validation accuracy over seeds, delta against the baseline, time), results.csv (per run),
    chart.png, and every run under OUT/runs/. Interrupted ablations resume where they stopped
    when the same command is run again; finished runs are not repeated. A run whose loss became
    non-finite shows as "diverged" in the tables, is left out of the comparison with the baseline,
    and is never trained again. Runs that failed are recorded, the others go on, and the command
    then exits non-zero naming the first.
    """
    from tricks.ablate import ablate as run_ablation
    from tricks.config import read_recipe

    from .reporters import AblationProgress, exit_if_failed

    if cumulative and both:
        raise TricksError("choose one of --cumulative and --both")
    mode = "both" if both else "cumulative" if cumulative else "alone"
    names = [p.strip() for p in plugins.split(",") if p.strip()]
    base_names = [p.strip() for p in (base or "").split(",") if p.strip()]
    reporter = AblationProgress(console, quiet)
    run_ablation(names, mode=mode, seeds=seeds, base=base_names, all_together=all_together, grid=list(grid or []),
                 recipe=read_recipe(config) if config else None, overrides=core, sets=set_, out=out,
                 registries=registry, reporter=reporter, gpus=gpus, per_gpu=per_gpu,
                 backend=backend, address=address, retry_failed=retry_failed)
    exit_if_failed(reporter.failures, "runs of the ablation", err_console)


def _catalog(registry):
    from tricks.registry import Catalog

    return Catalog(registry)


app.command("compare")(compare)
app.command("ensemble")(ensemble)


@plugins_app.command("list")
def plugins_list(
    registry: Optional[List[Path]] = typer.Option(None, "--registry", help="An extra registry file (repeatable)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    no_import: bool = typer.Option(False, "--no-import", help="Describe third-party plugins from their distribution's "
                                   "metadata only: import nothing (their hooks are not shown)."),
):
    """Every plugin in the registry and every installed third-party plugin.

    Registered plugins are described from the registry, without importing them. A third-party
    plugin (installed, not in the registry) is imported to read its hooks and description from its
    class, so its module's import-time code runs; --no-import lists it from its distribution's
    metadata instead. A plugin that fails to import is listed with its error (category 'broken')
    and the others are listed all the same; a note on stderr names it, and the exit status is 0.

    On a terminal: a table. Through a pipe: one plugin per line, tab-separated: name, installed
    (yes/no), version, hooks (comma-separated), category, summary; '-' where there is nothing.
    With --json, each plugin's 'error' says why it is broken (null when it is not).
    """
    catalog = _catalog(registry)
    rows = plugin_rows(catalog, imports=not no_import)
    if json_out:
        print(json.dumps(rows, indent=2))
    else:
        print_plugins(rows, console)
    broken = [r["name"] for r in rows if r["error"]]
    notes = [*(f"plugin '{n}' is broken: see its row" for n in broken), *getattr(catalog, "problems", [])]
    for note in notes:
        err_console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)


def _dist_summary(info) -> str:
    """The one-line summary of a plugin's installed distribution, read from its metadata."""
    try:
        return " ".join(str(info.entry_point.dist.metadata["Summary"] or "").split())
    except Exception:  # no distribution or unreadable metadata: no summary
        return ""


def plugin_rows(catalog, imports: bool = True) -> list[dict]:
    """One dict per plugin, sorted by name: what ``plugins list`` shows. A third-party plugin is
    imported to describe it (not with ``imports=False``); one that fails to is a row of its own
    with category 'broken', its error as summary and in 'error'."""
    rows = []
    for name in sorted(catalog.plugins):
        info = catalog.plugins[name]
        row = {"name": name, "installed": info.installed, "version": info.version, "third_party": info.third_party,
               "hooks": [], "category": "", "summary": "", "error": None}
        try:
            if info.third_party and not imports:
                row.update(category="third-party", summary=_dist_summary(info))
            else:
                row.update(hooks=list(info.hooks), summary=str(info.summary or ""),
                           category=str(info.meta("category") or "") if (info.entry or info.installed) else "")
        except TricksError as error:
            row.update(hooks=[], category="broken", summary=str(error), error=str(error))
        rows.append(row)
    return rows


def print_plugins(rows: list[dict], console: Console) -> None:
    """A table on a terminal: a line per plugin (and per hook), in which no plugin or hook name is
    broken or cut, the summary cut to the width left; plain tab-separated lines otherwise, for
    grep, cut and awk."""
    if not console.is_terminal:
        for r in rows:
            fields = [r["name"], "yes" if r["installed"] else "no", r["version"] or "-", ",".join(r["hooks"]) or "-",
                      r["category"] or "-", r["summary"] or "-"]
            console.file.write("\t".join(" ".join(str(f).split()) for f in fields) + "\n")
        console.file.flush()
        return
    table = Table(title="tricks plugins", caption="details: tricks plugins show NAME", box=None, padding=(0, 1),
                  pad_edge=False, title_justify="left", caption_justify="left")
    third_party = ["(third-party)"] if any(r["third_party"] for r in rows) else []
    columns = {"name": [r["name"] for r in rows], "version": ["version", "no"] + [r["version"] or "" for r in rows],
               "hooks": ["hooks"] + [h for r in rows for h in r["hooks"]], "category": ["category"] + [r["category"] for r in rows] + third_party}
    widths = {col: max(map(len, cells)) for col, cells in columns.items()}
    for col, width in widths.items():  # as wide as their longest entry: nothing in them is cut or folded
        table.add_column(col, width=width, no_wrap=True, style="bold" if col == "name" else None)
    room = console.width - sum(widths.values()) - 2 * len(widths)  # what the padding between columns leaves
    if room >= 10:
        table.add_column("summary", width=room, no_wrap=True)
    for r in rows:
        version = (r["version"] or "") if r["installed"] else "no"
        category = "\n".join(c for c in (r["category"], "(third-party)" if r["third_party"] else "") if c)
        cells = [Text(r["name"]), Text(version), Text("\n".join(r["hooks"])), Text(category),
                 Text(r["summary"] or "", no_wrap=True, overflow="ellipsis")]
        table.add_row(*cells[:len(table.columns)])
    console.print(table)


@plugins_app.command("show")
def plugins_show(
    name: str = typer.Argument(..., help="The plugin's short name."),
    registry: Optional[List[Path]] = typer.Option(None, "--registry", help="An extra registry file (repeatable)."),
):
    """A plugin's settings (type, default, description), paper, conflicts and order.

    An installed plugin is imported to read its settings (its module's import-time code runs);
    one that fails to import is a one-line error with the command that reinstalls it.
    """
    from tricks.registry import EXCLUSIVE

    catalog = _catalog(registry)
    if name not in catalog.plugins:
        catalog.get(name)  # raises with suggestions
    info = catalog.plugins[name]
    console.print(f"[bold]{name}[/bold]  {info.summary}")
    console.print(f"installed: {'yes, ' + str(info.version) if info.installed else 'no - ' + info.install_command()}"
                  f"{'  (third-party: not in the registry)' if info.third_party else ''}")
    if info.entry is not None and info.entry.paper is not None:
        p = info.entry.paper
        console.print(f"paper: {p.title} ({p.year}{', arXiv ' + p.arxiv if p.arxiv else ''})")
    if info.entry is not None or info.installed:
        console.print(f"category: {info.meta('category')}")
        console.print(f"hooks: {', '.join(info.hooks)}")
        provides = info.meta("provides")
        console.print(f"provides: {', '.join(provides) or '-'}"
                      + (f" (exclusive: {', '.join(p for p in provides if p in EXCLUSIVE)})" if set(provides) & set(EXCLUSIVE) else ""))
        task = info.meta("task")
        console.print(f"tasks: {', '.join(info.meta('tasks') or ['classification'])}"
                      + (f" (brings --task {task})" if task else ""))
        console.print(f"conflicts: {', '.join(info.meta('conflicts')) or '-'}")
        console.print(f"requires: {', '.join(info.meta('requires')) or '-'}")
        console.print(f"order: after {', '.join(info.meta('after')) or '-'}; before {', '.join(info.meta('before')) or '-'}")
    if info.installed:
        cls = info.load()
        table = Table(title="settings (--set " + name + ".KEY=VALUE)")
        for col in ("key", "type", "default", "description"):
            table.add_column(col, overflow="fold")
        for key, field in cls.Settings.model_fields.items():
            kind = _type_name(field.annotation)
            table.add_row(key, Text(kind), repr(field.get_default(call_default_factory=True)), field.description or "")  # list[str] is no markup
        console.print(table)


def _type_name(annotation) -> str:
    import typing

    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (list, tuple, dict, set):  # list[str], not str
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if args:
        return " | ".join(_type_name(a) for a in args)
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


@app.command("new-plugin")
def new_plugin(
    name: str = typer.Argument(..., help="Short name: lowercase letters, digits and underscores."),
    directory: Path = typer.Option(Path("."), "--dir", help="Where to create the package folder tricks-NAME/."),
):
    """Write a ready plugin package: pyproject with the entry point, a hook, a README, a test."""
    from tricks.scaffold import write_plugin

    path = write_plugin(name, directory)
    console.print(f"created {path}")
    console.print(f"next: pip install -e {path} && tricks run --plugins {name} --epochs 1")


@app.command()
def version():
    """Print the versions of tricks and its installed plugins."""
    from tricks import __version__
    from tricks.registry import Catalog

    console.print(f"tricks {__version__}")
    for name, info in sorted(Catalog().plugins.items()):
        if info.installed:
            console.print(f"  {name} {info.version}")


def _click_exceptions():
    """The click exceptions typer raises: its own copy of click where it vendors one."""
    try:
        from typer._click import exceptions
    except ImportError:  # a typer that uses click itself
        from click import exceptions
    return exceptions


def main() -> None:
    click = _click_exceptions()

    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:  # click's own exits (--help, --version) come back as a code
            sys.exit(code)
    except click.UsageError as error:
        # A flag of the wrong type, a missing argument, an unknown option: one line, with the
        # command's help to read, instead of click's usage block.
        path = error.ctx.command_path.split()[1:] if error.ctx is not None else []
        command = " ".join(["tricks", *[p for p in path if p not in ("-m", "tricks.cli.main")]])
        err_console.print(f"error: {error.format_message()} (see {command} --help)", markup=False, highlight=False,
                          soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("error: interrupted", markup=False, highlight=False)
        sys.exit(130)
    except TricksError as error:
        err_console.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except Diverged as error:
        err_console.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except PluginHookError as error:
        if os.environ.get("TRICKS_DEBUG"):
            raise
        err_console.print(f"error: {error} (set TRICKS_DEBUG=1 for the traceback)", markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
