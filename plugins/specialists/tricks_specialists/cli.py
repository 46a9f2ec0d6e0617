"""``tricks specialists``: the generalist + specialists procedure as one resumable job (a command
this plugin adds to the ``tricks`` CLI through the entry point group ``tricks.commands``)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from tricks.cli import options
from tricks.cli.options import core_options

console = Console()


@core_options()
def specialists(
    core: dict,
    out: Path = typer.Option(..., "--out", "-o", help="The job's folder; the same command continues it."),
    plugins: Optional[str] = typer.Option(None, "--plugins", "-p", help="The generalist's plugins (the specialists take them too), e.g. cosine."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A YAML recipe for the generalist."),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override one setting: plugin.key=value or core.key=value (repeatable)."),
    n_specialists: int = typer.Option(2, "--specialists", help="How many specialists (K-means clusters of the classes)."),
    size: Optional[int] = typer.Option(None, "--size", help="Classes per specialist (default: its cluster as K-means found it)."),
    overlap: bool = typer.Option(False, "--overlap/--no-overlap", help="Let subsets share classes (each takes the --size classes nearest its centroid)."),
    top_n: int = typer.Option(1, "--top-n", help="The generalist's top-n classes pick the active specialists (the paper: 1)."),
    specialist_epochs: Optional[int] = typer.Option(None, "--specialist-epochs", help="Epochs of each specialist (default: --epochs)."),
    specialist_lr: Optional[float] = typer.Option(None, "--specialist-lr", help="Learning rate of the specialists (default: --lr)."),
    soft_targets: bool = typer.Option(False, "--soft-targets/--no-soft-targets", help="Specialists also learn the generalist's soft targets."),
    control: bool = typer.Option(False, "--control/--no-control", help="Also train an ensemble of equal training cost (the generalist fine-tuned once per specialist)."),
    gpus: Optional[str] = options.gpus_option(),
    per_gpu: int = options.per_gpu_option(),
    backend: str = options.backend_option(),
    address: Optional[str] = options.address_option(),
    retry_failed: bool = options.retry_failed_option(),
    json_out: bool = typer.Option(False, "--json", help="Print the combination's results as one JSON object."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
):
    """Train a generalist, find confusable class subsets, train a specialist on each, and combine them.

    Hinton, Vinyals and Dean (arXiv 1503.02531, section 5): the subsets are K-means clusters of
    the columns of the covariance matrix of the generalist's predictions; each specialist starts
    from the generalist's weights and learns its classes plus one dustbin class from epochs half of
    its classes and half of the rest (log of the sampling factor added to the dustbin logit
    afterwards); at inference the specialists whose subset meets the generalist's top-n classes
    are combined with it by minimising KL(p_g || q) + sum KL(p_m || q collapsed), solved exactly
    by EM. Writes OUT/job.json, runs/, results/, subsets.json and combination.json; the same
    command continues an interrupted job without training a finished model again.
    """
    from tricks.cli.reporters import ItemProgress

    from .job import specialists_job

    progress = ItemProgress(console, quiet, lambda result: f"val_acc {100 * result['final_val_acc']:.2f}%")
    report = specialists_job(out, plugins=[p for p in (plugins or "").split(",") if p], recipe=config, sets=set_,
                             overrides=core, n_specialists=n_specialists, size=size, overlap=overlap, top_n=top_n,
                             specialist_epochs=specialist_epochs, specialist_lr=specialist_lr, soft_targets=soft_targets,
                             control=control, progress=progress, gpus=gpus, per_gpu=per_gpu, backend=backend,
                             address=address, retry_failed=retry_failed)
    if json_out:
        import json

        print(json.dumps(report))
        return
    console.print(f"subsets: {', '.join('{' + ', '.join(map(str, s)) + '}' for s in report['subsets'])}", markup=False)
    if report.get("uncovered"):
        console.print(f"classes no specialist covers (the generalist alone answers for them): {report['uncovered']}", markup=False)
    table = Table(title=f"validation ({report['n_images']} images; a specialist active on {report['images_with_active_specialist']})",
                  show_edge=False)
    for col in ("model", "acc %", "errors", "NLL", "acc % (specialists' classes)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name in ("generalist", "generalist+specialists", "control_ensemble"):
        r = report.get(name)
        if r is None:
            continue
        sub = r["acc_specialist_classes"]
        table.add_row(name, f"{100 * r['acc']:.2f}", str(r["errors"]), f"{r['nll']:.4f}", "-" if sub is None else f"{100 * sub:.2f}")
    console.print(table)
    console.print(f"job directory: {out} (combination.json, subsets.json, runs/)", markup=False)
