"""The table and chart of docs/results/noisy_cifar10.md: clean validation accuracy after training on
CIFAR-10 with label or background noise, for each method of ``tricks ablate`` folders (one folder
per noise setting, each with the cross-entropy baseline and the methods added to it).

    python docs/results/noisy_cifar10.py NAME=ABLATION [NAME=ABLATION ...] --out docs/results/noisy_cifar10 [--title T]

writes OUT.csv (mean and standard deviation over the seeds of each method and setting) and
OUT.png, and prints the table as Markdown.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

from tricks import atomic
from tricks.ablate import csv_text

NAMES = {"baseline": "cross-entropy", "only-label_smoothing": "label smoothing", "only-gce": "GCE (q 0.7)",
         "only-memory_module": "memory module"}


def read(folder: Path) -> dict[str, list[float]]:
    """Final validation accuracy of every finished run, by configuration slug."""
    found: dict[str, list[float]] = {}
    with open(folder / "results.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r["status"] == "ok":
                found.setdefault(r["slug"], []).append(float(r["final_val_acc"]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+", help="NAME=ABLATION_FOLDER, one per noise setting")
    parser.add_argument("--out", required=True, help="path without extension of the CSV and the PNG")
    parser.add_argument("--title", default="CIFAR-10 (10,000 noisy training images), resnet8, 10 epochs",
                        help="the chart's title")
    args = parser.parse_args()
    settings = [s.split("=", 1) for s in args.settings]
    results = {name: read(Path(folder)) for name, folder in settings}
    rows = []
    for slug, method in NAMES.items():
        for name, _ in settings:
            values = results[name].get(slug, [])
            if values:
                rows.append({"method": method, "noise": name, "seeds": len(values),
                             "final_val_acc": round(statistics.fmean(values), 4),
                             "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0})
    out = Path(args.out)
    atomic.write_text(out.with_suffix(".csv"), csv_text(rows, list(rows[0])))
    chart(rows, [n for n, _ in settings], out.with_suffix(".png"), args.title)
    names = [n for n, _ in settings]
    print("| method | " + " | ".join(names) + " |")
    print("| --- | " + " | ".join("---:" for _ in names) + " |")
    for method in NAMES.values():
        cells = []
        for n in names:
            r = next((r for r in rows if r["method"] == method and r["noise"] == n), None)
            cells.append(f"{100 * r['final_val_acc']:.1f} ± {100 * r['sd']:.1f} ({r['seeds']})" if r else "-")
        print(f"| {method} | " + " | ".join(cells) + " |")


def chart(rows: list[dict], settings: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(NAMES.values())
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        xs, ys, es = [], [], []
        for i, n in enumerate(settings):
            r = next((r for r in rows if r["method"] == method and r["noise"] == n), None)
            if r:
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                ys.append(100 * r["final_val_acc"])
                es.append(100 * r["sd"])
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=method)
    ax.set_xticks(range(len(settings)), settings)
    ax.set(ylabel="clean validation accuracy (%)", title=title)
    low = min(100 * r["final_val_acc"] for r in rows)
    ax.set_ylim(max(0, low - 10), None)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    atomic.write_with(path, lambda f: fig.savefig(f, dpi=90, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
