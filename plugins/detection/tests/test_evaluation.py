"""Tests of the detection evaluation: the COCO ground-truth dict pycocotools reads back, mAP of
perfect, shifted, mislabelled, missing and random predictions (cross-checked with torchmetrics),
the gathering of predictions, and the PNG of drawn boxes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from tricks_detection.evaluation import (
    STAT_NAMES,
    coco_ground_truth,
    draw_detections,
    evaluate_detections,
    gather_predictions,
)

CATEGORIES = ["circle", "square", "triangle"]
SIZE = (360, 480)  # (height, width): a 3 x 4 grid of 120-pixel cells
CELL, ROWS, COLS = 120, 3, 4


def synthetic(seed: int = 0, images: int = 4, per_image: int = 6):
    """Random boxes, small to large (sides 6 to 118 pixels), each in a cell of its own so that no
    two overlap, in a few images; every category occurs."""
    g = torch.Generator().manual_seed(seed)
    boxes, labels = [], []
    for i in range(images):
        cells = torch.randperm(ROWS * COLS, generator=g)[:per_image]
        corner = torch.stack([cells % COLS, cells // COLS], dim=1) * CELL
        wh = 6 + torch.rand(per_image, 2, generator=g) * (CELL - 12)
        xy = corner + 1 + torch.rand(per_image, 2, generator=g) * (CELL - 2 - wh)
        boxes.append(torch.cat([xy, xy + wh], dim=1))
        labels.append((torch.arange(per_image) + i) % len(CATEGORIES))
    ids = [10 + 3 * i for i in range(images)]  # ids need not be 0..N-1
    return boxes, labels, ids


def ground_truth(seed: int = 0, **kwargs) -> tuple[dict, list, list, list]:
    boxes, labels, ids = synthetic(seed, **kwargs)
    return coco_ground_truth(boxes, labels, ids, SIZE, CATEGORIES), boxes, labels, ids


def as_predictions(boxes, labels, ids, scores=None) -> dict[int, dict]:
    return {i: {"boxes": b.clone(), "labels": l.clone(),
                "scores": torch.ones(len(b)) if scores is None else scores[k]}
            for k, (i, b, l) in enumerate(zip(ids, boxes, labels))}


def shifted(boxes, fraction: float):
    """Each box moved right by ``fraction`` of its width."""
    out = []
    for b in boxes:
        b = b.clone()
        dx = (b[:, 2] - b[:, 0]) * fraction
        b[:, 0] += dx
        b[:, 2] += dx
        out.append(b)
    return out


def test_the_ground_truth_round_trips_through_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    gt, boxes, labels, ids = ground_truth()
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    coco = COCO(str(path))
    total = sum(len(b) for b in boxes)
    assert len(coco.getAnnIds()) == total == len(gt["annotations"])
    assert sorted(coco.getImgIds()) == ids
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CATEGORIES
    assert {a["id"] for a in gt["annotations"]} == set(range(1, total + 1))
    for image_id, image_boxes, image_labels in zip(ids, boxes, labels):
        image = coco.loadImgs(image_id)[0]
        assert (image["height"], image["width"]) == SIZE
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64)
        xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        assert torch.allclose(xyxy, image_boxes.double(), atol=1e-4)
        assert [a["category_id"] for a in anns] == (image_labels + 1).tolist()
        for a in anns:
            assert a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3])
            assert a["iscrowd"] == 0


def test_sizes_per_image_file_names_and_bad_labels():
    boxes = [torch.tensor([[1.0, 2.0, 5.0, 9.0]]), torch.zeros(0, 4)]
    labels = [torch.tensor([2]), torch.zeros(0, dtype=torch.int64)]
    gt = coco_ground_truth(boxes, labels, [1, 2], [(10, 20), (30, 40)], CATEGORIES, file_names=["a.png", "b.png"])
    assert gt["images"] == [{"id": 1, "width": 20, "height": 10, "file_name": "a.png"},
                            {"id": 2, "width": 40, "height": 30, "file_name": "b.png"}]
    assert gt["annotations"] == [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1.0, 2.0, 4.0, 7.0],
                                  "area": 28.0, "iscrowd": 0}]
    with pytest.raises(ValueError, match="label 3"):
        coco_ground_truth([boxes[0]], [torch.tensor([3])], [1], (10, 20), CATEGORIES)
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_detections(gt, {7: {"boxes": boxes[0], "scores": torch.ones(1), "labels": labels[0]}})


def test_a_perfect_prediction_scores_one():
    gt, boxes, labels, ids = ground_truth()
    metrics = evaluate_detections(gt, as_predictions(boxes, labels, ids))
    assert set(STAT_NAMES) | {"ap_per_class"} == set(metrics)
    assert metrics["map"] == 1.0
    assert metrics["map_50"] == 1.0
    assert metrics["map_75"] == 1.0
    assert metrics["mar_100"] == 1.0
    assert metrics["ap_per_class"] == {name: 1.0 for name in CATEGORIES}
    assert all(isinstance(metrics[name], float) for name in STAT_NAMES)


def test_shifted_boxes_score_lower_the_further_they_move():
    gt, boxes, labels, ids = ground_truth()
    near = evaluate_detections(gt, as_predictions(shifted(boxes, 0.1), labels, ids))
    far = evaluate_detections(gt, as_predictions(shifted(boxes, 0.3), labels, ids))
    assert near["map"] < 1.0
    assert far["map"] < near["map"]
    for metrics in (near, far):
        assert metrics["map_50"] >= metrics["map_75"]
        assert metrics["map_50"] >= metrics["map"]
    # map is the mean over IoU thresholds .50:.05:.95, so it may exceed map_75 (it does when far)
    assert near["map_75"] >= near["map"]
    # a 10% shift leaves IoU 0.9 / 1.1 = 0.82: every box is found at IoU .50 to .80 (7 of 10 thresholds)
    assert (near["map"], near["map_50"], near["map_75"]) == pytest.approx((0.7, 1.0, 1.0), abs=1e-9)
    # a 30% shift leaves IoU 0.7 / 1.3 = 0.54: found at IoU .50 only
    assert (far["map"], far["map_50"], far["map_75"]) == pytest.approx((0.1, 1.0, 0.0), abs=1e-9)


def test_wrong_labels_score_zero():
    gt, boxes, labels, ids = ground_truth()
    wrong = [(l + 1) % len(CATEGORIES) for l in labels]
    metrics = evaluate_detections(gt, as_predictions(boxes, wrong, ids))
    assert metrics["map"] == 0.0
    assert metrics["map_50"] == 0.0
    assert metrics["ap_per_class"] == {name: 0.0 for name in CATEGORIES}


@pytest.mark.parametrize("predictions", [
    {},
    {10: {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}},
])
def test_no_prediction_scores_zero(predictions):
    gt, *_ = ground_truth()
    metrics = evaluate_detections(gt, predictions)
    assert metrics["map"] == 0.0
    assert metrics["map_50"] == 0.0
    assert metrics["mar_100"] == 0.0
    assert metrics["ap_per_class"] == {name: 0.0 for name in CATEGORIES}


def test_undefined_metrics_are_nan():
    boxes = [torch.tensor([[10.0, 10.0, 150.0, 160.0]])]  # one large box of the first category
    labels = [torch.tensor([0])]
    gt = coco_ground_truth(boxes, labels, [1], SIZE, CATEGORIES)
    metrics = evaluate_detections(gt, as_predictions(boxes, labels, [1]))
    # pycocotools' precision is tp / (tp + fp + eps): one true positive gives 1 - 2e-16
    assert metrics["map"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["map_large"] == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(metrics["map_small"]) and math.isnan(metrics["map_medium"])
    assert metrics["ap_per_class"]["circle"] == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(metrics["ap_per_class"]["square"])


def random_predictions(boxes, labels, ids, seed: int = 2) -> dict[int, dict]:
    """An imperfect detector: most objects found roughly, some missed, a few false alarms."""
    g = torch.Generator().manual_seed(seed)
    predictions = {}
    for image_id, b, l in zip(ids, boxes, labels):
        keep = torch.rand(len(b), generator=g) > 0.2
        found = b[keep] + torch.randn(int(keep.sum()), 4, generator=g) * 4
        wh = 8 + torch.rand(3, 2, generator=g) * 60
        xy = torch.rand(3, 2, generator=g) * 200
        pred_boxes = torch.cat([found, torch.cat([xy, xy + wh], dim=1)])
        pred_boxes = torch.cat([pred_boxes[:, :2], torch.maximum(pred_boxes[:, 2:], pred_boxes[:, :2] + 1)], dim=1)
        pred_labels = torch.cat([l[keep], torch.randint(0, len(CATEGORIES), (3,), generator=g)])
        predictions[image_id] = {"boxes": pred_boxes, "labels": pred_labels,
                                 "scores": torch.rand(len(pred_boxes), generator=g)}
    return predictions


def test_agrees_with_torchmetrics_on_a_random_prediction():
    detection = pytest.importorskip("torchmetrics.detection")
    import numpy as np

    gt, boxes, labels, ids = ground_truth(seed=1, images=5, per_image=9)
    predictions = random_predictions(boxes, labels, ids)
    ours = evaluate_detections(gt, predictions)
    assert 0.1 < ours["map"] < 0.9
    preds = [predictions[i] for i in ids]
    targets = [{"boxes": b, "labels": l} for b, l in zip(boxes, labels)]

    # torchmetrics keeps its default IoU and recall thresholds in float32 (0.55 is 0.5500000119),
    # which moves a recall that lands exactly on a threshold to the next recall point: with
    # pycocotools' own float64 thresholds the two agree to torchmetrics' float32 output.
    metric = detection.MeanAveragePrecision(
        iou_type="bbox", class_metrics=True, backend="pycocotools",
        iou_thresholds=np.linspace(0.5, 0.95, 10).tolist(), rec_thresholds=np.linspace(0.0, 1.0, 101).tolist())
    metric.update(preds, targets)
    theirs = metric.compute()
    for name in STAT_NAMES:
        expected = float(theirs[name])
        if expected < 0:  # torchmetrics keeps pycocotools' -1 for "undefined"
            assert math.isnan(ours[name]), name
        else:
            assert ours[name] == pytest.approx(expected, abs=1e-6), name
    per_class = dict(zip(theirs["classes"].tolist(), theirs["map_per_class"].tolist()))
    for k, name in enumerate(CATEGORIES):
        assert ours["ap_per_class"][name] == pytest.approx(per_class[k], abs=1e-6), name

    default = detection.MeanAveragePrecision(iou_type="bbox")
    default.update(preds, targets)
    theirs = default.compute()
    for name in ("map", "map_50"):
        assert ours[name] == pytest.approx(float(theirs[name]), abs=1e-2), name  # up to 5e-3 seen


def test_the_ground_truth_is_left_as_it_was():
    gt, boxes, labels, ids = ground_truth()
    before = json.dumps(gt, sort_keys=True)
    evaluate_detections(gt, random_predictions(boxes, labels, ids))
    evaluate_detections(gt, {})
    assert json.dumps(gt, sort_keys=True) == before


def test_gather_predictions_without_a_process_group_returns_them_on_the_cpu():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _, boxes, labels, ids = ground_truth()
    predictions = {i: {k: v.to(device) for k, v in p.items()} for i, p in as_predictions(boxes, labels, ids).items()}
    gathered = gather_predictions(predictions)
    assert list(gathered) == ids
    for image_id, prediction in gathered.items():
        for key in ("boxes", "scores", "labels"):
            assert prediction[key].device.type == "cpu"
            assert torch.equal(prediction[key], predictions[image_id][key].cpu())


def test_gather_predictions_merges_every_processs_share(monkeypatch):
    """Two processes simulated: each holds some images; an image both hold (a padded shard)
    keeps the lowest rank's prediction."""
    import torch.distributed as tdist

    _, boxes, labels, ids = ground_truth()
    everything = as_predictions(boxes, labels, ids)
    mine = {ids[0]: everything[ids[0]], ids[1]: everything[ids[1]]}
    other = {ids[2]: everything[ids[2]], ids[3]: everything[ids[3]],
             ids[0]: {k: v + 1 for k, v in everything[ids[0]].items()}}

    def all_gather_object(output, obj):
        output[0], output[1] = obj, other

    monkeypatch.setattr(tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(tdist, "get_world_size", lambda *args, **kwargs: 2)
    monkeypatch.setattr(tdist, "all_gather_object", all_gather_object)
    gathered = gather_predictions(mine)
    assert sorted(gathered) == ids
    for image_id in ids:
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(gathered[image_id][key], everything[image_id][key])


RED, GREEN = (255, 0, 0), (0, 255, 0)


def test_draw_detections_writes_a_png_grid_with_the_boxes(tmp_path):
    n, height, width, scale, nrow, padding = 5, 16, 20, 4, 4, 2
    images = torch.zeros(n, 1, height, width, dtype=torch.uint8)
    none = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    predictions = [dict(none) for _ in range(n)]
    predictions[0] = {"boxes": torch.tensor([[2.0, 3.0, 12.0, 12.0], [1.0, 1.0, 18.0, 14.0]]),
                      "scores": torch.tensor([0.9, 0.2]), "labels": torch.tensor([1, 2])}
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in range(n)]
    targets[1] = {"boxes": torch.tensor([[4.0, 2.0, 15.0, 10.0]]), "labels": torch.tensor([0])}

    path = draw_detections(images, predictions, tmp_path / "plots" / "detections.png", CATEGORIES,
                           targets=targets, score_threshold=0.5, nrow=nrow, scale=scale)
    assert path == tmp_path / "plots" / "detections.png"
    assert [p.name for p in path.parent.iterdir()] == ["detections.png"]  # no temporary file left
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        assert picture.mode == "RGB"
        cell_w, cell_h = width * scale + padding, height * scale + padding
        assert picture.size == (nrow * cell_w + padding, 2 * cell_h + padding)  # 5 images: 2 rows of 4
        rgb = picture.load()

        def at(i, x, y):
            """The pixel at (x, y) of the enlarged image i."""
            return rgb[(i % nrow) * cell_w + padding + x, (i // nrow) * cell_h + padding + y]

        # the confident prediction's bottom edge (y = 12) in the prediction colour
        assert at(0, 7 * scale, 12 * scale) == RED
        # the low-scoring one (bottom edge y = 14) is not drawn
        assert at(0, 16 * scale, 14 * scale) == (0, 0, 0)
        # the ground truth's bottom edge (y = 10) in the ground-truth colour; nothing on image 2
        assert at(1, 10 * scale, 10 * scale) == GREEN
        assert {at(2, x, y) for x in range(0, width * scale, 3) for y in range(0, height * scale, 3)} == {(0, 0, 0)}


def test_draw_detections_keeps_colour_images_and_rejects_bad_input(tmp_path):
    images = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
    images[:, 0] = 200
    predictions = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    path = draw_detections(images, predictions, tmp_path / "colour.png", CATEGORIES, nrow=2, scale=2, padding=0)
    with Image.open(path) as picture:
        assert picture.size == (32, 16)
        assert picture.getpixel((5, 5)) == (200, 100, 100)
    with pytest.raises(ValueError, match="uint8"):
        draw_detections(images.float(), predictions, tmp_path / "bad.png", CATEGORIES)
    with pytest.raises(ValueError, match="predictions"):
        draw_detections(images, predictions[:1], tmp_path / "bad.png", CATEGORIES)
