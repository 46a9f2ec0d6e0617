"""The table and chart of docs/results/detection_mnist.md: the trained detectors (one per seed)
and their pruned, fine-tuned versions (``tricks lcp`` jobs of every method, ratio and seed):
mAP@[.5:.95], mAP@.5, mAP@.75 and the backbone's parameters.

    python docs/results/detection_mnist.py --baseline RUN [RUN ...] --jobs JOB [JOB ...] \\
        [--control RUN ...] --out docs/results/detection_mnist_pruning

writes OUT.csv (one row per run), OUT_summary.csv (mean and standard deviation over the seeds of
each method and ratio) and OUT.png, and prints the summary as a Markdown table. A job is matched
to the baseline of its seed (the seed of the runs it trained). ``--control``: the last runs of the
unpruned detectors trained on with the jobs' schedule and no pruning (method ``unpruned+epochs``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import tricks
from tricks import atomic
from tricks.ablate import csv_text

FIGURES = (("val_map", "mAP@[.5:.95]"), ("val_map_50", "mAP@.5"), ("val_map_75", "mAP@.75"))
METHODS = ("lcp", "dcp", "l1", "random")
UNPRUNED = ("none", "unpruned+epochs")


def backbone_params(run: tricks.RunDir) -> int:
    model = run.build_model()
    return sum(p.numel() for p in model.get_submodule(model.prune_root).parameters())


def row(run: tricks.RunDir, method: str, ratio: float, start: int, name: str) -> dict:
    last = run.metrics()[-1]
    params = backbone_params(run)
    return {"method": method, "ratio": ratio, "seed": run.config()["core"]["seed"], "backbone_params": params,
            "removed": round(1 - params / start, 4), **{k: round(last[k], 4) for k, _ in FIGURES}, "run": name}


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over the seeds, per method and ratio (the unpruned detectors first)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["ratio"]), []).append(r)
    order = sorted(groups, key=lambda g: (g[1], (UNPRUNED + METHODS).index(g[0])))
    out = []
    for method, ratio in order:
        rs = groups[(method, ratio)]
        entry = {"method": method, "ratio": ratio, "seeds": len(rs), "removed": rs[0]["removed"]}
        for k, _ in FIGURES:
            values = [r[k] for r in rs]
            entry[k] = round(statistics.fmean(values), 4)
            entry[k + "_sd"] = round(statistics.stdev(values), 4) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def markdown(summary: list[dict]) -> str:
    lines = ["| detector | backbone params removed | seeds | mAP@[.5:.95] | mAP@.5 | mAP@.75 |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for s in summary:
        name = {"none": "unpruned", "unpruned+epochs": "unpruned, + the jobs' epochs"}.get(s["method"], s["method"])
        cells = [f"{s[k]:.3f} ± {s[k + '_sd']:.3f}" for k, _ in FIGURES]
        lines.append(f"| {name} | {100 * s['removed']:.1f}% | {s['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, nargs="+", help="the trained detectors' run directories (a seed each)")
    parser.add_argument("--jobs", required=True, nargs="+", help="tricks lcp job folders")
    parser.add_argument("--control", nargs="*", default=[], help="unpruned detectors trained with the jobs' schedule")
    parser.add_argument("--out", required=True, help="path without extension of the CSVs and the PNG")
    args = parser.parse_args()
    bases = {tricks.RunDir(b).config()["core"]["seed"]: tricks.RunDir(b) for b in args.baseline}
    starts = {seed: backbone_params(run) for seed, run in bases.items()}
    rows = [row(run, "none", 0.0, starts[seed], run.path.name) for seed, run in sorted(bases.items())]
    for folder in args.jobs:
        meta = json.loads((Path(folder) / "job.json").read_text())["meta"]
        final = tricks.RunDir(Path(folder) / "runs" / "finetune")
        seed = final.config()["core"]["seed"]
        if seed not in starts:
            raise SystemExit(f"job {folder} ran with seed {seed}, and no --baseline has that seed")
        rows.append(row(final, meta["method"], meta["ratio"], starts[seed], f"{Path(folder).name}/runs/finetune"))
    for folder in args.control:
        run = tricks.RunDir(folder)
        rows.append(row(run, "unpruned+epochs", 0.0, starts[run.config()["core"]["seed"]], str(Path(folder).relative_to(Path(folder).parents[2]))))
    out = Path(args.out)
    atomic.write_text(out.with_suffix(".csv"), csv_text(rows, list(rows[0])))
    summary = summarize(rows)
    atomic.write_text(out.with_name(out.name + "_summary.csv"), csv_text(summary, list(summary[0])))
    chart(rows, summary, out.with_suffix(".png"))
    print(markdown(summary))


def chart(rows: list[dict], summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({r["ratio"] for r in rows if r["method"] not in UNPRUNED})
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(FIGURES), figsize=(13, 4.2))
    colors = dict(zip(METHODS, ("tab:red", "tab:orange", "tab:blue", "tab:gray")))
    for ax, (key, name) in zip(axes, FIGURES):
        for method, color, label in (("none", "green", "unpruned (band: seeds)"),
                                     ("unpruned+epochs", "purple", "unpruned + the jobs' epochs")):
            base = [r[key] for r in rows if r["method"] == method]
            if base:
                ax.axhspan(min(base), max(base), color=color, alpha=0.12)
                ax.axhline(sum(base) / len(base), color=color, lw=1, label=label)
        # the axis spans the unpruned detectors and the methods' means; a seed far below (a random
        # selection that broke the detector) is drawn at the bottom edge with its value
        unpruned = [r[key] for r in rows if r["method"] in UNPRUNED]
        low = max(0.0, min(unpruned) - 0.12)
        notes: dict[int, list[str]] = {}  # per ratio: the seeds below the axis
        for j, m in enumerate(methods):
            shift = (j - (len(methods) - 1) / 2) * 0.12
            for i, ratio in enumerate(ratios):
                points = [r[key] for r in rows if r["method"] == m and r["ratio"] == ratio]
                inside = [p for p in points if p >= low]
                ax.scatter([i + shift] * len(inside), inside, color=colors[m], s=14, alpha=0.6)
                below = [p for p in points if p < low]
                if below:
                    ax.scatter([i + shift] * len(below), [low] * len(below), color=colors[m], marker="v", s=30, clip_on=False)
                    notes.setdefault(i, []).append(f"{m} {', '.join(f'{p:.2f}' for p in below)}")
            means = [next((s[key] for s in summary if s["method"] == m and s["ratio"] == ratio), float("nan")) for ratio in ratios]
            ax.plot([i + shift for i in range(len(ratios))], means, "_", color=colors[m], ms=18, mew=2.5, label=m)
        for i, lines in notes.items():
            ax.text(i, low, "below the axis:\n" + "\n".join(lines), ha="center", va="bottom", fontsize=7, color="dimgray")
        removed = [next(s["removed"] for s in summary if s["ratio"] == ratio) for ratio in ratios]
        ax.set_xticks(range(len(ratios)), [f"{100 * r:.0f}% removed" for r in removed])
        ax.set_xlim(-0.6, len(ratios) - 0.4)
        ax.set_ylim(low, None)
        ax.set(title=name)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("validation (dots: seeds, bars: mean)")
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("FCOS on resnet8, MNIST-detection: backbone pruned stage by stage and fine-tuned", fontsize=10)
    fig.tight_layout()
    atomic.write_with(path, lambda f: fig.savefig(f, dpi=90, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
