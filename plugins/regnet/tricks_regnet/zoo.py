"""The RegNetX and RegNetY models of the paper's model zoo, by name.

Each :class:`ZooModel` holds the six RegNet numbers (as :class:`~tricks_regnet.config.RegNetParams`),
the stage depths and widths they generate, and what the paper's code reports for the model at
224x224 with 1000 classes: flops (multiply-adds), parameters and ImageNet top-1 error (100
epochs, mean of 5 runs). The tests check that our generator and complexity count reproduce the
depths, widths, flops and parameters exactly.

Names are ``regnetx_200mf`` ... ``regnetx_32gf`` and ``regnety_...``; a size of a gigaflop or more
is also accepted in megaflops (``regnetx_1600mf`` is ``regnetx_1.6gf``) and ``4.0gf``/``8.0gf``
as ``4gf``/``8gf``.

``python -m tricks_regnet.zoo`` prints a Markdown table of every model: its parameters, our
counts against the paper's, and the parameter count of timm's model of the same name (built
untrained, on the meta device) where timm is installed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from .complexity import Complexity, complexity
from .config import AnyNetConfig, RegNetParams

__all__ = ["ZooModel", "ZOO", "ALIASES", "ZOO_NAMES", "resolve_name", "zoo_model", "zoo_config", "zoo_table",
           "timm_params"]


@dataclass(frozen=True)
class ZooModel:
    """One model of the zoo: its RegNet numbers, the stages they give, and the paper's counts."""

    name: str
    params: RegNetParams
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    flops: int  # reported by the paper's code, 224x224, 1000 classes
    n_params: int  # idem
    error: float  # ImageNet top-1 error (%), 100 epochs, mean of 5 runs
    timm: str  # the same network in timm

    @property
    def gf(self) -> float:
        return self.flops / 1e9

    @property
    def mparams(self) -> float:
        return self.n_params / 1e6

    def config(self) -> AnyNetConfig:
        return self.params.config()


def _m(name, d, w0, wa, wm, g, depths, widths, flops, n_params, error, timm):
    se = 0.25 if name.startswith("regnety") else 0.0
    return ZooModel(name, RegNetParams(d, w0, wa, wm, g, 1.0, se), tuple(depths), tuple(widths), flops, n_params,
                    error, timm)


_MODELS = [
    #   name               d   w0   wa      wm    g    depths          widths                 flops        params     err
    _m("regnetx_200mf",  13,  24,  36.44, 2.49,   8, (1, 1, 4, 7),  (24, 56, 152, 368),     199040872,    2684792, 31.088, "regnetx_002"),
    _m("regnetx_400mf",  22,  24,  24.48, 2.54,  16, (1, 2, 7, 12), (32, 64, 160, 384),     397678568,    5157512, 27.382, "regnetx_004"),
    _m("regnetx_600mf",  16,  48,  36.97, 2.24,  24, (1, 3, 5, 7),  (48, 96, 240, 528),     600891112,    6196040, 25.864, "regnetx_006"),
    _m("regnetx_800mf",  16,  56,  35.73, 2.28,  16, (1, 3, 7, 5),  (64, 128, 288, 672),    799700712,    7259656, 24.846, "regnetx_008"),
    _m("regnetx_1.6gf",  18,  80,  34.01, 2.25,  24, (2, 4, 10, 2), (72, 168, 408, 912),   1602850792,    9190136, 23.038, "regnetx_016"),
    _m("regnetx_3.2gf",  25,  88,  26.31, 2.25,  48, (2, 6, 15, 2), (96, 192, 432, 1008),  3176622952,   15296552, 21.736, "regnetx_032"),
    _m("regnetx_4.0gf",  23,  96,  38.65, 2.43,  40, (2, 5, 14, 2), (80, 240, 560, 1360),  3964499816,   22118248, 21.356, "regnetx_040"),
    _m("regnetx_6.4gf",  17, 184,  60.83, 2.07,  56, (2, 4, 10, 1), (168, 392, 784, 1624), 6460292264,   26209256, 20.844, "regnetx_064"),
    _m("regnetx_8.0gf",  23,  80,  49.56, 2.88, 120, (2, 5, 15, 1), (80, 240, 720, 1920),  7995133416,   39572648, 20.728, "regnetx_080"),
    _m("regnetx_12gf",   19, 168,  73.36, 2.37, 112, (2, 5, 11, 1), (224, 448, 896, 2240), 12086679016,  46106056, 20.288, "regnetx_120"),
    _m("regnetx_16gf",   22, 216,  55.59, 2.10, 128, (2, 6, 13, 1), (256, 512, 896, 2048), 15940756456,  54278536, 19.956, "regnetx_160"),
    _m("regnetx_32gf",   23, 320,  69.86, 2.00, 168, (2, 7, 13, 1), (336, 672, 1344, 2520), 31735930792, 107811560, 19.498, "regnetx_320"),
    _m("regnety_200mf",  13,  24,  36.44, 2.49,   8, (1, 1, 4, 7),  (24, 56, 152, 368),     199519076,    3162996, 29.658, "regnety_002"),
    _m("regnety_400mf",  16,  48,  27.89, 2.09,   8, (1, 3, 6, 6),  (48, 104, 208, 440),    401849056,    4344144, 25.898, "regnety_004"),
    _m("regnety_600mf",  15,  48,  32.54, 2.32,  16, (1, 3, 7, 4),  (48, 112, 256, 608),    601227608,    6055160, 24.540, "regnety_006"),
    _m("regnety_800mf",  14,  56,  38.84, 2.40,  16, (1, 3, 8, 2),  (64, 128, 320, 768),    797183328,    6263168, 23.684, "regnety_008"),
    _m("regnety_1.6gf",  27,  48,  20.71, 2.65,  24, (2, 6, 17, 2), (48, 120, 336, 888),   1612087326,   11202430, 22.066, "regnety_016"),
    _m("regnety_3.2gf",  21,  80,  42.63, 2.66,  24, (2, 5, 13, 1), (72, 216, 576, 1512),  3176496162,   19436338, 21.074, "regnety_032"),
    _m("regnety_4.0gf",  22,  96,  31.41, 2.24,  64, (2, 6, 12, 2), (128, 192, 512, 1088), 3973301344,   20646656, 20.640, "regnety_040"),
    _m("regnety_6.4gf",  25, 112,  33.22, 2.27,  72, (2, 7, 14, 2), (144, 288, 576, 1296), 6355221876,   30583252, 20.110, "regnety_064"),
    _m("regnety_8.0gf",  17, 192,  76.82, 2.19,  56, (2, 4, 10, 1), (168, 448, 896, 2016), 7963074196,   39180068, 20.052, "regnety_080"),
    _m("regnety_12gf",   19, 168,  73.36, 2.37, 112, (2, 5, 11, 1), (224, 448, 896, 2240), 12092395504,  51822544, 19.670, "regnety_120"),
    _m("regnety_16gf",   18, 200, 106.23, 2.48, 112, (2, 4, 11, 1), (224, 448, 1232, 3024), 15911534044, 83590140, 19.608, "regnety_160"),
    _m("regnety_32gf",   20, 232, 115.89, 2.53, 232, (2, 5, 12, 1), (232, 696, 1392, 3712), 32279583362, 145046770, 19.066, "regnety_320"),
]

ZOO: dict[str, ZooModel] = {m.name: m for m in _MODELS}
ZOO_NAMES: tuple[str, ...] = tuple(ZOO)


def _aliases() -> dict[str, str]:
    aliases = {}
    for name in ZOO:
        family, size = name.split("_")
        if size.endswith("gf"):
            gf = float(size[:-2])
            aliases[f"{family}_{round(gf * 1000)}mf"] = name
            if gf == int(gf) and "." in size:
                aliases[f"{family}_{int(gf)}gf"] = name
    return aliases


ALIASES: dict[str, str] = _aliases()


def resolve_name(name: str) -> str | None:
    """The zoo's name for ``name`` (itself, or the model an alias stands for), else ``None``."""
    name = name.strip().lower()
    if name in ZOO:
        return name
    return ALIASES.get(name)


def zoo_model(name: str) -> ZooModel:
    canonical = resolve_name(name)
    if canonical is None:
        raise KeyError(f"no RegNet named {name!r} in the zoo; choose among {', '.join(ZOO_NAMES)}")
    return ZOO[canonical]


def zoo_config(name: str) -> AnyNetConfig:
    """The :class:`AnyNetConfig` of a zoo model (or alias)."""
    return zoo_model(name).config()


def timm_params(timm_name: str, num_classes: int = 1000) -> int | None:
    """Parameters of timm's model ``timm_name`` (untrained, built on the meta device); ``None`` without timm."""
    try:
        import timm
        import torch
    except ImportError:
        return None
    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes)
    return sum(p.numel() for p in model.parameters())


def _pct(ours: float, theirs: float) -> str:
    return f"{100.0 * (ours - theirs) / theirs:+.2f}%"


def zoo_table(with_timm: bool = True) -> str:
    """The Markdown table of ``python -m tricks_regnet.zoo``."""
    head = ("| model | d | w0 | wa | wm | g | depths | widths | GF ours | GF paper | diff | Mparams ours "
            "| Mparams paper | diff | acts (M) | timm model | timm params |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in ZOO.values():
        cfg = m.config()
        cx: Complexity = complexity(cfg)
        p = m.params
        t = timm_params(m.timm) if with_timm else None
        timm_cell = "-" if t is None else (f"{t:,} (= ours)" if t == cx.params else f"{t:,} (ours {cx.params:,})")
        lines.append(
            f"| {m.name} | {p.depth} | {p.w0:g} | {p.wa:.2f} | {p.wm:.2f} | {p.group_width} "
            f"| {', '.join(map(str, cfg.depths))} | {', '.join(map(str, cfg.widths))} "
            f"| {cx.flops / 1e9:.3f} | {m.gf:.3f} | {_pct(cx.flops, m.flops)} "
            f"| {cx.params / 1e6:.3f} | {m.mparams:.3f} | {_pct(cx.params, m.n_params)} "
            f"| {cx.acts / 1e6:.2f} | `{m.timm}` | {timm_cell} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tricks_regnet.zoo",
                                     description="Markdown table of the RegNet zoo: our counts against the paper's and timm's")
    parser.add_argument("--no-timm", action="store_true", help="leave out timm's parameter counts")
    args = parser.parse_args(argv)
    print(zoo_table(with_timm=not args.no_timm))
    return 0


if __name__ == "__main__":
    sys.exit(main())
