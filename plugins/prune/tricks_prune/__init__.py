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

A model may name the part the plugin prunes with a string attribute ``prune_root``, the dotted
path of a sub-module (``model.get_submodule(prune_root)``) that takes the run's images: a
detector of the detection plugin names ``"backbone.body"``, its backbone's stem and stages. Then
every graph operation (the groups, the plan, the criteria's scores, the Taylor hooks, the slimming
batchnorms, the params and MACs it logs, the replay) acts on that sub-module alone, traced with an
image of the run's shape; layer names (``prune.exclude``, the change's steps) are relative to it,
and whatever it returns keeps its width (the detector's feature pyramid reads it). Without the
attribute the whole model is pruned. :func:`pruned_part` resolves it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import field_validator, model_validator
from torch import nn

import tricks

from .criteria import (CRITERIA, Criterion, TaylorImportance, batchnorms, l1_scores, random_scores, register_criterion,
                       slimming_penalty, slimming_scores)
from .dcp import attach_aux_heads, find_stages, prune_dcp, selectable
from .graph import ChannelGroup, Member, apply_steps, build_graph, complexity, find_groups, matches, stream_layers
from .pruning import SCOPES, TARGETS, check_exclude, check_plan, input_step, plan_steps, prune_model, replay

__version__ = "0.1.0"
DCP_ALPHA = 1.0  # see the README: the weight of L_S against L_M
__all__ = [
    "prune_model", "replay", "plan_steps", "input_step", "check_plan", "complexity", "find_groups", "build_graph", "apply_steps", "ChannelGroup",
    "Member", "matches", "check_exclude", "CRITERIA", "Criterion", "register_criterion", "l1_scores", "random_scores",
    "slimming_scores", "TaylorImportance", "slimming_penalty", "batchnorms", "SCOPES", "TARGETS", "Prune",
    "PruneSettings", "format_count", "stream_layers", "pruned_part", "root_path",
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
                                                    "taylor (first-order Taylor, Molchanov et al.), dcp "
                                                    "(discrimination-aware channel selection, Zhuang et al.)")
    ratio: float = tricks.Field(0.5, ge=0, lt=1, description="fraction removed in all: of the prunable output channels "
                                                             "(target channels), or of the MACs / params")
    scope: Literal["global", "layer"] | None = tricks.Field(
        None, description="global: one ranking across layers; layer: the same fraction of every layer; "
                          "none: layer for dcp, global for the other criteria")
    target: Literal["channels", "macs", "params"] = tricks.Field(
        "channels", description="what ratio is a fraction of: the prunable channels, or the model's MACs or parameters")
    at: int | None = tricks.Field(None, ge=1, description="epoch (from 1) at whose end the first (or only) pruning step "
                                                          "runs; none: half the epochs (epochs // 2, at least 1)")
    steps: int = tricks.Field(1, ge=1, description="pruning steps (1: one-shot); each removes an equal share of ratio")
    every: int = tricks.Field(1, ge=1, description="epochs between two pruning steps")
    exclude: list[str] = tricks.Field([], description="layers whose output channels stay, as fnmatch patterns of their "
                                                      "names (e.g. 'stem*'); the classifier's outputs always stay, "
                                                      "and so do the layers the model names in prune_exclude()")
    min_channels: int = tricks.Field(1, ge=1, description="channels every layer keeps at least")
    streams: bool = tricks.Field(False, description="also prune residual streams (the channels summed across a "
                                                    "ResNet stage: its stem or shortcut and every block's last "
                                                    "convolution); false: only inside the blocks, as the papers do")
    sparsity: float = tricks.Field(1e-5, ge=0, description="slimming only: lambda of the L1 penalty on BatchNorm "
                                                           "gammas, added to the loss until the last pruning step")
    seed: int | None = tricks.Field(None, description="random only: seed of the random scores; none: the run's seed")
    aux_stages: list[str] | None = tricks.Field(None, description="dcp only: the modules after which auxiliary "
                                                                   "classifiers go; none: every stage of the model")
    alpha: float = tricks.Field(DCP_ALPHA, ge=0, description="dcp only: weight of the auxiliary (discrimination) "
                                                              "loss against the reconstruction loss in channel selection")
    samples: int = tricks.Field(128, ge=1, description="dcp only: training images (the first of the pruning epoch) "
                                                       "on which channels are selected and weights re-optimized")
    refit_steps: int = tricks.Field(5, ge=0, description="dcp only: gradient steps re-optimizing the kept "
                                                                     "weights after each selected channel")

    @field_validator("criterion")
    @classmethod
    def _criterion(cls, value):
        if value not in CRITERIA and value != "dcp":
            raise ValueError(f"unknown criterion {value!r}; choose one of {', '.join([*CRITERIA, 'dcp'])}")
        return value

    @model_validator(mode="after")
    def _dcp(self):
        if self.criterion == "dcp" and self.scope == "global":
            raise ValueError("dcp selects the same fraction of every layer it prunes; drop prune.scope=global "
                             "(or set prune.scope=layer)")
        if self.criterion == "dcp" and self.target != "channels":
            raise ValueError(f"dcp prunes a fraction of the channels, not a {self.target} budget; drop prune.target "
                             "or choose another criterion")
        return self

    @property
    def ranking(self) -> str:
        """The scope in force: the setting, or layer for dcp and global for the other criteria."""
        return self.scope or ("layer" if self.criterion == "dcp" else "global")


def model_exclude(model) -> list[str]:
    """The layers a model says must keep their output channels: the fnmatch patterns its
    ``prune_exclude()`` returns, if it has one (a ViT: its attention's ``qkv``, whose output is
    split into heads, which channel pruning does not know). For a model that names a
    ``prune_root``, the patterns of the model and of that sub-module, both relative to the sub-module."""
    out = []
    for owner in dict.fromkeys([model, pruned_part(model)]):
        declared = getattr(owner, "prune_exclude", None)
        out += list(declared()) if callable(declared) else []
    return out


def root_path(model) -> str | None:
    """The sub-module a model names to be pruned (its ``prune_root`` attribute, a dotted path such
    as ``"backbone.body"``), or None: the whole model is pruned."""
    path = getattr(model, "prune_root", None)
    if path is None:
        return None
    if not isinstance(path, str) or not path:
        raise tricks.TricksError(f"prune: {type(model).__name__}.prune_root is {path!r}; it names the sub-module to "
                                 "prune as a dotted path (model.get_submodule(path)), e.g. 'backbone.body'")
    return path


def pruned_part(model) -> nn.Module:
    """The module the plugin traces and prunes: ``model.get_submodule(model.prune_root)`` when the
    model names a ``prune_root`` (a detector's backbone body, which takes the images and returns
    the features its feature pyramid reads), else ``model`` itself."""
    path = root_path(model)
    if path is None:
        return model
    try:
        part = model.get_submodule(path)
    except AttributeError:
        some = ", ".join(n for n, _ in list(model.named_children())[:4])
        raise tricks.TricksError(f"prune: {type(model).__name__}.prune_root is {path!r}, which names no sub-module of "
                                 f"it (its top-level modules: {some}); name one as model.named_modules() does") from None
    if not isinstance(part, nn.Module):
        raise tricks.TricksError(f"prune: {type(model).__name__}.prune_root {path!r} is not a module")
    return part


def _label(model) -> str:
    """What the logged sizes are of: "" for the whole model, "backbone " for a detector's
    ``prune_root = "backbone.body"`` (the first part of the path)."""
    path = root_path(model)
    return "" if path is None else f"{path.split('.')[0]} "


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
        self._heads = None  # dcp: the auxiliary classifiers (AuxHeads), trained with the model until the last step
        self._aux: dict[str, torch.Tensor] = {}  # dcp: the heads' logits of the current training forward pass
        self._aux_hooks: list = []
        self._samples: list[tuple[torch.Tensor, torch.Tensor]] = []  # dcp: images of the pruning epoch

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

    def _groups(self, model, x):
        """``(dg, groups, exclude)``: the channel groups of the part of ``model`` that is pruned
        (:func:`pruned_part`) with the layers that must stay, ``prune.exclude`` plus, unless
        ``prune.streams``, the layers that write residual streams."""
        s = self.settings
        root = pruned_part(model)
        base = [*s.exclude, *model_exclude(model)]
        dg, groups = find_groups(root, x, base, s.min_channels)
        extra = [] if s.streams else [n for n in stream_layers(groups) if not matches(n, base)]
        if not extra:
            return dg, groups, base
        exclude = [*base, *extra]
        return (dg, *find_groups(root, x, exclude, s.min_channels, dg=dg)[1:], exclude)

    def _check_dcp(self, ctx, model=None, batch=None) -> None:
        """dcp trains auxiliary classifiers on class indices (``batch["target"]``) and prunes a whole
        classifier: refused in a run of another task, on per-image targets (a list), and on a model
        that names a ``prune_root``."""
        if self.settings.criterion != "dcp":
            return
        fix = "use prune.criterion=l1, taylor, slimming or random for a detector"
        if ctx.core.task != "classification":
            raise tricks.TricksError(
                f"prune: dcp selects channels with auxiliary classifiers trained on class indices, and a "
                f"{ctx.core.task} run's targets are per-image boxes; {fix} (LCP, the localization-aware variant, "
                "is coming as its own plugin)")
        if batch is not None and isinstance(batch.get("target"), (list, tuple)):
            raise tricks.TricksError(
                "prune: dcp selects channels with auxiliary classifiers trained on class indices, and this run's "
                f"targets are a list (per-image targets, as a detector's); {fix} (LCP, the localization-aware "
                "variant, is coming as its own plugin)")
        if model is not None and root_path(model) is not None:
            raise tricks.TricksError(
                f"prune: dcp prunes a whole classifier, and {type(model).__name__} names a part to prune "
                f"(prune_root={root_path(model)!r}); {fix}")

    # --- dcp: auxiliary heads, their losses, the images channels are selected on ---------------
    def _dcp_heads(self, ctx, model):
        """The auxiliary classifiers, made once (before the optimizer, so their parameters are in
        it and a resume finds them) after the stages named by ``aux_stages`` or found in the model."""
        if self._heads is None:
            s = self.settings
            stages = s.aux_stages if s.aux_stages is not None else find_stages(model)
            names = dict(model.named_modules())
            for name in stages:
                if name not in names or not name:
                    some = ", ".join(n for n, _ in list(model.named_children())[:4])
                    raise tricks.TricksError(f"prune.aux_stages: {type(model).__name__} has no module {name!r} (its "
                                             f"top-level modules: {some}); name stages as model.named_modules() does")
            self._heads = attach_aux_heads(model, stages, ctx.num_classes, self._example(ctx, model))
            if ctx.world_size > 1:
                import torch.distributed as dist

                for p in self._heads.parameters():  # the heads are outside the data-parallel model: average by hand
                    p.register_hook(lambda g: _mean_over_ranks(g, dist))
        return self._heads

    def _attach(self, model) -> None:
        """Forward hooks that run each head on its stage's output in training forward passes."""
        self._detach()
        heads = self._heads
        if heads is None:
            return
        for key, name in heads.stage_names.items():
            head = heads[key]

            def run(module, args, output, name=name, head=head):
                if module.training and torch.is_grad_enabled():
                    self._aux[name] = head(output)

            self._aux_hooks.append(model.get_submodule(name).register_forward_hook(run))

    def _detach(self) -> None:
        for handle in self._aux_hooks:
            handle.remove()
        self._aux_hooks, self._aux = [], {}

    def _collect(self, batch) -> None:
        """Keep the first ``samples`` training images of the pruning epoch, with their targets."""
        have = sum(len(x) for x, _ in self._samples)
        need = self.settings.samples - have
        if need > 0:
            self._samples.append((batch["input"][:need].detach().clone(), batch["target"][:need].detach().clone()))

    def _prune_dcp(self, ctx, model, x, ratio) -> tuple[list[dict], dict]:
        s = self.settings
        self._detach()
        if ctx.rank == 0:
            if not self._samples:
                raise tricks.TricksError("prune: dcp selects channels on the images of the pruning epoch, and none "
                                         "was seen; the epoch before a pruning step must train")
            images = torch.cat([a for a, _ in self._samples])
            labels = torch.cat([b for _, b in self._samples])
            change = prune_dcp(model, x, images, labels, ratio, self._heads, self._groups(model, x)[2], s.min_channels, s.alpha,
                               s.refit_steps)
        else:
            change = None
        self._samples = []
        if ctx.world_size > 1:  # rank 0 selected; the others make the same change (DDP then copies rank 0's weights)
            from tricks.distributed import broadcast_object

            change = broadcast_object(change)
            if ctx.rank != 0:
                apply_steps(model, x, change["steps"])
        if self.done + 1 < len(self.schedule):
            self._attach(model)
        steps = change.pop("steps")
        return steps, change

    # --- hooks -------------------------------------------------------------------------------
    @tricks.hookimpl(wrapper=True, tryfirst=True)
    def configure_optimizer(self, ctx, model):
        optimizer = yield
        if self.settings.criterion != "dcp" or optimizer is None:
            return optimizer
        self._check_dcp(ctx, model)
        heads = self._dcp_heads(ctx, model)
        group = {k: v for k, v in optimizer.defaults.items() if k not in ("params", "initial_lr")}
        group["lr"] = optimizer.param_groups[0]["lr"]
        optimizer.add_param_group({**group, "params": list(heads.parameters())})
        return optimizer

    @tricks.hookimpl
    def on_fit_start(self, ctx):
        s = self.settings
        self._check_dcp(ctx, ctx.model)
        root = pruned_part(ctx.model)
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
                ratio = max(0.0, 1 - (1 - s.ratio) * self.original[s.target] / complexity(root, x)[s.target])
            dg, groups, exclude = self._groups(ctx.model, x)
            check_plan(root, x, ratio, s.target, exclude, s.min_channels)
        if s.criterion == "dcp" and self.done < len(self.schedule):
            if not selectable(groups):
                raise tricks.TricksError(
                    f"prune: dcp selects the input channels of a plain convolution that alone reads them, and no "
                    f"prunable channel of {type(ctx.model).__name__} is read that way (residual streams and grouped "
                    "convolutions are not); choose prune.criterion=l1, taylor, slimming or random")
            self._attach(ctx.model)
        if s.criterion == "slimming" and not batchnorms(root):
            raise tricks.TricksError(f"prune: the slimming criterion ranks BatchNorm scales, and {type(root).__name__} "
                                     "has no BatchNorm layer; choose prune.criterion=l1 or taylor")

    @tricks.hookimpl
    def on_epoch_start(self, ctx, epoch):
        if self.settings.criterion == "taylor" and self._pending(epoch):
            if self._taylor is not None:
                self._taylor.close()
            s = self.settings
            x = self._example(ctx, ctx.model)
            # the hooks sit on the pruned part's parameters: they see the gradients of the whole
            # model's loss (a detector's summed losses) through the backward pass
            self._taylor = TaylorImportance(pruned_part(ctx.model), x, self._groups(ctx.model, x)[2], s.min_channels)

    @tricks.hookimpl(wrapper=True)
    def build_loss(self, ctx):
        base = yield
        s = self.settings
        if s.criterion == "dcp":
            def with_aux(output, batch):
                self._check_dcp(ctx, batch=batch)
                value = base(output, batch)
                if self._pending(ctx.epoch):
                    self._collect(batch)
                aux, self._aux = self._aux, {}
                for logits in aux.values():  # L_S of every stage's head, beside the final loss (Zhuang et al.)
                    value = value + F.cross_entropy(logits.float(), batch["target"])
                return value

            return with_aux
        if s.criterion != "slimming" or s.sparsity == 0:
            return base
        lam = s.sparsity

        def sparse(output, batch):
            value = base(output, batch)
            if self.schedule is not None and self.done >= len(self.schedule):
                return value  # fine-tuning after the last step: no penalty (Liu et al.)
            model = ctx.model
            if self._norms[0] is not model:
                self._norms = (model, batchnorms(pruned_part(model)))  # the pruned part's, which are ranked
            return value + lam * slimming_penalty(model, self._norms[1])

        return sparse

    @tricks.hookimpl
    def prune(self, ctx, model):
        if self.schedule is None:
            self.schedule = self.planned(ctx.epochs)
        if not self._pending(ctx.epoch):
            return None
        s = self.settings
        root, path = pruned_part(model), root_path(model)
        x = self._example(ctx, model)
        dg, groups, exclude = self._groups(model, x)
        before = complexity(root, x)
        pool = [g for g, _ in selectable(groups)] if s.criterion == "dcp" else [g for g in groups if g.prunable]
        channels = sum(g.size for g in pool)  # what the ratio is a fraction of (dcp: the channels it can select)
        if not self.original:
            self.original = {"channels": channels, **before}
        step, steps = self.done + 1, len(self.schedule)
        goal = s.ratio * step / steps  # the fraction of the original removed after this step
        now = channels if s.target == "channels" else before[s.target]
        ratio = min(max(0.0, 1 - (1 - goal) * self.original[s.target] / now), 0.999) if now else 0.0
        if s.criterion == "dcp":
            steps_, info = self._prune_dcp(ctx, model, x, ratio)
        else:
            steps_, info = self._plan(ctx, root, x, ratio, step, groups, exclude)
            apply_steps(root, x, steps_, dg)
        after = complexity(root, x)
        self.done += 1
        first = self.original["channels"]
        left = info["channels"][1] + (channels - info["channels"][0])  # prunable channels of the model now
        where = f" step {step}/{steps}" if steps > 1 else ""
        part = _label(model)  # "backbone " for a detector: the sizes are those of the part pruned
        ctx.log(f"prune{where}: {1 - left / max(1, first):.0%} of channels removed by {s.criterion} ({s.ranking}): "
                f"{part}params {_before_after(before['params'], after['params'])}, "
                f"{part}MACs {_before_after(before['macs'], after['macs'])}; channels {channels} -> {left} of {first}")
        if not steps_:
            return None
        return {"steps": steps_, **info, "step": step, "before": before, "after": after,
                **({"root": path} if path is not None else {})}

    def _plan(self, ctx, model, x, ratio, step, groups, exclude):
        s = self.settings
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
        return plan_steps(model, x, ratio, s.criterion, s.ranking, s.target, exclude, importance, generator,
                          s.min_channels, groups=groups)

    @tricks.hookimpl
    def replay_structure(self, ctx, model, change):
        path = root_path(model)
        made = change.get("root") if isinstance(change, Mapping) else None
        if made != path:
            raise tricks.TricksError(
                f"prune: the change was made on {'the sub-module ' + repr(made) if made else 'the whole model'}, and "
                f"{type(model).__name__} prunes {'its sub-module ' + repr(path) if path else 'the whole model'} "
                "(prune_root); a change replays only on the architecture it was made on")
        replay(pruned_part(model), self._example(ctx, model), change)

    @tricks.hookimpl
    def state_dict(self, ctx):
        state = {"schedule": list(self.schedule or []), "done": self.done, "original": dict(self.original)}
        if self._heads is not None:
            state["heads"] = {k: v.detach().clone() for k, v in self._heads.state_dict().items()}
        return state

    @tricks.hookimpl
    def load_state_dict(self, ctx, state):
        self.schedule = list(state.get("schedule") or []) or None
        self.done = int(state.get("done", 0))
        self.original = dict(state.get("original") or {})
        if self._heads is not None and state.get("heads"):
            self._heads.load_state_dict(state["heads"])  # in place: the optimizer holds these parameters
        if self._heads is not None and self.schedule and self.done >= len(self.schedule):
            self._detach()

    @tricks.hookimpl
    def on_fit_end(self, ctx, summary):
        self._detach()

    @tricks.hookimpl
    def on_exception(self, ctx, error):
        self._detach()


def _mean_over_ranks(grad, dist):
    grad = grad.clone()
    dist.all_reduce(grad)
    return grad / dist.get_world_size()


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
