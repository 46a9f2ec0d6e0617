"""The figures of a design-space analysis, drawn with matplotlib's object API (no pyplot state) and
written atomically as PNG: the error EDFs, raw and complexity-normalized, the error against every
design parameter, and the best models' block widths with their quantized linear fit.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tricks.atomic import write_with

from .stats import Sweep, as_number, count_text, edf, wm_used

FIGURES = ("edf.png", "edf_normalized.png", "error_vs_params.png", "best_widths.png")
# Only the models that finished with an error value are drawn; the EDFs' legends count the ones
# that diverged ("k of n diverged").


COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
          "tab:gray", "tab:olive", "tab:cyan")
WIDTH_KEY = re.compile(r"w\d+|w0|wa|width.*|flops|parameters|activations")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _grid(rows: int, cols: int, panel: tuple[float, float], left: float = 0.7, right: float = 0.15,
          top: float = 0.45, bottom: float = 0.55, wspace: float = 0.25, hspace: float = 0.5, **kwargs):
    """A figure of ``rows x cols`` panels of ``panel`` inches with fixed margins (inches): faster than
    ``tight_layout``, which measures every tick label of every panel."""
    width = left + right + cols * panel[0] + (cols - 1) * wspace * panel[0]
    height = top + bottom + rows * panel[1] + (rows - 1) * hspace * panel[1]
    fig = _figure(width, height)
    axes = fig.subplots(rows, cols, squeeze=False, **kwargs)
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=wspace, hspace=hspace)
    return fig, axes


def _log_axis(axis) -> None:
    """A log axis labelled 10, 20, 50, 100, ... in plain numbers (K, M, G suffixes), no minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: count_text(v)))
    axis.set_minor_formatter(NullFormatter())


def _save(fig, path: Path) -> None:
    write_with(path, lambda f: fig.savefig(f, dpi=90, format="png"))


def _color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def _left_out(sweep: Sweep) -> str:
    """``, k of n diverged`` for a legend, when some of the sweep's models diverged (they are not in the curve)."""
    return f", {sweep.diverged_text}" if sweep.diverged else ""


def plot_edf(sweeps: Sequence[Sweep], path: Path) -> None:
    """The error EDF of every sweep, overlaid."""
    fig, axes = _grid(1, 1, (5.6, 3.6), top=0.35)
    ax = axes[0, 0]
    for i, s in enumerate(sweeps):
        x, y = edf(s.errors)
        ax.step(x, y, where="post", color=_color(i), lw=1.8,
                label=f"{s.name} (n={len(s.ok)}, min {s.errors.min():.2f}, mean {s.errors.mean():.2f}{_left_out(s)})")
    ax.set(xlabel="error (%)", ylabel="cumulative prob.", ylim=(0, 1.02), title="error EDF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def plot_edf_normalized(sweeps: Sequence[Sweep], norm: dict[str, Any] | None, note: str, path: Path) -> None:
    """The complexity-normalized EDFs (``norm`` from :func:`.stats.normalization`), or ``note`` when there is none."""
    fig, axes = _grid(1, 1, (5.6, 3.6), top=0.35)
    ax = axes[0, 0]
    if norm is None:
        ax.text(0.5, 0.5, note, ha="center", va="center", wrap=True, transform=ax.transAxes)
        ax.set_axis_off()
    else:
        for i, (s, w) in enumerate(zip(sweeps, norm["weights"])):
            x, y = edf(s.errors, w)
            used = int((w > 0).sum())
            ax.step(x, y, where="post", color=_color(i), lw=1.8,
                    label=f"{s.name} (n={used}/{len(s.ok)}, weighted mean {np.sum(w * s.errors):.2f}{_left_out(s)})")
        ax.set(xlabel="error (%)", ylabel="cumulative prob. (flops-normalized)", ylim=(0, 1.02),
               title=f"complexity-normalized EDF ({len(norm['common'])} of {len(norm['edges']) - 1} log-flops bins)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def _panel_values(sweeps: Sequence[Sweep]) -> list[tuple[str, list[np.ndarray]]]:
    """``(name, per-sweep values aligned with sweep.ok)`` for every design parameter and complexity measure."""
    keys: list[str] = []
    for s in sweeps:
        for r in s.ok:
            for k in (r.get("params") or {}):
                if k not in keys:
                    keys.append(k)
    panels = []
    for k in keys:
        values = [np.array([as_number((r.get("params") or {}).get(k)) for r in s.ok]) for s in sweeps]
        if any(np.isfinite(v).any() for v in values):
            panels.append((k, values))

    def total_depth(r):
        depths = (r.get("config") or {}).get("depths")
        try:
            return float(sum(int(d) for d in depths))
        except (TypeError, ValueError):
            return math.nan

    depth = [np.array([total_depth(r) for r in s.ok]) for s in sweeps]
    same = any(k == "depth" for k, _ in panels) and all(
        np.array_equal(a, b, equal_nan=True) for a, b in zip(depth, dict(panels)["depth"]))
    if not same and any(np.isfinite(v).any() for v in depth):
        panels.append(("total depth", depth))
    for key, label in (("flops", "flops"), ("params", "parameters"), ("acts", "activations")):
        values = [s.complexity(key) for s in sweeps]
        if any(np.isfinite(v).any() for v in values):
            panels.append((label, values))
    return panels


def _trend(ax, x: np.ndarray, y: np.ndarray, log: bool, color: str) -> None:
    ux = np.unique(x)
    if ux.size < 2:
        return
    if log:
        a, b = np.polyfit(np.log(x), y, 1)
        xs = np.exp(np.linspace(np.log(ux[0]), np.log(ux[-1]), 50))
        ax.plot(xs, a * np.log(xs) + b, color=color, lw=1.5)
        return
    if ux.size <= 8:
        centers, medians = ux, np.array([np.median(y[x == u]) for u in ux])
    else:
        edges = np.quantile(x, np.linspace(0, 1, 7))
        index = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, 5)
        groups = [g for g in range(6) if np.any(index == g)]
        centers = np.array([np.median(x[index == g]) for g in groups])
        medians = np.array([np.median(y[index == g]) for g in groups])
    ax.plot(centers, medians, color=color, lw=1.5, marker="o", ms=3)


def plot_params(sweeps: Sequence[Sweep], path: Path) -> None:
    """The error against every design parameter and complexity measure, one panel each."""
    panels = _panel_values(sweeps)
    cols = min(5, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = _grid(rows, cols, (2.6, 1.9), top=0.6, left=0.6, wspace=0.08, hspace=0.45, sharey=True)
    axes = axes.ravel()
    pooled_errors = np.concatenate([s.errors for s in sweeps])
    margin = max(0.05 * np.ptp(pooled_errors), 0.5)
    axes[0].set_ylim(pooled_errors.min() - margin, pooled_errors.max() + margin)  # shared: set once
    for ax in axes:
        ax.set_autoscaley_on(False)
    for ax, (name, values) in zip(axes, panels):
        pooled = np.concatenate([v[np.isfinite(v)] for v in values])
        log = bool(WIDTH_KEY.fullmatch(name)) and pooled.min() > 0 and pooled.max() >= 2 * pooled.min()
        for i, (s, v) in enumerate(zip(sweeps, values)):
            keep = np.isfinite(v)
            x, y = v[keep], s.errors[keep]
            ax.plot(x, y, ls="", marker="o", ms=3, alpha=0.6, color=_color(i), mew=0)
            _trend(ax, x, y, log, _color(i))
        if log:
            ax.set_xscale("log")
            _log_axis(ax.xaxis)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    for ax in axes[::cols]:
        ax.set_ylabel("error (%)", fontsize=8)
    if not panels:
        axes[0].text(0.5, 0.5, "no design parameters or complexity recorded", ha="center", va="center",
                     transform=axes[0].transAxes)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", ms=5, color=_color(i)) for i in range(len(sweeps))]
    fig.legend(handles, [f"{s.name} ({s.diverged_text})" if s.diverged else s.name for s in sweeps], loc="upper center", ncol=min(len(sweeps), 5), fontsize=8,
               frameon=False)
    _save(fig, path)



def plot_best_widths(sweeps: Sequence[Sweep], fits: list[list[dict[str, Any]]], path: Path) -> None:
    """The block widths of the best models (``fits`` from :func:`.stats.best_fits`) with their fits."""
    cols = max(1, max(len(f) for f in fits))
    rows = len(sweeps)
    fig, axes = _grid(rows, cols, (2.9, 2.2), left=0.65, top=0.3, wspace=0.12, hspace=0.35, sharey=True)
    for i, (s, models) in enumerate(zip(sweeps, fits)):
        for c in range(cols):
            ax = axes[i, c]
            if c >= len(models):
                ax.set_axis_off()
                continue
            m = models[c]
            r = m["result"]
            ax.set_title(f"{s.name}: {r['id']} ({float(r['error']):.2f}%)", fontsize=8)
            if not m["widths"]:
                ax.text(0.5, 0.5, "no widths recorded", ha="center", va="center", transform=ax.transAxes)
                continue
            j = np.arange(len(m["widths"]))
            ax.step(j, m["widths"], where="mid", color=_color(i), lw=2, label="widths")
            fit = m["fit"]
            ax.step(j, fit["widths"], where="mid", color="black", lw=0.8, ls=":", label="quantized fit")
            wm = f"{fit['wm']:.2f}" if wm_used(fit) else "–"
            ax.plot(j, fit["u"], color="black", lw=1, ls="--",
                    label=f"w0={fit['w0']} wa={fit['wa']:.1f} wm={wm}\nfit err {fit['fit_error']:.3g}")
            ax.set_yscale("log")
            _log_axis(ax.yaxis)
            ax.set_xlabel("block", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=6, loc="best")
        axes[i, 0].set_ylabel("width", fontsize=8)
    _save(fig, path)
