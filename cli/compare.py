"""``tricks compare``: overlaid curves and a table of runs, ablations and sampling jobs."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer
from rich.console import Console


def compare(
    paths: List[Path] = typer.Argument(..., help="Run directories, ablation or sampling-job folders, or folders holding runs below them."),
    out: Path = typer.Option(..., "--out", "-o", help="The folder to write compare.png, compare.md and compare.csv into (created if missing)."),
):
    """Compare runs: overlaid learning curves and a table of final and best metrics.

    Accepts run directories, ablations and sampling jobs (found by their job.json), and folders
    with runs anywhere below. Writes OUT/compare.png (train loss, validation loss and accuracy
    against the epoch; an ablation configuration's seeds as mean and sd band), OUT/compare.md
    and OUT/compare.csv (per run: final and best validation accuracy, best epoch, final
    validation loss, epochs, parameters, training time).
    """
    from rich.markdown import Markdown

    from tricks.compare import compare as compare_runs
    from tricks.compare import markdown_table

    rows = compare_runs(paths, out)
    console = Console()
    console.print(Markdown(markdown_table(rows)))
    console.print(f"{len(rows)} run{'s' if len(rows) != 1 else ''} compared in {out}", markup=False, highlight=False,
                  soft_wrap=True)
