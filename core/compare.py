"""Seeing runs side by side: overlaid learning curves and a table of final and best metrics.

``compare(paths, out)`` accepts run directories, job folders (an ablation, a sampling job, any job
of :mod:`tricks.jobs`: found by their ``job.json``) and folders holding either anywhere below, and
writes into ``out``:

    compare.png   train loss, validation loss and validation accuracy against the epoch, one line
                  per run; the seeds of one ablation configuration are drawn as their mean with a
                  band of plus or minus one sample standard deviation
    compare.md    one row per run: final and best validation accuracy, best epoch, final
                  validation loss, finished epochs, parameters, training seconds
    compare.csv   the same rows, numbers at full precision (accuracies as fractions), with run_dir

Runs of a task with a metric of its own (retrieval: ``val_map_at_r``; detection: ``val_map``, as
their summaries name it) are compared by that metric instead of the accuracy, in the third panel
and the table's columns (``final_val_map_at_r``, ...), when every run has it.

Labels: an ablation's runs by configuration and seed, a sampling job's networks (and any other
job's items) by their id, other runs by their plugins plus the settings in which they differ from
the other such runs (``mixup [core.lr=0.05]``). Everything is read through :class:`tricks.RunDir`;
nothing here imports torch.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from . import atomic
from .errors import TricksError
from .jobs import FREE_SETTINGS
from .rundir import RunDir

FILES = ("compare.png", "compare.md", "compare.csv")
COLUMNS = ["label", "final_val_acc", "best_val_acc", "best_epoch", "final_val_loss", "epochs", "params",
           "train_seconds", "run_dir"]
# Curves: (metric key, panel title, scale); accuracy is drawn in per cent.
CURVES = [("train_loss", "train loss", 1.0), ("val_loss", "validation loss", 1.0),
          ("val_acc", "validation accuracy (%)", 100.0)]


def shared_metric(runs: list[Run]) -> str:
    """The metric the runs are compared by: their summaries' ``metric`` when every run names the
    same one, else the validation accuracy."""
    names = {(r.run.summary() or {}).get("metric") or "val_acc" for r in runs}
    return names.pop() if len(names) == 1 else "val_acc"


def columns(metric: str = "val_acc") -> list[str]:
    """The CSV's columns, the final and best figures named for ``metric``."""
    return [c.replace("val_acc", metric) for c in COLUMNS]
LEGEND_MAX = 20  # more lines than this are drawn without a legend
_RECORDS = ("plugins", "versions", "adhoc_plugins")  # config sections that record a run rather than decide it


@dataclass
class Run:
    """One run to compare: where it is, its label, and the ablation configuration it repeats (if any)."""

    run: RunDir
    label: str
    group: tuple[str, str] | None = None  # (job folder, configuration) for the seeds of an ablation row
    rows: list[dict] | None = None


# --- finding the runs ------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TricksError(f"cannot read {path} ({type(error).__name__}); repair or remove it") from None


def _from_job(folder: Path) -> list[Run]:
    """The runs of a job folder, in the order of its plan."""
    job = _read_json(folder / "job.json")
    runs = []
    for item in job.get("items", []):
        meta = item.get("meta") or {}
        run = RunDir(folder / item.get("run_dir", f"runs/{item['id']}"))
        if job.get("kind") == "ablation" and "configuration" in meta:
            label = f"{meta['configuration']} seed {meta.get('seed')}"
            runs.append(Run(run, label, (str(folder), meta["configuration"])))
        else:
            runs.append(Run(run, str(item["id"])))
    order = {}  # an ablation's seeds of one configuration together, configurations in plan order
    for r in runs:
        order.setdefault(r.group, len(order))
    return sorted(runs, key=lambda r: order[r.group]) if None not in order else runs


def _below(folder: Path) -> list[Run]:
    """The runs of job folders and the run directories anywhere below ``folder`` (hidden folders
    skipped); a run outside a job is labelled later, with the others (:func:`_plain_labels`)."""
    runs = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "checkpoints")
        if "job.json" in files:
            runs += _from_job(Path(here))
            dirs[:] = []
        elif RunDir.CONFIG.name in files:
            runs.append(Run(RunDir(here), ""))
            dirs[:] = []
    return runs


def _rows(run: RunDir) -> list[dict]:
    try:
        return run.metrics()
    except ValueError:
        raise TricksError(f"{run.path / RunDir.METRICS} is not JSON lines; repair or remove it") from None


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Every run the paths name that has finished an epoch, each once, labelled (see the module doc)."""
    if not paths:
        raise TricksError("name at least one run directory, ablation or sampling job to compare")
    runs: list[Run] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise TricksError(f"{path} does not exist; name a run directory, an ablation or a sampling job")
        if (path / "job.json").is_file():
            here = _from_job(path)
        elif RunDir(path).has_run():
            here = [Run(RunDir(path), "")]
        else:
            here = _below(path) if path.is_dir() else []
        for r in here:
            r.rows = _rows(r.run)
        here = [r for r in here if r.rows]
        if not here:
            if RunDir(path).has_run() or (path / "job.json").is_file():
                what = "the job in" if (path / "job.json").is_file() else "the run in"
                raise TricksError(f"{what} {path} has not finished an epoch (no rows in {RunDir.METRICS}); "
                                  "compare it after its first epoch")
            raise TricksError(f"{path} holds no run (no {RunDir.CONFIG}, job.json or run directory below it); "
                              "name a run directory, an ablation or a sampling job")
        runs += here
    seen, unique = set(), []
    for r in runs:
        if r.run.path.resolve() not in seen:
            seen.add(r.run.path.resolve())
            unique.append(r)
    plain = [r for r in unique if not r.label]
    for r, label in zip(plain, _plain_labels([r.run for r in plain])):
        r.label = label
    _disambiguate(unique)
    return unique


def _flat(config: dict) -> dict[str, str]:
    """A config's settings as ``section.key`` -> value (JSON), the records and free settings left out."""
    flat = {}
    for section, values in config.items():
        if section in _RECORDS or not isinstance(values, dict):
            continue
        for key, value in values.items():
            if (section, key) not in FREE_SETTINGS:
                flat[f"{section}.{key}"] = json.dumps(value, sort_keys=True)
    return flat


def _plain_labels(runs: list[RunDir]) -> list[str]:
    """Each run's plugins ('baseline' without any), plus the settings in which the runs differ."""
    configs = [r.config() for r in runs]
    flats = [_flat(c) for c in configs]
    keys = sorted({k for f in flats for k in f})
    differing = [k for k in keys if len({f[k] for f in flats if k in f}) > 1]
    labels = []
    for config, flat in zip(configs, flats):
        name = " + ".join(config.get("plugins") or []) or "baseline"
        shown = [f"{k}={json.loads(flat[k])}" for k in differing if k in flat]
        labels.append(name + (f" [{', '.join(shown)}]" if shown else ""))
    return labels


def _disambiguate(runs: list[Run]) -> None:
    """Give runs that share a label their path (below the folder all runs share) as well."""
    common = Path(os.path.commonpath([str(r.run.path.resolve()) for r in runs])) if runs else Path()
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.label] = counts.get(r.label, 0) + 1
    for r in runs:
        if counts[r.label] > 1:
            where = os.path.relpath(r.run.path.resolve(), common)
            r.label = f"{r.label} ({r.run.path.name if where == '.' else where})"


# --- the table ---------------------------------------------------------------------------------------
def table_row(r: Run, metric: str = "val_acc") -> dict:
    """Final and best figures of one run (of ``metric``), read from its metrics rows (and its
    summary for params)."""
    rows = r.rows or []
    accs = [(row[metric], row.get("epoch")) for row in rows if row.get(metric) is not None]
    best = max(accs, key=lambda a: a[0]) if accs else (None, None)  # the first epoch with the best accuracy
    summary = r.run.summary() or {}
    params = summary.get("params", next((row["params"] for row in reversed(rows) if "params" in row), None))
    return {
        "label": r.label,
        f"final_{metric}": rows[-1].get(metric),
        f"best_{metric}": best[0],
        "best_epoch": best[1],
        "final_val_loss": rows[-1].get("val_loss"),
        "epochs": len(rows),
        "params": params,
        "train_seconds": sum(row.get("epoch_seconds", 0.0) for row in rows),
        "run_dir": str(r.run.path),
    }


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _row_metric(rows: list[dict]) -> str:
    """The metric the rows of :func:`table_row` hold (``final_<metric>``)."""
    return next((k.removeprefix("final_") for k in (rows[0] if rows else ()) if k.startswith("final_")
                 and k != "final_val_loss"), "val_acc")


def markdown_table(rows: list[dict]) -> str:
    metric = _row_metric(rows)
    what = "val acc (%)" if metric == "val_acc" else f"{metric} (x100)"
    lines = [f"| run | final {what} | best {what} | best epoch | final val loss | epochs | params | train time (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        pct = {k: None if r[f"{k}_{metric}"] is None else 100 * r[f"{k}_{metric}"] for k in ("final", "best")}
        lines.append(f"| {r['label'].replace('|', '/')} | {_fmt(pct['final'], '.2f')} | "
                     f"{_fmt(pct['best'], '.2f')} | {_fmt(r['best_epoch'], 'd')} | "
                     f"{_fmt(r['final_val_loss'], '.4f')} | {r['epochs']} | {_fmt(r['params'], ',d')} | "
                     f"{_fmt(r['train_seconds'], '.1f')} |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict]) -> str:
    """The rows as CSV; floats keep every digit (``repr``), so they read back exactly."""
    buffer = io.StringIO()
    names = columns(_row_metric(rows))
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r[k] is None else repr(r[k]) if isinstance(r[k], float) else r[k]) for k in names})
    return buffer.getvalue()


# --- the curves ---------------------------------------------------------------------------------------
def _lines(runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """What to draw: one line per run, and one per ablation configuration with several seeds."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        if r.group is not None:
            groups.setdefault(r.group, []).append(r)
    names = {g: g[1] for g in groups}
    for g in groups:  # the same configuration from two ablations: name the ablation too
        if sum(1 for h in groups if h[1] == g[1]) > 1:
            names[g] = f"{g[1]} ({Path(g[0]).name})"
    lines, drawn = [], set()
    for r in runs:
        members = groups.get(r.group, [r]) if r.group is not None else [r]
        if len(members) == 1:
            lines.append((r.label, [r]))
        elif r.group not in drawn:
            drawn.add(r.group)
            lines.append((f"{names[r.group]} (mean ± sd, {len(members)} seeds)", members))
    return lines


def _curve(members: list[Run], key: str, scale: float):
    """Epochs, mean, and sd (None for one run) of ``key`` over the runs, at every epoch any run has."""
    by_epoch: dict[int, list[float]] = {}
    for r in members:
        for row in r.rows:
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                by_epoch.setdefault(row["epoch"], []).append(scale * value)
    epochs = sorted(by_epoch)
    mean = [statistics.fmean(by_epoch[e]) for e in epochs]
    sd = [statistics.stdev(by_epoch[e]) if len(by_epoch[e]) > 1 else 0.0 for e in epochs] if len(members) > 1 else None
    return epochs, mean, sd


def plot(runs: list[Run], path: Path, metric: str = "val_acc") -> None:
    """Three panels (train loss, validation loss, validation accuracy or ``metric``) against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    lines = _lines(runs)
    cmap = plt.get_cmap("tab10" if len(lines) <= 10 else "tab20" if len(lines) <= 20 else "viridis")
    colours = [cmap(i if len(lines) <= 20 else i / max(len(lines) - 1, 1)) for i in range(len(lines))]
    curves = CURVES if metric == "val_acc" else [*CURVES[:2], (metric, f"validation {metric}", 1.0)]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for (label, members), colour in zip(lines, colours):
        for ax, (key, _, scale) in zip(axes, curves):
            epochs, mean, sd = _curve(members, key, scale)
            if not epochs:
                continue
            ax.plot(epochs, mean, color=colour, marker="o" if len(epochs) <= 30 else None, markersize=3,
                    linewidth=1.2, label=label)
            if sd is not None:
                ax.fill_between(epochs, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                                color=colour, alpha=0.2, linewidth=0)
    for ax, (_, title, _) in zip(axes, curves):
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if len(lines) <= LEGEND_MAX:
        handles, labels = axes[0].get_legend_handles_labels()
        if not handles:
            handles, labels = axes[2].get_legend_handles_labels()
        columns = 1 if max((len(x) for x in labels), default=0) > 40 else min(3, len(labels)) or 1
        legend = fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False)
        fig.canvas.draw()
        height = legend.get_window_extent().height / fig.dpi
        fig.set_figheight(4.2 + height)
        fig.tight_layout(rect=(0, (height + 0.1) / fig.get_figheight(), 1, 1))
    else:
        fig.suptitle(f"{len(lines)} runs (too many to name: see compare.md)", fontsize=10)
        fig.tight_layout()
    atomic.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


# --- the command -------------------------------------------------------------------------------------
def compare(paths: list[str | Path], out: str | Path) -> list[dict]:
    """Find the runs in ``paths``, write ``compare.png``, ``compare.md`` and ``compare.csv`` into
    ``out`` (created if missing), and return the table rows (one per run, in the order found)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TricksError(f"--out {out} is a file; name a folder for the comparison (it is created if missing)")
    runs = find_runs(paths)
    metric = shared_metric(runs)
    rows = [table_row(r, metric) for r in runs]
    out.mkdir(parents=True, exist_ok=True)
    plot(runs, out / FILES[0], metric)
    title = f"# Comparison of {len(rows)} run{'s' if len(rows) != 1 else ''}\n\n"
    atomic.write_text(out / FILES[1], title + markdown_table(rows))
    atomic.write_text(out / FILES[2], csv_text(rows))
    return rows
