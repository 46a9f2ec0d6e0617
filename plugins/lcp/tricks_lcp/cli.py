"""``tricks lcp``: prune a trained detector's backbone as a job of dependent runs (a command this
plugin adds to the ``tricks`` CLI through the entry point group ``tricks.commands``)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from tricks.cli.options import core_options

console = Console()


@core_options()
def lcp(
    core: dict,
    out: Path = typer.Option(..., "--out", "-o", help="The job's folder; the same command continues it."),
    start: Optional[Path] = typer.Option(None, "--from", help="The trained detector to prune (a run directory)."),
    method: str = typer.Option("lcp", "--method", help="lcp (localization-aware), dcp (discrimination-only auxiliary loss), l1 or random."),
    ratio: float = typer.Option(0.5, "--ratio", help="Fraction of the input channels removed from every pruned layer (block-internal)."),
    stage_epochs: int = typer.Option(2, "--stage-epochs", min=1, help="Epochs of each stage run (training with the auxiliary network, then pruning)."),
    finetune_epochs: int = typer.Option(4, "--finetune-epochs", min=1, help="Epochs of the final fine-tuning of the pruned detector."),
    stages: Optional[str] = typer.Option(None, "--stages", help="Backbone stages to prune, e.g. 1,2 (default: all)."),
    plugins: Optional[str] = typer.Option(None, "--plugins", "-p", help="Plugins of every run, e.g. cosine."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A YAML recipe for every run."),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override one setting: plugin.key=value or core.key=value (repeatable)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Train the runs that failed again."),
    json_out: bool = typer.Option(False, "--json", help="Print the job's results as one JSON object."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
):
    """Prune a detector's backbone by LCP (Xie et al., arXiv 1911.02237) or a baseline, stage by stage, then fine-tune.

    lcp and dcp: one run per backbone stage, each starting from the previous one, that trains the
    detector with the auxiliary network after that stage and then selects the input channels of
    its layers by the gradient norm of reconstruction + alpha * auxiliary loss; then a fine-tuning
    run. l1 and random prune the same layers by the same fraction after as many epochs. Writes
    OUT/job.json, runs/ and results/; the same command continues an interrupted job.
    """
    from tricks.cli.reporters import ItemProgress
    from tricks.errors import TricksError

    from .job import lcp_job

    try:
        chosen = [int(p) for p in stages.split(",")] if stages else None
    except ValueError:
        raise TricksError(f"--stages {stages}: write stage indices separated by commas, e.g. --stages 1,2") from None
    progress = ItemProgress(console, quiet, lambda result: f"val_map {result['final_val_map']:.4f}")
    report = lcp_job(out, method=method, ratio=ratio, stage_epochs=stage_epochs, finetune_epochs=finetune_epochs,
                     start=start, stages=chosen, plugins=[p for p in (plugins or "").split(",") if p], recipe=config,
                     sets=set_, overrides=core, progress=progress, retry_failed=retry_failed)
    if json_out:
        import json

        print(json.dumps(report))
        return
    final = report.get("final")
    if final:
        table = Table(title=f"{method}, ratio {ratio}: the fine-tuned detector", show_edge=False)
        for col in ("mAP@[.5:.95]", "mAP@.5", "mAP@.75", "backbone params"):
            table.add_column(col, justify="right")
        table.add_row(*(f"{final[k]:.4f}" for k in ("val_map", "val_map_50", "val_map_75")), f"{final['backbone_params']:,}")
        console.print(table)
    console.print(f"job directory: {out} (runs/, results/)", markup=False)
