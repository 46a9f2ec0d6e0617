"""What the commands print while they work: a live progress display for people, JSON lines or
nothing for scripts. Each class implements the reporter protocol of the core call it is handed to
(``tricks.run``, ``tricks.ablate.ablate``, the regnet plugin's sampling job)."""

from __future__ import annotations

import json
import math

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text


def _progress(console: Console, *extra, transient: bool = True, disable: bool = False) -> Progress:
    """A bar with done/total, elapsed and remaining time, then the ``extra`` columns."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), *extra, console=console, transient=transient, disable=disable)


class RichReporter:
    """A live progress bar per epoch, a line per finished epoch, the table at the end (``tricks run``)."""

    def __init__(self, console: Console):
        self.console, self.rows = console, []
        self.progress = _progress(console, TextColumn("{task.fields[loss]}"))
        self.task = None

    def start(self, ctx):
        self.ctx = ctx
        self.every = ctx.core.log_every
        if ctx.start_epoch:
            self.console.print(f"resuming {ctx.run_dir} at epoch {ctx.start_epoch + 1}/{ctx.epochs}")
        self.progress.start()

    def epoch_start(self, epoch, steps):
        self.task = self.progress.add_task(f"epoch {epoch + 1}/{self.ctx.epochs}", total=steps, loss="")

    def step(self, index, loss):
        if index % self.every == 0:
            self.progress.update(self.task, advance=1, loss=f"loss {loss.item():.4f}")
        else:
            self.progress.update(self.task, advance=1)

    def epoch_end(self, row):
        self.progress.remove_task(self.task)
        self.rows.append(row)
        self.console.print(f"epoch {row['epoch']:>3}  train_loss {row['train_loss']:.4f}  {self._validation(row)}  "
                           f"lr {row['lr']:.4g}  {row['epoch_seconds']:.1f}s")

    def _validation(self, row) -> str:
        """``val_loss L  val_acc A%`` for classification; a task's own figures (mAP) otherwise."""
        metric = getattr(self.ctx, "metric", "val_acc")
        parts = [f"val_loss {row['val_loss']:.4f}"] if "val_loss" in row else []
        if metric == "val_acc":
            parts.append(f"val_acc {100 * row['val_acc']:.2f}%")
        else:
            parts += [f"{k} {row[k]:.4f}" for k in self._figures(row)]
        return "  ".join(parts)

    def _figures(self, row) -> list[str]:
        """The task's validation figures worth a column: its metric first, then the other plain numbers."""
        metric = getattr(getattr(self, "ctx", None), "metric", None) or next(k for k in row if k.startswith("val_") and k != "val_loss")
        others = [k for k in row if k.startswith("val_") and k not in (metric, "val_loss") and isinstance(row[k], float)]
        return [metric, *others[:3]]

    def finish(self, summary):
        self.progress.stop()
        table = Table(title="epochs")
        metric = (summary or {}).get("metric") or "val_acc"
        figures = ["val_loss", "val_acc"] if metric == "val_acc" else self._figures(self.rows[0]) if self.rows else [metric]
        for col in ("epoch", "train_loss", *figures, "lr", "seconds", "images/s"):
            table.add_column(col, justify="right")
        for r in self.rows:
            cells = [f"{100 * r[k]:.2f}%" if k == "val_acc" else f"{r[k]:.4f}" for k in figures]
            table.add_row(str(r["epoch"]), f"{r['train_loss']:.4f}", *cells,
                          f"{r['lr']:.4g}", f"{r['epoch_seconds']:.1f}", f"{r['images_per_second']:.0f}")
        if self.rows:
            self.console.print(table)
        if metric == "val_acc":
            self.console.print(f"final val_acc {100 * summary['final_val_acc']:.2f}%  best {100 * summary['best_val_acc']:.2f}% "
                               f"(epoch {summary['best_epoch']})")
        else:
            self.console.print(f"final {metric} {summary[f'final_{metric}']:.4f}  best {summary[f'best_{metric}']:.4f} "
                               f"(epoch {summary['best_epoch']})")
        self.console.print(f"run directory: {summary['run_dir']}")

    def log(self, message):
        self.console.print(message)


class JsonReporter:
    """One JSON object per finished epoch on stdout, then the summary (``tricks run --json``)."""

    def start(self, ctx): ...
    def epoch_start(self, epoch, steps): ...
    def step(self, index, loss): ...
    def log(self, message): ...

    def epoch_end(self, row):
        print(json.dumps({"event": "epoch", **row}), flush=True)

    def finish(self, summary):
        print(json.dumps({"event": "summary", **summary}), flush=True)


class QuietReporter(JsonReporter):
    """Nothing but the run directory at the end (``tricks run --quiet``)."""

    def epoch_end(self, row): ...

    def finish(self, summary):
        print(summary["run_dir"], flush=True)


class AblationProgress:
    """A bar over the ablation's runs and one over the epochs of the run in progress; a line per
    finished run, the table at the end (``tricks ablate``)."""

    def __init__(self, console: Console, quiet: bool = False):
        self.console, self.quiet = console, quiet
        self.progress = _progress(console, disable=quiet)
        self.runs = self.epochs = None
        self.failures: list[str] = []  # "configuration seed N: message" of every run that failed

    def start(self, runs, done):
        self.progress.start()
        self.runs = self.progress.add_task("runs", total=runs, completed=done)
        if done and not self.quiet:
            self.console.print(f"{done} of {runs} runs already finished; continuing")

    def run_start(self, index, config, seed, resuming):
        import tricks

        outer = self

        class EpochBar(tricks.Reporter):
            def start(self, ctx):
                outer.epochs = outer.progress.add_task(escape(f"{config.label} seed {seed}"), total=ctx.epochs,
                                                       completed=ctx.start_epoch)

            def epoch_end(self, row):
                outer.progress.update(outer.epochs, advance=1)

            def log(self, message):
                pass

        return EpochBar()

    def _done(self) -> None:
        if self.epochs is not None:
            self.progress.remove_task(self.epochs)
            self.epochs = None
        self.progress.update(self.runs, advance=1)

    def run_end(self, index, result):
        self._done()
        if not self.quiet:
            if result.metric == "val_acc":
                figures = f"final {100 * result.final:.2f}%  best {100 * result.best:.2f}%"
            else:
                figures = f"final {result.metric} {result.final:.4f}  best {result.best:.4f}"
            self.console.print(f"{result.configuration:<40} seed {result.seed}:  {figures}  {result.seconds:.0f}s",
                               markup=False, highlight=False)

    def run_failed(self, index, config, seed, message):
        self._done()
        self.failures.append(f"{config.label} seed {seed}: {message}")
        if not self.quiet:
            self.console.print(f"{config.label:<40} seed {seed}:  failed: {message}", markup=False, highlight=False)

    def run_diverged(self, index, result):
        self._done()
        if not self.quiet:
            self.console.print(f"{result.configuration:<40} seed {result.seed}:  diverged: {result.message}",
                               markup=False, highlight=False)

    def finish(self, rows, out):
        self.progress.stop()
        if not self.quiet:
            metric = rows[0].get("metric", "val_acc") if rows else "val_acc"
            from tricks.ablate import metric_title

            what = "validation accuracy (%)" if metric == "val_acc" else metric_title(metric)
            table = Table(title=f"ablation: {what}, mean ± sd over seeds", show_edge=False)
            table.add_column("configuration", overflow="fold")
            for col in ("seeds", "final", "best", "Δ final", "Δ best", "s/run"):  # numbers are never wrapped
                table.add_column(col, justify="right", no_wrap=True)
            for r in rows:
                seeds = str(r["seeds"]) + (f" + {r['diverged']} diverged" if r.get("diverged") else "")
                table.add_row(Text(r["configuration"]), seeds, _mean_sd(r, "final_acc", "final_sd"),
                              _mean_sd(r, "best_acc", "best_sd"), _signed(r.get("delta_final")),
                              _signed(r.get("delta_best")), _number(r.get("seconds"), "{:.0f}"))
            self.console.print(table)
        self.console.print(f"ablation directory: {out} (table.md, table.csv, results.csv, chart.png)")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _number(value, form: str) -> str:
    return form.format(value) if _finite(value) else "–"


def _signed(value) -> str:
    return _number(value, "{:+.2f}")


def _mean_sd(row: dict, mean: str, sd: str) -> str:
    if not _finite(row.get(mean)):
        return "diverged" if row.get("status") == "diverged" else "–"
    return f"{row[mean]:.2f} ± {row[sd]:.2f}" if _finite(row.get(sd)) else f"{row[mean]:.2f}"


class RichSweepProgress:
    """Networks done out of n, running, failed and the best error so far; a line per network
    (the regnet plugin's ``tricks sample``)."""

    def __init__(self, console: Console, quiet: bool = False):
        self.console, self.quiet = console, quiet
        self.progress = _progress(console, TextColumn("running {task.fields[running]}  failed {task.fields[failed]}  "
                                                      "diverged {task.fields[diverged]}  best {task.fields[best]}"), transient=False, disable=quiet)
        self.running = 0
        self.failed = 0
        self.diverged = 0
        self.best = None
        self.failures: list[str] = []  # "ID: message" of every network that failed

    def _fields(self):
        return dict(running=self.running, failed=self.failed, diverged=self.diverged,
                    best="-" if self.best is None else f"{self.best:.2f}%")

    def start(self, job, total, done, failed, best, diverged=0):
        self.failed, self.best, self.diverged = failed, best, diverged
        self.progress.start()
        self.task = self.progress.add_task(escape(job.space.name), total=total, completed=done, **self._fields())
        if done and not self.quiet:
            self.console.print(f"{done} of {total} networks already have a result; continuing")

    def model_start(self, task):
        self.running += 1
        self.progress.update(self.task, **self._fields())

    def model_end(self, result):
        self.running = max(0, self.running - 1)
        if result["status"] == "ok":
            self.best = result["error"] if self.best is None else min(self.best, result["error"])
            line = f"{result['id']}  error {result['error']:.2f}%  best epoch {result['best_error']:.2f}%  {result['time_s']:.0f}s"
        elif result["status"] == "diverged":
            self.diverged += 1
            line = f"{result['id']}  diverged: {result.get('message', '')}"
        else:
            self.failed += 1
            self.failures.append(f"{result['id']}: {result.get('message', '')}")
            line = f"{result['id']}  failed: {result.get('message', '')}"
        if not self.quiet:
            self.progress.console.print(line, markup=False, highlight=False)
        self.progress.update(self.task, advance=1, **self._fields())

    def finish(self, summary):
        self.progress.stop()


def exit_if_failed(failures: list[str], what: str, console: Console) -> None:
    """End a job command whose items failed: one line on stderr naming the first failure and the
    way on, exit status 2 when every failure was bad input (a TricksError), else 1. Diverged
    runs are results, not failures."""
    import sys

    if not failures:
        return
    others = f" (and {len(failures) - 1} more, each in its run's error.txt)" if len(failures) > 1 else ""
    console.print(f"error: {len(failures)} {what} failed; first {failures[0]}{others}; the rest of the job is "
                  "recorded: fix the cause and run the same command again with --retry-failed",
                  markup=False, highlight=False, soft_wrap=True)
    sys.exit(2 if all("TricksError: " in f for f in failures) else 1)


class ItemProgress:
    """The progress of a job of named runs (``tricks specialists``, ``tricks lcp``), as a
    ``tricks.jobs.JobProgress``: a bar over the items and one over the epochs of the run in
    progress, and a line per finished item, ``describe(result)`` for one that trained."""

    def __init__(self, console: Console, quiet: bool, describe):
        self.bars, self.console, self.quiet, self.describe = AblationProgress(console, quiet), console, quiet, describe

    def start(self, job, total, done, failed, diverged=0):
        self.bars.start(total, done)

    def item_start(self, item, resuming):
        class Label:
            label = item.id

        return self.bars.run_start(0, Label, (item.recipe.get("core") or {}).get("seed", 0), resuming)

    def item_end(self, item, result):
        self.bars._done()
        if not self.quiet:
            line = (f"{item.id:<16} {self.describe(result)}  {result.get('time_s', 0):.0f}s" if result["status"] == "ok"
                    else f"{item.id:<16} {result['status']}: {result.get('message', '')}")
            self.console.print(line, markup=False, highlight=False)

    def finish(self, job, results):
        self.bars.progress.stop()
