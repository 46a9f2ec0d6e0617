"""How important each channel of a group is: the pruning criteria.

A criterion scores every channel of a :class:`~tricks_prune.graph.ChannelGroup` (a tensor of
``group.size``, larger = more important, kept longer); a group's channels are scored from every
module of the group that produces them (a residual stream is produced by several convolutions
and their norms), so that a coupled channel is judged once, by all of it:

* ``l1`` (Li et al. 2017): the L1 norm of each output filter, ``sum |W[c]|``, summed over the
  group's conv/linear layers. Norms of different layers differ in scale (fan-in, initialization),
  so a global ranking divides each group's scores by their mean (``normalize``).
* ``random``: uniform scores from a seeded generator, the control.
* ``slimming`` (Liu et al. 2017): ``|gamma|`` of the norm layer after each convolution, averaged
  over the group's norm layers. Not normalized: the sparsity penalty on the gammas trains them to
  one scale, and the paper ranks them with one global threshold. A group with no norm layer has no
  score and is not pruned by this criterion.
* ``taylor`` (Molchanov et al. 2019): the first-order Taylor estimate of the loss change when the
  channel is removed, ``(sum over the channel's parameters of grad * weight)^2`` per batch,
  averaged over the batches it was accumulated on (:class:`TaylorImportance`). The parameters of
  a channel are those that produce it: its output filter and bias in every conv/linear layer of
  the group and its scale and shift in every norm layer (zeroing them all removes the channel;
  behind a BatchNorm the filter's own term is ~0, so this is the paper's gate after BN). Not
  normalized: the scores are estimates of the same loss, comparable across layers.

More criteria can be added with :func:`register_criterion` (a function of the group and a context
dict, returning the scores or None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import tricks

from .graph import ChannelGroup, find_groups

__all__ = ["Criterion", "CRITERIA", "register_criterion", "l1_scores", "random_scores", "slimming_scores",
           "TaylorImportance", "slimming_penalty", "batchnorms"]


@dataclass(frozen=True)
class Criterion:
    """A scoring rule: ``score(group, context) -> tensor[group.size] | None`` and whether a global
    ranking divides each group's scores by their mean. ``context`` holds ``generator`` (a
    ``torch.Generator`` for random criteria) and ``importance`` (precomputed scores by group key)."""

    name: str
    score: Callable[[ChannelGroup, dict], torch.Tensor | None]
    normalize: bool
    summary: str


def _filter_l1(module: nn.Module) -> torch.Tensor:
    weight = module.weight.detach()
    return weight.abs().reshape(weight.shape[0], -1).sum(1).float()


def l1_scores(group: ChannelGroup, context: dict | None = None) -> torch.Tensor:
    """The L1 norm of every output filter, summed over the group's conv/linear layers."""
    layers = group.layers
    scores = torch.zeros(group.size, dtype=torch.float32, device=layers[0].module.weight.device)
    for m in layers:
        scores[m.root_idxs] += _filter_l1(m.module)[m.idxs]
    return scores


def random_scores(group: ChannelGroup, context: dict | None = None) -> torch.Tensor:
    """Uniform random scores from ``context["generator"]`` (a CPU ``torch.Generator``)."""
    generator = (context or {}).get("generator")
    return torch.rand(group.size, generator=generator)


def slimming_scores(group: ChannelGroup, context: dict | None = None) -> torch.Tensor | None:
    """``|gamma|`` averaged over the group's norm layers; None for a group without one."""
    norms = [m for m in group.producers if m.kind == "norm" and getattr(m.module, "weight", None) is not None]
    if not norms:
        return None
    scores = torch.zeros(group.size, dtype=torch.float32, device=norms[0].module.weight.device)
    count = torch.zeros_like(scores)
    for m in norms:
        scores[m.root_idxs] += m.module.weight.detach().abs().float()[m.idxs]
        count[m.root_idxs] += 1
    return scores / count.clamp_min(1)


def _given(group: ChannelGroup, context: dict | None = None) -> torch.Tensor | None:
    importance = (context or {}).get("importance")
    if importance is None:
        raise tricks.TricksError("prune: the taylor criterion needs gradients: accumulate them with "
                                 "TaylorImportance during training and pass importance=its scores()")
    return importance.get(group.key)


CRITERIA: dict[str, Criterion] = {}


def register_criterion(criterion: Criterion) -> None:
    """Make ``criterion`` available by name (``prune_model(criterion=...)``, ``prune.criterion``)."""
    CRITERIA[criterion.name] = criterion


register_criterion(Criterion("l1", l1_scores, True, "L1 norm of the output filters (Li et al. 2017)"))
register_criterion(Criterion("random", random_scores, False, "random, seeded: the control"))
register_criterion(Criterion("slimming", slimming_scores, False,
                             "|BatchNorm gamma|, trained with an L1 penalty (Liu et al. 2017)"))
register_criterion(Criterion("taylor", _given, False,
                             "first-order Taylor, (sum grad*weight)^2 over the epoch's batches (Molchanov et al. 2019)"))


class TaylorImportance:
    """Accumulates Molchanov et al.'s first-order Taylor importance of every prunable channel of
    ``model`` over the training batches that run while it is open, through gradient hooks on the
    parameters that produce each channel (nothing in the training loop changes).

    For each batch, each channel's ``s = sum(grad * weight)`` over its parameters is summed by the
    hooks during the backward pass; when the next forward pass starts (or :meth:`scores` is asked)
    ``s^2`` is added to the channel's total. A batch whose ``s`` is not finite (a float16 overflow,
    a step the loss scaler skips) adds nothing. :meth:`scores` returns the mean over the batches.
    Under float16 with a loss scaler the gradients the hooks see are scaled by the loss scale, so
    every batch is weighted by the scale squared (constant unless the scaler changes it).
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, exclude=(), min_channels: int = 1):
        _, groups = find_groups(model, example_inputs, exclude, min_channels)
        self.groups = [g for g in groups if g.prunable]
        self.batches = 0
        self._pending: dict[str, torch.Tensor] = {}
        self._dirty = False
        self._handles = []
        self._totals: dict[str, torch.Tensor] = {}
        self._plan: list[tuple[ChannelGroup, list[tuple[str, torch.Tensor, torch.Tensor]]]] = []
        hooked: set[str] = set()
        for g in self.groups:
            device = g.layers[0].module.weight.device
            self._totals[g.key] = torch.zeros(g.size, dtype=torch.float32, device=device)
            parts = []
            for m in g.producers:
                parts.append((m.name, torch.tensor(m.idxs, device=device), torch.tensor(m.root_idxs, device=device)))
                if m.name in hooked:
                    continue
                hooked.add(m.name)
                channels = m.module.weight.shape[0] if m.kind == "layer" else m.module.weight.numel()
                self._pending[m.name] = torch.zeros(channels, dtype=torch.float32, device=device)
                for param in (m.module.weight, getattr(m.module, "bias", None)):
                    if isinstance(param, nn.Parameter) and param.requires_grad:
                        self._handles.append(param.register_hook(self._hook(m.name, param)))
            self._plan.append((g, parts))
        self._handles.append(model.register_forward_pre_hook(lambda module, args: self.flush()))

    def _hook(self, name: str, param: nn.Parameter):
        def add(grad: torch.Tensor):
            contribution = (grad.detach().float() * param.detach().float()).reshape(grad.shape[0], -1).sum(1)
            self._pending[name] += contribution
            self._dirty = True
        return add

    @torch.no_grad()
    def flush(self) -> None:
        """Add the batch whose gradients the hooks have seen to the totals."""
        if not self._dirty:
            return
        for g, parts in self._plan:
            s = torch.zeros_like(self._totals[g.key])
            for name, idxs, root_idxs in parts:
                s.index_add_(0, root_idxs, self._pending[name][idxs])
            square = s * s
            self._totals[g.key] += torch.where(torch.isfinite(square).all(), square, torch.zeros_like(square))
        for pending in self._pending.values():
            pending.zero_()
        self._dirty = False
        self.batches += 1

    def scores(self) -> dict[str, torch.Tensor]:
        """The mean importance per batch of every channel, by group key."""
        self.flush()
        return {k: v / max(1, self.batches) for k, v in self._totals.items()}

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "TaylorImportance":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def slimming_penalty(model: nn.Module, norms: list[nn.Module] | None = None) -> torch.Tensor:
    """``sum |gamma|`` over the BatchNorm layers of ``model`` (or ``norms``): Liu et al.'s sparsity
    term, to be multiplied by lambda and added to the loss."""
    norms = norms if norms is not None else batchnorms(model)
    terms = [m.weight.abs().sum() for m in norms]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def batchnorms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of ``model`` with a scale (the paper's channel scaling factors)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return [m for m in model.modules() if isinstance(m, _BatchNorm) and getattr(m, "weight", None) is not None]

