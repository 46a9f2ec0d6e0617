"""The localization-aware auxiliary network of LCP and the channel scores it drives.

Xie, Zhu, Zhao, Tao, Liu and Tao, "Localization-aware Channel Pruning for Object Detection",
Neurocomputing 2020 (arXiv 1911.02237).

The method
----------
LCP prunes a detector layer by layer the way DCP prunes a classifier (see ``tricks_prune.dcp``):
for one layer with weight ``W`` the input channels are scored with the gradient of

    L(W) = L_re(W) + alpha * L_a(W)

where ``L_re`` is the reconstruction error of the layer's output and ``L_a`` the loss of an
*auxiliary network* that reads the features the layer feeds. This module is that auxiliary network
and the pieces it is made of; the layer-by-layer loop lives elsewhere.

For every positive default box ``A`` matched to a ground-truth box ``B``
(:func:`match_default_boxes`), let ``C`` be the smallest box enclosing ``A`` and ``B``
(:func:`enclosing_box`). The *contextual RoIAlign* (:func:`contextual_roi_align`) pools the features
of ``B`` and of ``C`` to the same grid and adds them element-wise,

    F_O = RoIAlign(F, B) + RoIAlign(F, C),

so a positive sees its object and the context between the object and its default box (which matters
on shallow layers, whose receptive fields are small). A small head (:class:`AuxiliaryNetwork`) turns
``F_O`` into class logits and four box deltas relative to ``A``; the deltas are decoded into a
predicted box and compared with ``B`` by the generalized IoU (:func:`giou`),

    GIoU = IoU - |C' minus (P union B)| / |C'|      (C' the box enclosing P and B),
    L_ac = CE(logits, label),   L_ar = 1 - GIoU(P, B),   L_a = L_ac + m * L_ar,

each reduced over the positives of the batch. The score of input channel ``k`` of the pruned layer is
``S_k = sum over output channels and kernel positions of (dL/dW)^2`` (:func:`channel_scores`) and the
``K`` largest are kept (:func:`select_channels`).

Choices where the paper is silent (or could not be checked), made here
---------------------------------------------------------------------
* **Roles of the boxes.** ``B`` is the ground truth and ``A`` the matched default box; the features
  pooled are those of ``B`` and of ``C``. (One third-party reading of the paper names the boxes the
  other way round; the enclosing box ``C`` is the same either way.)
* **Matching** (:func:`match_default_boxes`): the SSD rule. Each default box takes the ground truth
  it overlaps most and is positive when that IoU is at least ``iou_threshold`` (0.5); in addition
  each ground truth claims the default box that overlaps it most, so every object has at least one
  positive even when no default box reaches the threshold. When two ground truths claim the same
  default box, the one listed later keeps it. A ground truth that overlaps no default box at all
  (IoU 0 everywhere) claims nothing: the forced pair would be arbitrary.
* **Default boxes** (:func:`grid_default_boxes`): the auxiliary network may sit on a backbone layer
  that has no anchors of its own, so SSD-like boxes are laid on the layer's grid: one box per
  (cell, size, aspect ratio), centred on the cell, ``w = s * sqrt(r)``, ``h = s / sqrt(r)`` in image
  pixels; not clipped to the image.
* **Head** (:class:`AuxiliaryNetwork`): ``num_convs`` (1) blocks of 3x3 convolution - BatchNorm -
  ReLU to ``hidden`` channels, global average pooling, then two linear layers: class logits and box
  deltas. The paper's exact layers were not retrieved. (In training mode BatchNorm needs more than
  one value per channel: with ``roi_size=1`` keep ``num_convs=0`` or batches of several positives.)
* **Classes.** Only positives are classified, so no background class is needed: ``num_classes``
  logits and labels in ``[0, num_classes)``. A detector whose labels are ``1..K`` with ``0`` for the
  background can pass ``num_classes=K+1`` unchanged (the background logit is then never a target).
* **Box deltas** (:func:`encode_boxes`, :func:`decode_boxes`): the usual centre/size
  parameterization relative to ``A``, ``dx = wx * (x_B - x_A) / w_A``, ``dy`` likewise,
  ``dw = ww * log(w_B / w_A)``, ``dh`` likewise, with weights ``(10, 10, 5, 5)`` (SSD's variances
  0.1 and 0.2); ``dw`` and ``dh`` are clamped at ``log(1000/16)`` before the exponential so a wild
  prediction cannot overflow.
* **Reduction.** ``"mean"`` over the positives of the batch by default, so the balance against
  ``alpha`` does not depend on how many objects a batch holds; ``"sum"`` (the paper's ``sum_i``) is
  available.
* **m** = 1.0 by default (the paper's value was not retrieved).
* An image without ground truth contributes nothing. A batch without positives gives zero losses that
  still carry a ``grad_fn`` through the features (and the head's parameters), so ``backward`` works
  and gives zero gradients.
* RoIAlign: ``torchvision.ops.roi_align`` with ``aligned=True`` (the half-pixel correction),
  ``sampling_ratio=2``, a 7x7 output by default.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, roi_align

from tricks import TricksError

__all__ = [
    "AuxiliaryError", "enclosing_box", "box_area", "giou", "match_default_boxes", "grid_default_boxes",
    "encode_boxes", "decode_boxes", "contextual_roi_align", "AuxiliaryNetwork", "channel_scores",
    "select_channels", "DEFAULT_BOX_WEIGHTS",
]

DEFAULT_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
_MAX_LOG_SCALE = math.log(1000.0 / 16)


class AuxiliaryError(TricksError, ValueError):
    """Bad arguments to the LCP auxiliary network or its helpers (a ``ValueError`` too)."""


# --- boxes ------------------------------------------------------------------------------------


def _check_boxes(name: str, boxes: Tensor) -> None:
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise AuxiliaryError(f"{name} must have shape [n, 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}")


def _check_pairs(a: Tensor, b: Tensor) -> None:
    _check_boxes("the first boxes", a)
    _check_boxes("the second boxes", b)
    if a.shape[0] != b.shape[0]:
        raise AuxiliaryError(f"paired boxes need the same count, got {a.shape[0]} and {b.shape[0]}")


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``[n, 4]`` xyxy boxes; a box with ``x2 < x1`` or ``y2 < y1`` has area 0."""
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def box_iou_pairs(a: Tensor, b: Tensor) -> Tensor:
    """IoU of paired boxes ``a[i]`` and ``b[i]`` (xyxy), ``[n]``."""
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    return inter / (box_area(a) + box_area(b) - inter).clamp(min=1e-12)


def enclosing_box(a: Tensor, b: Tensor) -> Tensor:
    """The smallest axis-aligned box containing both ``a[i]`` and ``b[i]``, for paired ``[n, 4]``
    xyxy boxes: the lower of the two left and top edges, the higher of the two right and bottom
    edges."""
    _check_pairs(a, b)
    return torch.cat([torch.minimum(a[:, :2], b[:, :2]), torch.maximum(a[:, 2:], b[:, 2:])], dim=1)


def giou(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """Paired generalized IoU of ``[n, 4]`` xyxy boxes: ``IoU - |C minus (P union T)| / |C|`` with
    ``C`` the smallest box enclosing ``P = pred[i]`` and ``T = target[i]``.

    In ``(-1, 1]`` for boxes of positive area; 1 exactly when the two boxes coincide. ``eps`` keeps
    the divisions finite for degenerate boxes. Differentiable in both arguments.
    """
    _check_pairs(pred, target)
    top_left = torch.maximum(pred[:, :2], target[:, :2])
    bottom_right = torch.minimum(pred[:, 2:], target[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    union = box_area(pred) + box_area(target) - inter
    iou = inter / (union + eps)
    area_c = box_area(enclosing_box(pred, target))
    return iou - (area_c - union) / (area_c + eps)


def match_default_boxes(default_boxes: Tensor, gt_boxes: Tensor, iou_threshold: float = 0.5,
                        ensure_each_gt: bool = True) -> tuple[Tensor, Tensor]:
    """The positive (default box, ground truth) pairs of one image, by the SSD matching rule.

    Each default box is paired with the ground truth it overlaps most and is positive when that IoU
    is at least ``iou_threshold``. With ``ensure_each_gt`` every ground truth also claims the default
    box that overlaps it most (whatever the IoU, as long as it is not zero), so each object that
    overlaps any default box has at least one positive; when two ground truths claim the same default
    box the one listed later keeps it. A ground truth that overlaps no default box has no positive.

    Returns ``(default_index, gt_index)``, two ``LongTensor`` of the same length, ordered by default
    index (each default box appears at most once). Empty when there is no ground truth.
    """
    _check_boxes("default_boxes", default_boxes)
    _check_boxes("gt_boxes", gt_boxes)
    if not 0.0 <= iou_threshold <= 1.0:
        raise AuxiliaryError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    device = default_boxes.device
    if gt_boxes.shape[0] == 0 or default_boxes.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.clone()
    with torch.no_grad():
        iou = box_iou(default_boxes.float(), gt_boxes.to(device=device, dtype=torch.float32))  # [D, G]
        best_iou, best_gt = iou.max(dim=1)
        positive = best_iou >= iou_threshold
        if ensure_each_gt:
            best_for_gt, best_default = iou.max(dim=0)  # [G]
            for g, (d, overlap) in enumerate(zip(best_default.tolist(), best_for_gt.tolist())):
                if overlap > 0:  # in order: a later gt overrides an earlier one
                    best_gt[d] = g
                    positive[d] = True
        default_index = positive.nonzero().flatten()
        return default_index, best_gt[default_index]


def grid_default_boxes(feature_hw: tuple[int, int], image_hw: tuple[int, int], sizes: Sequence[float],
                       aspect_ratios: Sequence[float] = (1.0,), device=None,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """SSD-like default boxes on a feature map's grid, in image pixels (xyxy).

    The image is divided into ``H x W`` cells (``feature_hw``), of ``image_h / H`` by ``image_w / W``
    pixels; on the centre of each cell sits one box per ``(size s, aspect ratio r)`` with width
    ``s * sqrt(r)`` and height ``s / sqrt(r)``. Returns ``[H * W * len(sizes) * len(aspect_ratios),
    4]``, ordered by row, then column, then size, then ratio. Boxes are not clipped to the image.
    """
    h, w = (int(v) for v in feature_hw)
    image_h, image_w = (float(v) for v in image_hw)
    if h < 1 or w < 1 or image_h <= 0 or image_w <= 0:
        raise AuxiliaryError(f"feature_hw and image_hw must be positive, got {feature_hw} and {image_hw}")
    if not sizes or not aspect_ratios or min(sizes) <= 0 or min(aspect_ratios) <= 0:
        raise AuxiliaryError(f"sizes and aspect_ratios must be non-empty and positive, got {sizes} and "
                             f"{aspect_ratios}")
    shapes = torch.tensor([[s * math.sqrt(r), s / math.sqrt(r)] for s in sizes for r in aspect_ratios],
                          dtype=torch.float64)  # [A, 2] (w, h)
    cy = (torch.arange(h, dtype=torch.float64) + 0.5) * (image_h / h)
    cx = (torch.arange(w, dtype=torch.float64) + 0.5) * (image_w / w)
    cy, cx = torch.meshgrid(cy, cx, indexing="ij")
    centres = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2)  # [H*W, 1, 2]
    half = shapes.unsqueeze(0) / 2  # [1, A, 2]
    boxes = torch.cat([centres - half, centres + half], dim=-1)  # [H*W, A, 4]
    return boxes.reshape(-1, 4).to(device=device, dtype=dtype)


def _centres(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h, w, h


def encode_boxes(reference: Tensor, target: Tensor,
                 weights: Sequence[float] = DEFAULT_BOX_WEIGHTS) -> Tensor:
    """The deltas ``(dx, dy, dw, dh)`` that take each ``reference`` box to its ``target`` box:
    ``dx = wx (cx_T - cx_R) / w_R``, ``dy = wy (cy_T - cy_R) / h_R``, ``dw = ww log(w_T / w_R)``,
    ``dh = wh log(h_T / h_R)``. The inverse of :func:`decode_boxes` (within its clamp)."""
    _check_pairs(reference, target)
    wx, wy, ww, wh = weights
    rx, ry, rw, rh = _centres(reference)
    tx, ty, tw, th = _centres(target)
    return torch.stack([wx * (tx - rx) / rw, wy * (ty - ry) / rh,
                        ww * torch.log(tw / rw), wh * torch.log(th / rh)], dim=1)


def decode_boxes(reference: Tensor, deltas: Tensor,
                 weights: Sequence[float] = DEFAULT_BOX_WEIGHTS) -> Tensor:
    """The boxes (xyxy) that ``deltas`` describe relative to ``reference`` boxes (see
    :func:`encode_boxes`). ``dw / ww`` and ``dh / wh`` are clamped at ``log(1000/16)`` before the
    exponential. Differentiable in ``deltas``."""
    _check_pairs(reference, deltas)
    wx, wy, ww, wh = weights
    rx, ry, rw, rh = _centres(reference)
    cx = deltas[:, 0] / wx * rw + rx
    cy = deltas[:, 1] / wy * rh + ry
    w = torch.exp((deltas[:, 2] / ww).clamp(max=_MAX_LOG_SCALE)) * rw
    h = torch.exp((deltas[:, 3] / wh).clamp(max=_MAX_LOG_SCALE)) * rh
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=1)


# --- contextual RoIAlign ----------------------------------------------------------------------


def _per_image(name: str, boxes, batch: int) -> list[Tensor]:
    if isinstance(boxes, Tensor):
        raise AuxiliaryError(f"{name} must be a list with one [n, 4] tensor per image, got a tensor")
    boxes = list(boxes)
    if len(boxes) != batch:
        raise AuxiliaryError(f"{name} has {len(boxes)} entries for a batch of {batch} images")
    for i, b in enumerate(boxes):
        _check_boxes(f"{name}[{i}]", b)
    return boxes


def contextual_roi_align(features: Tensor, gt_boxes: Sequence[Tensor], default_boxes: Sequence[Tensor],
                         output_size: int | tuple[int, int] = 7, spatial_scale: float = 1.0,
                         sampling_ratio: int = 2, context: bool = True) -> Tensor:
    """``RoIAlign(F, B) + RoIAlign(F, C)`` for every positive, ``C`` the box enclosing ``A`` and ``B``.

    ``features`` is ``[N, C, H, W]``; ``gt_boxes[i]`` and ``default_boxes[i]`` are the paired boxes
    ``B`` and ``A`` of image ``i`` (row ``j`` of one goes with row ``j`` of the other, both
    ``[P_i, 4]`` xyxy in image pixels); ``spatial_scale`` maps image pixels to feature cells (``1 /
    stride``). Uses ``torchvision.ops.roi_align`` with ``aligned=True``. Returns ``[sum P_i, C, s,
    s]``, images in order. Differentiable in ``features``. ``context=False`` gives ``RoIAlign(F, B)``
    alone (the object's own region, without the enclosing box).
    """
    if features.dim() != 4:
        raise AuxiliaryError(f"features must be [N, C, H, W], got {tuple(features.shape)}")
    batch = features.shape[0]
    b_boxes = _per_image("gt_boxes", gt_boxes, batch)
    a_boxes = _per_image("default_boxes", default_boxes, batch)
    for i, (b, a) in enumerate(zip(b_boxes, a_boxes)):
        if b.shape[0] != a.shape[0]:
            raise AuxiliaryError(f"image {i}: {b.shape[0]} ground-truth boxes for {a.shape[0]} default boxes; "
                                 "pass the matched box B of every positive default box A")
    like = {"device": features.device, "dtype": features.dtype}
    b_boxes = [b.to(**like) for b in b_boxes]
    c_boxes = [enclosing_box(a.to(**like), b) for a, b in zip(a_boxes, b_boxes)]
    pool = {"output_size": output_size, "spatial_scale": spatial_scale, "sampling_ratio": sampling_ratio,
            "aligned": True}
    own = roi_align(features, b_boxes, **pool)
    return own + roi_align(features, c_boxes, **pool) if context else own


# --- the auxiliary network --------------------------------------------------------------------


class AuxiliaryNetwork(nn.Module):
    """The localization-aware auxiliary loss ``L_a = L_ac + m * L_ar`` for one layer's features.

    ``in_channels`` is the channel count of the features it reads, ``num_classes`` the number of
    class logits (labels in ``[0, num_classes)``; positives only, so no background class is needed).
    After the contextual RoIAlign: ``num_convs`` blocks of 3x3 conv - BN - ReLU to ``hidden``
    channels (default ``min(in_channels, 256)``), global average pooling, a linear classifier and a
    linear regressor of four deltas relative to the default box (see :func:`encode_boxes`).
    ``max_positives`` keeps, per image, only that many positives, those of the highest IoU (a fine
    feature map matches hundreds of default boxes to each object). ``context=False`` pools the object's box alone (no enclosing box); with ``m = 0`` as well it is
    a discrimination-only loss on the objects' regions: DCP's auxiliary classifier for a detector.
    """

    def __init__(self, in_channels: int, num_classes: int, m: float = 1.0, hidden: int | None = None,
                 num_convs: int = 1, roi_size: int = 7, sampling_ratio: int = 2, iou_threshold: float = 0.5,
                 reduction: str = "mean", box_weights: Sequence[float] = DEFAULT_BOX_WEIGHTS, context: bool = True,
                 max_positives: int | None = None):
        super().__init__()
        self.context = bool(context)
        if max_positives is not None and max_positives < 1:
            raise AuxiliaryError(f"max_positives must be at least 1 (or None for all), got {max_positives}")
        self.max_positives = max_positives
        if in_channels < 1 or num_classes < 1:
            raise AuxiliaryError(f"in_channels and num_classes must be positive, got {in_channels} and {num_classes}")
        if reduction not in ("mean", "sum"):
            raise AuxiliaryError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if m < 0 or num_convs < 0 or roi_size < 1:
            raise AuxiliaryError(f"m and num_convs must be non-negative and roi_size positive, got m={m}, "
                                 f"num_convs={num_convs}, roi_size={roi_size}")
        if len(box_weights) != 4 or min(box_weights) <= 0:
            raise AuxiliaryError(f"box_weights must be four positive numbers, got {tuple(box_weights)}")
        hidden = min(in_channels, 256) if hidden is None else hidden
        self.in_channels, self.num_classes, self.m = in_channels, num_classes, float(m)
        self.roi_size, self.sampling_ratio, self.iou_threshold = roi_size, sampling_ratio, iou_threshold
        self.reduction, self.box_weights = reduction, tuple(float(w) for w in box_weights)
        layers: list[nn.Module] = []
        width = in_channels
        for _ in range(num_convs):
            layers += [nn.Conv2d(width, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
                       nn.ReLU(inplace=True)]
            width = hidden
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.cls = nn.Linear(width, num_classes)
        self.reg = nn.Linear(width, 4)

    def head(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """Class logits ``[P, num_classes]`` and box deltas ``[P, 4]`` of pooled RoI features."""
        x = self.body(pooled)
        return self.cls(x), self.reg(x)

    def _reduce(self, per_positive: Tensor) -> Tensor:
        return per_positive.mean() if self.reduction == "mean" else per_positive.sum()

    def losses(self, logits: Tensor, deltas: Tensor, labels: Tensor, default_boxes: Tensor,
               gt_boxes: Tensor) -> dict[str, Tensor]:
        """``L_ac``, ``L_ar`` and ``L_a`` of head outputs for ``P >= 1`` positives with their labels,
        default boxes ``A`` and ground-truth boxes ``B`` (all paired row by row)."""
        cls = self._reduce(F.cross_entropy(logits, labels, reduction="none"))
        predicted = decode_boxes(default_boxes.to(deltas.dtype), deltas, self.box_weights)
        reg = self._reduce(1.0 - giou(predicted, gt_boxes.to(deltas.dtype)))
        return {"cls": cls, "reg": reg, "loss": cls + self.m * reg}

    def _zero(self, features: Tensor) -> dict[str, Tensor]:
        zero = features.sum() * 0.0 + sum(p.sum() for p in self.parameters()) * 0.0
        return {"cls": zero, "reg": zero.clone(), "loss": zero.clone(), "positives": 0}

    def forward(self, features: Tensor, gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor],
                default_boxes: Tensor | Sequence[Tensor], spatial_scale: float) -> dict:
        """The auxiliary losses of a batch.

        ``features``: ``[N, C, H, W]``; ``gt_boxes[i]``: ``[G_i, 4]`` xyxy in image pixels and
        ``gt_labels[i]``: ``[G_i]`` of image ``i``; ``default_boxes``: one ``[D, 4]`` tensor for every
        image (e.g. :func:`grid_default_boxes`) or a list with one per image; ``spatial_scale``: feature
        cells per image pixel. Positives are found per image by :func:`match_default_boxes`.

        Returns ``{"cls": L_ac, "reg": L_ar, "loss": L_ac + m * L_ar, "positives": P}``.
        """
        if features.dim() != 4 or features.shape[1] != self.in_channels:
            raise AuxiliaryError(f"features must be [N, {self.in_channels}, H, W], got {tuple(features.shape)}")
        batch = features.shape[0]
        gts = _per_image("gt_boxes", gt_boxes, batch)
        labels = list(gt_labels)
        if len(labels) != batch:
            raise AuxiliaryError(f"gt_labels has {len(labels)} entries for a batch of {batch} images")
        defaults = [default_boxes] * batch if isinstance(default_boxes, Tensor) else \
            _per_image("default_boxes", default_boxes, batch)
        matched_a, matched_b, matched_labels = [], [], []
        for i, (gt, lab, dflt) in enumerate(zip(gts, labels, defaults)):
            lab = torch.as_tensor(lab, device=features.device).long().flatten()
            if lab.shape[0] != gt.shape[0]:
                raise AuxiliaryError(f"image {i}: {gt.shape[0]} boxes but {lab.shape[0]} labels")
            if lab.numel() and (lab.min() < 0 or lab.max() >= self.num_classes):
                raise AuxiliaryError(f"image {i}: labels must be in [0, {self.num_classes}), got "
                                     f"{lab.min().item()}..{lab.max().item()}")
            dflt = dflt.to(features.device)
            gt = gt.to(features.device)
            d_idx, g_idx = match_default_boxes(dflt, gt, self.iou_threshold)
            if self.max_positives is not None and len(d_idx) > self.max_positives:
                # the best-overlapping positives of the image (fine feature maps match hundreds)
                overlap = box_iou_pairs(dflt[d_idx], gt[g_idx])
                best = torch.topk(overlap, self.max_positives).indices.sort().values
                d_idx, g_idx = d_idx[best], g_idx[best]
            matched_a.append(dflt[d_idx])
            matched_b.append(gt[g_idx])
            matched_labels.append(lab[g_idx])
        positives = sum(a.shape[0] for a in matched_a)
        if positives == 0:
            return self._zero(features)
        pooled = contextual_roi_align(features, matched_b, matched_a, self.roi_size, spatial_scale,
                                      self.sampling_ratio, self.context)
        logits, deltas = self.head(pooled)
        out = self.losses(logits, deltas, torch.cat(matched_labels), torch.cat(matched_a), torch.cat(matched_b))
        out["positives"] = positives
        return out


# --- channel scores ---------------------------------------------------------------------------


def channel_scores(weight_grad: Tensor) -> Tensor:
    """``S_k = sum over output channels and kernel positions of (dL/dW[:, k])^2``: the squared
    Frobenius norm of the gradient of the weights that read input channel ``k``, for a weight laid
    out ``(out, in, ...)`` (convolution ``[out, in, kh, kw]``, linear ``[out, in]``). Non-negative;
    one score per input channel."""
    if weight_grad.dim() < 2:
        raise AuxiliaryError(f"a weight gradient of shape {tuple(weight_grad.shape)} has no input-channel "
                             "dimension: pass the gradient of a convolution's or linear layer's weight")
    return weight_grad.detach().pow(2).sum(dim=[d for d in range(weight_grad.dim()) if d != 1])


def select_channels(scores: Tensor, keep: int) -> Tensor:
    """The indices of the ``keep`` largest ``scores``, in ascending order of index (a ``LongTensor``
    of exactly ``keep`` entries). Ties are broken by ``torch.topk``."""
    if scores.dim() != 1:
        raise AuxiliaryError(f"scores must be one-dimensional, got shape {tuple(scores.shape)}")
    n = scores.shape[0]
    try:
        count = operator.index(keep)
    except TypeError:
        count = None
    if count is None or isinstance(keep, bool) or not 1 <= count <= n:
        raise AuxiliaryError(f"keep must be an integer from 1 to the number of channels ({n}), got {keep!r}")
    return torch.topk(scores, count).indices.sort().values.long()
