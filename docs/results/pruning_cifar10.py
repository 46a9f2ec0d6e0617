"""The CPU miniature of docs/results/pruning_cifar10.md: after `tricks ablate` has pruned, train
each pruned architecture from scratch (core.structure_from) as one job, then tabulate accuracy
against the MACs kept for every criterion and ratio, pruned-and-fine-tuned beside from-scratch,
and draw the chart.

    python docs/results/pruning_cifar10.py OUT [--data-dir ../shared/data/cifar10]

OUT is the folder the page's `tricks ablate` command wrote into (OUT/ablate); this script adds
OUT/scratch (a job: run it again to continue it) and writes OUT/pruning.csv and OUT/pruning.png.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

import tricks
from tricks.jobs import Item, Job, run_job

# The settings every run of the miniature shares (the page's ablate command uses the same).
CORE = {"model": "resnet20", "dataset": "npz", "train_limit": 5000, "val_limit": 2000, "epochs": 4,
        "batch_size": 128, "device": "cpu", "curves": False}
SCRATCH = ("l1", "random", "slimming", "taylor", "dcp")  # the criteria whose architectures are also trained from scratch


def pruned_runs(ablation: Path) -> list[tricks.RunDir]:
    return sorted((tricks.RunDir(p.parent) for p in (ablation / "runs").rglob("summary.json")), key=str)


def describe(run: tricks.RunDir) -> dict:
    config, summary = run.config(), run.summary() or {}
    source = (config.get("core") or {}).get("structure_from")
    scratch = bool(source)
    pruned = tricks.RunDir(source).config() if scratch else config  # a scratch run is its source's architecture
    prune = pruned.get("prune") or {}
    has = "prune" in pruned.get("plugins", [])
    return {"criterion": prune.get("criterion", "none") if has else "none",
            "ratio": prune.get("ratio", 0.0) if has else 0.0,
            "seed": config["core"]["seed"], "how": "scratch" if scratch else "fine-tuned",
            "final_val_acc": summary.get("final_val_acc"), "macs": summary.get("macs"),
            "macs_start": summary.get("macs_start"), "params": summary.get("params"), "run_dir": str(run.path)}


def scratch_job(out: Path, data_dir: str, sources: list[tricks.RunDir]) -> None:
    """Each pruned architecture trained from its fresh initialization for as many epochs (Liu et al.
    2019's Scratch-E)."""
    items = []
    for run in sources:
        config = run.config()
        ident = f"{config['prune']['criterion']}-{config['prune']['ratio']}-seed{config['core']['seed']}"
        recipe = {"plugins": ["cosine"], "core": {**CORE, "data_dir": data_dir, "seed": config["core"]["seed"],
                                                   "structure_from": str(run.path.resolve())}}
        items.append(Item(ident, recipe))
    run_job(Job(out, "pruning-scratch", items), per_device=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data-dir", default="../shared/data/cifar10")
    args = parser.parse_args()
    runs = [describe(r) for r in pruned_runs(args.out / "ablate")]
    sources = [tricks.RunDir(r["run_dir"]) for r in runs if r["criterion"] in SCRATCH]
    scratch_job(args.out / "scratch", str(Path(args.data_dir).resolve()), sources)
    runs += [describe(r) for r in pruned_runs(args.out / "scratch")]

    rows = []
    keys = sorted({(r["criterion"], r["ratio"], r["how"]) for r in runs})
    for criterion, ratio, how in keys:
        group = [r for r in runs if (r["criterion"], r["ratio"], r["how"]) == (criterion, ratio, how)]
        accs = [100 * r["final_val_acc"] for r in group if r["final_val_acc"] is not None]
        kept = [r["macs"] / r["macs_start"] for r in group if r["macs"] and r["macs_start"]]
        if how == "scratch":  # its own start is already pruned: compare with the unpruned model
            base = next((r["macs_start"] for r in runs if r["criterion"] == "none"), None)
            kept = [r["macs"] / base for r in group if base]
        rows.append({"criterion": criterion, "ratio": ratio, "how": how, "seeds": len(accs),
                     "acc_mean": round(statistics.mean(accs), 2) if accs else None,
                     "acc_sd": round(statistics.stdev(accs), 2) if len(accs) > 1 else None,
                     "macs_kept": round(statistics.mean(kept), 3) if kept else None,
                     "params": group[0]["params"]})
    with open(args.out / "pruning.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        print(r)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    base = [r for r in rows if r["criterion"] == "none"]
    if base:
        ax.axhline(base[0]["acc_mean"], color="gray", linestyle=":", label="unpruned")
    for (criterion, how), marker in zip(sorted({(r["criterion"], r["how"]) for r in rows if r["criterion"] != "none"}),
                                        "osD^vx<>"):
        line = sorted((r for r in rows if (r["criterion"], r["how"]) == (criterion, how)), key=lambda r: r["macs_kept"])
        ax.errorbar([100 * r["macs_kept"] for r in line], [r["acc_mean"] for r in line],
                    yerr=[r["acc_sd"] or 0 for r in line], marker=marker, capsize=3,
                    linestyle="--" if how == "scratch" else "-", label=f"{criterion} ({how})")
    ax.set_xlabel("MACs kept (% of the unpruned ResNet-20)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Channel pruning, CIFAR-10 miniature (mean ± sd over 2 seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "pruning.png", dpi=120)


if __name__ == "__main__":
    main()
