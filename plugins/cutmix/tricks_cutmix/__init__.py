"""CutMix (Yun, Han, Oh, Chun, Choe, Yoo, ICCV 2019, arXiv 1905.04899).

``x~ = M * x_i + (1 - M) * x_perm(i)``, ``y~ = lam * y_i + (1 - lam) * y_perm(i)``: a box of the
partner image replaces the same box of each image, and the labels are mixed by area. One
``lam ~ Beta(alpha, alpha)`` and one box per batch, as in the paper's code: the box centre is
uniform over the pixels, its sides are ``int(H * sqrt(1 - lam))`` and ``int(W * sqrt(1 - lam))``,
its corners ``centre -/+ side // 2`` clipped at the border, and ``lam`` is recomputed from the
clipped box, ``1 - area / (H * W)``. The functions below are the math, usable without the
framework (the partners, soft targets, ``lam`` and mixup itself come from the core's
:mod:`tricks.mixing`); :class:`CutMix` wires them to ``on_batch``, with an optional switch to mixup.
"""

from __future__ import annotations

import math

import torch

import tricks
from tricks.mixing import Pairing, mixup, partner, sample_lambda, soft_targets

__version__ = "0.1.0"

Box = tuple[int, int, int, int]  # (y1, y2, x1, x2): rows y1:y2, columns x1:x2


def sample_box(height: int, width: int, lam: float, generator: torch.Generator | None = None) -> Box:
    """The paper's box for ``lam``: centre uniform over the ``height x width`` pixels (drawn on the
    host with torch's CPU generator, columns first), sides ``int(side * sqrt(1 - lam))``, corners
    ``centre -/+ side // 2`` clipped to the image. Returns Python ints ``(y1, y2, x1, x2)``."""
    ratio = math.sqrt(max(0.0, 1.0 - lam))
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cx = int(torch.randint(width, (1,), generator=generator))
    cy = int(torch.randint(height, (1,), generator=generator))
    return box_at(height, width, cy, cx, cut_h, cut_w)


def box_at(height: int, width: int, cy: int, cx: int, cut_h: int, cut_w: int) -> Box:
    """The box of sides ``cut_h x cut_w`` centred on pixel ``(cy, cx)``, the paper's way:
    ``c -/+ cut // 2``, clipped to the image (an odd side loses one pixel)."""
    y1, y2 = min(max(cy - cut_h // 2, 0), height), min(max(cy + cut_h // 2, 0), height)
    x1, x2 = min(max(cx - cut_w // 2, 0), width), min(max(cx + cut_w // 2, 0), width)
    return y1, y2, x1, x2


def box_lambda(box: Box, height: int, width: int) -> float:
    """The share of the image outside ``box``: ``1 - area / (height * width)``."""
    y1, y2, x1, x2 = box
    return 1.0 - (y2 - y1) * (x2 - x1) / float(height * width)


def cutmix(x: torch.Tensor, target: torch.Tensor, box: Box, perm: torch.Tensor, num_classes: int,
           lam: float | None = None, inplace: bool = False):
    """Paste ``box`` of each example's partner ``x[perm]`` into it, and mix the targets.

    ``x`` is ``[B, C, H, W]``; ``target`` class indices ``[B]`` (made one-hot) or soft targets
    ``[B, K]`` (used as they are). ``lam`` weighs the example's own targets; by default it is
    the box's own, ``1 - area / (H * W)`` (the paper's code). Returns ``(mixed_x, mixed_y, lam)``.
    With ``inplace`` the box of ``x`` itself is overwritten (cheaper: only the box is written);
    otherwise ``x`` is left unchanged.
    """
    height, width = x.shape[-2:]
    if lam is None:
        lam = box_lambda(box, height, width)
    y1, y2, x1, x2 = box
    out = x if inplace else x.clone()
    if y2 > y1 and x2 > x1:
        # only the box is gathered (index_select: a fraction of the cost of x[perm] on a CPU);
        # the partner pixels are copied out before the box is overwritten
        out[..., y1:y2, x1:x2] = x[..., y1:y2, x1:x2].index_select(0, perm)
    y = soft_targets(target, num_classes)
    mixed_y = y.mul(lam).add_(y.index_select(0, perm), alpha=1.0 - lam)
    return out, mixed_y, lam


class CutMixSettings(tricks.Settings):
    alpha: float = tricks.Field(1.0, gt=0, description="lam ~ Beta(alpha, alpha) sets the box size; 1.0 (uniform) in the paper")
    prob: float = tricks.Field(1.0, ge=0, le=1, description=(
        "probability of mixing a batch; the paper uses 0.5 on CIFAR and 1.0 on ImageNet"))
    correct_lam: bool = tricks.Field(True, description=(
        "weigh the labels by the clipped box's area (paper's code, timm, torchvision); false keeps the sampled lam"))
    pairing: Pairing = tricks.Field(
        "permutation", description="how partners are chosen: permutation (paper), reverse (timm), roll (torchvision)")
    switch_prob: float = tricks.Field(0.0, ge=0, le=1, description=(
        "probability that a mixed batch uses mixup instead of CutMix (timm's switch_prob); 0 = never"))
    mixup_alpha: float = tricks.Field(1.0, gt=0, description="lam ~ Beta(mixup_alpha, mixup_alpha) for the batches switched to mixup")


class CutMix(tricks.Plugin):
    """Paste a box from a partner image into each image; labels mixed by the box's area."""

    Settings = CutMixSettings

    @tricks.hookimpl
    def on_batch(self, ctx, batch):
        s = self.settings
        if s.prob < 1.0 and torch.rand(()).item() >= s.prob:
            return None
        x, target = batch["input"], batch["target"]
        if x.ndim != 4:
            raise tricks.TricksError(
                f"cutmix needs image batches [B, C, H, W], got input of shape {tuple(x.shape)}; drop cutmix for this data")
        if s.switch_prob > 0 and torch.rand(()).item() < s.switch_prob:
            lam = sample_lambda(s.mixup_alpha)
            perm = partner(x.shape[0], s.pairing, x.device)
            batch["input"], batch["target"] = mixup(x, target, lam, perm, ctx.num_classes)
            return batch
        lam = sample_lambda(s.alpha)
        box = sample_box(x.shape[-2], x.shape[-1], lam)
        perm = partner(x.shape[0], s.pairing, x.device)
        batch["input"], batch["target"], _ = cutmix(
            x, target, box, perm, ctx.num_classes, lam=None if s.correct_lam else lam, inplace=True)
        return batch
