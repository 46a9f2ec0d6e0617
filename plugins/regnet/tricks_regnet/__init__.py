"""AnyNet and RegNet from "Designing Network Design Spaces" (Radosavovic, Kosaraju, Girshick, He,
Dollar, CVPR 2020, arXiv 2003.13678).

``config`` holds the architecture descriptions (:class:`AnyNetConfig`, the RegNet width rule),
``complexity`` counts flops, parameters and activations from a description alone, ``models`` builds
the networks (:class:`AnyNet`) and ``zoo`` names the paper's RegNetX/RegNetY models. All of it is
usable without the framework; :class:`RegNet` provides the networks as the run's model, chosen from
the core's ``--model``: a zoo name (``regnetx_200mf``, ``regnety_1.6gf``, ...), or ``anynet`` /
``regnet`` with the architecture in ``--set regnet.arch=...``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator

import tricks

from .complexity import Complexity, complexity, count_model, format_count, stagewise_complexity
from .config import AnyNetConfig, RegNetParams, anynet_config, config_from_dict, regnet_config, regnet_widths
from .models import AnyNet, AnyNetBlock, SqueezeExcite, Stem, build_anynet, create_regnet

__version__ = "0.1.0"
__all__ = [
    "AnyNetConfig", "anynet_config", "regnet_config", "regnet_widths", "config_from_dict", "RegNetParams",
    "Complexity", "complexity", "stagewise_complexity", "count_model", "AnyNet", "AnyNetBlock", "SqueezeExcite",
    "Stem", "build_anynet", "ZOO", "ZOO_NAMES", "ALIASES", "ZooModel", "zoo_config", "create_regnet",
    "resolve_model", "resolve_stem", "check_arch", "RegNet", "RegNetSettings", "ARCH_MODELS",
    "AUTO_CIFAR_MAX_SIZE", "TINY_ARCH",
]

_ZOO_ATTRS = ("ALIASES", "ZOO", "ZOO_NAMES", "ZooModel", "resolve_name", "zoo_config", "zoo_model")


def __getattr__(name):
    # the zoo loads on first use, so that ``python -m tricks_regnet.zoo`` runs it only once
    if name in _ZOO_ATTRS:
        from . import zoo

        return getattr(zoo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --model names whose architecture comes from --set regnet.arch=...
ARCH_MODELS = ("anynet", "regnet")
# stem="auto": inputs of at most this side get the 'cifar' stem (stride 1), larger ones the paper's.
AUTO_CIFAR_MAX_SIZE = 64
# A two-stage AnyNetX small enough for a run of seconds on 8x8 digits (the example settings).
TINY_ARCH = {"depths": [1, 1], "widths": [16, 32], "bottlenecks": 1, "groups": 8, "stem_width": 16}

_PER_STAGE_KEYS = {"depths", "widths", "bottlenecks", "groups", "se", "stem_width"}
_REGNET_KEYS = {"depth", "w0", "wa", "wm", "group_width", "g", "bottleneck", "se", "stem_width"}
_ARCH_EXAMPLE = "--set regnet.arch='{depth: 13, w0: 24, wa: 36.44, wm: 2.49, group_width: 8}'"


def check_arch(arch: dict[str, Any]) -> AnyNetConfig:
    """The :class:`AnyNetConfig` of an architecture dict, or ``ValueError`` with a one-line reason.

    A dict with ``depths`` is per-stage (``depths, widths, bottlenecks, groups, se, stem_width``),
    else RegNet parameters (``depth, w0, wa, wm, group_width, bottleneck, se, stem_width``);
    keys of neither form are errors.
    """
    if not isinstance(arch, dict):
        raise ValueError(f"an architecture is a mapping, not {type(arch).__name__}")
    allowed = _PER_STAGE_KEYS if "depths" in arch else _REGNET_KEYS
    unknown = sorted(set(arch) - allowed)
    if unknown:
        form = "a per-stage architecture" if "depths" in arch else "RegNet parameters"
        raise ValueError(f"unknown key '{unknown[0]}' for {form} (accepted: {', '.join(sorted(allowed))})")
    se = arch.get("se", 0.0)
    if isinstance(se, (int, float)) and not 0 <= se < 1:
        raise ValueError(f"se is the squeeze-excitation ratio, in [0, 1) (got {se})")
    try:
        return config_from_dict(arch)
    except (ValueError, TypeError, KeyError, ZeroDivisionError, OverflowError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"not a valid architecture: {reason}") from None


def resolve_model(model: str, arch: dict[str, Any] | None = None) -> tuple[AnyNetConfig, str]:
    """``(config, label)`` of the network that ``--model model`` (and ``regnet.arch``) asks for.

    A zoo name or alias gives that RegNet; ``anynet`` or ``regnet`` the architecture ``arch``.
    Anything else, a missing ``arch`` or a bad one is a one-line :class:`tricks.TricksError`.
    """
    from .zoo import ZOO, ZOO_NAMES, resolve_name

    name = resolve_name(model)
    if name is not None:
        if arch is not None:
            raise tricks.TricksError(
                f"regnet: --model {model} is a zoo model and ignores regnet.arch; use --model anynet to build "
                "regnet.arch, or drop the setting")
        return ZOO[name].config(), name
    if model in ARCH_MODELS:
        if arch is None:
            raise tricks.TricksError(f"regnet: --model {model} needs an architecture: {_ARCH_EXAMPLE} "
                                     "(or per stage: depths, widths, bottlenecks, groups, se)")
        try:
            cfg = check_arch(arch)
        except ValueError as error:
            raise tricks.TricksError(f"regnet: bad regnet.arch: {error}") from None
        return cfg, model
    sizes = [n.split("_", 1)[1] for n in ZOO_NAMES if n.startswith("regnetx_")]
    raise tricks.TricksError(
        f"regnet cannot build model '{model}': it builds the zoo's regnetx_SIZE and regnety_SIZE for SIZE in "
        f"{', '.join(sizes)} (e.g. regnetx_200mf), and anynet or regnet with --set regnet.arch=...; "
        "choose one with --model, or leave regnet out")


def resolve_stem(stem: str, image_size: int) -> str:
    """``imagenet`` or ``cifar``: ``auto`` is ``cifar`` for sides up to ``AUTO_CIFAR_MAX_SIZE``."""
    if stem == "auto":
        return "cifar" if image_size <= AUTO_CIFAR_MAX_SIZE else "imagenet"
    if stem not in ("imagenet", "cifar"):
        raise ValueError(f"stem must be auto, imagenet or cifar, got {stem!r}")
    return stem


class RegNetSettings(tricks.Settings):
    arch: dict | None = tricks.Field(
        None, description="the network of --model anynet/regnet: per stage {depths, widths, bottlenecks, groups, "
                          "se, stem_width} or RegNet parameters {depth, w0, wa, wm, group_width, bottleneck, se}")
    stem: Literal["auto", "imagenet", "cifar"] = tricks.Field(
        "auto", description=f"imagenet: stem and every stage of stride 2 (the paper's); cifar: stem and first "
                            f"stage of stride 1 (32x32 ends at 4x4); auto: cifar up to {AUTO_CIFAR_MAX_SIZE} pixels")

    @field_validator("arch")
    @classmethod
    def _arch(cls, value):
        if value is not None:
            check_arch(value)
        return value


class RegNet(tricks.Plugin):
    """Provide the run's model as a RegNet of the paper's zoo or an AnyNet/RegNet of given parameters."""

    name = "regnet"
    Settings = RegNetSettings
    summary = "AnyNet and RegNet models (X and Y blocks), the paper's RegNetX/RegNetY zoo by name."
    category = "model"
    provides = ("model",)
    # the --model that example_settings() is meant for (the tiny AnyNet of TINY_ARCH)
    example_model = "anynet"

    @classmethod
    def example_settings(cls, workdir) -> dict:
        return {"arch": dict(TINY_ARCH), "stem": "cifar"}

    @tricks.hookimpl
    def build_model(self, ctx):
        from .zoo import resolve_name

        if resolve_name(ctx.core.model) is None and ctx.core.model not in ARCH_MODELS:
            return None  # not one of this plugin's names: the next provider's
        s = self.settings
        cfg, label = resolve_model(ctx.core.model, s.arch)
        stem = resolve_stem(s.stem, ctx.image_size)
        model = AnyNet(cfg, ctx.num_classes, ctx.in_chans, stem)
        cx = complexity(cfg, ctx.image_size, stem, ctx.num_classes, ctx.in_chans)
        kind = "Y" if cfg.se > 0 else "X"
        ctx.log(f"regnet: {label} ({kind} blocks, {stem} stem), depths {list(cfg.depths)}, widths "
                f"{list(cfg.widths)}, groups {list(cfg.groups)}; at {ctx.image_size}x{ctx.image_size}: "
                f"{format_count(cx.flops)} flops, {format_count(cx.params)} params, {format_count(cx.acts)} acts")
        return model
