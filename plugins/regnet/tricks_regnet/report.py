"""The written report of a design-space analysis: :func:`report` loads the sweeps, computes the
statistics (:mod:`.stats`), draws the figures (:mod:`.figures`) and writes ``summary.json`` and
``report.md`` - or ``report.html``, the same Markdown rendered to HTML by markdown-it-py.

Models that diverged (their training loss became non-finite, or their error stayed at chance) or
failed are left out of every statistic and figure (``keep_diverged`` keeps those at chance); the
report's findings count the diverged ones per sweep, warn when more than ``DIVERGED_WARNING`` of a
sweep diverged, and the report lists them ("k of n diverged" also in the EDFs' legends).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tricks import TricksError
from tricks.atomic import write_json, write_text
from tricks.jobs import check_writable

from .figures import plot_best_widths, plot_edf, plot_edf_normalized, plot_params
from .stats import (Sweep, as_number, best_fits, count_text, load_sweeps, normalization, normalization_bins, one_line,
                    summarize, weighted_quantile, wm_used)

DIVERGED_WARNING = 0.05  # a sweep with more diverged networks than this share gets a warning in the findings

HTML_HEAD = (
    "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Design-space analysis</title>\n"
    "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;line-height:1.4}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%}</style></head><body>\n")


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")


def _literal(text: Any) -> str:
    """``text`` with every ASCII punctuation mark backslash-escaped, so that Markdown shows it as it is."""
    return _PUNCTUATION.sub(r"\\\1", str(text))


def to_markdown(blocks: list[tuple], literal: bool = False) -> str:
    """The report's blocks (``("h1", text)``, ``("h2", text)``, ``("p", text)``, ``("list", items)``,
    ``("table", header, rows)``, ``("img", src, alt)``) as Markdown. With ``literal``, every text is
    escaped so that a renderer shows it verbatim (an error message's ``__init__`` or ``*args`` stay
    as they are); the ``.md`` report keeps the plain text, for reading as it is."""
    text, cell = (_literal, _literal) if literal else (str, _md_cell)
    out = []
    for kind, *content in blocks:
        if kind in ("h1", "h2"):
            out.append(("# " if kind == "h1" else "## ") + text(content[0]))
        elif kind == "p":
            out.append(text(content[0]))
        elif kind == "list":
            out.append("\n".join(f"- {text(item)}" for item in content[0]))
        elif kind == "table":
            header, rows = content
            lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{text(content[1])}]({content[0]})")
    return "\n\n".join(out) + "\n"


def to_html(markdown: str) -> str:
    """A standalone HTML page of a Markdown report, rendered by markdown-it-py (CommonMark with
    tables; raw HTML in the text is escaped, not interpreted)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    return HTML_HEAD + body + "</body></html>\n"


def _window_text(sweep: Sweep) -> str:
    parts = []
    for key, value in sweep.window.items():
        if isinstance(value, (list, tuple)) and len(value) == 2:
            lo, hi = (count_text(as_number(v)) if v is not None else "" for v in value)
            parts.append(f"{key} {lo}–{hi}")
        elif value is not None:
            parts.append(f"{key} {value}")
    return ", ".join(parts) or "none"


def _findings(sweeps: Sequence[Sweep], rows: list[dict[str, Any]], norm: dict[str, Any] | None, note: str,
              fits: list[list[dict[str, Any]]], top: int) -> list[str]:
    """Plain sentences computed from the data."""
    out = []
    ranked = sorted(rows, key=lambda r: r["median"])
    lead = ranked[0]
    if len(rows) == 1:
        out.append(f"{lead['label']}: median error {lead['median']:.2f}% over {lead['n_ok']} models "
                   f"(mean {lead['mean']:.2f}%, best {lead['min']:.2f}% by model {lead['best_id']}).")
    else:
        others = ", ".join(f"{r['label']} by {r['median'] - lead['median']:.2f} points ({r['median']:.2f}%)"
                           for r in ranked[1:])
        out.append(f"{lead['label']} has the lowest median error, {lead['median']:.2f}%: it is below {others}.")
        best = min(rows, key=lambda r: r["min"])
        out.append(f"The best model overall is {best['best_id']} of {best['label']} "
                   f"({best['min']:.2f}% at {count_text(best['best_flops'])} flops).")
        means = sorted(rows, key=lambda r: r["mean"])
        if means[0]["label"] != lead["label"]:
            out.append(f"By mean error the order differs: {means[0]['label']} is lowest ({means[0]['mean']:.2f}%).")
    if norm is None:
        out.append(note)
    else:
        nb, kept = len(norm["edges"]) - 1, len(norm["common"])
        text = (f"Complexity normalization: flops cut into {nb} log-spaced bins from {count_text(norm['edges'][0])} "
                f"to {count_text(norm['edges'][-1])}; {kept} hold models"
                f"{' of every sweep' if len(sweeps) > 1 else ''} and get equal weight.")
        dropped = [f"{s.name} {n} of {len(s.ok)}" for s, n in zip(sweeps, norm["dropped"]) if n]
        text += (f" Models outside them are dropped: {', '.join(dropped)}." if dropped else " No model is dropped.")
        out.append(text)
        medians = [(s.name, weighted_quantile(s.errors, w, 0.5)) for s, w in zip(sweeps, norm["weights"])]
        if len(medians) > 1:
            medians.sort(key=lambda m: m[1])
            out.append("Normalized median errors: " + ", ".join(f"{n} {m:.2f}%" for n, m in medians) + ".")
    for s, models in zip(sweeps, fits):
        errs = [m["fit"]["fit_error"] for m in models if m["fit"]]
        if errs:
            exact = sum(e == 0 for e in errs)
            wms = [m["fit"]["wm"] for m in models if m["fit"] and wm_used(m["fit"])]
            out.append(f"Quantized linear fit of the {len(errs)} best models of {s.name}: median fit error "
                       f"{np.median(errs):.3g} (mean squared log width), {exact} fit exactly"
                       + (f", median wm {np.median(wms):.2f}." if wms else "; every fit is constant (wa = 0)."))
    small = [r["label"] for r in rows if r["n_ok"] < 10]
    if small:
        out.append(f"Fewer than 10 finished models in {', '.join(small)}: their EDF and percentiles are coarse.")
    counts = []
    for s in sweeps:
        n, total, chance = s.n_diverged, len(s.results), s.at_chance
        why = f" ({n - chance} non-finite loss, {chance} at chance)" if n else ""
        counts.append(f"{s.name} {n} of {total}{why}")
    kept = any(s.kept_diverged for s in sweeps)
    out.append("Diverged networks: " + ", ".join(counts) + (
        "; those at chance are kept in the EDFs and statistics (--keep-diverged), the others left out." if kept
        else "; they are listed below and left out of the EDFs and every statistic." if any(
            s.n_diverged for s in sweeps) else "."))
    for s in sweeps:
        share = s.n_diverged / max(1, len(s.results))
        if share > DIVERGED_WARNING:
            out.append(f"Warning: {share:.0%} of {s.name}'s networks diverged, so its EDF describes the networks "
                       "this recipe could train rather than the design space; fix the recipe (a warmup, "
                       "zero-gamma, a lower learning rate) and sample again.")
    failed = sum(r["n_failed"] for r in rows)
    if failed:
        out.append(f"{failed} model{'s' if failed > 1 else ''} failed; they are listed below and left out of "
                   "every statistic.")
    return out


def _diverged_cell(sweep: Sweep) -> str:
    return f"{len(sweep.diverged)} of {len(sweep.results)}" if sweep.diverged else "0"


def _diverged_at(result: dict[str, Any]) -> str:
    at = result.get("diverged_at") if isinstance(result.get("diverged_at"), dict) else {}
    return f" (epoch {at['epoch']}, step {at['step']})" if at.get("epoch") is not None and at.get("step") is not None else ""


def report(paths: Sequence[str | Path | Sweep], out: str | Path | None = None, fmt: str = "md", top: int = 5,
           keep_diverged: bool = False) -> Path:
    """Analyse one or more sweeps and write ``report.md`` (or ``report.html``) with its figures into ``out``.

    ``out`` defaults to the first sweep's ``analysis/`` folder. ``keep_diverged``: the networks that
    stayed at chance enter the EDFs, fits and statistics. Returns the report's path.
    """
    if fmt not in ("md", "html"):
        raise TricksError(f"unknown report format {fmt!r}: use md or html")
    if int(top) < 1:
        raise TricksError(f"top must be at least 1 (got {top})")
    sweeps = load_sweeps(list(paths), keep_diverged)
    out = Path(out) if out is not None else sweeps[0].path / "analysis"
    check_writable(out, "--out")  # before any figure is drawn
    out.mkdir(parents=True, exist_ok=True)
    rows = [summarize(s) for s in sweeps]
    try:
        flops = [s.complexity("flops") for s in sweeps]
        norm, note = normalization(flops, normalization_bins(min(len(f) for f in flops))), ""
    except TricksError as error:
        norm, note = None, str(error)[0].upper() + str(error)[1:] + "; edf_normalized.png only shows this note."
    fits = best_fits(sweeps, int(top))
    plot_edf(sweeps, out / "edf.png")
    plot_edf_normalized(sweeps, norm, note, out / "edf_normalized.png")
    plot_params(sweeps, out / "error_vs_params.png")
    plot_best_widths(sweeps, fits, out / "best_widths.png")

    f2 = lambda v: f"{v:.2f}"  # noqa: E731
    blocks: list[tuple] = [("h1", "Design-space analysis"), ("h2", "Sweeps")]
    blocks.append(("table", ["sweep", "space", "path", "window", "resolution", "finished", "diverged", "failed"],
                   [[s.name, s.space or "?", str(s.path), _window_text(s), s.spec.get("resolution", "?"),
                     len(s.ok), _diverged_cell(s), len(s.failed)] for s in sweeps]))
    blocks.append(("h2", "Findings"))
    blocks.append(("list", _findings(sweeps, rows, norm, note, fits, int(top))))
    blocks.append(("h2", "Error statistics (top-1 error, %)"))
    blocks.append(("table", ["sweep", "ok", "diverged", "failed", "min", "p5", "p10", "p25", "median", "mean", "best",
                             "best flops", "best params", "flops range"],
                   [[r["label"], r["n_ok"], _diverged_cell(s), r["n_failed"], f2(r["min"]), f2(r["p5"]), f2(r["p10"]), f2(r["p25"]),
                     f2(r["median"]), f2(r["mean"]), r["best_id"], count_text(r["best_flops"]),
                     count_text(r["best_params"]),
                     f"{count_text(r['flops_min'])}–{count_text(r['flops_max'])}"] for s, r in zip(sweeps, rows)]))
    blocks.append(("h2", "Error EDF"))
    left_out = "; ".join(f"{s.name} {s.diverged_text}" for s in sweeps if s.diverged)
    blocks.append(("p", "F(e) is the fraction of a sweep's models with error below e; a curve further up and to "
                        "the left is a better design space."
                   + (f" Models that diverged are left out of every curve: {left_out}." if left_out else "")))
    blocks.append(("img", "edf.png", "error EDF"))
    blocks.append(("h2", "Complexity-normalized EDF"))
    blocks.append(("p", "Each sweep's models are reweighted so that every sweep puts the same mass on each "
                        "log-flops bin populated by all sweeps: differences left are not due to complexity."))
    blocks.append(("img", "edf_normalized.png", "complexity-normalized error EDF"))
    blocks.append(("h2", "Error against the design parameters"))
    blocks.append(("p", "One point per model; lines are least-squares fits on log x (widths, complexity) or "
                        "binned medians (other parameters)."))
    blocks.append(("img", "error_vs_params.png", "error against each design parameter"))
    blocks.append(("h2", f"Best {int(top)} models and their quantized linear fit"))
    fit_rows = []
    for s, models in zip(sweeps, fits):
        for m in models:
            r, fit = m["result"], m["fit"]
            cfg = r.get("config") or {}
            cx = r.get("complexity") or {}
            fit_cells = ([fit["w0"], f"{fit['wa']:.2f}", f"{fit['wm']:.3f}" if wm_used(fit) else "–",
                          f"{fit['fit_error']:.4g}"] if fit else ["?"] * 4)
            fit_rows.append([s.name, r["id"], f2(float(r["error"])), count_text(as_number(cx.get("flops"))),
                             ",".join(str(v) for v in cfg.get("depths", [])) or "?",
                             ",".join(str(v) for v in cfg.get("widths", [])) or "?", *fit_cells])
    blocks.append(("table", ["sweep", "id", "error", "flops", "depths", "widths", "w0", "wa", "wm", "fit error"],
                   fit_rows))
    blocks.append(("p", "The fit error is the mean squared difference of log widths between the model and "
                        "regnet_widths(d, w0, wa, wm); 0 means the model is a RegNet. Dashed: u_j = w0 + wa*j; "
                        "dotted: the fitted quantized widths."))
    blocks.append(("img", "best_widths.png", "widths of the best models with their fits"))
    diverged = [f"{s.name} {r['id']}{_diverged_at(r)}: {one_line(r.get('message') or 'no message')}"
                for s in sweeps for r in s.diverged]
    if diverged:
        blocks.append(("h2", f"Diverged models ({len(diverged)})"))
        blocks.append(("list", diverged))
    failures = [f"{s.name} {r['id']}: {one_line(r.get('message') or r.get('status') or 'no message')}"
                for s in sweeps for r in s.failed]
    if failures:
        blocks.append(("h2", f"Failed models ({len(failures)})"))
        blocks.append(("list", failures))

    write_json(out / "summary.json", ({"sweeps": rows, "best": [
        {"sweep": s.name, "id": m["result"]["id"], "error": float(m["result"]["error"]),
         "fit": {k: m["fit"][k] for k in ("w0", "wa", "wm", "fit_error")} if m["fit"] else None}
        for s, models in zip(sweeps, fits) for m in models],
        "diverged": [{"sweep": s.name, "id": r["id"], "diverged_at": r.get("diverged_at"), "message": r.get("message")}
                     for s in sweeps for r in s.diverged]}))
    target = out / f"report.{fmt}"
    write_text(target, to_markdown(blocks) if fmt == "md" else to_html(to_markdown(blocks, literal=True)))
    return target
