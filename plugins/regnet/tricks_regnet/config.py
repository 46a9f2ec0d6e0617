"""Architecture configurations of AnyNet and RegNet models, and the RegNet width generator.

An :class:`AnyNetConfig` is the canonical form of every model the plugin builds: per stage a depth
``d_i``, a width ``w_i``, a bottleneck ratio ``b_i`` (the block's inner width is ``w_i / b_i``) and
a group width ``g_i``, plus the squeeze-excitation ratio of Y blocks (0 for X blocks). RegNets are
AnyNets whose per-stage widths and depths come from the quantized linear rule of
:func:`regnet_widths` (the paper's section 3.3).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

Q = 8  # widths are multiples of 8


@dataclass(frozen=True)
class AnyNetConfig:
    """Per-stage parameters of an AnyNet: ``depths``, ``widths``, ``bottlenecks`` (b), ``groups`` (g).

    ``se`` is the squeeze-excitation ratio of a Y block (``round(se * w_in)`` channels, ``w_in`` the
    block's input width); 0 makes X blocks. ``stem_width`` is the stem's output width (32 in the paper).
    """

    depths: tuple[int, ...]
    widths: tuple[int, ...]
    bottlenecks: tuple[float, ...]
    groups: tuple[int, ...]
    se: float = 0.0
    stem_width: int = 32

    def __post_init__(self):
        n = len(self.depths)
        for name in ("widths", "bottlenecks", "groups"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"AnyNetConfig: {name} has {len(getattr(self, name))} entries for {n} stages")
        if n == 0:
            raise ValueError("AnyNetConfig: a model needs at least one stage")
        if any(d < 1 for d in self.depths) or any(w < 1 for w in self.widths):
            raise ValueError("AnyNetConfig: every stage needs depth >= 1 and width >= 1")
        for w, b, g in zip(self.widths, self.bottlenecks, self.groups):
            wb = w / b
            if abs(wb - round(wb)) > 1e-9 or round(wb) % g:
                raise ValueError(f"AnyNetConfig: a stage of width {w}, bottleneck {b} and group width {g} is "
                                 "incompatible (w/b must be a whole multiple of g); build it with anynet_config()")

    @property
    def depth(self) -> int:
        return sum(self.depths)

    @property
    def inner_widths(self) -> tuple[int, ...]:
        """``w_i / b_i`` per stage: the width of the 3x3 group convolution."""
        return tuple(int(round(w / b)) for w, b in zip(self.widths, self.bottlenecks))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("depths", "widths", "groups"):
            d[key] = [int(v) for v in d[key]]
        d["bottlenecks"] = [float(v) for v in d["bottlenecks"]]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AnyNetConfig":
        return cls(tuple(int(v) for v in data["depths"]), tuple(int(v) for v in data["widths"]),
                   tuple(float(v) for v in data["bottlenecks"]), tuple(int(v) for v in data["groups"]),
                   float(data.get("se", 0.0)), int(data.get("stem_width", 32)))

    def key(self) -> str:
        """A canonical string: two configs build the same network exactly when their keys are equal."""
        return repr((tuple(map(int, self.depths)), tuple(map(int, self.widths)), tuple(map(float, self.bottlenecks)),
                     tuple(map(int, self.groups)), float(self.se), int(self.stem_width)))


def compatible(w, b, g):
    """Make (width, bottleneck, group width) buildable; works on scalars and numpy arrays.

    The inner width ``w/b`` must be a whole multiple of the group width ``g``: ``g`` is first
    clamped to the inner width, then the inner width is rounded to the nearest multiple of ``g``
    (half to even, at least ``g``), and the width becomes ``inner * b``. With b = 1 this is the
    adjustment of the paper's code (RegNetX-1.6GF: 80 with g = 24 becomes 72).
    Returns ``(w, g)``.
    """
    w, b, g = np.asarray(w, dtype=np.float64), np.asarray(b, dtype=np.float64), np.asarray(g, dtype=np.float64)
    inner = np.maximum(1.0, np.round(w / b))
    g = np.minimum(g, inner)
    inner = np.maximum(g, np.round(inner / g) * g)
    w = np.round(inner * b)
    return w.astype(np.int64), g.astype(np.int64)


def anynet_config(depths: Sequence[int], widths: Sequence[int], bottlenecks: Sequence[float] | float = 1.0,
                  groups: Sequence[int] | int = 1, se: float = 0.0, stem_width: int = 32) -> AnyNetConfig:
    """An :class:`AnyNetConfig` from per-stage values (a scalar is shared by all stages), made compatible."""
    n = len(depths)
    bs = [float(bottlenecks)] * n if np.isscalar(bottlenecks) else [float(b) for b in bottlenecks]
    gs = [int(groups)] * n if np.isscalar(groups) else [int(g) for g in groups]
    for key, values in (("widths", widths), ("bottlenecks", bs), ("groups", gs)):
        if len(values) != n:  # compatible() would broadcast a single value over the stages
            raise ValueError(f"AnyNetConfig: {key} has {len(values)} entries for {n} stages")
    if any(not b > 0 for b in bs) or any(g < 1 for g in gs):
        raise ValueError("AnyNetConfig: bottleneck ratios must be > 0 and group widths >= 1")
    ws, gs = compatible(list(widths), bs, gs)
    return AnyNetConfig(tuple(int(d) for d in depths), tuple(int(w) for w in ws), tuple(bs),
                        tuple(int(g) for g in gs), float(se), int(stem_width))


def regnet_widths(depth: int, w0: float, wa: float, wm: float, q: int = Q) -> np.ndarray:
    """Per-block widths of a RegNet: the linear rule ``u_j = w0 + wa*j`` quantized in log space.

    ``s_j = log(u_j / w0) / log(wm)`` is rounded to an integer, ``w_j = w0 * wm**round(s_j)``, and
    each width is rounded to a multiple of ``q``.
    """
    if depth < 1 or w0 <= 0 or wa < 0 or wm <= 1:
        raise ValueError(f"RegNet needs depth >= 1, w0 > 0, wa >= 0 and wm > 1 (got d={depth}, w0={w0}, wa={wa}, wm={wm})")
    u = w0 + wa * np.arange(depth)
    s = np.round(np.log(u / w0) / np.log(wm))
    return (np.round(w0 * np.power(wm, s) / q) * q).astype(np.int64)


def stages_of(block_widths: Sequence[int]) -> tuple[list[int], list[int]]:
    """Group consecutive blocks of equal width into stages: ``(widths, depths)``."""
    widths: list[int] = []
    depths: list[int] = []
    for w in block_widths:
        if widths and widths[-1] == w:
            depths[-1] += 1
        else:
            widths.append(int(w))
            depths.append(1)
    return widths, depths


@dataclass(frozen=True)
class RegNetParams:
    """The six numbers of a RegNet (plus SE): depth, w0, wa, wm, group width, bottleneck ratio."""

    depth: int
    w0: float
    wa: float
    wm: float
    group_width: int
    bottleneck: float = 1.0
    se: float = 0.0
    stem_width: int = 32
    q: int = field(default=Q)

    def config(self) -> AnyNetConfig:
        widths, depths = stages_of(regnet_widths(self.depth, self.w0, self.wa, self.wm, self.q))
        return anynet_config(depths, widths, self.bottleneck, self.group_width, self.se, self.stem_width)


def regnet_config(depth: int, w0: float, wa: float, wm: float, group_width: int, bottleneck: float = 1.0,
                  se: float = 0.0, stem_width: int = 32) -> AnyNetConfig:
    """The :class:`AnyNetConfig` of a RegNet."""
    return RegNetParams(depth, w0, wa, wm, group_width, bottleneck, se, stem_width).config()


def config_from_dict(data: dict[str, Any]) -> AnyNetConfig:
    """An AnyNet config (``depths``, ``widths``, ...) or RegNet parameters (``depth``, ``w0``, ``wa``, ``wm``, ...)."""
    data = dict(data)
    if "depths" in data:
        try:
            return anynet_config(data.pop("depths"), data.pop("widths"), data.pop("bottlenecks", 1.0),
                                 data.pop("groups", 1), float(data.pop("se", 0.0)), int(data.pop("stem_width", 32)))
        except KeyError as error:
            raise ValueError(f"an AnyNet config needs {error.args[0]}") from None
    keys = ("depth", "w0", "wa", "wm")
    if all(k in data for k in keys):
        return regnet_config(int(data["depth"]), float(data["w0"]), float(data["wa"]), float(data["wm"]),
                             int(data.get("group_width", data.get("g", 1))), float(data.get("bottleneck", 1.0)),
                             float(data.get("se", 0.0)), int(data.get("stem_width", 32)))
    raise ValueError("an architecture is either per-stage (depths, widths, bottlenecks, groups, se) "
                     "or RegNet parameters (depth, w0, wa, wm, group_width, bottleneck, se)")
