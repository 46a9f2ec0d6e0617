"""Design-space sweeps as data: loading sweep folders, error EDFs, complexity normalization, the
quantized linear fit of block widths, and the summary statistics of a sweep.

A sweep folder is what ``tricks sample`` writes: ``sweep.json`` (the space, the complexity window,
...) and ``results/<id>.json``, one per trained model. :mod:`.figures` draws these statistics and
:mod:`.report` writes them up.

Only the models that finished with an error value (``ok``) enter the EDFs and the statistics. A
model that diverged -- its training loss became non-finite (also an ``ok`` result of an older job
whose final validation loss is not a finite number), or its validation error stayed at chance (its
best error within ``CHANCE_MARGIN`` points of ``100 (1 - 1/C)``, as the sampling job records it and as
an older job's results are read) -- and a model that failed are counted apart, so that a report
can say how many of a space's models were left out and why. ``keep_diverged`` puts the networks
that stayed at chance (they have an error value) back among the ``ok`` ones.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tricks import TricksError

from .complexity import format_count
from .config import Q, regnet_widths

PERCENTILES = (5, 10, 25)
NORMALIZATION_BINS = 10
WM_RANGE = (1.2, 4.0)  # the w_m searched by the quantized linear fit (the RegNet space is 1.5..3)


# ----------------------------------------------------------------------------------------- loading


@dataclass
class Sweep:
    """One sweep folder: its ``sweep.json`` (``spec``) and its results: finished (``ok``), diverged
    (``diverged``: the training loss became non-finite) or ``failed``."""

    path: Path
    name: str
    space: str | None
    spec: dict[str, Any]
    results: list[dict[str, Any]]
    ok: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    diverged: list[dict[str, Any]] = field(default_factory=list)
    kept_diverged: bool = False

    @property
    def at_chance(self) -> int:
        """How many of the models recorded as diverged stayed at chance (the others' loss became non-finite)."""
        return sum(1 for r in self.results if r.get("reason") == "chance")

    @property
    def n_diverged(self) -> int:
        """Every model recorded as diverged, left out or (``kept_diverged``) kept."""
        return sum(1 for r in self.results if r.get("status") == "diverged")

    @property
    def diverged_text(self) -> str:
        """``k of n diverged`` (n: every model with a result), or "" when none did."""
        return f"{len(self.diverged)} of {len(self.results)} diverged" if self.diverged else ""

    @property
    def errors(self) -> np.ndarray:
        return np.array([float(r["error"]) for r in self.ok])

    def complexity(self, key: str) -> np.ndarray:
        """``flops``, ``params`` or ``acts`` of the finished models (NaN where a result lacks it)."""
        return np.array([as_number((r.get("complexity") or {}).get(key)) for r in self.ok])

    @property
    def window(self) -> dict[str, Any]:
        window = self.spec.get("window")
        return window if isinstance(window, dict) else {}

    def best(self, k: int) -> list[dict[str, Any]]:
        """The ``k`` finished models of lowest error (ties by id)."""
        return sorted(self.ok, key=lambda r: (float(r["error"]), str(r.get("id"))))[:k]


def as_number(value: Any) -> float:
    """A JSON value as a float; NaN when it is no finite number."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return math.nan


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TricksError(f"cannot read {path}: {one_line(error)}; restore it, or remove it and run the "
                          "sampling job's command again to rewrite it") from None


def load_sweep(path: str | Path, keep_diverged: bool = False) -> Sweep:
    """Read a sweep folder. Raises :class:`TricksError` when it is not a sweep or holds no finished
    model. ``keep_diverged``: the networks that stayed at chance count as finished (ok)."""
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
    results.sort(key=lambda r: (as_number(r.get("index")) if math.isfinite(as_number(r.get("index"))) else math.inf,
                                r["id"]))
    from .sweep import at_chance, chance_error

    classes = spec.get("num_classes") if isinstance(spec.get("num_classes"), int) else None
    ok, failed, diverged = [], [], []
    for i, result in enumerate(results):
        status = result.get("status", "ok")
        best = as_number(result.get("best_error"))
        finite_loss = "final_val_loss" not in result or math.isfinite(as_number(result["final_val_loss"]))
        if status == "ok" and finite_loss and classes and math.isfinite(best) and at_chance(best, classes):
            result = results[i] = {**result, "status": "diverged", "reason": "chance", "message": (
                f"its validation error stayed at chance ({best:.1f}% at best, chance {chance_error(classes):.1f}%)")}
            status = "diverged"
        if status == "diverged" and keep_diverged and result.get("reason") == "chance" \
                and math.isfinite(as_number(result.get("error"))):
            ok.append(result)
        elif status == "diverged" or (status == "ok" and "final_val_loss" in result
                                    and not math.isfinite(as_number(result["final_val_loss"]))):
            if not result.get("message"):
                result = {**result, "message": "its training loss became non-finite"}
            results[i] = entry = {**result, "status": "diverged", "reason": result.get("reason") or "non-finite"}
            diverged.append(entry)
        elif status == "ok" and math.isfinite(as_number(result.get("error"))):
            ok.append(result)
        else:
            if status == "ok" and not result.get("message"):
                result = {**result, "message": "finished without an error value"}
            failed.append(result)
    space = spec.get("space") if isinstance(spec.get("space"), str) else None
    sweep = Sweep(path, space or path.resolve().name, space, spec, results, ok, failed, diverged, keep_diverged)
    if not results:
        where = "results/ is empty" if results_dir.is_dir() else "it has no results/ folder"
        raise TricksError(f"{path} holds no finished model yet ({where})")
    if not ok:
        first = (failed or diverged)[0]
        counts = ("all failed" if not diverged else "all diverged" if not failed
                  else f"{len(diverged)} diverged, {len(failed)} failed")
        raise TricksError(f"{path}: none of its {len(results)} models finished with an error value ({counts}; "
                          f"first: {first['id']}: {one_line(first.get('message') or 'no message')}); "
                          "there is nothing to analyse: train more models, or change the recipe")
    return sweep


def load_sweeps(paths: Sequence[str | Path | Sweep], keep_diverged: bool = False) -> list[Sweep]:
    """Read several sweeps and give each a distinct label: the space, else the folder name, else more of the path."""
    sweeps = [p if isinstance(p, Sweep) else load_sweep(p, keep_diverged) for p in paths]
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


def wm_used(fit: dict[str, Any]) -> bool:
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
            "n_failed": len(sweep.failed), "n_diverged": len(sweep.diverged), "n_results": len(sweep.results),
            "min": float(errors.min()), "p5": float(p5), "p10": float(p10),
            "p25": float(p25), "median": float(median), "mean": float(errors.mean()),
            "best_id": best["id"], "best_error": float(best["error"]),
            "best_flops": as_number(cx.get("flops")), "best_params": as_number(cx.get("params")),
            "flops_min": float(flops.min()) if flops.size else math.nan,
            "flops_max": float(flops.max()) if flops.size else math.nan}


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


# ------------------------------------------------------------------------------------------- text


def count_text(v: float) -> str:
    """A count in short form (``4.1M``), ``?`` when unknown."""
    return format_count(v) if math.isfinite(v) else "?"


def one_line(text: Any, limit: int = 300) -> str:
    """``text`` on one line, cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
