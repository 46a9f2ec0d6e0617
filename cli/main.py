"""``tricks``: run experiments, list and show plugins, start a plugin of your own."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tricks.errors import PluginHookError, TricksError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train image classifiers with composable bag-of-tricks plugins.")
plugins_app = typer.Typer(no_args_is_help=True, help="List and inspect plugins.")
app.add_typer(plugins_app, name="plugins")
console = Console()
err_console = Console(stderr=True)


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class RichReporter:
    """A live progress bar per epoch, a line per finished epoch, the table at the end."""

    def __init__(self, console: Console):
        self.console, self.rows = console, []
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[loss]}"),
                                 console=console, transient=True)
        self.task = None

    def start(self, ctx):
        self.ctx = ctx
        self.every = ctx.config.log_every
        if ctx.start_epoch:
            self.console.print(f"resuming {ctx.run_dir} at epoch {ctx.start_epoch + 1}/{ctx.epochs}")
        self.progress.start()

    def epoch_start(self, epoch, steps):
        self.task = self.progress.add_task(f"epoch {epoch + 1}/{self.ctx.epochs}", total=steps, loss="")

    def step(self, index, loss):
        if index % self.every == 0:
            self.progress.update(self.task, advance=1, loss=f"loss {loss.item():.4f}")
        else:
            self.progress.update(self.task, advance=1)

    def epoch_end(self, row):
        self.progress.remove_task(self.task)
        self.rows.append(row)
        self.console.print(f"epoch {row['epoch']:>3}  train_loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  "
                           f"val_acc {100 * row['val_acc']:.2f}%  lr {row['lr']:.4g}  {row['epoch_seconds']:.1f}s")

    def finish(self, summary):
        self.progress.stop()
        table = Table(title="epochs")
        for col in ("epoch", "train_loss", "val_loss", "val_acc", "lr", "seconds", "images/s"):
            table.add_column(col, justify="right")
        for r in self.rows:
            table.add_row(str(r["epoch"]), f"{r['train_loss']:.4f}", f"{r['val_loss']:.4f}", f"{100 * r['val_acc']:.2f}%",
                          f"{r['lr']:.4g}", f"{r['epoch_seconds']:.1f}", f"{r['images_per_second']:.0f}")
        if self.rows:
            self.console.print(table)
        self.console.print(f"final val_acc {100 * summary['final_val_acc']:.2f}%  best {100 * summary['best_val_acc']:.2f}% "
                           f"(epoch {summary['best_epoch']})")
        self.console.print(f"run directory: {summary['run_dir']}")

    def log(self, message):
        self.console.print(message)


class JsonReporter:
    """One JSON object per finished epoch on stdout, then the summary."""

    def start(self, ctx): ...
    def epoch_start(self, epoch, steps): ...
    def step(self, index, loss): ...
    def log(self, message): ...

    def epoch_end(self, row):
        print(json.dumps({"event": "epoch", **row}), flush=True)

    def finish(self, summary):
        print(json.dumps({"event": "summary", **summary}), flush=True)


class QuietReporter(JsonReporter):
    """Nothing but the run directory at the end."""

    def epoch_end(self, row): ...

    def finish(self, summary):
        print(summary["run_dir"], flush=True)


@app.command()
def run(
    plugins: Optional[str] = typer.Option(None, "--plugins", "-p", help="Comma-separated plugin names, e.g. mixup,cosine (replaces the recipe's list)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A YAML recipe, or a run directory's config.yaml, to start from."),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override one setting: plugin.key=value or core.key=value (repeatable)."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs. [default: 20]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch size, split across processes. [default: 64]"),
    lr: Optional[float] = typer.Option(None, help="Base learning rate. [default: 0.1]"),
    model: Optional[str] = typer.Option(None, help="resnet8/14/20/32/44/56/110 or resnet18/34/50 (CIFAR-style), a plugin's model, or timm:NAME. [default: resnet20]"),
    dataset: Optional[str] = typer.Option(None, help="digits (bundled), cifar10, cifar100, npz or imagefolder. [default: digits]"),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Folder holding the data set (CIFAR in torchvision's format, .npz shards, or an ImageFolder tree)."),
    download: Optional[bool] = typer.Option(None, "--download", help="Let torchvision download CIFAR into --data-dir (never done otherwise)."),
    device: Optional[Device] = typer.Option(None, help="Where to train. [default: auto]"),
    precision: Optional[Precision] = typer.Option(None, help="fp32, or mixed precision bf16/fp16 (fp16 with loss scaling). [default: fp32]"),
    seed: Optional[int] = typer.Option(None, help="Random seed; CPU runs with the same seed are identical. [default: 0]"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory to create. [default: runs/<time>-<plugins>]"),
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

    overrides = dict(epochs=epochs, batch_size=batch_size, lr=lr, model=model, dataset=dataset, data_dir=data_dir,
                     download=download, device=device.value if device else None,
                     precision=precision.value if precision else None, seed=seed)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if resume is not None and config is not None:
        raise TricksError("--resume continues a run with its own config; drop --config (flags and --set still apply)")
    if resume is not None and out is not None and out != resume:
        raise TricksError("--resume writes into the run directory it continues; drop --out")
    if resume is not None and not (resume / "config.yaml").exists():
        raise TricksError(f"{resume} holds no run (no config.yaml); start one with --out {resume}")
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
    cfg = tricks.resolve(plugins=plugins, recipe=recipe, overrides=overrides, sets=set_, registries=registry)
    drift = cfg.version_drift((recipe or {}).get("versions"))
    if drift and rank == 0:
        err_console.print(f"note: the recipe was written with other versions ({', '.join(drift)}); "
                          "results may differ", markup=False, highlight=False, soft_wrap=True)
    tricks.run(cfg, out=resume or out, resume=resume, reporter=reporter)


class AblationProgress:
    """A bar over the ablation's runs and one over the epochs of the run in progress; a line per finished run."""

    def __init__(self, console: Console, quiet: bool = False):
        self.console, self.quiet = console, quiet
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
                                 disable=quiet)
        self.runs = self.epochs = None

    def start(self, runs, done):
        self.progress.start()
        self.runs = self.progress.add_task("runs", total=runs, completed=done)
        if done and not self.quiet:
            self.console.print(f"{done} of {runs} runs already finished; continuing")

    def run_start(self, index, config, seed, resuming):
        import tricks

        outer = self

        class EpochBar(tricks.Reporter):
            def start(self, ctx):
                outer.epochs = outer.progress.add_task(f"{config.label} seed {seed}", total=ctx.epochs,
                                                       completed=ctx.start_epoch)

            def epoch_end(self, row):
                outer.progress.update(outer.epochs, advance=1)

            def log(self, message):
                pass

        return EpochBar()

    def run_end(self, index, result):
        if self.epochs is not None:
            self.progress.remove_task(self.epochs)
            self.epochs = None
        self.progress.update(self.runs, advance=1)
        if not self.quiet:
            self.console.print(f"{result.configuration:<40} seed {result.seed}:  final {100 * result.final_val_acc:.2f}%  "
                               f"best {100 * result.best_val_acc:.2f}%  {result.seconds:.0f}s", markup=False, highlight=False)

    def finish(self, rows, out):
        self.progress.stop()
        if not self.quiet:
            table = Table(title="ablation")
            for col in ("configuration", "seeds", "final val acc (%)", "best val acc (%)", "delta final", "delta best", "time/run (s)"):
                table.add_column(col, justify="left" if col == "configuration" else "right")
            for r in rows:
                table.add_row(r["configuration"], str(r["seeds"]), f"{r['final_acc']:.2f} ± {r['final_sd']:.2f}",
                              f"{r['best_acc']:.2f} ± {r['best_sd']:.2f}", f"{r['delta_final']:+.2f}",
                              f"{r['delta_best']:+.2f}", f"{r['seconds']:.0f}")
            self.console.print(table)
        self.console.print(f"ablation directory: {out} (table.md, table.csv, results.csv, chart.png)")


@app.command()
def ablate(
    plugins: str = typer.Option(..., "--plugins", "-p", help="The tricks to add to the baseline, comma-separated, in order."),
    cumulative: bool = typer.Option(False, "--cumulative", help="Add the tricks one after another, as the paper's tables do (default: each alone)."),
    both: bool = typer.Option(False, "--both", help="Train each trick alone and the cumulative sequence."),
    all_together: bool = typer.Option(False, "--all", help="With each trick alone: also train every trick at once."),
    seeds: int = typer.Option(1, "--seeds", help="Seeds per configuration: the core seed, +1, ..."),
    base: Optional[str] = typer.Option(None, "--base", help="Plugins in every configuration, the baseline included, e.g. step."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A YAML recipe every configuration starts from (its plugin list is replaced)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="plugin.key=value or core.key=value, applied to every configuration that has the plugin (repeatable)."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs. [default: 20]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch size. [default: 64]"),
    lr: Optional[float] = typer.Option(None, help="Base learning rate. [default: 0.1]"),
    model: Optional[str] = typer.Option(None, help="The model of every configuration. [default: resnet20]"),
    dataset: Optional[str] = typer.Option(None, help="digits (bundled), cifar10, cifar100, npz or imagefolder. [default: digits]"),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Folder holding the data set."),
    device: Optional[Device] = typer.Option(None, help="Where to train. [default: auto]"),
    precision: Optional[Precision] = typer.Option(None, help="fp32, bf16 or fp16. [default: fp32]"),
    seed: Optional[int] = typer.Option(None, help="The first seed. [default: 0]"),
    out: Path = typer.Option(Path("ablation"), "--out", "-o", help="The ablation directory; run the same command again to resume it."),
    registry: Optional[List[Path]] = typer.Option(None, "--registry", help="An extra registry file (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the ablation directory at the end."),
):
    """Train the baseline and the baseline with each trick added, over seeds, and tabulate.

    Writes OUT/table.md and table.csv (per configuration: mean and spread of the final and best
    validation accuracy over seeds, delta against the baseline, time), results.csv (per run),
    chart.png, and every run under OUT/runs/. Interrupted ablations resume where they stopped
    when the same command is run again; finished runs are not repeated.
    """
    from tricks.ablate import ablate as run_ablation
    from tricks.config import read_recipe

    if cumulative and both:
        raise TricksError("choose one of --cumulative and --both")
    mode = "both" if both else "cumulative" if cumulative else "alone"
    overrides = dict(epochs=epochs, batch_size=batch_size, lr=lr, model=model, dataset=dataset, data_dir=data_dir,
                     device=device.value if device else None, precision=precision.value if precision else None, seed=seed)
    names = [p.strip() for p in plugins.split(",") if p.strip()]
    base_names = [p.strip() for p in (base or "").split(",") if p.strip()]
    run_ablation(names, mode=mode, seeds=seeds, base=base_names, all_together=all_together, recipe=read_recipe(config) if config else None,
                 overrides=overrides, sets=set_, out=out, registries=registry, reporter=AblationProgress(console, quiet))


def _catalog(registry):
    from tricks.registry import Catalog

    return Catalog(registry)


@plugins_app.command("list")
def plugins_list(
    registry: Optional[List[Path]] = typer.Option(None, "--registry", help="An extra registry file (repeatable)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Every plugin in the registry and every installed third-party plugin."""
    catalog = _catalog(registry)
    rows = []
    for name in sorted(catalog.plugins):
        info = catalog.plugins[name]
        rows.append({"name": name, "installed": info.installed, "version": info.version,
                     "third_party": info.third_party, "hooks": info.hooks,
                     "category": info.meta("category") if (info.entry or info.installed) else "",
                     "summary": info.summary})
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="tricks plugins")
    for col in ("name", "installed", "hooks", "category", "summary"):
        table.add_column(col, overflow="fold")
    for r in rows:
        status = f"yes ({r['version']})" if r["installed"] else "no"
        name = r["name"] + (" [third-party]" if r["third_party"] else "")
        table.add_row(name, status, ", ".join(r["hooks"]), r["category"], r["summary"])
    console.print(table)


@plugins_app.command("show")
def plugins_show(
    name: str = typer.Argument(..., help="The plugin's short name."),
    registry: Optional[List[Path]] = typer.Option(None, "--registry", help="An extra registry file (repeatable)."),
):
    """A plugin's settings (type, default, description), paper, conflicts and order."""
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
            table.add_row(key, kind, repr(field.default), field.description or "")
        console.print(table)


def _type_name(annotation) -> str:
    import typing

    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return "|".join(str(a) for a in args)
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


def _broken_command(message: str):
    def command():
        raise TricksError(message)

    return command


def _add_plugin_commands() -> None:
    """Commands that installed plugins add (entry point group ``tricks.commands``): a
    function with typer parameters, registered under the entry point's name."""
    from importlib import metadata

    taken = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    for ep in metadata.entry_points(group="tricks.commands"):
        if ep.name in taken:
            continue
        try:
            fn = ep.load()
        except Exception as error:  # a broken plugin must not break the other commands
            fn = _broken_command(f"command '{ep.name}' comes from a plugin that fails to import "
                                 f"({type(error).__name__}: {error}); reinstall that plugin")
        app.command(ep.name)(fn)
        taken.add(ep.name)


_add_plugin_commands()


def main() -> None:
    try:
        app()
    except TricksError as error:
        err_console.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except PluginHookError as error:
        if os.environ.get("TRICKS_DEBUG"):
            raise
        err_console.print(f"error: {error} (set TRICKS_DEBUG=1 for the traceback)", markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
