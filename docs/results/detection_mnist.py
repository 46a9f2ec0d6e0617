"""The table and chart of docs/results/detection_mnist.md: the trained detector and its pruned,
fine-tuned versions (``tricks lcp`` jobs of every method), mAP@[.5:.95], mAP@.5, mAP@.75 and the
backbone's parameters.

    python docs/results/detection_mnist.py --baseline RUN JOB [JOB ...] --out docs/results/detection_mnist_pruning

writes OUT.csv and OUT.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import tricks
from tricks import atomic
from tricks.ablate import csv_text

FIGURES = (("val_map", "mAP@[.5:.95]"), ("val_map_50", "mAP@.5"), ("val_map_75", "mAP@.75"))


def backbone_params(run: tricks.RunDir) -> int:
    model = run.build_model()
    return sum(p.numel() for p in model.get_submodule(model.prune_root).parameters())


def row(run: tricks.RunDir, method: str, ratio: float, start: int, name: str) -> dict:
    last = run.metrics()[-1]
    params = backbone_params(run)
    return {"method": method, "ratio": ratio, "seed": run.config()["core"]["seed"], "backbone_params": params,
            "removed": round(1 - params / start, 4), **{k: round(last[k], 4) for k, _ in FIGURES}, "run": name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the trained detector's run directory")
    parser.add_argument("jobs", nargs="+", help="tricks lcp job folders")
    parser.add_argument("--out", required=True, help="path without extension of the CSV and PNG")
    args = parser.parse_args()
    base = tricks.RunDir(args.baseline)
    start = backbone_params(base)
    rows = [row(base, "none", 0.0, start, base.path.name)]
    for folder in args.jobs:
        meta = json.loads((Path(folder) / "job.json").read_text())["meta"]
        # a job of the first plan pruned l1/random in one run (item "prune") instead of stage by stage
        method = meta["method"] + (" one-shot" if (Path(folder) / "runs" / "prune").is_dir() else "")
        rows.append(row(tricks.RunDir(Path(folder) / "runs" / "finetune"), method, meta["ratio"], start,
                        f"{Path(folder).name}/runs/finetune"))
    out = Path(args.out)
    atomic.write_text(out.with_suffix(".csv"), csv_text(rows, list(rows[0])))
    chart(rows, out.with_suffix(".png"))
    for r in rows:
        print(r)


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        label = "unpruned" if r["method"] == "none" else f"{r['method']} ({100 * r['removed']:.0f}% of backbone params removed)"
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(FIGURES))]
        ax.bar(xs, [r[k] for k, _ in FIGURES], width, label=label)
    ax.set_xticks(range(len(FIGURES)), [name for _, name in FIGURES])
    low = min(r[k] for r in rows for k, _ in FIGURES)
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set(ylabel="validation", title="FCOS on resnet8, MNIST-detection: pruned and fine-tuned")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    atomic.write_with(path, lambda f: fig.savefig(f, dpi=90, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
