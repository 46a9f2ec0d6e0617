"""Tabulate the CPU miniature of docs/results/specialists_cifar10.md: a generalist, generalist +
specialists, and an ensemble of equal training cost, from the jobs its commands wrote.

    python docs/results/specialists_cifar10.py JOB [JOB ...]

Each JOB is the folder of one ``tricks specialists`` command (one seed). Prints the subsets each
job found (with CIFAR-10's class names), the table of the page (mean ± sd over the jobs), and each
specialist against the generalist on its own classes; writes specialists_cifar10.csv beside this
script (one row per job and model).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tricks.ablate import csv_text
from tricks.atomic import write_text

HERE = Path(__file__).resolve().parent
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MODELS = ("generalist", "generalist+specialists", "control_ensemble")


def mean_sd(values: list[float], scale: float = 100.0, form: str = "{:.2f}") -> str:
    values = [scale * v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return form.format(values[0])
    return f"{form.format(statistics.mean(values))} ± {form.format(statistics.stdev(values))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("jobs", type=Path, nargs="+")
    jobs = parser.parse_args().jobs
    reports, rows = [], []
    for job in jobs:
        report = json.loads((job / "combination.json").read_text())
        reports.append(report)
        names = ["{" + ", ".join(CLASSES[c] for c in s) + "}" for s in report["subsets"]]
        print(f"{job}: subsets {'  '.join(names)}; a specialist active on {report['images_with_active_specialist']} "
              f"of {report['n_images']} images")
        results = {p.stem: json.loads(p.read_text()) for p in (job / "results").glob("*.json")}
        seconds = {k: r.get("train_seconds") or 0.0 for k, r in results.items()}
        cost = {"generalist": seconds.get("generalist", 0.0),
                "generalist+specialists": seconds.get("generalist", 0.0) + sum(v for k, v in seconds.items() if k.startswith("specialist-")),
                "control_ensemble": seconds.get("generalist", 0.0) + sum(v for k, v in seconds.items() if k.startswith("control-"))}
        for model in MODELS:
            r = report.get(model)
            if r is None:
                continue
            rows.append({"job": str(job), "model": model, "acc": round(100 * r["acc"], 2), "errors": r["errors"],
                         "nll": round(r["nll"], 4), "acc_specialist_classes": round(100 * r["acc_specialist_classes"], 2),
                         "acc_where_active": round(100 * r["acc_where_active"], 2) if r.get("acc_where_active") is not None else "",
                         "train_seconds": round(cost[model]), "subsets": " ".join(names)})
        for s in report["specialists"]:
            print(f"  specialist {'{' + ', '.join(CLASSES[c] for c in s['subset']) + '}'}: on its {s['images']} images "
                  f"generalist {100 * s['generalist_acc']:.2f}%, specialist (subset + dustbin) {100 * s['specialist_acc']:.2f}%")
    keys = list(rows[0])
    write_text(HERE / "specialists_cifar10.csv", csv_text(rows, keys))
    print("\n| model | val acc % | errors | NLL | acc % where a specialist is active | training s | jobs |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model in MODELS:
        of = [r for r in reports if model in r]
        if not of:
            continue
        secs = [r["train_seconds"] for r in rows if r["model"] == model]
        print(f"| {model} | {mean_sd([r[model]['acc'] for r in of])} | {mean_sd([r[model]['errors'] for r in of], 1, '{:.0f}')} | "
              f"{mean_sd([r[model]['nll'] for r in of], 1, '{:.3f}')} | {mean_sd([r[model]['acc_where_active'] for r in of])} | "
              f"{mean_sd(secs, 1, '{:.0f}')} | {len(of)} |")



if __name__ == "__main__":
    main()
