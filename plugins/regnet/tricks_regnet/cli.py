"""``tricks sample`` and ``tricks analyze``: commands this plugin adds to the ``tricks`` CLI
(entry point group ``tricks.commands``).

``tricks --help`` lists them with the first paragraph of their docstrings, read without importing
this package (which imports torch); the package is imported when one of them runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from tricks import TricksError
from tricks.cli import options
from tricks.cli.options import core_options

console = Console()


@core_options(exclude=("model", "seed"))  # each network is the run's model; --seed is the sampling seed
def sample(
    core: dict,
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
    gpus: Optional[str] = options.gpus_option(),
    per_gpu: int = options.per_gpu_option(),
    backend: str = options.backend_option(),
    address: Optional[str] = options.address_option(),
    retry_failed: bool = options.retry_failed_option(),
    registry: Optional[List[Path]] = typer.Option(None, "--registry", help="An extra registry file (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display; the summary line only."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only sample: print the networks and their complexity, train and write nothing."),
):
    """Sample networks from a design space and train each with the same recipe.

    The recipe: without --config, the default for sampling (recipes/sampling.yaml: SGD with
    momentum 0.9 and Nesterov, lr 0.1 per 128 images scaled to the batch, half an epoch of linear
    warmup, cosine decay to 0, weight decay 5e-5, zero-gamma), with --plugins added to it; with
    --config, that recipe instead. On the embedded 8x8 digits the networks train at 32x32 unless
    --image-size says otherwise. A network whose loss becomes non-finite, or whose validation
    error stays at chance, is recorded as diverged.

    Writes SWEEP/sweep.json (the plan), samples.jsonl, results/ID.json (one per network, as it
    finishes), runs/ID/ (each network's run) and summary.json. Run the same command again to
    continue an interrupted job: finished networks are kept, an interrupted one resumes from its
    checkpoint. Then: tricks analyze SWEEP [SWEEP ...]. On CUDA, training uses bf16 and
    channels_last unless --precision or --channels-last/--no-channels-last say otherwise.
    """
    from tricks.cli.reporters import RichSweepProgress, exit_if_failed

    from .spaces import SpaceError, Window
    from .sweep import sample_job

    try:
        window = Window.parse(flops, params, acts)
    except SpaceError as error:
        raise TricksError(str(error)) from None
    overrides = core
    if dry_run:
        from .sweep import plan

        job = plan(out, space, n, seed, window, plugins, config, set_, overrides, registry, write=False)
        print_samples(job)
        return
    progress = RichSweepProgress(console, quiet)
    summary = sample_job(out, space, n, seed, window, plugins, config, set_, overrides, gpus, per_gpu, backend,
                         address, progress, retry_failed, registries=registry)
    best = f"{summary['min_error']:.2f}%" if summary["min_error"] is not None else "-"
    console.print(f"{summary['ok']} of {summary['n']} networks trained, {summary.get('diverged', 0)} diverged, "
                  f"{summary['failed']} failed, min error {best}; analyse with: tricks analyze {out}",
                  markup=False, highlight=False)
    exit_if_failed(progress.failures, "networks", Console(stderr=True))


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
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Report folder (when not given: FIRST_SWEEP/analysis)."),
    html: bool = typer.Option(False, "--html", help="Write report.html instead of report.md."),
    top: int = typer.Option(5, "--top", help="How many best networks' widths to plot and fit."),
    keep_diverged: bool = typer.Option(False, "--keep-diverged", help="Keep the networks whose error stayed at "
                                       "chance in the EDFs, fits and statistics (those with a non-finite loss have "
                                       "no error to keep)."),
):
    """Compare design spaces: error EDFs (plain and complexity-normalized), error against each
    design parameter, the best networks' widths with their quantized linear fit, and a table."""
    from .analysis import report

    path = report(list(sweeps), out, "html" if html else "md", top, keep_diverged)
    console.print(f"report: {path}", markup=False, highlight=False)
