"""The CPU miniature of docs/results/vit_cifar10.md: tabulate the ViT-against-ResNet comparison and
the cumulative ablation of the ViT recipe's parts, draw the validation curves, and copy a trained
ViT's attention maps.

    python docs/results/vit_cifar10.py OUT

OUT holds what the page's commands wrote: OUT/ablate (tricks ablate), OUT/vit-recipe-seed1 and
OUT/resnet56-seed0, OUT/resnet56-seed1 (tricks run). Writes docs/results/vit_cifar10.csv (one row
per run), vit_cifar10_curves.png and vit_cifar10_attention.png beside this script.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
from pathlib import Path

import tricks
from tricks.atomic import write_with

HERE = Path(__file__).resolve().parent


def runs(out: Path) -> list[dict]:
    rows = []
    for summary in sorted(out.rglob("summary.json")):
        run = tricks.RunDir(summary.parent)
        config, s, metrics = run.config(), run.summary() or {}, run.metrics()
        model = config["core"]["model"]
        parts = [p for p in config["plugins"] if p not in ("vit", "resnet_tweaks")]
        rows.append({
            "model": model + ("-D" if "resnet_tweaks" in config["plugins"] else ""),
            "plugins": "+".join(parts), "seed": config["core"]["seed"],
            "final_val_acc": round(100 * s["final_val_acc"], 2), "best_val_acc": round(100 * s["best_val_acc"], 2),
            "final_val_ema_acc": round(100 * s["final_val_ema_acc"], 2) if "final_val_ema_acc" in s else "",
            "final_train_loss": round(metrics[-1]["train_loss"], 4),
            "seconds": round(sum(r["epoch_seconds"] for r in metrics), 1),
            "macs": s.get("macs", ""), "params": s.get("params", ""),
            "run_dir": str(run.path.relative_to(out)),
        })
    return rows


def curves(out: Path, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    full = max(len(r["plugins"].split("+")) for r in rows if r["model"] == "vit_cifar")
    names = {"adamw+linear_scaling+no_bias_decay": "AdamW only",
             "adamw+linear_scaling+no_bias_decay+warmup+cosine+label_smoothing": "recipe up to label smoothing"}
    for r in rows:
        recipe = r["model"] != "vit_cifar" or (len(r["plugins"].split("+")) == full and "adamw" in r["plugins"])
        label = "its recipe" if recipe else names.get(r["plugins"])
        if label is None:
            continue
        metrics = tricks.RunDir(out / r["run_dir"]).metrics()
        style = "-" if r["model"] == "vit_cifar" else "--"
        ax.plot([m["epoch"] for m in metrics], [100 * m["val_acc"] for m in metrics], style, marker="o", ms=3,
                label=f"{r['model']}, {label}, seed {r['seed']}")
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title="CIFAR-10, 5,000 training images, 8 epochs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_with(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    out = parser.parse_args().out
    rows = runs(out)
    with open(HERE / "vit_cifar10.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["plugins"]), []).append(r)
    for (model, plugins), rs in groups.items():
        accs = [r["final_val_acc"] for r in rs]
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        ema = [r["final_val_ema_acc"] for r in rs if r["final_val_ema_acc"] != ""]
        print(f"{model:14} {plugins:90} n={len(rs)} final {statistics.mean(accs):.2f}{spread}"
              + (f"  ema {statistics.mean(ema):.2f}" if ema else "")
              + f"  {statistics.mean(r['seconds'] for r in rs):.0f} s")
    curves(out, rows, HERE / "vit_cifar10_curves.png")
    maps = sorted(out.rglob("attention.png"))
    full = [m for m in maps if "vit-recipe-seed" in str(m)] or maps  # the whole recipe (AdamW)
    if full:
        shutil.copyfile(full[0], HERE / "vit_cifar10_attention.png")


if __name__ == "__main__":
    main()
