"""Gradient clipping (Pascanu et al. 2013, arXiv 1211.5063; at global norm 1.0 in the ViT paper's
and timm's recipes).

Before every optimizer step the gradients of the optimizer's parameters are clipped, as timm's
``dispatch_clip_grad`` does it:

* ``norm``: rescale all of them together so that their global ``norm_type``-norm is at most
  ``max_norm`` (``torch.nn.utils.clip_grad_norm_``);
* ``value``: clamp every entry to ``[-max_norm, max_norm]`` (``torch.nn.utils.clip_grad_value_``);
* ``agc``: adaptive clipping (Brock et al. 2021), each output unit's gradient norm at most
  ``max_norm`` times its weight norm (``timm.utils.adaptive_clip_grad``).

:class:`GradClip` hooks the run's optimizer and reports, per epoch, the mean global gradient norm
before clipping (``grad_norm``) and the fraction of steps that were clipped (``grad_clipped``).
"""

from __future__ import annotations

from typing import Literal

import torch
from timm.utils import dispatch_clip_grad

import tricks

__version__ = "0.1.0"


def grads_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters of an optimizer's groups that have a gradient (each once)."""
    seen, params = set(), []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def clip(params: list[torch.Tensor], max_norm: float, mode: str = "norm",
         norm_type: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the gradients of ``params`` in place; returns ``(norm, clipped)`` as device tensors: the
    global ``norm_type``-norm of the gradients before clipping, and whether clipping changed them
    (norm: the norm exceeded ``max_norm``; value: an entry exceeded it; agc: the global norm fell)."""
    grads = [p.grad for p in params]
    if mode == "norm":
        # what dispatch_clip_grad calls for "norm", keeping the norm it returns
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
        return norm, norm > max_norm
    norm = torch.nn.utils.get_total_norm(grads, norm_type=norm_type)
    if mode == "value":
        largest = torch.nn.utils.get_total_norm(grads, norm_type=float("inf"))
        dispatch_clip_grad(params, max_norm, mode="value")
        return norm, largest > max_norm
    dispatch_clip_grad(params, max_norm, mode=mode, norm_type=norm_type)
    after = torch.nn.utils.get_total_norm(grads, norm_type=norm_type)
    return norm, after < norm


class GradClipSettings(tricks.Settings):
    max_norm: float = tricks.Field(
        1.0, gt=0,
        description="the bound, > 0: the global gradient norm (norm), every entry's magnitude (value), or the factor "
                    "of each unit's weight norm (agc; about 0.01-0.16 in the NFNet paper) (ViT, timm: 1.0 with norm)")
    mode: Literal["norm", "value", "agc"] = tricks.Field(
        "norm", description="norm: rescale all gradients to a global norm <= max_norm; value: clamp each entry; "
                            "agc: adaptive clipping by unit-wise weight norms (timm's dispatch_clip_grad modes)")
    norm_type: float = tricks.Field(
        2.0, ge=1, allow_inf_nan=True,
        description="the p of the p-norm, >= 1 or inf, for modes norm and agc (and the reported grad_norm)")


class GradClip(tricks.Plugin):
    """Clip the gradients before every optimizer step; the epoch's mean norm and clipped fraction in the metrics."""

    Settings = GradClipSettings

    def __init__(self, settings: GradClipSettings | None = None):
        super().__init__(settings)
        self._optimizer = None
        self._handle = None
        self._reset(None)

    def _reset(self, device) -> None:
        # per-epoch sums, kept on the device: nothing is read on the host until the epoch ends
        self._norms = torch.zeros((), dtype=torch.float64, device=device)
        self._clipped = torch.zeros((), dtype=torch.float64, device=device)
        self._steps = 0

    def _before_step(self, optimizer, args, kwargs) -> None:
        params = grads_of(optimizer)
        if not params:
            return
        s = self.settings
        norm, clipped = clip(params, s.max_norm, s.mode, s.norm_type)
        self._norms += norm.to(self._norms.device, torch.float64)
        self._clipped += clipped.to(self._clipped.device, torch.float64)
        self._steps += 1

    def _attach(self, ctx) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._optimizer = ctx.optimizer
        self._handle = ctx.optimizer.register_step_pre_hook(self._before_step)

    @tricks.hookimpl
    def on_fit_start(self, ctx):
        self._reset(ctx.device)
        self._attach(ctx)

    @tricks.hookimpl
    def on_epoch_end(self, ctx, epoch, metrics):
        if self._steps:
            norms, clipped = torch.stack([self._norms, self._clipped]).tolist()  # the epoch's one host sync
            metrics["grad_norm"] = norms / self._steps
            metrics["grad_clipped"] = clipped / self._steps
        self._reset(ctx.device)
        if ctx.optimizer is not self._optimizer:  # rebuilt after a structural change (pruning)
            self._attach(ctx)
