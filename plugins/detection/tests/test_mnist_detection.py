"""Tests of MNIST-detection and its COCO files: determinism, tight boxes around each digit's ink,
the split each digit comes from, the overlap rule and digit counts, the COCO round trip (read
back here and by pycocotools), and the errors of ``read_coco``. Skipped without MNIST."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from tricks.errors import TricksError
from tricks_detection.mnist_detection import (INK_THRESHOLD, DetectionSet, coco_dict, generate, read_coco,
                                              write_coco)

# The checkout sits beside shared/ (shared/data/mnist holds MNIST/raw/ in torchvision's layout).
MNIST = Path(os.environ.get("TRICKS_MNIST") or Path(__file__).resolve().parents[3].parent / "shared" / "data" / "mnist")
needs_mnist = pytest.mark.skipif(not (MNIST / "MNIST" / "raw").is_dir(), reason=f"MNIST not found at {MNIST}")


def mnist_split(train: bool):
    import torchvision

    return torchvision.datasets.MNIST(str(MNIST), train=train, download=False)


@needs_mnist
def test_same_arguments_same_set_another_seed_another():
    a = generate(MNIST, train=True, count=64, seed=3)
    b = generate(MNIST, train=True, count=64, seed=3)
    assert a.images.dtype == torch.uint8 and a.images.shape == (64, 1, 64, 64)
    assert torch.equal(a.images, b.images)
    assert len(a.boxes) == len(b.boxes) == 64
    for key in ("boxes", "labels", "sources"):
        for x, y in zip(getattr(a, key), getattr(b, key)):
            assert torch.equal(x, y)
    assert a.image_ids == b.image_ids and a.file_names == b.file_names
    for other in (generate(MNIST, train=True, count=64, seed=4), generate(MNIST, train=False, count=64, seed=3)):
        assert not torch.equal(a.images, other.images)


@needs_mnist
@pytest.mark.parametrize("threshold", [INK_THRESHOLD, 40])
def test_every_box_is_tight_around_its_digits_ink(threshold):
    d = generate(MNIST, train=True, count=80, seed=1, max_iou=0.3, ink_threshold=threshold, return_masks=True)
    assert d.masks is not None
    for image, boxes, masks in zip(d.images, d.boxes, d.masks):
        assert masks.shape == (len(boxes), 64, 64) and masks.dtype == torch.bool
        # the canvas's ink is exactly the union of the digits' ink: nothing drawn outside the masks
        assert torch.equal(image[0] > 0, masks.any(dim=0))
        for box, mask in zip(boxes, masks):
            x1, y1, x2, y2 = (int(v) for v in box)
            assert torch.equal(box, torch.tensor([x1, y1, x2, y2], dtype=torch.float32))
            inside = torch.zeros_like(mask)
            inside[y1:y2, x1:x2] = True
            assert mask.any() and not (mask & ~inside).any()  # all its ink lies in the box
            # tight: every edge row / column of the box holds ink of this digit
            assert mask[y1, x1:x2].any() and mask[y2 - 1, x1:x2].any()
            assert mask[y1:y2, x1].any() and mask[y1:y2, x2 - 1].any()
            # the pixels of its ink on the canvas are above the threshold
            assert (image[0][mask] > threshold).all()


@needs_mnist
@pytest.mark.parametrize("train", [True, False])
def test_digits_come_from_their_split(train):
    """At scale 1 a digit is pasted unresized: the canvas inside each box equals the MNIST image
    its source names, cropped to its ink, in the split of the set; its label is that image's."""
    split, other = mnist_split(train), mnist_split(not train)
    d = generate(MNIST, train=train, count=300, digits=(1, 1), scale=(1.0, 1.0), seed=7)
    assert d.sources is not None and d.categories == [str(k) for k in range(10)]
    seen = torch.cat(d.sources)
    assert seen.min() >= 0 and seen.max() < len(split.data)
    if train:  # training digits are drawn from all 60,000, well past the test split's 10,000
        assert seen.max() >= len(other.data)
    mismatched = 0
    for image, boxes, labels, sources in zip(d.images, d.boxes, d.labels, d.sources):
        (x1, y1, x2, y2), index = (int(v) for v in boxes[0]), int(sources[0])
        digit = split.data[index]
        rows, cols = (digit > 0).any(dim=1).nonzero()[:, 0], (digit > 0).any(dim=0).nonzero()[:, 0]
        crop = digit[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        assert torch.equal(image[0, y1:y2, x1:x2], crop)
        assert int(labels[0]) == int(split.targets[index])
        # the same index in the other split is (almost always) another image
        if index < len(other.data):
            other_digit = other.data[index]
            mismatched += not torch.equal(other_digit, digit)
    assert mismatched > 0


@needs_mnist
def test_no_overlap_counts_and_inside_the_canvas():
    lo, hi, canvas = 1, 3, 64
    d = generate(MNIST, train=True, count=400, canvas=canvas, digits=(lo, hi), seed=2)
    counts = torch.tensor([len(b) for b in d.boxes])
    # a digit that finds no free place is left out, never the first: 1 <= count <= hi, every count seen
    assert counts.min() >= 1 and counts.max() <= hi
    assert set(counts.tolist()) == {1, 2, 3}
    assert (counts >= lo).all()
    for boxes, labels in zip(d.boxes, d.labels):
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64 and len(labels) == len(boxes)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= canvas).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert labels.min() >= 0 and labels.max() <= 9
        iou = box_iou(boxes, boxes)
        assert torch.equal(iou - torch.diag(iou.diagonal()), torch.zeros_like(iou))
    # on a large canvas every drawn digit finds a place: counts within [lo, hi] even for lo > 1
    wide = generate(MNIST, train=False, count=100, canvas=160, digits=(2, 4), seed=5)
    assert all(2 <= len(b) <= 4 for b in wide.boxes)
    # sizes follow the scale: MNIST ink is at most 28 px, so at most 28 * 1.5 after resizing
    sides = torch.cat([b[:, 2:] - b[:, :2] for b in d.boxes])
    assert sides.max() <= 42 and sides.min() >= 1


@needs_mnist
def test_max_iou_bounds_the_overlap():
    d = generate(MNIST, train=True, count=200, digits=(3, 3), max_iou=0.2, seed=9)
    overlapping = 0
    for boxes in d.boxes:
        iou = box_iou(boxes, boxes).fill_diagonal_(0)
        assert iou.max() <= 0.2 + 1e-6
        overlapping += int((iou > 0).any())
    assert overlapping > 0  # the rule allows overlap, and some canvases use it


@needs_mnist
def test_coco_round_trip_and_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    d = generate(MNIST, train=False, count=25, seed=11)
    path = write_coco(d, tmp_path, "val")
    assert path == tmp_path / "annotations" / "instances_val.json"
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == sorted(d.file_names)
    assert not [p for p in tmp_path.rglob("*.tmp")]
    back = read_coco(tmp_path, "val")
    assert torch.equal(back.images, d.images)
    assert back.categories == d.categories and back.image_ids == d.image_ids and back.file_names == d.file_names
    for a, b, la, lb in zip(d.boxes, back.boxes, d.labels, back.labels):
        assert b.dtype == torch.float32 and torch.allclose(a, b)
        assert torch.equal(la, lb)
    coco = COCO(str(path))
    n_boxes = sum(len(b) for b in d.boxes)
    assert len(coco.getAnnIds()) == n_boxes and len(coco.getImgIds()) == len(d)
    assert sorted(coco.getCatIds()) == list(range(1, 11))
    first = coco.loadAnns(coco.getAnnIds(imgIds=[d.image_ids[0]]))
    x1, y1, x2, y2 = d.boxes[0][0].tolist()
    assert first[0]["bbox"] == [x1, y1, x2 - x1, y2 - y1] and first[0]["area"] == (x2 - x1) * (y2 - y1)
    assert first[0]["category_id"] == int(d.labels[0][0]) + 1 and first[0]["iscrowd"] == 0
    assert json.loads(path.read_text()) == coco_dict(d)


def test_read_coco_rgb_crowds_and_sparse_category_ids(tmp_path):
    """Colour images stay RGB, iscrowd annotations are dropped, and category ids 3 and 7 become
    labels 0 and 1; no MNIST needed."""
    images = torch.randint(0, 256, (2, 3, 10, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    d = DetectionSet(images=images, boxes=[torch.tensor([[1.0, 2.0, 5.0, 9.0]]), torch.zeros(0, 4)],
                     labels=[torch.tensor([1]), torch.zeros(0, dtype=torch.int64)], categories=["a", "b"],
                     image_ids=[5, 9], file_names=["x.png", "y.png"])
    path = write_coco(d, tmp_path, "train")
    coco = json.loads(path.read_text())
    coco["categories"] = [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]
    coco["annotations"] = [{**coco["annotations"][0], "category_id": 7},
                           {"id": 2, "image_id": 9, "category_id": 3, "bbox": [0, 0, 4, 4], "area": 16, "iscrowd": 1}]
    path.write_text(json.dumps(coco))
    back = read_coco(tmp_path, "train")
    assert torch.equal(back.images, images) and back.categories == ["a", "b"]
    assert torch.equal(back.boxes[0], d.boxes[0]) and back.boxes[1].shape == (0, 4)
    assert back.labels[0].tolist() == [1] and back.labels[1].tolist() == []


def test_read_coco_missing_folder_and_mixed_sizes(tmp_path):
    with pytest.raises(TricksError) as error:
        read_coco(tmp_path / "nowhere", "val")
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "nowhere") in message
    # images of two sizes cannot form one tensor: a one-line error naming both files
    from PIL import Image

    d = DetectionSet(images=torch.zeros(2, 1, 8, 8, dtype=torch.uint8), boxes=[torch.zeros(0, 4)] * 2,
                     labels=[torch.zeros(0, dtype=torch.int64)] * 2, categories=["0"], image_ids=[1, 2],
                     file_names=["a.png", "b.png"])
    write_coco(d, tmp_path, "val")
    Image.fromarray(np.zeros((6, 9), dtype=np.uint8)).save(tmp_path / "val" / "b.png")
    with pytest.raises(TricksError) as error:
        read_coco(tmp_path, "val")
    message = str(error.value)
    assert "\n" not in message and "b.png" in message and "a.png" in message and "size" in message
    (tmp_path / "val" / "b.png").unlink()
    with pytest.raises(TricksError, match="b.png") as error:
        read_coco(tmp_path, "val")
    assert "\n" not in str(error.value)
