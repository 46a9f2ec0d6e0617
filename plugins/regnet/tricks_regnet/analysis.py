"""Analysis of design-space sweeps: error EDFs, complexity normalization, quantized linear fits, report.

A sweep folder is what ``tricks sample`` writes: ``sweep.json`` (the space, the complexity window,
...) and ``results/<id>.json``, one per trained model. This module reads one or more sweeps and
writes a report (Markdown or HTML) with its figures:

* the error EDF ``F(e) = (1/n) sum_i 1[e_i < e]`` of every sweep, overlaid (``edf.png``);
* the complexity-normalized EDF (``edf_normalized.png``): each sweep's models are reweighted so that
  every sweep puts the same mass on each log-flops bin that all sweeps populate;
* the error against every design parameter and complexity measure (``error_vs_params.png``);
* the per-block widths of the best models with their quantized linear fit (``best_widths.png``),
  the fit of the paper's section 3.3 that leads from AnyNet to RegNet.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tricks import TricksError
from tricks.io import write_json, write_text, write_with

from .complexity import format_count
from .config import Q, regnet_widths

PERCENTILES = (5, 10, 25)
FIGURES = ("edf.png", "edf_normalized.png", "error_vs_params.png", "best_widths.png")
NORMALIZATION_BINS = 10
WM_RANGE = (1.2, 4.0)  # the w_m searched by the quantized linear fit (the RegNet space is 1.5..3)


# ----------------------------------------------------------------------------------------- loading


@dataclass
class Sweep:
    """One sweep folder: its ``sweep.json`` (``spec``) and its results, finished (``ok``) or not."""

    path: Path
    name: str
    space: str | None
    spec: dict[str, Any]
    results: list[dict[str, Any]]
    ok: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def errors(self) -> np.ndarray:
        return np.array([float(r["error"]) for r in self.ok])

    def complexity(self, key: str) -> np.ndarray:
        """``flops``, ``params`` or ``acts`` of the finished models (NaN where a result lacks it)."""
        return np.array([_number((r.get("complexity") or {}).get(key)) for r in self.ok])

    @property
    def window(self) -> dict[str, Any]:
        window = self.spec.get("window")
        return window if isinstance(window, dict) else {}

    def best(self, k: int) -> list[dict[str, Any]]:
        """The ``k`` finished models of lowest error (ties by id)."""
        return sorted(self.ok, key=lambda r: (float(r["error"]), str(r.get("id"))))[:k]


def _number(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return math.nan


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TricksError(f"cannot read {path}: {error}") from None


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep folder. Raises :class:`TricksError` when it is not a sweep or holds no finished model."""
    path = Path(path)
    if path.is_file() and path.name == "sweep.json":
        path = path.parent
    if not path.exists():
        raise TricksError(f"no sweep at {path}: the folder does not exist")
    if not path.is_dir():
        raise TricksError(f"{path} is not a sweep folder (give the folder that holds sweep.json and results/)")
    spec_path, results_dir = path / "sweep.json", path / "results"
    if not spec_path.is_file() and not results_dir.is_dir():
        raise TricksError(f"{path} is not a sweep folder: it has no sweep.json and no results/ "
                          "(make one with `tricks sample`)")
    spec = _read_json(spec_path) if spec_path.is_file() else {}
    if not isinstance(spec, dict):
        raise TricksError(f"{spec_path} is not a JSON object")
    files = sorted(p for p in results_dir.glob("*.json") if not p.name.startswith(".")) if results_dir.is_dir() else []
    results = []
    for file in files:
        result = _read_json(file)
        if not isinstance(result, dict):
            raise TricksError(f"{file} is not a JSON object")
        result["id"] = str(result["id"]) if result.get("id") not in (None, "") else file.stem
        results.append(result)
    results.sort(key=lambda r: (_number(r.get("index")) if math.isfinite(_number(r.get("index"))) else math.inf,
                                r["id"]))
    ok, failed = [], []
    for result in results:
        if result.get("status", "ok") == "ok" and math.isfinite(_number(result.get("error"))):
            ok.append(result)
        else:
            if result.get("status", "ok") == "ok" and not result.get("message"):
                result = {**result, "message": "finished without an error value"}
            failed.append(result)
    space = spec.get("space") if isinstance(spec.get("space"), str) else None
    sweep = Sweep(path, space or path.resolve().name, space, spec, results, ok, failed)
    if not results:
        where = "results/ is empty" if results_dir.is_dir() else "it has no results/ folder"
        raise TricksError(f"{path} holds no finished model yet ({where})")
    if not ok:
        first = failed[0]
        raise TricksError(f"{path}: none of its {len(failed)} models finished (all failed; "
                          f"first: {first['id']}: {_one_line(first.get('message') or 'no message')})")
    return sweep


def load_sweeps(paths: Sequence[str | Path | Sweep]) -> list[Sweep]:
    """Read several sweeps and give each a distinct label: the space, else the folder name, else more of the path."""
    sweeps = [p if isinstance(p, Sweep) else load_sweep(p) for p in paths]
    if not sweeps:
        raise TricksError("no sweep to analyse: give at least one sweep folder")
    labels = [s.name for s in sweeps]
    places = [s.path.resolve() for s in sweeps]
    for level in (1, 2, 3):
        # a clash of different folders: name them by more and more of their path
        clash = {lab for lab in labels if len({p for p, other in zip(places, labels) if other == lab}) > 1}
        if not clash:
            break
        labels = [("/".join(p.parts[-level:]) if lab in clash else lab) for p, lab in zip(places, labels)]
    seen: dict[str, int] = {}
    counts = {lab: labels.count(lab) for lab in labels}
    for i, lab in enumerate(labels):
        if counts[lab] > 1:  # the same folder given twice
            seen[lab] = seen.get(lab, 0) + 1
            labels[i] = f"{lab} #{seen[lab]}"
    for s, lab in zip(sweeps, labels):
        s.name = lab
    return sweeps


# ------------------------------------------------------------------------------------------- EDFs


def edf(errors: Sequence[float], weights: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The (weighted) error EDF ``F(e) = sum_i w_i 1[e_i < e]`` (``w_i = 1/n`` without weights) as a step curve.

    Returns ``(x, y)`` for ``step(x, y, where="post")``: ``x`` is the first error followed by the
    sorted distinct errors, ``y`` starts at 0 and ``y[i]`` is the mass of the errors ``<= x[i]``.
    ``F(e) = y[searchsorted(x, e, side="left") - 1]`` (0 when that index is -1) holds for every ``e``,
    jump points included. Models of weight 0 are left out.
    """
    e = np.asarray(errors, dtype=np.float64).ravel()
    w = np.full(e.shape, 1.0) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if w.shape != e.shape:
        raise ValueError(f"edf: {e.size} errors and {w.size} weights")
    keep = w > 0
    e, w = e[keep], w[keep]
    if e.size == 0:
        return np.zeros(0), np.zeros(0)
    ux, inverse = np.unique(e, return_inverse=True)
    mass = np.bincount(inverse, weights=w) / w.sum()
    return np.concatenate([ux[:1], ux]), np.concatenate([[0.0], np.minimum(np.cumsum(mass), 1.0)])


def edf_at(errors: Sequence[float], points: Sequence[float] | float,
           weights: Sequence[float] | None = None) -> np.ndarray:
    """``F(p) = sum_i w_i 1[e_i < p] / sum_i w_i`` at each point (``w_i = 1`` without weights)."""
    e = np.asarray(errors, dtype=np.float64).ravel()
    w = np.full(e.shape, 1.0) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    p = np.atleast_1d(np.asarray(points, dtype=np.float64))
    return (w[None, :] * (e[None, :] < p[:, None])).sum(1) / w.sum()


def _log_bins(flops: np.ndarray, valid: np.ndarray, bins: int | Sequence[float], all_flops: np.ndarray):
    """The bin (or -1) of every model: ``bins`` equal bins of log-flops over the union range, or given edges."""
    index = np.full(flops.shape, -1)
    if np.isscalar(bins):
        nb = int(bins)
        if nb < 1:
            raise ValueError("normalized_weights: bins must be >= 1")
        lo, hi = np.log(all_flops.min()), np.log(all_flops.max())
        edges = np.exp(np.linspace(lo, hi, nb + 1))
        if hi > lo:
            t = (np.log(flops[valid]) - lo) / (hi - lo) * nb
            index[valid] = np.clip(np.floor(t).astype(np.int64), 0, nb - 1)
        else:
            index[valid] = 0
        return index, edges
    edges = np.asarray(bins, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError("normalized_weights: bin edges must be increasing")
    nb = edges.size - 1
    f = flops[valid]
    i = np.searchsorted(edges, f, side="right") - 1
    i[f == edges[-1]] = nb - 1
    index[valid] = np.where((i >= 0) & (i < nb), i, -1)
    return index, edges


def normalization_bins(n: int) -> int:
    """How many log-flops bins to normalize with when the smallest sweep has ``n`` models: about
    ``sqrt(n)``, from 2 to 10 (10 for the paper's 500 models; 5 for 24), so that a bin is rarely
    empty by chance alone."""
    return int(min(NORMALIZATION_BINS, max(2, round(math.sqrt(n)))))


def normalization(flops_by_space: Sequence[Sequence[float]],
                  bins: int | Sequence[float] = NORMALIZATION_BINS) -> dict[str, Any]:
    """The complexity normalization with its bookkeeping: ``weights`` (one array per space), ``edges``,
    ``counts`` (models per space and bin), ``common`` (the bins every space populates), ``dropped``
    (models per space that get weight 0)."""
    arrays = [np.asarray(f, dtype=np.float64).ravel() for f in flops_by_space]
    if not arrays:
        raise TricksError("complexity normalization needs at least one design space")
    valid = [np.isfinite(a) & (a > 0) for a in arrays]
    if any(not v.any() for v in valid):
        raise TricksError("complexity normalization needs every space to have models with a known flop count")
    all_flops = np.concatenate([a[v] for a, v in zip(arrays, valid)])
    indices, edges = [], None
    for a, v in zip(arrays, valid):
        index, edges = _log_bins(a, v, bins, all_flops)
        indices.append(index)
    nb = len(edges) - 1
    counts = np.array([np.bincount(i[i >= 0], minlength=nb) for i in indices])
    common = np.flatnonzero((counts > 0).all(axis=0))
    if common.size == 0:
        raise TricksError("complexity normalization is impossible: no flops bin holds models of every space "
                          "(their flop ranges do not overlap)")
    weights = []
    for index, count in zip(indices, counts):
        w = np.zeros(index.shape)
        inside = np.isin(index, common)
        w[inside] = 1.0 / (common.size * count[index[inside]])
        weights.append(w)
    return {"weights": weights, "edges": edges, "counts": counts, "common": common,
            "dropped": [int((w == 0).sum()) for w in weights]}


def normalized_weights(flops_by_space: Sequence[Sequence[float]],
                       bins: int | Sequence[float] = NORMALIZATION_BINS) -> list[np.ndarray]:
    """Complexity-normalizing weights: one array per space, summing to 1.

    Log-flops are cut into ``bins`` equal bins over the union range of all spaces (or ``bins`` is a
    sequence of flop edges). Only the bins that every space populates are kept; each gets the same
    mass ``1/#kept`` in every space, shared equally by that space's models in it. Models in other
    bins (or without a flop count) get weight 0.
    """
    return normalization(flops_by_space, bins)["weights"]


def weighted_quantile(values: Sequence[float], weights: Sequence[float], q: float) -> float:
    """The smallest value whose cumulative weight reaches ``q`` of the total."""
    v, w = np.asarray(values, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    order = np.argsort(v, kind="stable")
    cum = np.cumsum(w[order]) / w.sum()
    return float(v[order][min(np.searchsorted(cum, q - 1e-12), v.size - 1)])


# ---------------------------------------------------------------------------- quantized linear fit


def _fit_w0(t: np.ndarray, w0: int, wms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For one ``w0`` and each ``wm``: the least loss over ``wa >= 0`` and a ``wa`` that attains it.

    For fixed ``(w0, wm)`` block ``j`` moves from level ``k`` to ``k+1`` when ``wa`` crosses
    ``w0 (wm^(k+1/2) - 1) / j``, so the loss is piecewise constant in ``wa``: sorting these points
    and accumulating the change of each crossing gives the loss on every piece exactly.
    """
    d = t.size
    head = (math.log(w0) - t[0]) ** 2  # block 0 is always w0
    if d == 1:
        return np.full(wms.shape, head), np.zeros(wms.shape)
    # levels up to twice the widest block suffice; a small wm needs more of them
    kmax = np.maximum(1, np.ceil(math.log(2 * math.exp(t.max()) / w0) / np.log(wms)).astype(np.int64) + 1)
    loss, wa = np.empty(wms.shape), np.empty(wms.shape)
    for kk in np.unique(kmax):
        rows = kmax == kk
        loss[rows], wa[rows] = _fit_w0_levels(t, w0, wms[rows], int(kk))
    return (loss + head) / d, wa


def _fit_w0_levels(t: np.ndarray, w0: int, wms: np.ndarray, kmax: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_fit_w0` for levels ``0..kmax``, without block 0 and not yet divided by the depth."""
    d = t.size
    k = np.arange(kmax + 1)
    levels = np.round(w0 * np.power(wms[:, None], k[None, :]) / Q) * Q  # (M, K+1)
    cost = (np.log(levels)[:, None, :] - t[None, 1:, None]) ** 2  # (M, d-1, K+1): block j at level k
    delta = np.diff(cost, axis=2)  # (M, d-1, K): the change when block j goes up one level
    j = np.arange(1, d, dtype=np.float64)
    cross = w0 * (np.power(wms[:, None], k[None, :-1] + 0.5) - 1.0)[:, None, :] / j[None, :, None]
    m = wms.size
    cross, delta = cross.reshape(m, -1), delta.reshape(m, -1)
    order = np.argsort(cross, axis=1, kind="stable")
    cross, delta = np.take_along_axis(cross, order, 1), np.take_along_axis(delta, order, 1)
    loss = cost[:, :, 0].sum(1)[:, None] + np.concatenate([np.zeros((m, 1)), np.cumsum(delta, 1)], 1)
    lo = np.concatenate([np.zeros((m, 1)), cross], 1)
    hi = np.concatenate([cross, 2 * cross[:, -1:] + 1], 1)
    loss = np.where(hi > lo * (1 + 1e-9) + 1e-9, loss, np.inf)  # pieces of zero width do not exist
    wa = np.where(np.arange(lo.shape[1])[None, :] == 0, 0.0, (lo + hi) / 2)
    best = np.argmin(loss, axis=1)
    rows = np.arange(m)
    return loss[rows, best], wa[rows, best]


def _targeted_wms(widths: np.ndarray, w0: int) -> np.ndarray:
    """``wm`` values inside each interval where ``round8(w0 wm^k)`` equals one of the widths, for every
    level ``k`` that keeps ``wm`` in range: exact fits need ``wm`` in the intersection of such intervals,
    which for wide or deep models is far narrower than any grid step (densest for the widest block)."""
    out = []
    unique = np.unique(widths)
    for w in unique[unique > w0]:
        points = 32 if w == unique[-1] else 8
        lo_w, hi_w = (w - Q / 2) / w0, (w + Q / 2) / w0
        k_min = max(1, math.ceil(math.log(max(lo_w, 1.0 + 1e-12)) / math.log(WM_RANGE[1]) - 1e-9))
        k_max = math.floor(math.log(hi_w) / math.log(WM_RANGE[0]) + 1e-9)
        for k in range(k_min, k_max + 1):
            lo, hi = max(lo_w ** (1 / k), WM_RANGE[0]), min(hi_w ** (1 / k), WM_RANGE[1])
            if hi > lo:
                out.append(np.linspace(lo, hi, points + 2)[1:-1])
    return np.concatenate(out) if out else np.zeros(0)


def fit_quantized_linear(block_widths: Sequence[float]) -> dict[str, Any]:
    """The paper's quantized linear fit of a model's per-block widths.

    Finds ``w0`` (a multiple of 8), ``wa >= 0`` and ``wm`` in [1.2, 4] minimizing the mean squared
    difference of log widths between ``block_widths`` and ``regnet_widths(d, w0, wa, wm)``: a search
    over ``w0`` (near the first block's width, and across the range of widths) and a grid of ``wm``
    (with points inside every interval that makes a quantized level equal one of the widths), ``wa``
    solved exactly for each, then a local refinement of ``wm``. A true RegNet's widths are reproduced
    exactly (fit error 0); the parameters found may differ from the RegNet's own.

    Returns ``w0``, ``wa``, ``wm``, ``fit_error``, the fitted ``widths`` and the continuous line
    ``u`` (``u_j = w0 + wa j``).
    """
    w = np.asarray(block_widths, dtype=np.float64).ravel()
    if w.size == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError("fit_quantized_linear needs at least one block width, all positive")
    t, d = np.log(w), w.size
    first = max(Q, int(round(w[0] / Q)) * Q)
    grid = np.round(np.arange(WM_RANGE[0], WM_RANGE[1] + 1e-9, 0.01), 6)
    best = (math.inf, first, 0.0, 2.0)
    # w0 near the first width, and a ladder over all widths (a decreasing profile is best fit by a
    # constant near its geometric mean), then the neighbours of the best rung
    ladder = np.exp(np.linspace(np.log(max(w.min(), Q)), np.log(max(w.max(), Q)), 12))
    w0s = {first + Q * i for i in range(-4, 5)} | {int(round(v / Q)) * Q for v in ladder}
    tried: set[int] = set()
    for extra in (False, True):
        if extra:
            w0s = {best[1] + Q * i for i in range(-3, 4)}
        for w0 in sorted(v for v in w0s - tried if v >= Q):
            tried.add(w0)
            # an exact fit needs w0 == the first width: only then is it worth aiming at narrow intervals
            wms = np.unique(np.concatenate([grid, _targeted_wms(w, w0)])) if w0 == first else grid
            loss, wa = _fit_w0(t, w0, wms)
            i = int(np.argmin(loss))
            if loss[i] < best[0] - 1e-12:
                best = (float(loss[i]), w0, float(wa[i]), float(wms[i]))
    _, w0, wa, wm = best
    if d > 1:
        step = 0.01
        for _ in range(3):
            wms = np.unique(np.clip(np.linspace(wm - step, wm + step, 41), *WM_RANGE))
            loss, was = _fit_w0(t, w0, wms)
            i = int(np.argmin(loss))
            if loss[i] < best[0] - 1e-12:
                best = (float(loss[i]), w0, float(was[i]), float(wms[i]))
                _, w0, wa, wm = best
            step /= 20
    widths = regnet_widths(d, w0, wa, wm)
    # prefer short numbers when they give the same widths
    for digits_a, digits_m in ((0, 1), (1, 2), (2, 2), (2, 3), (3, 4)):
        a, mm = round(wa, digits_a), round(wm, digits_m)
        if a >= 0 and WM_RANGE[0] <= mm <= WM_RANGE[1] and np.array_equal(regnet_widths(d, w0, a, mm), widths):
            wa, wm = float(a), float(mm)
            break
    fit_error = float(np.mean((np.log(widths) - t) ** 2))
    return {"w0": int(w0), "wa": float(wa), "wm": float(wm), "fit_error": fit_error, "depth": d,
            "widths": [int(v) for v in widths], "u": [float(w0 + wa * j) for j in range(d)]}


def _wm_used(fit: dict[str, Any]) -> bool:
    """Whether the fit's ``wm`` matters: with a single level (e.g. ``wa = 0``) any ``wm`` gives the same widths."""
    return len(set(fit["widths"])) > 1


def block_widths(result: dict[str, Any]) -> list[int] | None:
    """Per-block widths of a result's model (from its config, else from RegNet parameters), or None."""
    config = result.get("config") or {}
    depths, widths = config.get("depths"), config.get("widths")
    if isinstance(depths, list) and isinstance(widths, list) and len(depths) == len(widths) and depths:
        try:
            return [int(w) for w, n in zip(widths, depths) for _ in range(int(n))]
        except (TypeError, ValueError):
            return None
    params = result.get("params") or {}
    try:
        return [int(v) for v in regnet_widths(int(params["depth"]), float(params["w0"]), float(params["wa"]),
                                               float(params["wm"]))]
    except (KeyError, TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------- summary


def summarize(sweep: Sweep) -> dict[str, Any]:
    """The summary row of a sweep: counts, error statistics (percent), the best model, the flops range."""
    errors = sweep.errors
    p5, p10, p25, median = np.percentile(errors, (*PERCENTILES, 50))
    best = sweep.best(1)[0]
    cx = best.get("complexity") or {}
    flops = sweep.complexity("flops")
    flops = flops[np.isfinite(flops)]
    return {"label": sweep.name, "space": sweep.space, "path": str(sweep.path), "n_ok": len(sweep.ok),
            "n_failed": len(sweep.failed), "min": float(errors.min()), "p5": float(p5), "p10": float(p10),
            "p25": float(p25), "median": float(median), "mean": float(errors.mean()),
            "best_id": best["id"], "best_error": float(best["error"]),
            "best_flops": _number(cx.get("flops")), "best_params": _number(cx.get("params")),
            "flops_min": float(flops.min()) if flops.size else math.nan,
            "flops_max": float(flops.max()) if flops.size else math.nan}


def _count(v: float) -> str:
    return format_count(v) if math.isfinite(v) else "?"


def _window_text(sweep: Sweep) -> str:
    parts = []
    for key, value in sweep.window.items():
        if isinstance(value, (list, tuple)) and len(value) == 2:
            lo, hi = (_count(_number(v)) if v is not None else "" for v in value)
            parts.append(f"{key} {lo}–{hi}")
        elif value is not None:
            parts.append(f"{key} {value}")
    return ", ".join(parts) or "none"


def _one_line(text: Any, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------- figures


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
    axis.set_major_formatter(FuncFormatter(lambda v, _: _count(v)))
    axis.set_minor_formatter(NullFormatter())


def _save(fig, path: Path) -> None:
    write_with(path, lambda f: fig.savefig(f, dpi=90, format="png"))


def _color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def plot_edf(sweeps: Sequence[Sweep], path: Path) -> None:
    fig, axes = _grid(1, 1, (5.6, 3.6), top=0.35)
    ax = axes[0, 0]
    for i, s in enumerate(sweeps):
        x, y = edf(s.errors)
        ax.step(x, y, where="post", color=_color(i), lw=1.8,
                label=f"{s.name} (n={len(s.ok)}, min {s.errors.min():.2f}, mean {s.errors.mean():.2f})")
    ax.set(xlabel="error (%)", ylabel="cumulative prob.", ylim=(0, 1.02), title="error EDF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def plot_edf_normalized(sweeps: Sequence[Sweep], norm: dict[str, Any] | None, note: str, path: Path) -> None:
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
                    label=f"{s.name} (n={used}/{len(s.ok)}, weighted mean {np.sum(w * s.errors):.2f})")
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
        values = [np.array([_number((r.get("params") or {}).get(k)) for r in s.ok]) for s in sweeps]
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
    fig.legend(handles, [s.name for s in sweeps], loc="upper center", ncol=min(len(sweeps), 5), fontsize=8,
               frameon=False)
    _save(fig, path)


def best_fits(sweeps: Sequence[Sweep], top: int) -> list[list[dict[str, Any]]]:
    """For each sweep, its ``top`` best models with their block widths and quantized linear fit."""
    out = []
    for s in sweeps:
        rows = []
        for r in s.best(top):
            widths = block_widths(r)
            rows.append({"result": r, "widths": widths, "fit": fit_quantized_linear(widths) if widths else None})
        out.append(rows)
    return out


def plot_best_widths(sweeps: Sequence[Sweep], fits: list[list[dict[str, Any]]], path: Path) -> None:
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
            wm = f"{fit['wm']:.2f}" if _wm_used(fit) else "–"
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


# ----------------------------------------------------------------------------------------- report


def _finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities replaced by None (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def _render(blocks: list[tuple], fmt: str) -> str:
    if fmt == "md":
        out = []
        for kind, *content in blocks:
            if kind in ("h1", "h2"):
                out.append(("# " if kind == "h1" else "## ") + content[0])
            elif kind == "p":
                out.append(content[0])
            elif kind == "list":
                out.append("\n".join(f"- {item}" for item in content[0]))
            elif kind == "table":
                header, rows = content
                lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
                out.append("\n".join(lines))
            elif kind == "img":
                out.append(f"![{content[1]}]({content[0]})")
        return "\n\n".join(out) + "\n"
    esc = html.escape
    out = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\"><title>Design-space analysis</title>",
           "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;line-height:1.4}"
           "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
           "th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%}</style></head><body>"]
    for kind, *content in blocks:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{esc(content[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{esc(content[0])}</p>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{esc(str(item))}</li>" for item in content[0]) + "</ul>")
        elif kind == "table":
            header, rows = content
            out.append("<table><tr>" + "".join(f"<th>{esc(str(h))}</th>" for h in header) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in rows)
                       + "</table>")
        elif kind == "img":
            out.append(f"<p><img src=\"{esc(content[0])}\" alt=\"{esc(content[1])}\"></p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


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
                   f"({best['min']:.2f}% at {_count(best['best_flops'])} flops).")
        means = sorted(rows, key=lambda r: r["mean"])
        if means[0]["label"] != lead["label"]:
            out.append(f"By mean error the order differs: {means[0]['label']} is lowest ({means[0]['mean']:.2f}%).")
    if norm is None:
        out.append(note)
    else:
        nb, kept = len(norm["edges"]) - 1, len(norm["common"])
        text = (f"Complexity normalization: flops cut into {nb} log-spaced bins from {_count(norm['edges'][0])} "
                f"to {_count(norm['edges'][-1])}; {kept} hold models"
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
            wms = [m["fit"]["wm"] for m in models if m["fit"] and _wm_used(m["fit"])]
            out.append(f"Quantized linear fit of the {len(errs)} best models of {s.name}: median fit error "
                       f"{np.median(errs):.3g} (mean squared log width), {exact} fit exactly"
                       + (f", median wm {np.median(wms):.2f}." if wms else "; every fit is constant (wa = 0)."))
    small = [r["label"] for r in rows if r["n_ok"] < 10]
    if small:
        out.append(f"Fewer than 10 finished models in {', '.join(small)}: their EDF and percentiles are coarse.")
    failed = sum(r["n_failed"] for r in rows)
    if failed:
        out.append(f"{failed} model{'s' if failed > 1 else ''} failed; they are listed below and left out of "
                   "every statistic.")
    return out


def report(paths: Sequence[str | Path | Sweep], out: str | Path | None = None, fmt: str = "md", top: int = 5) -> Path:
    """Analyse one or more sweeps and write ``report.md`` (or ``report.html``) with its figures into ``out``.

    ``out`` defaults to the first sweep's ``analysis/`` folder. Returns the report's path.
    """
    if fmt not in ("md", "html"):
        raise TricksError(f"unknown report format {fmt!r}: use md or html")
    if int(top) < 1:
        raise TricksError(f"top must be at least 1 (got {top})")
    sweeps = load_sweeps(list(paths))
    out = Path(out) if out is not None else sweeps[0].path / "analysis"
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
    blocks.append(("table", ["sweep", "space", "path", "window", "resolution", "finished", "failed"],
                   [[s.name, s.space or "?", str(s.path), _window_text(s), s.spec.get("resolution", "?"),
                     len(s.ok), len(s.failed)] for s in sweeps]))
    blocks.append(("h2", "Findings"))
    blocks.append(("list", _findings(sweeps, rows, norm, note, fits, int(top))))
    blocks.append(("h2", "Error statistics (top-1 error, %)"))
    blocks.append(("table", ["sweep", "ok", "failed", "min", "p5", "p10", "p25", "median", "mean", "best",
                             "best flops", "best params", "flops range"],
                   [[r["label"], r["n_ok"], r["n_failed"], f2(r["min"]), f2(r["p5"]), f2(r["p10"]), f2(r["p25"]),
                     f2(r["median"]), f2(r["mean"]), r["best_id"], _count(r["best_flops"]), _count(r["best_params"]),
                     f"{_count(r['flops_min'])}–{_count(r['flops_max'])}"] for r in rows]))
    blocks.append(("h2", "Error EDF"))
    blocks.append(("p", "F(e) is the fraction of a sweep's models with error below e; a curve further up and to "
                        "the left is a better design space."))
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
            fit_cells = ([fit["w0"], f"{fit['wa']:.2f}", f"{fit['wm']:.3f}" if _wm_used(fit) else "–",
                          f"{fit['fit_error']:.4g}"] if fit else ["?"] * 4)
            fit_rows.append([s.name, r["id"], f2(float(r["error"])), _count(_number(cx.get("flops"))),
                             ",".join(str(v) for v in cfg.get("depths", [])) or "?",
                             ",".join(str(v) for v in cfg.get("widths", [])) or "?", *fit_cells])
    blocks.append(("table", ["sweep", "id", "error", "flops", "depths", "widths", "w0", "wa", "wm", "fit error"],
                   fit_rows))
    blocks.append(("p", "The fit error is the mean squared difference of log widths between the model and "
                        "regnet_widths(d, w0, wa, wm); 0 means the model is a RegNet. Dashed: u_j = w0 + wa*j; "
                        "dotted: the fitted quantized widths."))
    blocks.append(("img", "best_widths.png", "widths of the best models with their fits"))
    failures = [f"{s.name} {r['id']}: {_one_line(r.get('message') or r.get('status') or 'no message')}"
                for s in sweeps for r in s.failed]
    if failures:
        blocks.append(("h2", f"Failed models ({len(failures)})"))
        blocks.append(("list", failures))

    write_json(out / "summary.json", _finite({"sweeps": rows, "best": [
        {"sweep": s.name, "id": m["result"]["id"], "error": float(m["result"]["error"]),
         "fit": {k: m["fit"][k] for k in ("w0", "wa", "wm", "fit_error")} if m["fit"] else None}
        for s, models in zip(sweeps, fits) for m in models]}))
    target = out / f"report.{fmt}"
    write_text(target, _render(blocks, fmt))
    return target
