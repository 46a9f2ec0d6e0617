"""Ablations: train a baseline and the baseline with tricks added, over several seeds, and
tabulate the effect of each trick.

An ablation directory holds ``plan.json`` (what is trained: the configurations, the seeds, the
shared settings), ``runs/<configuration>/seed<k>/`` (ordinary run directories), and the
results: ``results.csv`` (one row per finished run), ``table.md`` and ``table.csv`` (one row per
configuration: mean and spread over seeds, delta against the baseline, time) and ``chart.png``.
The results are rewritten atomically after every run. Running the same ablation again into the
same directory skips finished runs and resumes an interrupted one from its last checkpoint.
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import io
from .config import CORE, parse_set, read_recipe, resolve
from .errors import TricksError
from .registry import Catalog

MODES = ("alone", "cumulative", "both")


@dataclass
class Configuration:
    """One row of the ablation: a label, its directory name and the plugins it trains with."""

    label: str
    slug: str
    plugins: list[str]
    added: list[str] = field(default_factory=list)  # the tricks on top of the base plugins


def plan(tricks: list[str], mode: str = "alone", base: list[str] | None = None, all_together: bool = False) -> list[Configuration]:
    """The configurations of an ablation, baseline first.

    ``alone``: the baseline, then the baseline plus each trick on its own. ``cumulative``: the
    baseline, then the tricks added one after another, as in the tables of Bag of Tricks.
    ``both``: the two, without repeating a configuration. ``base`` plugins are in every
    configuration, the baseline included. ``all_together`` adds the configuration with every
    trick at once where the mode does not already end with it (``alone``).
    """
    if mode not in MODES:
        raise TricksError(f"unknown ablation mode '{mode}'; choose one of {', '.join(MODES)}")
    base = list(base or [])
    repeated = sorted({t for t in tricks if tricks.count(t) > 1} | (set(tricks) & set(base)))
    if repeated:
        raise TricksError(f"'{repeated[0]}' is named twice in the ablation; list each plugin once (in --plugins or --base)")
    if not tricks:
        raise TricksError("an ablation needs at least one plugin to add: --plugins a,b,c")
    suffix = f" ({', '.join(base)})" if base else ""
    configs = [Configuration("baseline" + suffix, "baseline", base, [])]
    if mode in ("alone", "both"):
        for t in tricks:
            configs.append(Configuration(f"+ {t}", f"only-{t}", base + [t], [t]))
        if all_together and mode == "alone" and len(tricks) > 1:
            configs.append(Configuration("+ all of them", "all", base + tricks, list(tricks)))
    if mode in ("cumulative", "both"):
        for i in range(1, len(tricks) + 1):
            added = tricks[:i]
            if mode == "both" and i == 1:
                continue  # the same as the first trick alone
            label = f"+ {tricks[0]}" if i == 1 else "+ " + " + ".join(added)
            configs.append(Configuration(label, f"upto-{tricks[i - 1]}", base + added, added))
    return configs


def split_sets(sets: list[str], plugins: list[str]) -> list[str]:
    """The ``--set`` items that apply to a configuration: core settings and its plugins' settings."""
    return [s for s in sets if parse_set(s)[0] in (CORE, *plugins)]


@dataclass
class RunResult:
    configuration: str
    slug: str
    seed: int
    final_val_acc: float
    best_val_acc: float
    final_val_loss: float
    seconds: float
    run_dir: str


def read_result(config: Configuration, seed: int, run_dir: Path, epochs: int) -> RunResult | None:
    """The result of a finished run (all its epochs in metrics.jsonl), else None."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if len(rows) < epochs:
        return None
    rows = rows[:epochs]
    return RunResult(config.label, config.slug, seed, rows[-1]["val_acc"], max(r["val_acc"] for r in rows),
                     rows[-1]["val_loss"], sum(r["epoch_seconds"] for r in rows), str(run_dir))


def _mean_sd(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(configs: list[Configuration], results: list[RunResult]) -> list[dict]:
    """One row per configuration with finished runs: accuracy in %, mean and sample standard
    deviation over seeds, and the difference of the means from the baseline's."""
    rows = []
    for c in configs:
        mine = [r for r in results if r.slug == c.slug]
        if not mine:
            continue
        final, final_sd = _mean_sd([100 * r.final_val_acc for r in mine])
        best, best_sd = _mean_sd([100 * r.best_val_acc for r in mine])
        rows.append(dict(configuration=c.label, plugins=" ".join(c.plugins) or "-", seeds=len(mine),
                         final_acc=final, final_sd=final_sd, best_acc=best, best_sd=best_sd,
                         seconds=statistics.fmean(r.seconds for r in mine)))
    base = next((r for r in rows if r["configuration"] == configs[0].label), None)
    for r in rows:
        r["delta_final"] = r["final_acc"] - base["final_acc"] if base else math.nan
        r["delta_best"] = r["best_acc"] - base["best_acc"] if base else math.nan
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| configuration | seeds | final val acc (%) | best val acc (%) | delta final | delta best | time per run (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['configuration']} | {r['seeds']} | {r['final_acc']:.2f} ± {r['final_sd']:.2f} | "
                     f"{r['best_acc']:.2f} ± {r['best_sd']:.2f} | {r['delta_final']:+.2f} | {r['delta_best']:+.2f} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict], columns: list[str]) -> str:
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items() if k in columns})
    return buffer.getvalue()


TABLE_COLUMNS = ["configuration", "plugins", "seeds", "final_acc", "final_sd", "best_acc", "best_sd",
                 "delta_final", "delta_best", "seconds"]
RESULT_COLUMNS = ["configuration", "slug", "seed", "final_val_acc", "best_val_acc", "final_val_loss", "seconds", "run_dir"]


def plot_chart(rows: list[dict], path: Path, title: str) -> None:
    """Horizontal bars of the final accuracy (mean, with the spread over seeds), the best
    accuracy as a marker, and the baseline as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [textwrap.fill(r["configuration"], 34) for r in rows][::-1]
    final = [r["final_acc"] for r in rows][::-1]
    spread = [r["final_sd"] for r in rows][::-1]
    best = [r["best_acc"] for r in rows][::-1]
    lines = sum(label.count("\n") + 1 for label in labels)
    fig, ax = plt.subplots(figsize=(9, 0.32 * lines + 0.25 * len(rows) + 1.8))
    y = range(len(rows))
    ax.barh(y, final, xerr=spread, color="tab:blue", alpha=0.8, capsize=3, label="final (mean ± sd)")
    ax.scatter(best, y, color="tab:orange", zorder=3, label="best (mean)", marker="D", s=18)
    ax.axvline(rows[0]["final_acc"], color="gray", linestyle="--", linewidth=1, label="baseline final")
    low = min(min(final) - max(spread + [0]), min(best))
    high = max(max(final) + max(spread + [0]), max(best))
    pad = max(0.5, 0.1 * (high - low))
    ax.set_xlim(max(0.0, low - pad), min(100.0, high + pad))
    ax.set_yticks(list(y), labels)
    ax.set_xlabel("validation accuracy (%)")
    ax.set_title(textwrap.fill(title, 70), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1))
    io.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def write_results(out: Path, configs: list[Configuration], results: list[RunResult], title: str) -> list[dict]:
    rows = summarize(configs, results)
    io.write_text(out / "results.csv", csv_text([r.__dict__ for r in results], RESULT_COLUMNS))
    io.write_text(out / "table.csv", csv_text(rows, TABLE_COLUMNS))
    io.write_text(out / "table.md", f"# {title}\n\n" + markdown_table(rows))
    if rows:
        plot_chart(rows, out / "chart.png", title)
    return rows


class AblationReporter:
    """What the ablation tells its caller; every method is optional to override."""

    def start(self, runs: int, done: int) -> None: ...
    def run_start(self, index: int, config: Configuration, seed: int, resuming: bool) -> Any:
        """Returns the :class:`tricks.Reporter` for the run (None: silent)."""
        return None
    def run_end(self, index: int, result: RunResult) -> None: ...
    def finish(self, rows: list[dict], out: Path) -> None: ...


def ablate(
    plugins: list[str],
    *,
    mode: str = "alone",
    seeds: int = 1,
    base: list[str] | None = None,
    all_together: bool = False,
    recipe: str | Path | dict | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    out: str | Path = "ablation",
    registries: list[Path] | None = None,
    reporter: AblationReporter | None = None,
) -> list[dict]:
    """Train every configuration of :func:`plan` with ``seeds`` seeds (the core seed, +1, ...)
    into ``out`` and return the table rows. Finished runs found in ``out`` are not repeated."""
    from .api import run as run_one

    reporter = reporter or AblationReporter()
    if seeds < 1:
        raise TricksError(f"--seeds must be at least 1, got {seeds}")
    configs = plan(plugins, mode, base, all_together)
    data = read_recipe(recipe) if isinstance(recipe, (str, Path)) else dict(recipe or {})
    sets, overrides = list(sets or []), {k: v for k, v in (overrides or {}).items() if v is not None}
    named = {parse_set(s)[0] for s in sets} - {CORE}
    everything = {p for c in configs for p in c.plugins}
    stray = sorted(named - everything)
    if stray:
        raise TricksError(f"--set names '{stray[0]}', which is in no configuration of this ablation; "
                          f"add it to --plugins or --base, or drop the --set")

    # resolve every configuration before training any: a conflict or a bad setting stops here
    catalog = Catalog(registries)
    resolved = {}
    for c in configs:
        try:
            resolved[c.slug] = resolve(plugins=c.plugins, recipe=data, overrides=overrides,
                                       sets=split_sets(sets, c.plugins), catalog=catalog)
        except TricksError as error:
            raise TricksError(f"configuration '{c.label}': {error}") from None
    first_seed = resolved[configs[0].slug].core.seed
    epochs = resolved[configs[0].slug].core.epochs

    out = Path(out)
    description = {
        "configurations": [{"label": c.label, "slug": c.slug, "plugins": c.plugins} for c in configs],
        "seeds": [first_seed + k for k in range(seeds)],
        "settings": {c.slug: resolved[c.slug].to_dict() for c in configs},
    }
    for c in configs:  # versions may differ between sessions without changing what is trained
        description["settings"][c.slug].pop("versions", None)
    plan_file = out / "plan.json"
    if plan_file.exists():
        previous = json.loads(plan_file.read_text())
        if previous != json.loads(json.dumps(description)):
            raise TricksError(f"{out} holds an ablation with other configurations, seeds or settings; "
                              "repeat its command to resume it, or choose another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        io.write_json(plan_file, description)

    title = ("ablation: " + ", ".join(plugins) + (f" on {', '.join(base)}" if base else "")
             + f" ({mode}{' + all' if all_together and mode == 'alone' else ''})")
    jobs = [(c, first_seed + k) for k in range(seeds) for c in configs]  # seed-major: a full table early
    results: list[RunResult] = []
    pending = []
    for c, seed in jobs:
        result = read_result(c, seed, out / "runs" / c.slug / f"seed{seed}", epochs)
        (results.append(result) if result else pending.append((c, seed)))
    reporter.start(len(jobs), len(results))
    write_results(out, configs, results, title)
    for c, seed in pending:
        run_dir = out / "runs" / c.slug / f"seed{seed}"
        resuming = (run_dir / "config.yaml").exists()
        run_reporter = reporter.run_start(len(results), c, seed, resuming)
        cfg = resolve(plugins=c.plugins, recipe=data, overrides={**overrides, "seed": seed},
                      sets=split_sets(sets, c.plugins), catalog=catalog)
        run_one(cfg, out=run_dir, resume=run_dir if resuming else None, reporter=run_reporter)
        result = read_result(c, seed, run_dir, epochs)
        results.append(result)
        write_results(out, configs, results, title)
        reporter.run_end(len(results), result)
    order = {c.slug: i for i, c in enumerate(configs)}
    results.sort(key=lambda r: (order[r.slug], r.seed))
    rows = write_results(out, configs, results, title)
    reporter.finish(rows, out)
    return rows
