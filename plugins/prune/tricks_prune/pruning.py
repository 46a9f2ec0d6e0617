"""Structured pruning as plain functions: :func:`prune_model` removes channels and returns the change
as data, :func:`replay` makes the same change on a fresh model of the same architecture.

``ratio`` is the fraction of the *prunable* output channels removed: the channels of the groups
that may be cut (not the classifier's, not an excluded layer's), each coupled group counted once
(a residual stream of a stage is one group however many convolutions write to it).

* ``scope="global"``: one ranking of every prunable channel across groups (by the criterion's
  scores, each group's divided by its mean where the criterion asks, see
  :mod:`tricks_prune.criteria`); the lowest go first, until ``ratio`` of the channels are gone.
* ``scope="layer"``: ``round(ratio * channels)`` of each group, its lowest.
* ``target="macs"`` / ``"params"``: as many channels as needed, in the same order (global) or with
  the same fraction in every group (layer), for the model's MACs / parameters to fall by at least
  ``ratio``; found by bisection, each candidate pruned on a copy and measured.

Every group keeps at least ``min_channels`` channels (at least one position of its convolution
groups). A change is ``{"steps": [{"layer": NAME, "idxs": [...]}, ...], ...}``: the channels of the
group whose first layer is ``NAME``, in the order they were removed, each relative to the model at
that step; the other keys describe it (criterion, ratio, channels before and after).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

import tricks

from .criteria import CRITERIA
from .graph import ChannelGroup, apply_steps, complexity, find_groups, matches, prunable_layers

__all__ = ["prune_model", "replay", "plan_steps", "input_step", "check_plan", "SCOPES", "TARGETS", "check_exclude"]

SCOPES = ("global", "layer")
TARGETS = ("channels", "macs", "params")


def check_exclude(model: nn.Module, exclude: Sequence[str]) -> None:
    """A ``TricksError`` for an exclude pattern that matches no conv or linear layer of ``model``."""
    names = prunable_layers(model)
    for pattern in exclude:
        if not any(matches(n, [pattern]) for n in names):
            some = ", ".join(names[:3] + (["..."] if len(names) > 3 else []))
            raise tricks.TricksError(f"prune.exclude: {pattern!r} matches no conv or linear layer of {type(model).__name__} "
                                     f"(its layers are named like {some}); use a pattern such as 'stem*' or 'stages.0.*'")


def _check_arguments(ratio: float, criterion: str, scope: str, target: str, min_channels: int) -> None:
    if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise tricks.TricksError(f"prune: ratio must be at least 0 and below 1 (the fraction removed), got {ratio!r}")
    if criterion not in CRITERIA:
        raise tricks.TricksError(f"prune: unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if scope not in SCOPES:
        raise tricks.TricksError(f"prune: unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    if target not in TARGETS:
        raise tricks.TricksError(f"prune: unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if not isinstance(min_channels, int) or min_channels < 1:
        raise tricks.TricksError(f"prune: min_channels must be at least 1, got {min_channels!r}")


def _unit_scores(groups: list[ChannelGroup], criterion: str, context: dict) -> dict[str, torch.Tensor]:
    """The score of every unit (position) of every group the criterion can score, on the CPU."""
    rule = CRITERIA[criterion]
    out: dict[str, torch.Tensor] = {}
    for g in groups:
        scores = rule.score(g, context)
        if scores is None:
            continue
        scores = torch.as_tensor(scores).detach().float().cpu().reshape(-1)
        if scores.numel() != g.size:
            raise tricks.TricksError(f"prune: criterion {criterion!r} scored {scores.numel()} channels of {g.key}, "
                                     f"which has {g.size}")
        if not torch.isfinite(scores).all():
            raise tricks.TricksError(f"prune: criterion {criterion!r} gave non-finite scores to the channels of {g.key}")
        units = g.unit_scores(scores)
        if rule.normalize:
            mean = units.mean()
            units = units / mean if mean > 0 else units
        out[g.key] = units
    return out


def _global_order(groups: list[ChannelGroup], scores: dict[str, torch.Tensor]) -> list[tuple[ChannelGroup, int]]:
    """Every unit that may go, lowest score first (ties: module order, then position), leaving out
    the ones that would take a group below its minimum."""
    entries = []
    for g in groups:
        for u, s in enumerate(scores[g.key].tolist()):
            entries.append((s, g.order, u, g))
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    left = {g.key: g.units for g in groups}
    order = []
    for _, _, u, g in entries:
        if left[g.key] > g.min_units:
            left[g.key] -= 1
            order.append((g, u))
    return order


def _plan_from(order: list[tuple[ChannelGroup, int]], k: int) -> dict[str, list[int]]:
    plan: dict[str, list[int]] = {}
    for g, u in order[:k]:
        plan.setdefault(g.key, []).append(u)
    return plan


def _layer_plan(groups: list[ChannelGroup], scores: dict[str, torch.Tensor], ratio: float) -> dict[str, list[int]]:
    plan = {}
    for g in groups:
        k = min(math.floor(ratio * g.units + 0.5), g.units - g.min_units)
        if k > 0:
            ranked = torch.sort(scores[g.key], stable=True).indices[:k]
            plan[g.key] = ranked.tolist()
    return plan


def _steps(groups: list[ChannelGroup], plan: Mapping[str, list[int]]) -> list[dict]:
    return [{"layer": g.key, "idxs": g.channels(plan[g.key])} for g in groups if plan.get(g.key)]


def plan_steps(model: nn.Module, example_inputs: torch.Tensor, ratio: float, criterion: str = "l1",
               scope: str = "global", target: str = "channels", exclude: Sequence[str] = (),
               importance: Mapping[str, torch.Tensor] | None = None, generator: torch.Generator | None = None,
               min_channels: int = 1, groups: Sequence[ChannelGroup] | None = None) -> tuple[list[dict], dict]:
    """``(steps, info)``: the channels :func:`prune_model` would remove, without removing them
    (``groups``: what :func:`find_groups` found for the model, to save tracing it again)."""
    _check_arguments(ratio, criterion, scope, target, min_channels)
    check_exclude(model, exclude)
    if groups is None:
        groups = find_groups(model, example_inputs, exclude, min_channels)[1]
    context = {"generator": generator, "importance": importance, "model": model}
    candidates = [g for g in groups if g.prunable]
    scores = _unit_scores(candidates, criterion, context)
    ranked = [g for g in candidates if g.key in scores]
    total = sum(g.size for g in ranked)
    info: dict[str, Any] = {"criterion": criterion, "scope": scope, "target": target, "ratio": float(ratio),
                            "groups": len(ranked)}
    if ratio == 0 or not ranked:
        plan: dict[str, list[int]] = {}
    elif target == "channels":
        if scope == "global":
            want = math.floor(ratio * total + 0.5)
            order, plan, removed = _global_order(ranked, scores), {}, 0
            for g, u in order:
                if removed >= want:
                    break
                plan.setdefault(g.key, []).append(u)
                removed += g.ch_groups
        else:
            plan = _layer_plan(ranked, scores, ratio)
    else:
        plan = _search(model, example_inputs, ranked, scores, scope, ratio, target)
    steps = _steps(ranked, plan)
    removed = sum(len(s["idxs"]) for s in steps)
    info["channels"] = [total, total - removed]
    return steps, info


def _search(model, example_inputs, groups, scores, scope, ratio, target) -> dict[str, list[int]]:
    """The plan that removes the fewest channels (global: a prefix of the ranking; layer: the
    smallest common fraction) for ``target`` (macs or params) to fall by at least ``ratio``."""
    start = complexity(model, example_inputs)[target]
    goal = (1 - ratio) * start

    def measure(plan) -> int:
        clone = copy.deepcopy(model)
        apply_steps(clone, example_inputs, _steps(groups, plan))
        return complexity(clone, example_inputs)[target]

    if scope == "global":
        order = _global_order(groups, scores)
        make: Callable[[float], dict] = lambda k: _plan_from(order, int(k))
        lo, hi = 0, len(order)  # measure(make(lo)) > goal (ratio > 0); find the least k that reaches it
        if measure(make(hi)) > goal:
            _unreachable(target, ratio, measure(make(hi)), start)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if measure(make(mid)) <= goal:
                hi = mid
            else:
                lo = mid
        return make(hi)
    lo_r, hi_r = 0.0, 1.0
    best = _layer_plan(groups, scores, hi_r)
    if measure(best) > goal:
        _unreachable(target, ratio, measure(best), start)
    seen: dict[str, int] = {}
    for _ in range(30):
        mid = (lo_r + hi_r) / 2
        plan = _layer_plan(groups, scores, mid)
        key = repr(sorted((k, len(v)) for k, v in plan.items()))
        value = seen[key] if key in seen else seen.setdefault(key, measure(plan))
        if value <= goal:
            hi_r, best = mid, plan
        else:
            lo_r = mid
        if hi_r - lo_r < 1e-4:
            break
    return best


def _unreachable(target: str, ratio: float, best: int, start: int) -> None:
    raise tricks.TricksError(
        f"prune: the {target} cannot fall by {ratio:.0%}: removing every channel that may go leaves "
        f"{best / start:.0%} of the {target}; lower prune.ratio, or prune.min_channels, or exclude fewer layers")


def prune_model(model: nn.Module, example_inputs: torch.Tensor, ratio: float, criterion: str = "l1",
                scope: str = "global", target: str = "channels", exclude: Sequence[str] = (),
                importance: Mapping[str, torch.Tensor] | None = None, generator: torch.Generator | None = None,
                min_channels: int = 1) -> dict:
    """Remove channels of ``model`` in place and return the change as data (see the module docs).

    ``example_inputs``: a batch the model accepts (one image is enough), on the model's device.
    ``criterion``: a name of :data:`tricks_prune.CRITERIA` (l1, random, slimming, taylor);
    ``importance``: precomputed channel scores by group key (the taylor criterion's, from
    :class:`~tricks_prune.TaylorImportance`); ``generator``: the random criterion's generator.
    ``exclude``: fnmatch patterns of layer names whose output channels stay (and every channel
    coupled to them). ``ratio`` 0 removes nothing and returns an empty list of steps.
    """
    _check_arguments(ratio, criterion, scope, target, min_channels)
    check_exclude(model, exclude)
    dg, groups = find_groups(model, example_inputs, exclude, min_channels)
    steps, info = plan_steps(model, example_inputs, ratio, criterion, scope, target, exclude, importance, generator,
                             min_channels, groups=groups)
    apply_steps(model, example_inputs, steps, dg)
    return {"steps": steps, **info}


def _check_change(change: Any) -> list[dict]:
    steps = change.get("steps") if isinstance(change, Mapping) else change
    ok = isinstance(steps, (list, tuple)) and all(
        isinstance(s, Mapping) and isinstance(s.get("layer"), str) and isinstance(s.get("idxs"), (list, tuple))
        and all(isinstance(i, int) and not isinstance(i, bool) for i in s["idxs"]) for s in steps)
    if not ok:
        raise tricks.TricksError("prune: a change is {'steps': [{'layer': NAME, 'idxs': [int, ...]}, ...]} (what "
                                 "prune_model returns); this one is not")
    return list(steps)


def replay(model: nn.Module, example_inputs: torch.Tensor, change: Any) -> nn.Module:
    """Make ``change`` (what :func:`prune_model` returned, or its list of steps) on ``model``, a
    fresh model of the architecture it was made on, in place; the shapes come out identical."""
    apply_steps(model, example_inputs, _check_change(change))
    return model


def input_step(groups: Sequence[ChannelGroup], layer: str, drop: Sequence[int]) -> dict:
    """The step that removes input channels ``drop`` of layer ``layer`` (a conv or linear layer
    reading a prunable group), as :func:`apply_steps` and :func:`replay` take it: the group's
    channels that feed those inputs, with everything coupled to them. For criteria that choose a
    layer's inputs (discrimination-aware channel pruning selects the channels a convolution reads)."""
    for g in groups:
        for m in g.members:
            if m.name == layer and not m.out:
                if not g.prunable:
                    raise tricks.TricksError(f"prune: the inputs of {layer} cannot be removed: {g.why}")
                to_root = dict(zip(m.idxs, m.root_idxs))
                missing = [i for i in drop if i not in to_root]
                if missing:
                    raise tricks.TricksError(f"prune: {layer} has no input channel {missing[0]} in the group of {g.key}")
                return {"layer": g.key, "idxs": sorted({to_root[int(i)] for i in drop})}
    raise tricks.TricksError(f"prune: no group of coupled channels feeds {layer!r}; name a conv or linear layer of the model")


def check_plan(model: nn.Module, example_inputs: torch.Tensor, ratio: float, target: str = "channels",
               exclude: Sequence[str] = (), min_channels: int = 1) -> None:
    """A ``TricksError`` now, before any training, for a plan no pruning step could carry out: no
    channel may go, or a MACs / params ``target`` out of reach with every prunable channel gone."""
    check_exclude(model, exclude)
    if ratio == 0:
        return
    groups = [g for g in find_groups(model, example_inputs, exclude, min_channels)[1] if g.prunable]
    if not groups:
        raise tricks.TricksError(f"prune: no channel of {type(model).__name__} may be removed (every layer feeds the "
                                 "output, is excluded, or is at prune.min_channels); exclude fewer layers")
    if target != "channels":
        start = complexity(model, example_inputs)[target]
        clone = copy.deepcopy(model)
        apply_steps(clone, example_inputs, _steps(groups, _layer_plan(groups, {g.key: torch.zeros(g.units) for g in groups}, 1.0)))
        best = complexity(clone, example_inputs)[target]
        if best > (1 - ratio) * start:
            _unreachable(target, ratio, best, start)
