"""The training-curves PNG of a run directory."""

from __future__ import annotations

from pathlib import Path

from .atomic import write_with


def plot_curves(history: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    first = history[0] if history else {}
    # the metric the run is judged by: accuracy for classification, a task's own (val_map) otherwise
    metric = "val_acc" if "val_acc" in first else next((k for k in first if k.startswith("val_") and k != "val_loss"), None)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [r["train_loss"] for r in history], marker="o", label="train")
    if "val_loss" in first:
        axes[0].plot(epochs, [r["val_loss"] for r in history], marker="o", label="validation")
    axes[0].set(title="loss", xlabel="epoch")
    axes[0].legend()
    if metric == "val_acc":
        axes[1].plot(epochs, [100 * r["val_acc"] for r in history], marker="o", color="tab:green")
        axes[1].set(title="validation accuracy (%)", xlabel="epoch")
    elif metric is not None:
        axes[1].plot(epochs, [r.get(metric) for r in history], marker="o", color="tab:green")
        axes[1].set(title=f"validation {metric.removeprefix('val_')}", xlabel="epoch")
    axes[2].plot(epochs, [r["lr"] for r in history], marker="o", color="tab:red")
    axes[2].set(title="learning rate (last step of epoch)", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    write_with(Path(path), lambda f: fig.savefig(f, dpi=90, format="png"))
    plt.close(fig)
