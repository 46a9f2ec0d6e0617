"""Label smoothing, as in "Bag of Tricks for Image Classification with Convolutional Neural
Networks" (He et al., CVPR 2019, arXiv 1812.01187).

The target of class ``y`` among ``K`` becomes a distribution that keeps ``on`` on ``y`` and spreads
the rest evenly over the other classes:

* ``form="paper"`` (the paper's equation): ``on = 1 - eps``, ``off = eps / (K - 1)``;
* ``form="torch"`` (``F.cross_entropy(label_smoothing=eps)``, gluon-cv's code):
  ``on = 1 - eps + eps / K``, ``off = eps / K``.

Both are the affine map ``t -> off + (on - off) * t`` of the one-hot target, and the same map is
applied to soft targets (mixup, cutmix). Because the map is affine and a mixture's weights sum to 1,
smoothing then mixing equals mixing then smoothing. The functions below are the math, usable
without the framework; :class:`LabelSmoothing` wraps the loss in force with them.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

import tricks

__version__ = "0.1.0"

FORMS = ("paper", "torch")


def smoothing_values(epsilon: float, num_classes: int, form: str = "paper") -> tuple[float, float]:
    """``(on, off)``: the target probability of the true class and of every other class."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; use 'paper' or 'torch'")
    if num_classes < 2:
        raise ValueError(f"label smoothing needs at least 2 classes, got {num_classes}")
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
    if form == "paper":
        return 1.0 - epsilon, epsilon / (num_classes - 1)
    return 1.0 - epsilon + epsilon / num_classes, epsilon / num_classes


def torch_epsilon(epsilon: float, num_classes: int, form: str = "paper") -> float:
    """The ``label_smoothing`` argument of ``F.cross_entropy`` that gives the same targets:
    ``eps * K / (K - 1)`` for the paper's form, ``eps`` for torch's."""
    smoothing_values(epsilon, num_classes, form)  # checks the arguments
    return epsilon * num_classes / (num_classes - 1) if form == "paper" else epsilon


def smooth_targets(target: torch.Tensor, epsilon: float, num_classes: int, form: str = "paper") -> torch.Tensor:
    """Smoothed target distributions ``[B, K]``.

    ``target`` holds class indices (``int64 [B]``) or soft targets (floating ``[B, K]``, rows
    summing to 1). Class ``y`` becomes ``on`` at ``y`` and ``off`` elsewhere; a soft target ``t``
    becomes ``off + (on - off) * t``, the same affine map, so that it commutes with mixing.
    Hard targets give float32 rows; soft targets keep their dtype. The input is not changed.
    """
    on, off = smoothing_values(epsilon, num_classes, form)
    if target.is_floating_point():
        if target.shape[-1] != num_classes:
            raise ValueError(f"soft targets have {target.shape[-1]} classes, expected {num_classes}")
        return target.mul(on - off).add_(off)
    full = torch.full((target.shape[0], num_classes), off, dtype=torch.float32, device=target.device)
    return full.scatter_(1, target.unsqueeze(1), on)


def minimiser_logit_gap(epsilon: float, num_classes: int, form: str = "paper") -> float:
    """The gap between the true class's logit and every other logit at the minimum of the
    cross-entropy against the smoothed target: ``log(on / off)``, which is
    ``log((K - 1)(1 - eps) / eps)`` for the paper's form (infinite for ``eps = 0``)."""
    on, off = smoothing_values(epsilon, num_classes, form)
    return math.inf if off == 0 else math.log(on / off)


class LabelSmoothingSettings(tricks.Settings):
    epsilon: float = tricks.Field(0.1, ge=0, lt=1, description="mass taken from the true class and spread over the others (0 turns smoothing off)")
    form: Literal["paper", "torch"] = tricks.Field(
        "paper", description="paper: 1-eps on the true class, eps/(K-1) elsewhere; torch: 1-eps+eps/K and eps/K, as F.cross_entropy(label_smoothing=eps)")


class LabelSmoothing(tricks.Plugin):
    """Train against smoothed targets: wraps the loss in force and hands it smoothed distributions.
    In a detection run the detector smooths its classification head's targets itself
    (``model.set_label_smoothing``; see the detection plugin)."""

    Settings = LabelSmoothingSettings
    tasks = ("classification", "detection")

    @tricks.hookimpl(wrapper=True)
    def build_loss(self, ctx):
        loss = yield
        s = self.settings
        k = ctx.num_classes
        if k < 2:
            raise tricks.TricksError(f"label_smoothing needs at least 2 classes, the data has {k}; drop label_smoothing from --plugins")
        if s.form == "paper" and s.epsilon > (k - 1) / k:
            raise tricks.TricksError(
                f"label_smoothing.epsilon={s.epsilon} with form=paper and {k} classes puts less mass on the true class "
                f"than on each other class; use epsilon <= {(k - 1) / k:.4g}")
        epsilon, form = s.epsilon, s.form
        task = getattr(ctx.core, "task", "classification")
        if task != "classification":
            # a detector computes its losses inside the model: it smooths its own classification
            # head's targets, given the (on, off) of its class count
            seam = getattr(ctx.model, "set_label_smoothing", None)
            if seam is None:
                raise tricks.TricksError(f"label_smoothing: the {task} model '{ctx.core.model}' has no classification head "
                                         "that takes smoothed targets (no set_label_smoothing); drop label_smoothing from --plugins")
            seam(None if epsilon == 0 else (lambda classes: smoothing_values(epsilon, classes, form)))
            return loss
        if s.epsilon == 0:
            return loss  # identity: the loss in force, unchanged

        def smoothed(output, batch):
            return loss(output, {**batch, "target": smooth_targets(batch["target"], epsilon, k, form)})

        return smoothed
