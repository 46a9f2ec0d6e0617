"""Structured channel pruning: whole output channels are removed, so the model really gets smaller.

Papers: Li, Kadav, Durdanovic, Samet, Graf, "Pruning Filters for Efficient ConvNets", ICLR 2017,
arXiv 1608.08710 (the L1 norm of filters); Liu, Li, Shen, Huang, Yan, Zhang, "Learning Efficient
Convolutional Networks through Network Slimming", ICCV 2017, arXiv 1708.06519 (BatchNorm scales
with an L1 penalty); Molchanov, Mallya, Tyree, Frosio, Kautz, "Importance Estimation for Neural
Network Pruning", CVPR 2019, arXiv 1906.10771 (first-order Taylor importance).

* :mod:`~tricks_prune.graph`: which channels are coupled (Torch-Pruning's dependency graph, as
  :class:`ChannelGroup` objects named by their first layer), removing them, and
  :func:`complexity` (params and MACs with torch's ``FlopCounterMode``);
* :mod:`~tricks_prune.criteria`: the scores (``l1``, ``random``, ``slimming``, ``taylor``) and
  :class:`TaylorImportance`, which accumulates the Taylor scores through gradient hooks;
* :mod:`~tricks_prune.pruning`: :func:`prune_model` (prune in place, return the change as data)
  and :func:`replay` (the same change on a fresh model);
* :class:`Prune`, the plugin: prunes at the scheduled epochs on the ``prune`` hook, replays its
  changes on ``replay_structure``, adds the slimming penalty to the loss, and keeps its schedule
  in the checkpoint.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import field_validator

import tricks

from .criteria import (CRITERIA, Criterion, TaylorImportance, batchnorms, l1_scores, random_scores, register_criterion,
                       slimming_penalty, slimming_scores)
from .graph import ChannelGroup, Member, apply_steps, build_graph, complexity, find_groups, matches
from .pruning import SCOPES, TARGETS, check_exclude, check_plan, input_step, plan_steps, prune_model, replay

__version__ = "0.1.0"
__all__ = [
    "prune_model", "replay", "plan_steps", "input_step", "check_plan", "complexity", "find_groups", "build_graph", "apply_steps", "ChannelGroup",
    "Member", "matches", "check_exclude", "CRITERIA", "Criterion", "register_criterion", "l1_scores", "random_scores",
    "slimming_scores", "TaylorImportance", "slimming_penalty", "batchnorms", "SCOPES", "TARGETS", "Prune",
    "PruneSettings", "format_count",
]


def format_count(n: float, like: float | None = None) -> str:
    """``0.273M``, ``126M``, ``4.51G``, ``950K``: three significant digits, in the unit that suits
    ``like`` (default ``n``), so that a before and an after read in the same unit."""
    ref = abs(n if like is None else like)
    for unit, scale, floor in (("G", 1e9, 1e9), ("M", 1e6, 1e5), ("K", 1e3, 1e3)):
        if ref >= floor:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


def _before_after(before: float, after: float) -> str:
    return f"{format_count(before)} -> {format_count(after, like=before)}"


class PruneSettings(tricks.Settings):
    criterion: str = tricks.Field("l1", description="channel importance: l1 (filter L1 norm, Li et al.), random (the "
                                                    "control), slimming (|BN gamma| with an L1 penalty, Liu et al.), "
                                                    "taylor (first-order Taylor, Molchanov et al.)")
    ratio: float = tricks.Field(0.5, ge=0, lt=1, description="fraction removed in all: of the prunable output channels "
                                                             "(target channels), or of the MACs / params")
    scope: Literal["global", "layer"] = tricks.Field("global", description="global: one ranking across layers; "
                                                                           "layer: the same fraction of every layer")
    target: Literal["channels", "macs", "params"] = tricks.Field(
        "channels", description="what ratio is a fraction of: the prunable channels, or the model's MACs or parameters")
    at: int | None = tricks.Field(None, ge=1, description="epoch (from 1) at whose end the first (or only) pruning step "
                                                          "runs; none: half the epochs (epochs // 2, at least 1)")
    steps: int = tricks.Field(1, ge=1, description="pruning steps (1: one-shot); each removes an equal share of ratio")
    every: int = tricks.Field(1, ge=1, description="epochs between two pruning steps")
    exclude: list[str] = tricks.Field([], description="layers whose output channels stay, as fnmatch patterns of their "
                                                      "names (e.g. 'stem*'); the classifier's outputs always stay")
    min_channels: int = tricks.Field(1, ge=1, description="channels every layer keeps at least")
    sparsity: float = tricks.Field(1e-5, ge=0, description="slimming only: lambda of the L1 penalty on BatchNorm "
                                                           "gammas, added to the loss until the last pruning step")
    seed: int | None = tricks.Field(None, description="random only: seed of the random scores; none: the run's seed")

    @field_validator("criterion")
    @classmethod
    def _criterion(cls, value):
        if value not in CRITERIA:
            raise ValueError(f"unknown criterion {value!r}; choose one of {', '.join(CRITERIA)}")
        return value


class Prune(tricks.Plugin):
    """Remove whole channels at the scheduled epochs (one-shot or iterative), ranked by a criterion."""

    Settings = PruneSettings
    summary = "Structured channel pruning (L1, slimming, Taylor, random) at scheduled epochs, through Torch-Pruning."
    category = "pruning"

    def __init__(self, settings=None):
        super().__init__(settings)
        self.schedule: list[int] | None = None  # the epochs (from 1) that end with a pruning step
        self.done = 0  # pruning steps made
        self.original: dict[str, int] = {}  # prunable channels, MACs and params before the first step
        self._taylor: TaylorImportance | None = None
        self._norms: tuple[object, list] = (None, [])

    # --- the schedule -------------------------------------------------------------------------
    def planned(self, epochs: int) -> list[int]:
        """The epochs (from 1) that end with a pruning step, in a run of ``epochs`` epochs."""
        s = self.settings
        at = s.at if s.at is not None else max(1, epochs // 2)
        return [at + i * s.every for i in range(s.steps)]

    def _pending(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) ends with a pruning step not yet made."""
        return self.schedule is not None and self.done < len(self.schedule) and self.schedule[self.done] == epoch + 1

    @staticmethod
    def _example(ctx, model) -> torch.Tensor:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        return torch.zeros(1, ctx.in_chans, ctx.image_size, ctx.image_size, device=device)

    # --- hooks -------------------------------------------------------------------------------
    @tricks.hookimpl
    def on_fit_start(self, ctx):
        s = self.settings
        if self.schedule is None:
            self.schedule = self.planned(ctx.epochs)
        last = self.schedule[-1]
        if self.done < len(self.schedule) and last > ctx.epochs:
            keys = "prune.at" if s.steps == 1 else "prune.at, prune.steps and prune.every"
            raise tricks.TricksError(
                f"prune: the {'last ' if s.steps > 1 else ''}pruning step is planned at the end of epoch {last}, but the run has "
                f"{ctx.epochs} epochs; choose {keys} so that at + (steps - 1) * every <= {ctx.epochs}, or train longer")
        if self.done < len(self.schedule):
            x, ratio = self._example(ctx, ctx.model), s.ratio
            if self.original and s.target != "channels":  # resumed between steps: what is left to remove
                ratio = max(0.0, 1 - (1 - s.ratio) * self.original[s.target] / complexity(ctx.model, x)[s.target])
            check_plan(ctx.model, x, ratio, s.target, s.exclude, s.min_channels)
        if s.criterion == "slimming" and not batchnorms(ctx.model):
            raise tricks.TricksError(f"prune: the slimming criterion ranks BatchNorm scales, and {type(ctx.model).__name__} "
                                     "has no BatchNorm layer; choose prune.criterion=l1 or taylor")

    @tricks.hookimpl
    def on_epoch_start(self, ctx, epoch):
        if self.settings.criterion == "taylor" and self._pending(epoch):
            if self._taylor is not None:
                self._taylor.close()
            s = self.settings
            self._taylor = TaylorImportance(ctx.model, self._example(ctx, ctx.model), s.exclude, s.min_channels)

    @tricks.hookimpl(wrapper=True)
    def build_loss(self, ctx):
        base = yield
        s = self.settings
        if s.criterion != "slimming" or s.sparsity == 0:
            return base
        lam = s.sparsity

        def sparse(output, batch):
            value = base(output, batch)
            if self.schedule is not None and self.done >= len(self.schedule):
                return value  # fine-tuning after the last step: no penalty (Liu et al.)
            model = ctx.model
            if self._norms[0] is not model:
                self._norms = (model, batchnorms(model))
            return value + lam * slimming_penalty(model, self._norms[1])

        return sparse

    @tricks.hookimpl
    def prune(self, ctx, model):
        if self.schedule is None:
            self.schedule = self.planned(ctx.epochs)
        if not self._pending(ctx.epoch):
            return None
        s = self.settings
        x = self._example(ctx, model)
        dg, groups = find_groups(model, x, s.exclude, s.min_channels)
        before = complexity(model, x)
        channels = sum(g.size for g in groups if g.prunable)
        if not self.original:
            self.original = {"channels": channels, **before}
        step, steps = self.done + 1, len(self.schedule)
        goal = s.ratio * step / steps  # the fraction of the original removed after this step
        now = channels if s.target == "channels" else before[s.target]
        ratio = min(max(0.0, 1 - (1 - goal) * self.original[s.target] / now), 0.999) if now else 0.0
        importance, generator = None, None
        if s.criterion == "taylor":
            if self._taylor is None:
                raise tricks.TricksError("prune: the taylor criterion accumulates gradients during the epoch before "
                                         "pruning; call on_epoch_start for that epoch first")
            importance = _all_reduced(self._taylor.scores(), ctx)
            self._taylor.close()
            self._taylor = None
        elif s.criterion == "random":
            generator = torch.Generator().manual_seed((s.seed if s.seed is not None else ctx.core.seed) * 1000 + step)
        steps_, info = plan_steps(model, x, ratio, s.criterion, s.scope, s.target, s.exclude, importance, generator,
                                  s.min_channels, groups=groups)
        apply_steps(model, x, steps_, dg)
        after = complexity(model, x)
        self.done += 1
        first = self.original["channels"]
        left = info["channels"][1] + (channels - info["channels"][0])  # prunable channels of the model now
        where = f" step {step}/{steps}" if steps > 1 else ""
        ctx.log(f"prune{where}: {1 - left / max(1, first):.0%} of channels removed by {s.criterion} ({s.scope}): "
                f"params {_before_after(before['params'], after['params'])}, "
                f"MACs {_before_after(before['macs'], after['macs'])}; channels {channels} -> {left} of {first}")
        if not steps_:
            return None
        return {"steps": steps_, **info, "step": step, "before": before, "after": after}

    @tricks.hookimpl
    def replay_structure(self, ctx, model, change):
        replay(model, self._example(ctx, model), change)

    @tricks.hookimpl
    def state_dict(self, ctx):
        return {"schedule": list(self.schedule or []), "done": self.done, "original": dict(self.original)}

    @tricks.hookimpl
    def load_state_dict(self, ctx, state):
        self.schedule = list(state.get("schedule") or []) or None
        self.done = int(state.get("done", 0))
        self.original = dict(state.get("original") or {})


def _all_reduced(scores: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
    """The scores summed over the processes of a data-parallel run (each saw its own batches)."""
    import torch.distributed as dist

    if ctx.world_size <= 1 or not dist.is_initialized():
        return scores
    keys = sorted(scores)
    flat = torch.cat([scores[k].reshape(-1) for k in keys])
    if dist.get_backend() == "gloo" and flat.device.type != "cpu":
        flat = flat.cpu()
    dist.all_reduce(flat)
    out, i = {}, 0
    for k in keys:
        n = scores[k].numel()
        out[k] = flat[i:i + n]
        i += n
    return out
