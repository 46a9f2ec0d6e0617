"""``tricks sample`` and ``tricks analyze``: commands this plugin adds to the ``tricks`` CLI
(entry point group ``tricks.commands``)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tricks import TricksError

console = Console()


class RichSweepProgress:
    """Networks done out of n, running, failed and the best error so far; a line per network."""

    def __init__(self, console: Console, quiet: bool = False):
        self.console, self.quiet = console, quiet
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(),
                                 TextColumn("running {task.fields[running]}  failed {task.fields[failed]}  "
                                            "best {task.fields[best]}"),
                                 console=console, transient=False, disable=quiet)
        self.running = 0
        self.failed = 0
        self.best = None

    def _fields(self):
        return dict(running=self.running, failed=self.failed,
                    best="-" if self.best is None else f"{self.best:.2f}%")

    def start(self, job, total, done, failed, best):
        self.failed, self.best = failed, best
        self.progress.start()
        self.task = self.progress.add_task(job.space.name, total=total, completed=done, **self._fields())
        if done and not self.quiet:
            self.console.print(f"{done} of {total} networks already have a result; continuing")

    def model_start(self, task):
        self.running += 1
        self.progress.update(self.task, **self._fields())

    def model_end(self, result):
        self.running = max(0, self.running - 1)
        if result["status"] == "ok":
            self.best = result["error"] if self.best is None else min(self.best, result["error"])
            line = f"{result['id']}  error {result['error']:.2f}%  best epoch {result['best_error']:.2f}%  {result['time_s']:.0f}s"
        else:
            self.failed += 1
            line = f"{result['id']}  failed: {result.get('message', '')}"
        if not self.quiet:
            self.progress.console.print(line, markup=False, highlight=False)
        self.progress.update(self.task, advance=1, **self._fields())

    def finish(self, summary):
        self.progress.stop()


def sample(
    space: str = typer.Option(..., "--space", help="anynetx_a..anynetx_e, regnet, regnetx, regnety, or a YAML space file."),
    n: int = typer.Option(..., "--n", help="How many distinct networks to sample and train."),
    out: Path = typer.Option(..., "--out", "-o", help="The job's folder; the same command continues it."),
    flops: Optional[str] = typer.Option(None, "--flops", help="Complexity window on multiply-adds, e.g. 360M:400M."),
    params: Optional[str] = typer.Option(None, "--params", help="Window on parameters, e.g. 1M:3M."),
    acts: Optional[str] = typer.Option(None, "--acts", help="Window on activations, e.g. :5M."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (the training seed is core.seed)."),
    plugins: Optional[str] = typer.Option(None, "--plugins", "-p", help="The recipe's plugins, e.g. cosine,label_smoothing (regnet is added)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A YAML recipe to start from."),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override one setting: plugin.key=value or core.key=value (repeatable)."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs per network. [default: 20]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size. [default: 64]"),
    lr: Optional[float] = typer.Option(None, help="Base learning rate. [default: 0.1]"),
    dataset: Optional[str] = typer.Option(None, help="digits (bundled), cifar10, cifar100, npz or imagefolder. [default: digits]"),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Folder holding the data set."),
    train_limit: Optional[int] = typer.Option(None, "--train-limit", help="Train on the first N images only."),
    val_limit: Optional[int] = typer.Option(None, "--val-limit", help="Evaluate on the first N images only."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda. [default: auto]"),
    precision: Optional[str] = typer.Option(None, help="fp32, bf16 or fp16. [default: bf16 on CUDA, fp32 on CPU]"),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", help="[default: on with CUDA]"),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="GPUs to use: all (default) or indices like 0,1."),
    per_gpu: int = typer.Option(1, "--per-gpu", help="Networks trained at once on each GPU (or on the CPU)."),
    backend: str = typer.Option("local", "--backend", help="local (a process pool) or ray (a Ray cluster)."),
    address: Optional[str] = typer.Option(None, "--address", help="The Ray cluster to join (default: start a local one)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Train the networks that failed before again."),
    registry: Optional[List[Path]] = typer.Option(None, "--registry", help="An extra registry file (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display; the summary line only."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only sample: print the networks and their complexity, train and write nothing."),
):
    """Sample networks from a design space and train each with the same recipe.

    Writes SWEEP/sweep.json (the plan), samples.jsonl, results/ID.json (one per network, as it
    finishes), runs/ID/ (each network's run) and summary.json. Run the same command again to
    continue an interrupted job: finished networks are kept, an interrupted one resumes from its
    checkpoint. Then: tricks analyze SWEEP [SWEEP ...].
    """
    import torch

    from .spaces import SpaceError, Window
    from .sweep import sample_job

    try:
        window = Window.parse(flops, params, acts)
    except SpaceError as error:
        raise TricksError(str(error)) from None
    cuda = device == "cuda" or (device in (None, "auto") and torch.cuda.is_available())
    overrides = dict(epochs=epochs, batch_size=batch_size, lr=lr, dataset=dataset, data_dir=data_dir,
                     train_limit=train_limit, val_limit=val_limit, device=device,
                     precision=precision or ("bf16" if cuda else None),
                     channels_last=channels_last if channels_last is not None else (True if cuda else None))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if dry_run:
        from .sweep import plan

        job = plan(out, space, n, seed, window, plugins, config, set_, overrides, registry, write=False)
        print_samples(job)
        return
    summary = sample_job(out, space, n, seed, window, plugins, config, set_, overrides, gpus, per_gpu, backend,
                         address, RichSweepProgress(console, quiet), retry_failed, registries=registry)
    best = f"{summary['min_error']:.2f}%" if summary["min_error"] is not None else "-"
    console.print(f"{summary['ok']} of {summary['n']} networks trained, {summary['failed']} failed, "
                  f"min error {best}; analyse with: tricks analyze {out}", markup=False, highlight=False)


def print_samples(job) -> None:
    """The sampled networks of a job, with their complexity at the job's input size."""
    from rich.table import Table

    from .complexity import format_count

    table = Table(title=f"{job.space.name}: {len(job.samples)} networks at {job.resolution}x{job.resolution} "
                        f"({job.stem} stem, {job.num_classes} classes), window {job.window}")
    for col in ("id", "depths", "widths", "b", "g", "flops", "params", "acts"):
        table.add_column(col, justify="left" if col in ("depths", "widths", "b", "g") else "right")
    for i, s in enumerate(job.samples):
        c = s.config
        table.add_row(job.ident(i), ",".join(map(str, c.depths)), ",".join(map(str, c.widths)),
                      ",".join(f"{b:g}" for b in c.bottlenecks), ",".join(map(str, c.groups)),
                      format_count(s.complexity["flops"]), format_count(s.complexity["params"]),
                      format_count(s.complexity["acts"]))
    console.print(table)


def analyze(
    sweeps: List[Path] = typer.Argument(..., help="One or more sampling job folders."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Report folder. [default: FIRST_SWEEP/analysis]"),
    html: bool = typer.Option(False, "--html", help="Write report.html instead of report.md."),
    top: int = typer.Option(5, "--top", help="How many best networks' widths to plot and fit."),
):
    """Compare design spaces: error EDFs (plain and complexity-normalized), error against each
    design parameter, the best networks' widths with their quantized linear fit, and a table."""
    from .analysis import report

    path = report(list(sweeps), out, "html" if html else "md", top)
    console.print(f"report: {path}", markup=False, highlight=False)
