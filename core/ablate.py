"""Ablations: train a baseline and the baseline with tricks added, over several seeds, and
tabulate the effect of each trick.

``--grid plugin.key=v1,v2`` crosses the configurations with every value of one or more settings
(each configuration takes the grid's settings of its own plugins and of the core).

An ablation is a job (:mod:`tricks.jobs`): its directory holds ``job.json`` (the plan),
``results/ID.json`` (one per finished run), ``runs/<configuration>/[<grid point>/]seed<k>/``
(ordinary run directories), and the tables: ``results.csv`` (one row per finished run),
``table.md`` and ``table.csv`` (one row per configuration and grid point: mean and spread over
seeds, delta against the baseline at the same grid point, time) and ``chart.png``. The figures are
the validation accuracy, or for a task with a metric of its own (``--task retrieval``: MAP@R;
detection: mAP) that metric, x100, with the columns named for it (``final_val_map_at_r``,
``final_map_at_r``). The tables are rewritten atomically after every run. Running the same ablation again continues it with the
engine's resume policy: finished runs are kept, an interrupted one resumes from its checkpoint.

A run whose training loss became non-finite is ``diverged``: its row in ``results.csv`` says so
and has no figures; a configuration's figures are over its seeds that finished, its ``status`` in
``table.csv`` is ``diverged`` (every seed) or ``partly diverged``, ``table.md`` shows "diverged"
where there is no figure, and its comparison with the baseline (or the comparison of every row
with a baseline that diverged) is left out, with a note under ``table.md``. A diverged run is not
trained again, ``--retry-failed`` or not.
"""

from __future__ import annotations

import csv
import io as _io
import itertools
import math
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import atomic
from .config import CORE, _core_value, parse_set, read_recipe, resolve
from .errors import TricksError
from .jobs import Item, Job, JobProgress, check_writable, run_job
from .registry import Catalog

MODES = ("alone", "cumulative", "both")


@dataclass
class Configuration:
    """One row of the ablation: a label, its directory name and the plugins it trains with."""

    label: str
    slug: str
    plugins: list[str]
    added: list[str] = field(default_factory=list)  # the tricks on top of the base plugins
    point: dict[str, str] = field(default_factory=dict)  # grid settings of this row: "plugin.key" -> raw value
    base: str = ""  # the slug of the configuration before the grid was applied

    @property
    def folder(self) -> str:
        """Where its runs go under ``runs/``: the configuration, then the grid point."""
        name = ",".join(f"{k}={v}" for k, v in self.point.items()).replace("/", "_")
        return f"{self.base or self.slug}/{name}" if name else self.slug


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


def parse_grid(items: list[str] | None) -> list[tuple[str, list[str]]]:
    """``--grid plugin.key=v1,v2,...`` items -> ``[("plugin.key", ["v1", "v2", ...]), ...]``."""
    grid: list[tuple[str, list[str]]] = []
    for item in items or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise TricksError(f"--grid {item!r}: expected plugin.key=v1,v2,..., e.g. --grid mixup.alpha=0.2,0.4,1.0")
        section, name, _ = parse_set(item)
        raw = item.split("=", 1)[1]
        values = [v.strip() for v in raw.split(",") if v.strip()]
        key = f"{section}.{name}"
        if not values:
            raise TricksError(f"--grid {item!r}: give the values to try, e.g. --grid mixup.alpha=0.2,0.4,1.0")
        if len(set(values)) < len(values):
            raise TricksError(f"--grid {item!r}: a value is named twice; list each value once")
        if key in (k for k, _ in grid):
            raise TricksError(f"--grid names '{key}' twice; give all its values in one --grid {key}=v1,v2")
        grid.append((key, values))
    return grid


def expand(configs: list[Configuration], grid: list[tuple[str, list[str]]]) -> list[Configuration]:
    """Each configuration crossed with every point of the grid over the settings it has (the
    core's, and its own plugins'); a configuration without any grid setting stays one row."""
    rows = []
    for c in configs:
        keys = [(k, vs) for k, vs in grid if k.split(".")[0] in (CORE, *c.plugins)]
        for values in itertools.product(*(vs for _, vs in keys)):
            point = {k: v for (k, _), v in zip(keys, values)}
            if not point:
                rows.append(c)
                continue
            label = c.label + " [" + ", ".join(f"{k}={v}" for k, v in point.items()) + "]"
            slug = c.slug + "@" + ",".join(f"{k}={v}" for k, v in point.items()).replace("/", "_")
            rows.append(Configuration(label, slug, c.plugins, c.added, point, c.slug))
    return rows


@dataclass
class RunResult:
    """One run of the ablation: finished (``ok``) or ``diverged`` (its figures are NaN; ``message``
    says where its loss became non-finite). ``final`` and ``best`` are the run's ``metric`` (a
    fraction): the validation accuracy of a classification run, a task's own metric otherwise
    (detection: ``val_map``; retrieval: ``val_map_at_r``)."""

    configuration: str
    slug: str
    seed: int
    final: float
    best: float
    final_val_loss: float
    seconds: float
    run_dir: str
    status: str = "ok"
    message: str = ""
    metric: str = "val_acc"


def _mean_sd(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(configs: list[Configuration], results: list[RunResult]) -> list[dict]:
    """One row per configuration with finished or diverged runs: the runs' metric in % (the
    accuracy of a classification run; ``metric`` names it), mean and sample
    standard deviation over the seeds that finished (NaN where none did), how many diverged
    (``diverged``, ``status``: ok, partly diverged, diverged), and the difference of the means
    from the baseline's at the same grid point (NaN, with a ``note``, where either of them has a
    diverged seed or there is no baseline)."""
    rows, used = [], []
    for c in configs:
        mine = [r for r in results if r.slug == c.slug]
        if not mine:
            continue
        done = [r for r in mine if r.status == "ok"]
        lost = [r for r in mine if r.status != "ok"]
        nan2 = (math.nan, math.nan)
        final, final_sd = _mean_sd([100 * r.final for r in done]) if done else nan2
        best, best_sd = _mean_sd([100 * r.best for r in done]) if done else nan2
        status = "ok" if not lost else "diverged" if not done else "partly diverged"
        rows.append(dict(configuration=c.label, plugins=" ".join(c.plugins) or "-", **c.point, metric=_metric(mine),
                         seeds=len(done), diverged=len(lost), status=status, final_acc=final, final_sd=final_sd, best_acc=best,
                         best_sd=best_sd, seconds=statistics.fmean(r.seconds for r in done) if done else math.nan,
                         note=_diverged_note(lost, len(mine))))
        used.append(c)
    baseline = configs[0].base or configs[0].slug
    bases = [(c.point, r) for c, r in zip(used, rows) if (c.base or c.slug) == baseline]
    for c, r in zip(used, rows):
        # the baseline at the same values of the grid settings it has
        base = next((b for p, b in bases if all(c.point.get(k) == v for k, v in p.items())), None)
        if base is not None and r["status"] == "ok" and base["status"] == "ok":
            r["delta_final"] = r["final_acc"] - base["final_acc"]
            r["delta_best"] = r["best_acc"] - base["best_acc"]
            continue
        r["delta_final"] = r["delta_best"] = math.nan
        if base is not None and r["status"] != "ok" and base is not r:
            r["note"] += "; left out of the comparison with the baseline"
        elif base is not None and base["status"] != "ok" and base is not r:
            r["note"] = (r["note"] + "; " if r["note"] else "") + (
                "not compared: its baseline " + ("diverged" if base["status"] == "diverged" else "partly diverged"))
    return rows


def _metric(results: list[RunResult]) -> str:
    """The metric of the runs (every run of an ablation has its task's)."""
    return next((r.metric for r in results if r.status == "ok"), results[0].metric if results else "val_acc")


def metric_title(metric: str) -> str:
    """How the tables title a metric shown in %: ``val acc (%)``, ``val_map (x100)``."""
    return "val acc (%)" if metric == "val_acc" else f"{metric} (x100)"


def _diverged_note(lost: list[RunResult], runs: int) -> str:
    if not lost:
        return ""
    first = lost[0]
    where = f"seed {first.seed}: {first.message}" if first.message else f"seed {first.seed}"
    return f"{len(lost)} of {runs} seed{'s' if runs > 1 else ''} diverged ({where})"


def _number(value: float, text: str) -> str:
    return text if isinstance(value, float) and math.isfinite(value) else "diverged"


def markdown_table(rows: list[dict]) -> str:
    what = metric_title(rows[0].get("metric", "val_acc")) if rows else metric_title("val_acc")
    lines = [f"| configuration | seeds | final {what} | best {what} | delta final | delta best | time per run (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        diverged = r.get("diverged", 0)
        seeds = f"{r['seeds']} + {diverged} diverged" if diverged else str(r["seeds"])
        final = _number(r["final_acc"], f"{r['final_acc']:.2f} ± {r['final_sd']:.2f}")
        best = _number(r["best_acc"], f"{r['best_acc']:.2f} ± {r['best_sd']:.2f}")
        delta = [f"{v:+.2f}" if math.isfinite(v) else "–" for v in (r["delta_final"], r["delta_best"])]
        seconds = f"{r['seconds']:.0f}" if math.isfinite(r["seconds"]) else "–"
        lines.append(f"| {r['configuration']} | {seeds} | {final} | {best} | {delta[0]} | {delta[1]} | {seconds} |")
    notes = [f"- {r['configuration']}: {r['note']}" for r in rows if r.get("note")]
    if notes:
        lines += ["", "Runs whose training loss became non-finite (diverged) have no figures; a configuration "
                      "with a diverged seed is not compared with its baseline:", "", *notes]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict], columns: list[str]) -> str:
    """Rows as CSV; a float is written with 4 decimals, and left empty where it is no number."""
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ((f"{v:.4f}" if math.isfinite(v) else "") if isinstance(v, float) else v)
                         for k, v in r.items() if k in columns})
    return buffer.getvalue()


TABLE_COLUMNS = ["configuration", "plugins", "seeds", "diverged", "status", "final_acc", "final_sd", "best_acc",
                 "best_sd", "delta_final", "delta_best", "seconds", "note"]
RESULT_COLUMNS = ["configuration", "slug", "seed", "status", "final_val_acc", "best_val_acc", "final_val_loss", "seconds",
                  "run_dir", "message"]


def _named(columns: list[str], metric: str) -> list[str]:
    """The columns with the accuracy's named for ``metric`` (``final_val_map``, ...)."""
    if metric == "val_acc":
        return list(columns)
    short = metric.removeprefix("val_")
    names = {"final_val_acc": f"final_{metric}", "best_val_acc": f"best_{metric}",
             "final_acc": f"final_{short}", "best_acc": f"best_{short}"}
    return [names.get(c, c) for c in columns]


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
    y = list(range(len(rows)))
    shown = [i for i in y if math.isfinite(final[i])]  # a configuration that diverged in every seed has no bar
    ax.barh([y[i] for i in shown], [final[i] for i in shown], xerr=[spread[i] for i in shown], color="tab:blue",
            alpha=0.8, capsize=3, label="final (mean ± sd)")
    ax.scatter([best[i] for i in shown], [y[i] for i in shown], color="tab:orange", zorder=3, label="best (mean)",
               marker="D", s=18)
    if math.isfinite(rows[0]["final_acc"]):
        ax.axvline(rows[0]["final_acc"], color="gray", linestyle="--", linewidth=1, label="baseline final")
    if shown:
        low = min(min(final[i] - spread[i] for i in shown), min(best[i] for i in shown))
        high = max(max(final[i] + spread[i] for i in shown), max(best[i] for i in shown))
    else:
        low, high = 0.0, 100.0
    pad = max(0.5, 0.1 * (high - low))
    ax.set_xlim(max(0.0, low - pad), min(100.0, high + pad))
    for i in y:
        if i not in shown:
            ax.text(ax.get_xlim()[0], i, "  diverged", va="center", ha="left", color="tab:red", fontsize=9)
    ax.set_yticks(list(y), labels)
    metric = rows[0].get("metric", "val_acc")
    ax.set_xlabel("validation accuracy (%)" if metric == "val_acc" else metric_title(metric))
    ax.set_title(textwrap.fill(title, 70), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1))
    atomic.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def write_results(out: Path, configs: list[Configuration], results: list[RunResult], title: str,
                  grid_keys: list[str] = ()) -> list[dict]:
    rows = summarize(configs, results)
    points = {c.slug: c.point for c in configs}
    metric = _metric(results)
    runs = [{**r.__dict__, "final_val_acc": r.final, "best_val_acc": r.best, **points.get(r.slug, {})} for r in results]
    atomic.write_text(out / "results.csv", csv_text(
        [dict(zip(_named(list(r), metric), r.values())) for r in runs],
        _named(RESULT_COLUMNS[:2] + list(grid_keys) + RESULT_COLUMNS[2:], metric)))
    atomic.write_text(out / "table.csv", csv_text([dict(zip(_named(list(r), metric), r.values())) for r in rows],
                                                  _named(TABLE_COLUMNS[:2] + list(grid_keys) + TABLE_COLUMNS[2:], metric)))
    atomic.write_text(out / "table.md", f"# {title}\n\n" + markdown_table(rows))
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
    def run_failed(self, index: int, config: Configuration, seed: int, message: str) -> None: ...
    def run_diverged(self, index: int, result: RunResult) -> None:
        """A run whose training loss became non-finite (``result.message`` says where)."""
    def finish(self, rows: list[dict], out: Path) -> None: ...


def ablate(
    plugins: list[str],
    *,
    mode: str = "alone",
    seeds: int = 1,
    base: list[str] | None = None,
    all_together: bool = False,
    grid: list[str] | None = None,
    recipe: str | Path | dict | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    out: str | Path = "ablation",
    registries: list[Path] | None = None,
    reporter: AblationReporter | None = None,
    gpus: str | None = None,
    per_gpu: int = 1,
    backend: str = "local",
    address: str | None = None,
    retry_failed: bool = False,
    extra_plugins: list | None = None,
) -> list[dict]:
    """Train every configuration of :func:`plan`, crossed with the ``grid`` (``plugin.key=v1,v2``
    strings), with ``seeds`` seeds (the core seed, +1, ...) into ``out``, and return the table
    rows. The runs are a job (:mod:`tricks.jobs`): finished runs found in ``out`` are kept, an
    interrupted one resumes, one that fails is recorded and the others go on. ``gpus``,
    ``per_gpu``, ``backend`` and ``address`` spread the runs as for a sampling job; ``retry_failed``
    trains the runs that failed before again (a diverged run is kept: with the same seed and
    settings it diverges again). ``out`` is checked before anything is resolved or trained."""
    reporter = reporter or AblationReporter()
    if seeds < 1:
        raise TricksError(f"--seeds must be at least 1, got {seeds}")
    check_writable(out, "--out")
    base_configs = plan(plugins, mode, base, all_together)
    grid_items = parse_grid(grid)
    configs = expand(base_configs, grid_items)
    data = read_recipe(recipe) if isinstance(recipe, (str, Path)) else dict(recipe or {})
    sets, overrides = list(sets or []), {k: v for k, v in (overrides or {}).items() if v is not None}
    catalog = Catalog(registries)
    # the plugin a --task brings (retrieval, detection) is in every configuration
    task = _core_value(data, overrides, sets, "task")
    provider = catalog.task_provider(task) if task and task != "classification" else None
    brought = [provider] if provider else []
    everything = {p for c in base_configs for p in c.plugins} | set(brought)
    for what, named in (("--set", {parse_set(s)[0] for s in sets}), ("--grid", {k.split(".")[0] for k, _ in grid_items})):
        stray = sorted(named - everything - {CORE})
        if stray:
            raise TricksError(f"{what} names '{stray[0]}', which is in no configuration of this ablation; "
                              f"add it to --plugins or --base, or drop the {what}")
    both = sorted({f"{s_}.{k}" for s_, k, _ in map(parse_set, sets)} & {k for k, _ in grid_items})
    if both:
        raise TricksError(f"'{both[0]}' is in --set and in --grid; keep it in one of them")

    # resolve every run before training any: a conflict or a bad setting stops here
    first_seed = None
    items, where = [], {}
    for k in range(seeds):  # seed-major: a full table early
        for c in configs:
            point_sets = [f"{key}={value}" for key, value in c.point.items()]
            try:
                cfg = resolve(plugins=c.plugins, recipe=data, overrides=overrides,
                              sets=split_sets(sets, c.plugins + brought) + point_sets, catalog=catalog)
                if first_seed is None:
                    first_seed = cfg.core.seed
                seed = first_seed + k
                cfg.core.seed = seed
            except (TricksError, ValueError) as error:
                raise TricksError(f"configuration '{c.label}': {error}") from None
            ident = f"{c.slug}-seed{seed}".replace("/", "_")
            items.append(Item(ident, cfg.to_dict(), run_dir=f"runs/{c.folder}/seed{seed}",
                              meta={"configuration": c.label, "slug": c.slug, "seed": seed}))
            where[ident] = (c, seed)

    title = ("ablation: " + ", ".join(plugins) + (f" on {', '.join(base)}" if base else "")
             + f" ({mode}{' + all' if all_together and mode == 'alone' else ''})"
             + (" x " + " x ".join(k for k, _ in grid_items) if grid_items else ""))
    job = Job(Path(out), "ablation", items, meta={
        "configurations": [{"label": c.label, "slug": c.slug, "plugins": c.plugins, "grid": c.point} for c in configs],
        "seeds": [first_seed + k for k in range(seeds)], "grid": dict(grid_items)})
    grid_keys = [k for k, _ in grid_items]
    results: list[RunResult] = []

    def collect(result: dict) -> RunResult | None:
        c, seed = where[result["id"]]
        run_dir = str(job.out / result["run_dir"])
        if result["status"] == "diverged":
            return RunResult(c.label, c.slug, seed, math.nan, math.nan, math.nan, result.get("train_seconds") or 0.0,
                             run_dir, "diverged", result.get("message") or "")
        if result["status"] != "ok":
            return None
        metric = result.get("metric") or "val_acc"
        return RunResult(c.label, c.slug, seed, result[f"final_{metric}"], result[f"best_{metric}"],
                         result["final_val_loss"], result["train_seconds"], run_dir, metric=metric)

    def tell(name: str, *args) -> None:  # a reporter may leave out the methods it has no use for
        method = getattr(reporter, name, None)
        if method is not None:
            method(*args)

    class Progress(JobProgress):
        def start(self, job, total, done, failed, diverged=0):
            results.extend(r for r in map(collect, job.results().values()) if r is not None)
            reporter.start(total, done)
            write_results(job.out, configs, results, title, grid_keys)

        def item_start(self, item, resuming):
            c, seed = where[item.id]
            return reporter.run_start(len(results), c, seed, resuming)

        def item_end(self, item, result):
            one = collect(result)
            if one is None:
                c, seed = where[item.id]
                tell("run_failed", len(results), c, seed, result.get("message", ""))
                return
            results.append(one)
            write_results(job.out, configs, results, title, grid_keys)
            if one.status == "diverged":
                tell("run_diverged", len(results), one)
            else:
                reporter.run_end(len(results), one)

    run_job(job, gpus=gpus, per_device=per_gpu, backend=backend, address=address, progress=Progress(),
            retry_failed=retry_failed, extra_plugins=extra_plugins)
    order = {c.slug: i for i, c in enumerate(configs)}
    results.sort(key=lambda r: (order[r.slug], r.seed))
    rows = write_results(job.out, configs, results, title, grid_keys)
    reporter.finish(rows, job.out)
    return rows
