"""Analysis of design-space sweeps: error EDFs, complexity normalization, quantized linear fits, report.

A sweep folder is what ``tricks sample`` writes: ``sweep.json`` (the space, the complexity window,
...) and ``results/<id>.json``, one per trained model. :func:`report` reads one or more sweeps and
writes a report (Markdown or HTML) with its figures:

* the error EDF ``F(e) = (1/n) sum_i 1[e_i < e]`` of every sweep, overlaid (``edf.png``);
* the complexity-normalized EDF (``edf_normalized.png``): each sweep's models are reweighted so that
  every sweep puts the same mass on each log-flops bin that all sweeps populate;
* the error against every design parameter and complexity measure (``error_vs_params.png``);
* the per-block widths of the best models with their quantized linear fit (``best_widths.png``),
  the fit of the paper's section 3.3 that leads from AnyNet to RegNet.

The work is split in three modules, re-exported here: :mod:`.stats` (loading and statistics),
:mod:`.figures` and :mod:`.report`.
"""

from __future__ import annotations

from .figures import FIGURES, plot_best_widths, plot_edf, plot_edf_normalized, plot_params
from .report import report, to_html, to_markdown
from .stats import (NORMALIZATION_BINS, PERCENTILES, WM_RANGE, Sweep, best_fits, block_widths, edf, edf_at,
                    fit_quantized_linear, load_sweep, load_sweeps, normalization, normalization_bins,
                    normalized_weights, summarize, weighted_quantile)

__all__ = [
    "FIGURES", "NORMALIZATION_BINS", "PERCENTILES", "WM_RANGE", "Sweep", "best_fits", "block_widths", "edf",
    "edf_at", "fit_quantized_linear", "load_sweep", "load_sweeps", "normalization", "normalization_bins",
    "normalized_weights", "plot_best_widths", "plot_edf", "plot_edf_normalized", "plot_params", "report",
    "summarize", "to_html", "to_markdown", "weighted_quantile",
]
