"""Label smoothing on a detector's classification head.

torchvision's detectors compute their losses inside the model, so the ``label_smoothing``
plugin cannot hand them smoothed targets through the batch as it does for a classifier. Every
detector this plugin builds offers ``model.set_label_smoothing(values)`` instead, where
``values(k)`` gives ``(on, off)`` for ``k`` classes (the label_smoothing plugin's
``smoothing_values``); ``None`` turns smoothing off. Each module that computes a classification
loss smooths its own targets:

* the sigmoid heads (FCOS, RetinaNet; sigmoid focal loss per class): a positive anchor of class
  ``y`` gets the target ``on`` in column ``y`` and ``off`` in the other real classes' columns,
  the smoothing of its one-hot row over the ``K`` real classes; a background anchor keeps an
  all-zero row (it has no class to take mass from), and the background column (label 0, never
  a target of a sigmoid head) stays 0;
* the softmax heads (SSD, SSDlite, Faster R-CNN's box head; cross-entropy over ``K + 1`` classes,
  background included): every sampled anchor or proposal, background ones too, gets ``on`` on its
  class and ``off`` on the ``K`` others, as in a classifier (Zhang et al., "Bag of Freebies for
  Training Object Detection Neural Networks", arXiv 1902.04103, smooth the box head of Faster
  R-CNN this way). SSD's hard negatives are still mined by the unsmoothed loss.

With ``(on, off) = (1, 0)`` every loss equals torchvision's own (the tests check it).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetClassificationHead
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.ssd import SSD
from torchvision.ops import sigmoid_focal_loss


class Smoothed:
    """A module that computes a classification loss with smoothed targets: ``smoothing`` is
    ``(on, off)`` or None; ``smoothing_classes`` the class count ``values`` is asked for."""

    smoothing: tuple[float, float] | None = None
    smoothing_classes: int = 0


def sigmoid_targets(logits: Tensor, labels: Tensor, foreground: Tensor, on: float, off: float) -> Tensor:
    """Per-class binary targets of a sigmoid head: ``logits [..., K + 1]`` (column 0 the
    background, never a target), ``labels`` the matched class of each anchor (1..K), ``foreground``
    which anchors have one. A positive row: ``off`` on the real classes, ``on`` at its label."""
    target = torch.zeros_like(logits)
    fg_labels = labels[foreground]
    rows = target[foreground]
    rows[:, 1:] = off
    rows.scatter_(1, fg_labels.unsqueeze(1), on)
    target[foreground] = rows
    return target


def _matched_labels(targets: list[dict], matched_idxs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(labels, foreground)``, stacked over the images: the class of the box each anchor is
    matched to (0 where none) and whether it is matched."""
    labels, fg = [], []
    for target, matched in zip(targets, matched_idxs):
        fore = matched >= 0
        if target["labels"].numel():
            lab = torch.where(fore, target["labels"][matched.clamp(min=0)], 0)
        else:
            lab = torch.zeros_like(matched)
        labels.append(lab)
        fg.append(fore)
    return torch.stack(labels), torch.stack(fg)


class SmoothedFCOSHead(Smoothed, FCOSHead):
    """FCOS's head; its classification loss (sigmoid focal, summed over anchors, over the number
    of positives) takes smoothed targets when ``smoothing`` is set."""

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        losses = super().compute_loss(targets, head_outputs, anchors, matched_idxs)
        if self.smoothing is None:
            return losses
        logits = head_outputs["cls_logits"]
        labels, fg = _matched_labels(targets, matched_idxs)
        goal = sigmoid_targets(logits, labels, fg, *self.smoothing)
        losses["classification"] = sigmoid_focal_loss(logits, goal, reduction="sum") / fg.sum().clamp(min=1)
        return losses


class SmoothedRetinaNetClassificationHead(Smoothed, RetinaNetClassificationHead):
    """RetinaNet's classification head; per image, sigmoid focal loss over the anchors that are
    not between the IoU thresholds, over the image's positives, averaged over the images."""

    def compute_loss(self, targets, head_outputs, matched_idxs):
        if self.smoothing is None:
            return super().compute_loss(targets, head_outputs, matched_idxs)
        logits = head_outputs["cls_logits"]
        labels, fg = _matched_labels(targets, matched_idxs)
        goal = sigmoid_targets(logits, labels, fg, *self.smoothing)
        total = logits.new_zeros(())
        for i, matched in enumerate(matched_idxs):
            valid = matched != self.BETWEEN_THRESHOLDS
            total = total + sigmoid_focal_loss(logits[i][valid], goal[i][valid], reduction="sum") / fg[i].sum().clamp(min=1)
        return total / len(targets)


class SmoothedSSDLoss(Smoothed):
    """SSD's (and SSDlite's) loss with a smoothed cross-entropy: the positives and the hard
    negatives (``neg_to_pos_ratio`` per positive, mined by the unsmoothed loss), over the positives."""

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        losses = super().compute_loss(targets, head_outputs, anchors, matched_idxs)
        if self.smoothing is None:
            return losses
        logits = head_outputs["cls_logits"]
        labels, fg = _matched_labels(targets, matched_idxs)
        classes = logits.shape[-1]
        flat, flat_labels = logits.reshape(-1, classes), labels.reshape(-1)
        plain = F.cross_entropy(flat, flat_labels, reduction="none").view_as(labels)
        # cross-entropy against (on at the label, off elsewhere) is torch's smoothing by off * classes
        smooth = F.cross_entropy(flat, flat_labels, reduction="none",
                                 label_smoothing=self.smoothing[1] * classes).view_as(labels)
        negatives = self.neg_to_pos_ratio * fg.sum(1, keepdim=True)
        ranked = plain.detach().masked_fill(fg, -float("inf")).sort(1, descending=True)[1].sort(1)[1]
        background = ranked < negatives
        losses["classification"] = (smooth[fg].sum() + smooth[background].sum()) / fg.sum().clamp(min=1)
        return losses


class SmoothedRoIHeads(Smoothed, RoIHeads):
    """Faster R-CNN's box head; in training with ``smoothing`` set, the cross-entropy over the
    sampled proposals takes smoothed targets (the box regression loss is torchvision's)."""

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training or self.smoothing is None:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        _, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        classes = class_logits.shape[-1]
        loss_classifier = F.cross_entropy(class_logits, torch.cat(labels), label_smoothing=self.smoothing[1] * classes)
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}


class LabelSmoothingSeam:
    """The detectors' side of the label_smoothing plugin: ``set_label_smoothing(values)``."""

    def set_label_smoothing(self, values: Callable[[int], tuple[float, float]] | None) -> None:
        found = False
        for module in self.modules():
            if isinstance(module, Smoothed):
                module.smoothing = None if values is None else tuple(float(v) for v in values(module.smoothing_classes))
                found = True
        if not found:
            raise RuntimeError(f"{type(self).__name__} has no classification loss that takes smoothed targets")


class FCOSDetector(LabelSmoothingSeam, FCOS):
    pass


class RetinaNetDetector(LabelSmoothingSeam, RetinaNet):
    pass


class SSDDetector(LabelSmoothingSeam, SmoothedSSDLoss, SSD):
    pass


class FasterRCNNDetector(LabelSmoothingSeam, FasterRCNN):
    pass
