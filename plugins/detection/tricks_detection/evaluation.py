"""COCO-style evaluation of object detections, and a PNG of predicted boxes.

The metrics come from pycocotools, the COCO reference implementation, so the numbers are the
ones published COCO results use. The conventions throughout:

- boxes are ``xyxy`` float pixel coordinates (torchvision's convention); COCO stores ``xywh``;
- labels are contiguous integers ``0..K-1``; the COCO category id of label ``k`` is ``k + 1``
  (COCO ids start at 1), and category ``k`` is named ``categories[k]``;
- a prediction is a dict ``{"boxes": [n, 4], "scores": [n], "labels": [n]}`` of tensors on any
  device, as torchvision's detection models return them in eval mode.

A metric that pycocotools cannot define (an area range, or a category, with no ground-truth
object: pycocotools reports ``-1``) is returned as ``nan``, so that it cannot be mistaken for a
score or silently averaged in; the project's JSON writers store it as ``null``.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["STAT_NAMES", "coco_ground_truth", "draw_detections", "evaluate_detections", "gather_predictions"]

# The names of COCOeval.stats for bounding boxes, in the order pycocotools computes them.
STAT_NAMES = (
    "map", "map_50", "map_75", "map_small", "map_medium", "map_large",
    "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large",
)


def _xywh(boxes: Tensor) -> list[list[float]]:
    """``xyxy`` boxes as COCO ``[x, y, width, height]`` lists of Python floats."""
    boxes = torch.as_tensor(boxes).detach().to("cpu", torch.float64).reshape(-1, 4)
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
    return xywh.tolist()


def _check_labels(labels: Tensor, num_classes: int, where: str) -> list[int]:
    values = [int(v) for v in torch.as_tensor(labels).detach().cpu().reshape(-1).tolist()]
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"{where}: label {bad[0]} is outside 0..{num_classes - 1} "
                         f"({num_classes} categories)")
    return values


def coco_ground_truth(boxes: Sequence[Tensor], labels: Sequence[Tensor], image_ids: Sequence[int],
                      sizes: Sequence[tuple[int, int]] | tuple[int, int], categories: Sequence[str],
                      *, file_names: Sequence[str] | None = None) -> dict:
    """A COCO ground-truth dict (the layout of a COCO annotation JSON file) for bounding boxes.

    ``boxes[i]`` (float ``[n, 4]`` ``xyxy`` pixels) and ``labels[i]`` (integers ``0..K-1``) are
    the objects of image ``image_ids[i]``. ``sizes`` is each image's ``(height, width)``, or one
    ``(height, width)`` for all. ``categories`` names the labels in order. ``file_names``, when
    given, is stored as each image's ``file_name``.

    Returns ``{"images", "annotations", "categories"}``: annotation ids count from 1, each
    annotation's ``category_id`` is its label + 1, its ``bbox`` is ``[x, y, w, h]``, its
    ``area`` is ``w * h`` (the box area; it decides the small/medium/large range) and its
    ``iscrowd`` is 0. Categories get ids ``1..K``. The dict is plain JSON data.
    """
    n = len(image_ids)
    if len(boxes) != n or len(labels) != n:
        raise ValueError(f"{n} image ids but {len(boxes)} box tensors and {len(labels)} label tensors")
    if len(sizes) == 2 and all(isinstance(s, (int, float)) or (isinstance(s, Tensor) and s.dim() == 0) for s in sizes):
        sizes = [tuple(sizes)] * n  # one (height, width) for every image
    if len(sizes) != n:
        raise ValueError(f"{n} image ids but {len(sizes)} sizes")
    if file_names is not None and len(file_names) != n:
        raise ValueError(f"{n} image ids but {len(file_names)} file names")
    ids = [int(i) for i in image_ids]
    if len(set(ids)) != n:
        raise ValueError("image ids must be unique")

    images, annotations = [], []
    for i, (image_id, image_boxes, image_labels, (height, width)) in enumerate(zip(ids, boxes, labels, sizes)):
        image = {"id": image_id, "width": int(width), "height": int(height)}
        if file_names is not None:
            image["file_name"] = str(file_names[i])
        images.append(image)
        xywh = _xywh(image_boxes)
        values = _check_labels(image_labels, len(categories), f"image {image_id}")
        if len(values) != len(xywh):
            raise ValueError(f"image {image_id}: {len(xywh)} boxes but {len(values)} labels")
        for bbox, label in zip(xywh, values):
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": label + 1,
                "bbox": bbox,
                "area": bbox[2] * bbox[3],
                "iscrowd": 0,
            })
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": str(name)} for k, name in enumerate(categories)],
    }


def _results(predictions: dict[int, dict], num_classes: int) -> list[dict]:
    """Predictions as a COCO result list: one ``{image_id, category_id, bbox, score}`` per box."""
    results = []
    for image_id, prediction in predictions.items():
        image_id = int(image_id)
        xywh = _xywh(prediction["boxes"])
        scores = torch.as_tensor(prediction["scores"]).detach().to("cpu", torch.float64).reshape(-1).tolist()
        values = _check_labels(prediction["labels"], num_classes, f"prediction for image {image_id}")
        if not len(xywh) == len(scores) == len(values):
            raise ValueError(f"prediction for image {image_id}: {len(xywh)} boxes, {len(scores)} scores, "
                             f"{len(values)} labels")
        results.extend({"image_id": image_id, "category_id": label + 1, "bbox": bbox, "score": score}
                       for bbox, score, label in zip(xywh, scores, values))
    return results


def _defined(value: float) -> float:
    """pycocotools' ``-1`` (undefined) as ``nan``; any other value as a Python float."""
    value = float(value)
    return math.nan if value < 0 else value


def evaluate_detections(ground_truth: dict, predictions: dict[int, dict],
                        categories: Sequence[str] | None = None) -> dict[str, Any]:
    """COCO bounding-box metrics of ``predictions`` against ``ground_truth``, by pycocotools.

    ``ground_truth`` is a COCO dict such as :func:`coco_ground_truth` makes; ``predictions`` maps
    an image id to that image's prediction (``boxes`` ``xyxy`` ``[n, 4]``, ``scores`` ``[n]``,
    ``labels`` ``0..K-1`` ``[n]``; tensors on any device). Every ground-truth image is evaluated:
    one without a prediction counts as one where nothing was found. ``categories`` names the
    labels; by default the names in ``ground_truth``.

    Returns floats under :data:`STAT_NAMES` (``map`` is AP averaged over IoU .50:.05:.95,
    ``map_50`` and ``map_75`` at one IoU, ``map_small/medium/large`` by object area, ``mar_1``,
    ``mar_10``, ``mar_100`` the recall with at most that many detections per image), and
    ``ap_per_class``: ``{name: AP@[.5:.95]}`` over all areas with at most 100 detections per
    image. A metric without ground truth to measure against is ``nan`` (pycocotools says -1).
    No prediction at all gives 0.0 for every defined metric.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_categories = sorted(ground_truth.get("categories", []), key=lambda c: c["id"])
    if categories is None:
        categories = [c["name"] for c in gt_categories]
    if [c["id"] for c in gt_categories] != list(range(1, len(categories) + 1)):
        raise ValueError(f"the ground truth's category ids must be 1..{len(categories)} "
                         f"(one per name in categories), got {[c['id'] for c in gt_categories]}")
    known = {int(image["id"]) for image in ground_truth["images"]}
    unknown = sorted({int(i) for i in predictions} - known)
    if unknown:
        raise ValueError(f"predictions for image ids not in the ground truth: {unknown[:10]}")

    results = _results(predictions, len(categories))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        # COCOeval writes flags into the annotations it reads: give it copies, not the caller's
        coco_gt.dataset = {**ground_truth, "annotations": [dict(a) for a in ground_truth.get("annotations", [])]}
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:
            # pycocotools' loadRes cannot take an empty list: an empty result set is the
            # ground truth's images and categories with no annotation.
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(ground_truth["images"]),
                               "categories": list(ground_truth["categories"]), "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    metrics: dict[str, Any] = {name: _defined(value) for name, value in zip(STAT_NAMES, evaluator.stats)}

    # precision: [IoU thresholds, recall points, categories, area ranges, max detections]
    params = evaluator.params
    precision = torch.from_numpy(evaluator.eval["precision"])
    area = params.areaRngLbl.index("all")
    max_dets = params.maxDets.index(100)
    per_class = {}
    for k, category_id in enumerate(params.catIds):
        values = precision[:, :, k, area, max_dets]
        values = values[values > -1]
        per_class[categories[category_id - 1]] = float(values.mean()) if values.numel() else math.nan
    metrics["ap_per_class"] = per_class
    return metrics


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def gather_predictions(predictions: dict[int, dict]) -> dict[int, dict]:
    """Every process's predictions, on every process, with their tensors on the CPU.

    Under torch.distributed with more than one process each process holds the predictions for
    its shard of the images; they are exchanged with ``all_gather_object`` (a collective: every
    process must call this) and merged by image id. An image id predicted by several processes
    (a DistributedSampler pads the last shard by repeating images) keeps the lowest rank's
    prediction. Without a process group the predictions come back as they are, on the CPU.
    """
    local = _to_cpu(dict(predictions))
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() <= 1:
        return local
    gathered: list[dict | None] = [None] * tdist.get_world_size()
    tdist.all_gather_object(gathered, local)
    merged: dict[int, dict] = {}
    for part in gathered:
        for image_id, prediction in (part or {}).items():
            merged.setdefault(image_id, prediction)
    return merged


def _rgb(image: Tensor, scale: int) -> Tensor:
    """A ``[C, H, W]`` uint8 image as RGB, each pixel repeated ``scale`` times both ways."""
    if image.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {image.dtype}")
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"each image must be [C, H, W] with C 1 or 3, got {tuple(image.shape)}")
    image = image.detach().cpu().expand(3, -1, -1)
    return image.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2).contiguous()


def _draw(image: Tensor, boxes: Tensor, texts: list[str] | None, color, scale: int, width: int) -> Tensor:
    from torchvision.utils import draw_bounding_boxes

    boxes = torch.as_tensor(boxes).detach().to("cpu", torch.float32).reshape(-1, 4)
    if boxes.numel() == 0:
        return image
    height, width_px = image.shape[1:]
    boxes = boxes * scale
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width_px - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height - 1)
    # a box whose corners came out of order is drawn as the box they span
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], dim=1)
    options = {}
    if texts and "fill_labels" in _draw_options():
        # text on a patch of the box colour: readable on any image
        options = {"fill_labels": True, "label_colors": "black"}
    return draw_bounding_boxes(image, boxes, labels=texts, colors=color, width=width, **options)


def _draw_options() -> set[str]:
    """The keyword arguments this torchvision's draw_bounding_boxes takes (filled labels came in 0.21)."""
    import inspect

    from torchvision.utils import draw_bounding_boxes

    return set(inspect.signature(draw_bounding_boxes).parameters)


def draw_detections(images: Tensor | Sequence[Tensor], predictions: Sequence[dict], path: str | os.PathLike,
                    categories: Sequence[str], targets: Sequence[dict] | None = None,
                    score_threshold: float = 0.5, nrow: int = 4, scale: int = 4, *,
                    prediction_color: str | tuple[int, int, int] = (255, 0, 0),
                    target_color: str | tuple[int, int, int] = (0, 255, 0),
                    width: int = 2, padding: int = 2) -> Path:
    """Save a PNG grid of ``images`` with their predicted (and ground-truth) boxes; return its path.

    ``images`` is uint8 ``[N, C, H, W]`` (C 1 or 3; any device), ``predictions[i]`` the
    prediction for image ``i`` (``boxes`` ``xyxy`` pixels, ``scores``, ``labels`` ``0..K-1``).
    Each image is enlarged ``scale`` times (nearest neighbour, so pixels stay sharp) and made RGB;
    the predicted boxes scoring at least ``score_threshold`` are drawn in ``prediction_color``
    with the text "name score", and, when ``targets`` (dicts with ``boxes``) are given, the
    ground-truth boxes in ``target_color`` under them, without text (it would cover the
    prediction's). The images are laid out ``nrow`` to a row with ``padding`` pixels between
    them; the file is written atomically (a reader never sees half a PNG).
    """
    from PIL import Image
    from torchvision.utils import make_grid

    from tricks.atomic import write_with

    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    if isinstance(images, Tensor) and images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got {tuple(images.shape)}")
    if len(predictions) != len(images):
        raise ValueError(f"{len(images)} images but {len(predictions)} predictions")
    if targets is not None and len(targets) != len(images):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    if len(images) == 0:
        raise ValueError("no image to draw")

    def name(label: int) -> str:
        return categories[label] if 0 <= label < len(categories) else str(label)

    drawn = []
    for i, image in enumerate(images):
        canvas = _rgb(image, scale)
        if targets is not None:
            canvas = _draw(canvas, targets[i]["boxes"], None, target_color, scale, width)
        prediction = predictions[i]
        scores = torch.as_tensor(prediction["scores"]).detach().cpu().reshape(-1).float()
        keep = scores >= score_threshold
        boxes = torch.as_tensor(prediction["boxes"]).detach().cpu().reshape(-1, 4)[keep]
        labels = torch.as_tensor(prediction["labels"]).detach().cpu().reshape(-1)[keep].tolist()
        texts = [f"{name(int(v))} {s:.2f}" for v, s in zip(labels, scores[keep].tolist())]
        canvas = _draw(canvas, boxes, texts, prediction_color, scale, width)
        drawn.append(canvas)

    grid = make_grid(drawn, nrow=nrow, padding=padding)
    picture = Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy())
    path = Path(path)
    write_with(path, lambda filename: picture.save(filename, format="PNG"))
    return path
