"""Design spaces and the sampler.

A design space is a spec (a dict, or a YAML file of the same shape) that names how each design
parameter is drawn and which constraints bind them. Two kinds exist:

``kind: anynet`` -- per-stage parameters ``depth``, ``width``, ``bottleneck`` and ``group_width``
for ``stages`` stages, each drawn independently per stage, except the names in ``shared`` (one
value for all stages) and in ``increasing`` (non-decreasing from stage to stage)::

    name: anynetx_d
    kind: anynet
    stages: 4
    se: 0.0
    params:
      depth: {low: 1, high: 16}                 # integers low..high, uniform
      width: {low: 8, high: 1024, step: 8}
      bottleneck: {values: [1, 2, 4]}
      group_width: {values: [1, 2, 4, 8, 16, 32]}
    shared: [bottleneck, group_width]
    increasing: [width]

``kind: regnet`` -- ``depth``, ``w0``, ``wa``, ``wm``, ``group_width`` and ``bottleneck`` of the
quantized linear rule; a value spec may say ``dist: log_uniform`` (continuous, rounded to ``step``).
Only models with exactly ``stages`` stages are kept, by pycls's rule for its sweeps: the last
block's level is ``stages - 1`` and the levels give as many distinct widths once rounded to 8 (a
network where rounding merges two levels, or a level is skipped, is rejected).

Sampling is uniform over the configurations that satisfy the constraints: independent uniform
draws, except that a non-decreasing parameter is drawn uniformly among all non-decreasing
sequences (a uniformly random multiset of the allowed values, sorted), which is what rejection
sampling would give, without the rejections. Every draw is first made buildable
(:func:`config.compatible`), the constraints are checked on the buildable widths, and candidates
outside the complexity window are rejected. The sampler works on batches of candidates with numpy,
is seeded, returns the same sequence for the same seed (a larger ``n`` extends it), and never
returns the same network twice.
"""

from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .complexity import parse_count, stagewise_complexity, stagewise_flops
from .config import AnyNetConfig, compatible

ANYNET_PARAMS = ("depth", "width", "bottleneck", "group_width")
REGNET_PARAMS = ("depth", "w0", "wa", "wm", "group_width", "bottleneck")
METRICS = ("flops", "params", "acts")
BATCH = 8192

_ANYNET_BASE = {
    "kind": "anynet", "stages": 4, "se": 0.0, "stem_width": 32,
    "params": {
        "depth": {"low": 1, "high": 16},
        "width": {"low": 8, "high": 1024, "step": 8},
        "bottleneck": {"values": [1, 2, 4]},
        "group_width": {"values": [1, 2, 4, 8, 16, 32]},
    },
    "shared": [], "increasing": [],
}
_REGNET_BASE = {
    "kind": "regnet", "stages": 4, "se": 0.0, "stem_width": 32,
    "params": {
        "depth": {"low": 12, "high": 28},
        "w0": {"low": 8, "high": 256, "step": 8, "dist": "log_uniform"},
        "wa": {"low": 8, "high": 256, "step": 0.1, "dist": "log_uniform"},
        "wm": {"low": 2.0, "high": 3.0, "step": 0.001, "dist": "log_uniform"},
        "group_width": {"values": [1, 2, 4, 8, 16, 32]},
        "bottleneck": {"values": [1]},
    },
}


def _derive(base: dict, **changes) -> dict:
    spec = copy.deepcopy(base)
    params = changes.pop("params", {})
    spec.update(changes)
    spec["params"].update(params)
    return spec


SPACES: dict[str, dict[str, Any]] = {
    "anynetx_a": _derive(_ANYNET_BASE, name="anynetx_a",
                         description="AnyNetX_A: every stage's depth, width, bottleneck and group width free"),
    "anynetx_b": _derive(_ANYNET_BASE, name="anynetx_b", shared=["bottleneck"],
                         description="AnyNetX_B: A with one bottleneck ratio for all stages"),
    "anynetx_c": _derive(_ANYNET_BASE, name="anynetx_c", shared=["bottleneck", "group_width"],
                         description="AnyNetX_C: B with one group width for all stages"),
    "anynetx_d": _derive(_ANYNET_BASE, name="anynetx_d", shared=["bottleneck", "group_width"],
                         increasing=["width"], description="AnyNetX_D: C with non-decreasing widths"),
    "anynetx_e": _derive(_ANYNET_BASE, name="anynetx_e", shared=["bottleneck", "group_width"],
                         increasing=["width", "depth"],
                         description="AnyNetX_E: D with non-decreasing depths"),
    "regnet": _derive(_REGNET_BASE, name="regnet",
                      params={"depth": {"low": 1, "high": 63},
                              "wm": {"low": 1.5, "high": 3.0, "step": 0.001, "dist": "log_uniform"},
                              "bottleneck": {"values": [1, 2, 4]}},
                      description="RegNet: d < 64, w0, wa < 256, 1.5 <= wm <= 3, b and g as in AnyNetX_E"),
    "regnetx": _derive(_REGNET_BASE, name="regnetx",
                       description="RegNetX: RegNet with b = 1, 12 <= d <= 28 and wm >= 2"),
    "regnety": _derive(_REGNET_BASE, name="regnety", se=0.25,
                       description="RegNetY: RegNetX with squeeze-excitation (ratio 0.25)"),
}


class SpaceError(ValueError):
    """A design space spec or a sampling request that cannot work; the message names the fix."""


@dataclass
class Sample:
    """One sampled network: its design parameters, buildable config and complexity."""

    params: dict[str, Any]
    config: AnyNetConfig
    complexity: dict[str, int]

    def key(self) -> str:
        return self.config.key()

    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params, "config": self.config.to_dict(), "complexity": self.complexity}


@dataclass
class Window:
    """Complexity bounds: ``{"flops": (lo, hi), ...}``; a missing bound is open."""

    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)

    @classmethod
    def parse(cls, flops: str | None = None, params: str | None = None, acts: str | None = None) -> "Window":
        bounds = {}
        for name, text in (("flops", flops), ("params", params), ("acts", acts)):
            if text:
                bounds[name] = parse_range(text, f"--{name}")
        return cls(bounds)

    def mask(self, values: dict[str, np.ndarray]) -> np.ndarray:
        ok = np.ones(len(next(iter(values.values()))), dtype=bool)
        for name, (lo, hi) in self.bounds.items():
            ok &= (values[name] >= lo) & (values[name] <= hi)
        return ok

    def to_dict(self) -> dict[str, list[float | None]]:
        """JSON-ready: an open high bound is ``None``."""
        return {k: [lo, None if hi == math.inf else hi] for k, (lo, hi) in self.bounds.items()}

    @classmethod
    def from_dict(cls, data: dict[str, list]) -> "Window":
        return cls({k: (float(lo or 0.0), math.inf if hi is None else float(hi)) for k, (lo, hi) in data.items()})

    def __str__(self) -> str:
        from .complexity import format_count

        return ", ".join(f"{k} {format_count(lo)}:{format_count(hi) if hi != math.inf else ''}"
                         for k, (lo, hi) in self.bounds.items()) or "none"


def parse_range(text: str, what: str = "range") -> tuple[float, float]:
    """``360M:400M`` -> (3.6e8, 4e8); either side may be empty (``:400M``, ``1M:``)."""
    if ":" not in str(text):
        raise SpaceError(f"{what} {text!r}: expected LOW:HIGH, e.g. 360M:400M (either side may be empty)")
    lo, hi = str(text).split(":", 1)
    try:
        low = parse_count(lo) if lo.strip() else 0.0
        high = parse_count(hi) if hi.strip() else math.inf
    except ValueError:
        raise SpaceError(f"{what} {text!r}: bounds must be numbers with an optional K/M/G suffix, e.g. 360M:400M") from None
    if low > high:
        raise SpaceError(f"{what} {text!r}: the low bound is above the high one")
    return low, high


# --- value specs ---------------------------------------------------------------------------------
MAX_VALUES = 1_000_000  # values of one parameter's range (a finer step samples no better)
MAX_DEPTH = 1000  # blocks per stage (RegNet: d < 64 in all)
MAX_STAGES = 16  # each stage halves the resolution
# the lowest value of each parameter: (bound, whether the bound itself is allowed)
LOWEST = {"depth": (1, True), "width": (1, True), "group_width": (1, True), "bottleneck": (0, False),
          "w0": (0, False), "wa": (0, True), "wm": (1, False)}
SPEC_KEYS = ("name", "description", "kind", "stages", "se", "stem_width", "params", "shared", "increasing")
VALUE_KEYS = ("values", "low", "high", "step", "dist")


def _number(name: str, key: str, value: Any) -> float:
    """A finite number of a value spec, or a :class:`SpaceError` naming the parameter and key."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        what = "values must all be finite numbers" if key == "values" else f"{key} must be a finite number"
        raise SpaceError(f"parameter '{name}': {what}, not {value!r}")
    return float(value)


def _values(name: str, spec: dict) -> np.ndarray | None:
    """The finite list of values of a uniform spec, or ``None`` for a continuous (log-)uniform one."""
    if "values" in spec:
        raw = spec["values"]
        if not isinstance(raw, (list, tuple)) or len(raw) == 0:
            raise SpaceError(f"parameter '{name}': values must be a non-empty list of numbers, e.g. values: [1, 2, 4]")
        return np.unique(np.asarray([_number(name, "values", v) for v in raw], dtype=np.float64))
    if "low" not in spec or "high" not in spec:
        raise SpaceError(f"parameter '{name}': give values: [...] or low:/high: (and optionally step:, dist:)")
    low, high = _number(name, "low", spec["low"]), _number(name, "high", spec["high"])
    step = _number(name, "step", spec.get("step", 1))
    if low > high or step <= 0:
        raise SpaceError(f"parameter '{name}': needs low <= high and step > 0")
    dist = spec.get("dist", "uniform")
    if dist not in ("uniform", "log_uniform"):
        raise SpaceError(f"parameter '{name}': dist must be uniform or log_uniform, not {dist!r}")
    if dist == "log_uniform":
        if low <= 0:
            raise SpaceError(f"parameter '{name}': a log_uniform range needs low > 0")
        return None
    count = int(math.floor((high - low) / step + 1e-9)) + 1
    if count > MAX_VALUES:
        raise SpaceError(f"parameter '{name}': low {low:g} to high {high:g} in steps of {step:g} is {count:,} values, "
                         f"more than {MAX_VALUES:,}; raise step or narrow the range")
    return low + step * np.arange(count)


def _names(value: Any, label: str, at: str) -> list[str]:
    """``shared:``/``increasing:``: a list of parameter names, or one comma-separated string."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpaceError(f"{at}: {label} must be a list of parameter names, e.g. {label}: [bottleneck, group_width]")
    return list(value)


def check_spec(spec: Any, at: Any = None) -> None:
    """The shape of a space spec: known keys, numbers that are numbers, a mapping per parameter.
    ``at(*keys)`` says where a key is written (``space file F, line L, column C``); by default the
    messages name the space. What the values mean is checked by :class:`DesignSpace`."""
    if not isinstance(spec, dict):
        raise SpaceError(f"a space spec is a mapping ({', '.join(SPEC_KEYS)}), not {type(spec).__name__}")
    at = at or (lambda *keys: f"space {spec.get('name', 'custom')}")
    for key in spec:
        if key not in SPEC_KEYS:
            close = difflib.get_close_matches(str(key), SPEC_KEYS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SpaceError(f"{at(key)}: unknown key {key!r}{hint}; a space has {', '.join(SPEC_KEYS)}")
    for key, lo, hi in (("stages", 1, MAX_STAGES), ("stem_width", 1, 4096)):
        value = spec.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi):
            raise SpaceError(f"{at(key)}: {key} must be a whole number from {lo} to {hi}, not {value!r}")
    se = spec.get("se")
    if se is not None and (isinstance(se, bool) or not isinstance(se, (int, float)) or not 0 <= se < 1):
        raise SpaceError(f"{at('se')}: se (the squeeze-excitation ratio) must be a number >= 0 and < 1, not {se!r}")
    for key in ("name", "kind", "description"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise SpaceError(f"{at(key)}: {key} must be a string, not {spec[key]!r}")
    params = spec.get("params")
    if params is not None and not isinstance(params, dict):
        raise SpaceError(f"{at('params')}: params must be a mapping of parameter -> range, "
                         "e.g. params: {depth: {low: 1, high: 16}}")
    for name, value in (params or {}).items():
        if not isinstance(value, dict):
            raise SpaceError(f"{at('params', name)}: parameter '{name}' must be a mapping (values: [...] or low:/high:)")
        for key in value:
            if key not in VALUE_KEYS:
                raise SpaceError(f"{at('params', name, key)}: parameter '{name}' has the unknown key {key!r}; "
                                 f"a range has {', '.join(VALUE_KEYS)}")
        try:
            _values(name, value)
        except SpaceError as error:
            raise SpaceError(f"{at('params', name)}: {error}") from None
    for label in ("shared", "increasing"):
        _names(spec.get(label), label, at(label))


def _draw(name: str, spec: dict, rng: np.random.Generator, shape) -> np.ndarray:
    vals = spec.get("_values") if "_values" in spec else _values(name, spec)
    if vals is not None:
        return vals[rng.integers(len(vals), size=shape)]
    low, high, step = float(spec["low"]), float(spec["high"]), float(spec.get("step", 0) or 0)
    v = np.exp(rng.uniform(math.log(low), math.log(high), size=shape))
    if step:
        v = np.clip(np.round(v / step) * step, math.ceil(low / step - 1e-9) * step, math.floor(high / step + 1e-9) * step)
    return v


def _draw_nondecreasing(name: str, spec: dict, rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``[n, k]`` non-decreasing sequences, uniform among all of them (stars and bars)."""
    vals = spec.get("_values") if "_values" in spec else _values(name, spec)
    if vals is None:
        raise SpaceError(f"parameter '{name}' is increasing: give it a finite range (values: or low/high/step, not log_uniform)")
    m = len(vals)
    # a uniform k-subset of range(m + k - 1) (independent draws, rows with a repeat drawn again),
    # sorted, minus (0, 1, ..., k-1): a uniform non-decreasing sequence of k indices into vals
    picks = np.sort(rng.integers(m + k - 1, size=(n, k)), axis=1)
    while True:
        bad = np.flatnonzero((np.diff(picks, axis=1) == 0).any(axis=1))
        if not len(bad):
            break
        picks[bad] = np.sort(rng.integers(m + k - 1, size=(len(bad), k)), axis=1)
    return vals[picks - np.arange(k)]


# --- spaces ----------------------------------------------------------------------------------------
class DesignSpace:
    """A validated design-space spec that samples networks."""

    def __init__(self, spec: dict[str, Any]):
        check_spec(spec)
        self.spec = spec = copy.deepcopy(spec)
        self.name = str(spec.get("name", "custom"))
        self.kind = spec.get("kind", "anynet")
        if self.kind not in ("anynet", "regnet"):
            raise SpaceError(f"space {self.name}: kind must be anynet or regnet, not {self.kind!r}")
        self.stages = int(spec.get("stages", 4))
        self.se = float(spec.get("se", 0.0))
        self.stem_width = int(spec.get("stem_width", 32))
        self.params = dict(spec.get("params") or {})
        names = ANYNET_PARAMS if self.kind == "anynet" else REGNET_PARAMS
        unknown = [k for k in self.params if k not in names]
        if unknown:
            raise SpaceError(f"space {self.name}: unknown parameter '{unknown[0]}'; a {self.kind} space has {', '.join(names)}")
        missing = [k for k in names if k not in self.params and not (k == "bottleneck")]
        if missing:
            raise SpaceError(f"space {self.name}: parameter '{missing[0]}' has no range; add it under params:")
        self.params.setdefault("bottleneck", {"values": [1]})
        for key, spec_ in list(self.params.items()):
            if not isinstance(spec_, dict):
                raise SpaceError(f"space {self.name}: parameter '{key}' must be a mapping (values: [...] or low:/high:)")
            vals = _values(key, spec_)
            self.params[key] = {**spec_, "_values": vals}  # the value list, made once
            lowest, highest = (float(spec_["low"]), float(spec_["high"])) if vals is None else (vals.min(), vals.max())
            bound, allowed = LOWEST[key]
            if lowest < bound or (lowest == bound and not allowed):
                raise SpaceError(f"space {self.name}: parameter '{key}' reaches {lowest:g}; it must stay "
                                 f"{'>=' if allowed else '>'} {bound}: raise its low end")
            if key == "depth" and highest > MAX_DEPTH:
                raise SpaceError(f"space {self.name}: parameter 'depth' reaches {highest:g} blocks, more than "
                                 f"{MAX_DEPTH}; lower it")
        self.shared = _names(spec.get("shared"), "shared", f"space {self.name}")
        self.increasing = _names(spec.get("increasing"), "increasing", f"space {self.name}")
        for label, group in (("shared", self.shared), ("increasing", self.increasing)):
            bad = [k for k in group if k not in ANYNET_PARAMS]
            if bad:
                raise SpaceError(f"space {self.name}: {label} names '{bad[0]}', not a per-stage parameter ({', '.join(ANYNET_PARAMS)})")
            if group and self.kind == "regnet":
                raise SpaceError(f"space {self.name}: {label}: applies to anynet spaces (a RegNet's widths already increase)")
        for key in self.increasing:
            if key not in self.shared:
                _draw_nondecreasing(key, self.params[key], np.random.default_rng(0), 1, self.stages)
        if self.stages < 1:
            raise SpaceError(f"space {self.name}: stages must be >= 1")

    def describe(self) -> str:
        return str(self.spec.get("description", self.name))

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.spec)

    def param_names(self) -> list[str]:
        if self.kind == "regnet":
            return list(REGNET_PARAMS)
        short = {"depth": "d", "width": "w", "bottleneck": "b", "group_width": "g"}
        return [f"{short[k]}{i + 1}" for k in ANYNET_PARAMS for i in range(self.stages)]

    # candidates: (params dict of arrays, depths, widths, bottlenecks, groups) with the constraints checked
    def _candidates(self, rng: np.random.Generator, n: int):
        if self.kind == "anynet":
            return self._anynet(rng, n)
        return self._regnet(rng, n)

    def _anynet(self, rng, n):
        s = self.stages
        drawn = {}
        for key in ANYNET_PARAMS:
            spec = self.params[key]
            if key in self.shared:
                drawn[key] = np.repeat(_draw(key, spec, rng, (n, 1)), s, axis=1)
            elif key in self.increasing:
                drawn[key] = _draw_nondecreasing(key, spec, rng, n, s)
            else:
                drawn[key] = _draw(key, spec, rng, (n, s))
        depths = drawn["depth"].astype(np.int64)
        widths, groups = compatible(drawn["width"], drawn["bottleneck"], drawn["group_width"])
        ok = np.ones(n, dtype=bool)
        built = {"depth": depths, "width": widths, "bottleneck": drawn["bottleneck"], "group_width": groups}
        for key in self.increasing:
            ok &= np.all(np.diff(built[key], axis=1) >= 0, axis=1)
        ok &= (depths >= 1).all(1) & (widths >= 1).all(1)
        short = {"depth": "d", "width": "w", "bottleneck": "b", "group_width": "g"}
        params = {f"{short[k]}{i + 1}": built[k][:, i] for k in ANYNET_PARAMS for i in range(s)}
        return ok, params, depths, widths, drawn["bottleneck"], groups

    def _regnet(self, rng, n):
        p = {key: _draw(key, self.params[key], rng, n) for key in REGNET_PARAMS}
        d = p["depth"].astype(np.int64)
        if (d < 1).any() or (p["w0"] <= 0).any() or (p["wm"] <= 1).any() or (p["wa"] < 0).any():
            raise SpaceError(f"space {self.name}: a RegNet needs depth >= 1, w0 > 0, wa >= 0 and wm > 1")
        k = self.stages
        w0, wa, wm = p["w0"], p["wa"], p["wm"]
        # pycls's rule (check_regnet_constraints): the levels 0..last must give exactly k distinct
        # widths, so a network whose last block's level is not k - 1 is out before the per-block
        # widths are computed (fewer levels than stages, or two levels merged by rounding to 8)
        last = np.round(np.log((w0 + wa * (d - 1)) / w0) / np.log(wm))
        cand = np.flatnonzero(last + 1 == k)
        ok = np.zeros(n, dtype=bool)
        depths = np.zeros((n, k), dtype=np.int64)
        widths = np.full((n, k), 8, dtype=np.int64)
        # rows in groups of similar depth, so that the per-block matrices are not padded to the deepest
        for group in np.array_split(cand[np.argsort(d[cand], kind="stable")], 4):
            if len(group):
                self._regnet_stages(group, w0, wa, wm, d, k, ok, depths, widths)
        b = np.repeat(p["bottleneck"][:, None], k, axis=1)
        g = np.repeat(p["group_width"][:, None], k, axis=1)
        widths, groups = compatible(widths, b, g)
        params = {"depth": d, "w0": p["w0"], "wa": p["wa"], "wm": p["wm"], "group_width": p["group_width"],
                  "bottleneck": p["bottleneck"]}
        return ok, params, depths, widths, b, groups

    @staticmethod
    def _regnet_stages(rows, w0, wa, wm, d, k, ok, depths, widths) -> None:
        """Per-block widths of the RegNets ``rows``; those with exactly ``k`` stages are marked in
        ``ok`` and their stage depths and widths filled in."""
        c0, ca, cm, cd = w0[rows, None], wa[rows, None], wm[rows, None], d[rows]
        j = np.arange(cd.max())
        s = np.round(np.log((c0 + ca * j) / c0) / np.log(cm))
        # wm ** level from a per-row table of the few levels there are (the same numbers as
        # np.power(wm, s) on the whole matrix, at a fraction of the cost)
        powers = np.power(cm, np.arange(int(s.max()) + 1, dtype=np.float64))
        w = np.round(c0 * np.take_along_axis(powers, s.astype(np.int64), axis=1) / 8) * 8
        live = j < cd[:, None]
        start = live & np.concatenate([np.ones((len(rows), 1), bool), w[:, 1:] != w[:, :-1]], axis=1)
        keep = start.sum(1) == k
        idx = rows[keep]
        ok[idx] = True
        if len(idx):
            st, w, live = start[keep], w[keep], live[keep]
            widths[idx] = w[st].reshape(len(idx), k).astype(np.int64)
            stage = np.cumsum(st, axis=1) - 1
            blocks = np.repeat(np.arange(len(idx))[:, None], w.shape[1], axis=1)
            depths[idx] = np.bincount((blocks * k + stage)[live], minlength=len(idx) * k).reshape(len(idx), k)

    def sample(self, n: int, seed: int = 0, window: Window | None = None, resolution: int = 224,
               stem: str = "imagenet", num_classes: int = 1000, max_draws: int = 20_000_000) -> list[Sample]:
        """``n`` distinct networks, in a reproducible order (the first k are the same for any n >= k)."""
        window = window or Window()
        rng = np.random.default_rng(seed)
        out: list[Sample] = []
        seen: set[str] = set()
        draws = 0
        while len(out) < n:
            if draws >= max_draws or (not out and draws >= min(max_draws, 1_000_000)):
                raise SpaceError(
                    f"space {self.name}: only {len(out)} of {n} distinct networks in the window ({window}) after "
                    f"{draws:,} draws; widen the window, ask for fewer, or check the space's ranges")
            ok, params, depths, widths, bots, groups = self._candidates(rng, BATCH)
            draws += BATCH
            inners = np.round(widths / bots).astype(np.int64)
            if "flops" in window.bounds:  # a cheap first cut; the exact counts follow for the survivors
                lo, hi = window.bounds["flops"]
                rough = stagewise_flops(depths, widths, inners, groups, self.se, resolution, stem, num_classes,
                                        self.stem_width)
                ok &= (rough >= lo * (1 - 1e-9)) & (rough <= hi * (1 + 1e-9))
            idx = np.flatnonzero(ok)
            depths, widths, bots, groups, inners = (a[idx] for a in (depths, widths, bots, groups, inners))
            params = {k: v[idx] for k, v in params.items()}
            flops, nparams, acts = stagewise_complexity(depths, widths, inners, groups, self.se, resolution, stem,
                                                        num_classes, self.stem_width)
            ok = window.mask({"flops": flops, "params": nparams, "acts": acts}) if len(idx) else ok[idx]
            for i in np.flatnonzero(ok):
                cfg = AnyNetConfig(tuple(int(v) for v in depths[i]), tuple(int(v) for v in widths[i]),
                                   tuple(float(v) for v in bots[i]), tuple(int(v) for v in groups[i]),
                                   self.se, self.stem_width)
                key = cfg.key()
                if key in seen:
                    continue
                seen.add(key)
                out.append(Sample({k: _py(v[i]) for k, v in params.items()}, cfg,
                                  {"flops": int(flops[i]), "params": int(nparams[i]), "acts": int(acts[i])}))
                if len(out) == n:
                    break
        return out


def _py(v):
    v = v.item() if hasattr(v, "item") else v
    return int(v) if isinstance(v, float) and v.is_integer() else (round(v, 6) if isinstance(v, float) else v)


def get_space(name_or_path: str | Path | dict) -> DesignSpace:
    """A built-in space by name, or a YAML spec file, or a spec dict."""
    if isinstance(name_or_path, dict):
        return DesignSpace(name_or_path)
    text = str(name_or_path)
    if text.lower() in SPACES:
        return DesignSpace(SPACES[text.lower()])
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return read_space(path)
    close = difflib.get_close_matches(text.lower(), list(SPACES), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise SpaceError(f"unknown design space '{text}': {hint}choose one of {', '.join(SPACES)} or a YAML file")


def read_space(path: str | Path) -> DesignSpace:
    """A space from a YAML file, read as tricks reads every YAML file (UTF-8, bounded, no key twice);
    a problem is a :class:`SpaceError` naming the file, and the line and column where they are known."""
    from tricks.config import read_yaml
    from tricks.errors import TricksError

    path = Path(path)
    try:
        doc = read_yaml(path, "space file", ", ".join(SPEC_KEYS))
    except TricksError as error:
        raise SpaceError(str(error)) from None
    check_spec(doc, doc.at)
    spec = dict(doc)
    spec.setdefault("name", path.stem)
    try:
        return DesignSpace(spec)
    except SpaceError as error:
        raise SpaceError(f"{doc.source}: {error}") from None
