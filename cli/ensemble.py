"""``tricks ensemble``: runs evaluated alone and together on their validation data."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console


def ensemble(
    runs: List[Path] = typer.Argument(..., help="Run directories, each with its last checkpoint (checkpoints/last.pt)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Evaluate on this data set instead of the first run's "
                                          "(digits, mnist, cifar10, cifar100, npz, imagefolder)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Where the data lie, when not where the first run "
                                           "read them (the data moved)."),
    val_limit: Optional[int] = typer.Option(None, "--val-limit", min=1, help="Use only the first N validation "
                                            "examples (default: the first run's setting)."),
    logit_bias: Optional[List[str]] = typer.Option(None, "--logit-bias", metavar="CLASS=VALUE", help="Add VALUE to "
                                                   "every member's logit for CLASS before anything is computed "
                                                   "(repeatable)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Validation images per forward pass."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write OUT/ensemble.json (the folder is "
                                       "created if missing)."),
):
    """Evaluate runs alone and as an ensemble on the validation data they were trained on.

    Every run's model is rebuilt with its last weights through its own plugins. Prints, for each
    run and for the ensemble (the mean of the members' probabilities, and the mean of their
    logits): accuracy, errors, the negative log-likelihood of the labels and the expected
    calibration error (15 equal-width confidence bins). The runs must have the same classes and
    inputs, and were trained on the same data set unless --dataset/--data-dir are given. One run
    alone is fine, e.g. with --logit-bias 3=3.5 (raise class 3's logit by 3.5, as Hinton et al.
    did for a class left out of the transfer set).
    """
    from tricks import atomic
    from tricks.ensemble import evaluate_ensemble
    from tricks.errors import TricksError

    if out is not None and out.exists() and not out.is_dir():
        raise TricksError(f"--out {out} is a file; give a folder to write ensemble.json into")
    result = evaluate_ensemble(runs, device=device, dataset=dataset, data_dir=data_dir, val_limit=val_limit,
                               logit_bias=logit_bias, batch_size=batch_size)
    err = Console(stderr=True)
    for note in result["notes"]:
        err.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    if out is not None:
        atomic.write_json(out / "ensemble.json", result)
    if json_out:
        print(atomic.dumps(result))
        return
    print_table(result, Console())
    if out is not None:
        Console().print(f"wrote {out / 'ensemble.json'}", markup=False, highlight=False, soft_wrap=True)


def print_table(result: dict, console: Console) -> None:
    from rich.table import Table

    from tricks.ensemble import table_rows

    data = result["data"]
    bias = ", ".join(f"{c}={v:+g}" for c, v in result["logit_bias"].items())
    title = (f"{len(result['members'])} run{'s' if len(result['members']) != 1 else ''} on {data['n']} "
             f"{data['dataset']} validation images" + (f", logit bias {bias}" if bias else ""))
    table = Table(title=title, title_justify="left")
    for name, justify in (("run", "left"), ("model", "left"), ("acc %", "right"), ("errors", "right"),
                          ("NLL", "right"), (f"ECE ({result['ece_bins']} bins)", "right")):
        table.add_column(name, justify=justify, overflow="fold")
    rows = table_rows(result)
    members = len(result["members"])
    for i, row in enumerate(rows):
        table.add_row(row["label"], row["model"], _number(row["acc"], 100, 2), str(row["errors"]),
                      _number(row["nll"], 1, 4), _number(row["ece"], 1, 4), end_section=i == members - 1)
    console.print(table)


def _number(value, scale: float, digits: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value * scale:.{digits}f}"

