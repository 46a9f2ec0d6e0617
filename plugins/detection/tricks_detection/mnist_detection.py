"""MNIST-detection: canvases of scattered MNIST digits with one box per digit, and COCO JSON.

``generate`` draws a detection data set from MNIST: each canvas is a black single-channel square
on which a few digits, cropped to their ink, rescaled and placed at random, are composited with
``max()``; each digit gets a tight box around its ink and its digit class as label. Training
canvases use only MNIST's training digits and validation canvases only its test digits, so no
digit is seen in both.

``write_coco`` / ``read_coco`` store a ``DetectionSet`` as PNG images and a COCO ``instances``
JSON file (``coco_dict`` gives the JSON dict without files, for evaluation with pycocotools).

Box convention (throughout): ``(x1, y1, x2, y2)`` in pixels, COCO-style continuous coordinates: a
box covering pixel columns 3..7 inclusive has ``x1 = 3, x2 = 8``; COCO's ``bbox`` is then
``[x1, y1, x2 - x1, y2 - y1]``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tricks.errors import TricksError

__all__ = ["DIGIT_NAMES", "INK_THRESHOLD", "DetectionSet", "coco_dict", "generate", "read_coco", "write_coco"]

#: A pixel of a resized digit (uint8, 0-255) is ink when its value is greater than this. Pixels at
#: or below it are set to 0 before the digit is pasted, so a digit's box encloses exactly the
#: pixels it drew on the canvas. MNIST digits themselves are cropped to their pixels > 0.
INK_THRESHOLD = 0

#: The category names of MNIST-detection: label ``i`` is the digit ``str(i)``.
DIGIT_NAMES = [str(d) for d in range(10)]


@dataclass
class DetectionSet:
    """Images with their boxes and labels, the in-memory form of a detection data set.

    ``images`` is uint8 ``[N, C, H, W]`` (all one size; C = 1 for MNIST); ``boxes[i]`` is float32
    ``[k_i, 4]`` in ``(x1, y1, x2, y2)`` pixels (continuous coordinates, see the module's
    docstring); ``labels[i]`` int64 ``[k_i]`` holds contiguous class indices ``0..K-1`` naming
    ``categories``; ``image_ids`` are the COCO image ids and ``file_names`` the images' file names.

    Optional, filled by ``generate`` only: ``sources[i]`` int64 ``[k_i]``, the index of each box's
    digit in its MNIST split (training split for ``train=True``, test split otherwise), and, with
    ``return_masks=True``, ``masks[i]`` bool ``[k_i, H, W]``, the ink of each digit on its canvas.
    """

    images: torch.Tensor
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    categories: list[str]
    image_ids: list[int]
    file_names: list[str]
    sources: list[torch.Tensor] | None = None
    masks: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])


# --------------------------------------------------------------------------- MNIST


#: ``generate``'s source that needs no files: scikit-learn's bundled 8x8 digits (tricks' default
#: data set, split as ``tricks.data.load_digits_data`` splits it), for tests and first runs.
EMBEDDED = "digits"


@functools.lru_cache(maxsize=4)
def _mnist_split(root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """One split of the digit source (read-only, cached per process): the uint8 images ``[N, h, w]``
    (MNIST's 28x28 from ``root``, or the bundled 8x8 digits when ``root`` is ``EMBEDDED``), their
    int64 labels, the indices of the images that hold any ink, and their ink boxes as rows
    ``(row0, row1, col0, col1)`` (half-open) of pixels > 0."""
    if root == EMBEDDED:
        from tricks.data import load_digits_data

        xt, yt, xv, yv = load_digits_data()
        x, y = (xt, yt) if train else (xv, yv)
        data, targets = torch.from_numpy(np.ascontiguousarray(x[..., 0])), torch.from_numpy(y)
    else:
        import torchvision

        try:
            split = torchvision.datasets.MNIST(root, train=train, download=False)
        except (RuntimeError, OSError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise TricksError(f"cannot read MNIST in {root} ({reason}); point --data-dir at the folder that "
                              "holds MNIST/raw/ with the four decompressed IDX files") from None
        data = split.data.contiguous()
        targets = split.targets.to(torch.int64)
    ink = (data > 0).numpy()
    rows, cols = ink.any(axis=2), ink.any(axis=1)  # [N, h] and [N, w]
    pool = np.flatnonzero(rows.any(axis=1))
    rows, cols = rows[pool], cols[pool]
    r0, c0 = rows.argmax(axis=1), cols.argmax(axis=1)
    r1, c1 = data.shape[1] - rows[:, ::-1].argmax(axis=1), data.shape[2] - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([r0, r1, c0, c1], axis=1).astype(np.int64)
    return data, targets, pool, boxes


def _resize_digit(crop: torch.Tensor, height: int, width: int, threshold: int) -> torch.Tensor:
    """``crop`` (uint8 ``[h, w]``) resized to ``height x width`` (bilinear with antialiasing,
    rounded to uint8), pixels at or below ``threshold`` set to 0, then trimmed to the tight box
    of the remaining ink; an empty ``[0, 0]`` tensor when no ink is left."""
    if crop.shape[0] != height or crop.shape[1] != width:
        resized = F.interpolate(crop[None, None].float(), size=(height, width), mode="bilinear",
                                antialias=True, align_corners=False)[0, 0]
        crop = resized.round_().clamp_(0, 255).to(torch.uint8)
    mask = crop > threshold
    if threshold > 0:
        crop = torch.where(mask, crop, torch.zeros((), dtype=torch.uint8))
    rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
    if rows.numel() == 0:
        return crop[:0, :0]
    return crop[int(rows[0]):int(rows[-1]) + 1, int(cols[0]):int(cols[-1]) + 1]


def _iou_ok(candidates: np.ndarray, placed: np.ndarray, max_iou: float) -> np.ndarray:
    """For each candidate box (rows ``x1, y1, x2, y2``), whether its IoU with every placed box is
    at most ``max_iou``; with ``max_iou = 0`` that is: no shared area (touching edges is fine)."""
    if len(placed) == 0:
        return np.ones(len(candidates), dtype=bool)
    a, b = candidates[:, None, :], placed[None, :, :]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    if max_iou <= 0:
        return (inter == 0).all(axis=1)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return (inter <= max_iou * union).all(axis=1)


def generate(mnist_root, *, train: bool, count: int, canvas: int = 64, digits: tuple[int, int] = (1, 3),
             scale: tuple[float, float] = (0.75, 1.5), max_iou: float = 0.0, seed: int = 0,
             ink_threshold: int = INK_THRESHOLD, attempts: int = 50, return_masks: bool = False) -> DetectionSet:
    """An MNIST-detection set of ``count`` canvases, deterministic from ``(seed, train)``.

    Each canvas is a black uint8 ``canvas x canvas`` image (one channel). The number of digits on
    it is drawn uniformly in ``[digits[0], digits[1]]``; each digit is a random MNIST image of the
    split (training digits when ``train``, test digits otherwise; ``mnist_root`` is MNIST's folder,
    or ``EMBEDDED`` for the bundled 8x8 digits and their validation split), cropped to its ink (pixels > 0),
    resized by a factor drawn uniformly in ``scale`` (relative to MNIST's own pixel size: a digit
    28 px tall becomes ``28 * s`` px, bilinear with antialiasing, rounded to uint8; a digit that
    would not fit the canvas is shrunk until it does), and pasted at a uniformly random position
    fully inside the canvas with ``max()``. Its box is the tight box of the resized digit's pixels
    greater than ``ink_threshold`` (fainter pixels are dropped, so the box holds all its ink); its
    label is the digit's class.

    Overlap: a new digit's box must have IoU ``<= max_iou`` with every box already on the canvas
    (``0.0``: boxes never share area). Up to ``attempts`` random positions are tried; when none
    fits, that digit is left out, so a crowded canvas can hold fewer than ``digits[0]`` digits. The
    first digit always fits, so every canvas holds at least one.

    The same arguments give identical tensors, bit for bit (one ``numpy.random.Generator`` seeded
    from ``(seed, train)`` alone); another seed gives another set. Images are named
    ``000001.png``... with image ids 1..count. ``sources`` holds each box's index in its MNIST
    split; ``return_masks=True`` also fills ``masks`` (each digit's ink on its canvas).
    """
    lo, hi = (int(d) for d in digits)
    s_lo, s_hi = (float(s) for s in scale)
    if count < 0:
        raise TricksError(f"count must be 0 or more, got {count}")
    if canvas < 1:
        raise TricksError(f"canvas must be a positive side in pixels, got {canvas}")
    if not 1 <= lo <= hi:
        raise TricksError(f"digits must be (lo, hi) with 1 <= lo <= hi, got {tuple(digits)}")
    if not 0 < s_lo <= s_hi:
        raise TricksError(f"scale must be (lo, hi) with 0 < lo <= hi, got {tuple(scale)}")
    if not 0.0 <= max_iou <= 1.0:
        raise TricksError(f"max_iou must lie in [0, 1], got {max_iou}")
    if attempts < 1:
        raise TricksError(f"attempts must be 1 or more, got {attempts}")
    if not 0 <= ink_threshold < 255:
        raise TricksError(f"ink_threshold must lie in [0, 254], got {ink_threshold}")

    data, targets, pool, ink_boxes = _mnist_split(str(mnist_root), bool(train))
    rng = np.random.default_rng([int(seed) % (1 << 64), int(bool(train))])
    images = np.zeros((count, canvas, canvas), dtype=np.uint8)
    boxes, labels, sources, masks = [], [], [], []
    for i in range(count):
        wanted = int(rng.integers(lo, hi + 1))
        placed = np.zeros((0, 4), dtype=np.int64)
        source, drawn = [], []
        for _ in range(wanted):
            pick = int(rng.integers(len(pool)))
            s = float(rng.uniform(s_lo, s_hi))
            index = int(pool[pick])
            r0, r1, c0, c1 = (int(v) for v in ink_boxes[pick])
            h0, w0 = r1 - r0, c1 - c0
            s = min(s, canvas / h0, canvas / w0)
            height = min(canvas, max(1, math.floor(h0 * s + 0.5)))
            width = min(canvas, max(1, math.floor(w0 * s + 0.5)))
            digit = _resize_digit(data[index, r0:r1, c0:c1], height, width, ink_threshold)
            bh, bw = digit.shape
            if bh == 0:  # scaled so small that no pixel stays above the threshold
                continue
            tries = 1 if len(placed) == 0 else attempts
            xs = rng.integers(0, canvas - bw + 1, size=tries)
            ys = rng.integers(0, canvas - bh + 1, size=tries)
            candidates = np.stack([xs, ys, xs + bw, ys + bh], axis=1)
            ok = np.flatnonzero(_iou_ok(candidates, placed, max_iou))
            if len(ok) == 0:
                continue
            box = candidates[ok[0]]
            x, y = int(box[0]), int(box[1])
            region = images[i, y:y + bh, x:x + bw]
            np.maximum(region, digit.numpy(), out=region)
            placed = np.concatenate([placed, box[None]], axis=0)
            source.append(index)
            drawn.append(digit)
        if not source:
            raise TricksError(f"canvas {i + 1} got no digit: scale {tuple(scale)} shrinks digits below the ink "
                              f"threshold {ink_threshold}; raise the scale's lower end")
        boxes.append(torch.from_numpy(placed.astype(np.float32)))
        src = torch.tensor(source, dtype=torch.int64)
        sources.append(src)
        labels.append(targets[src].clone())
        if return_masks:
            mask = torch.zeros(len(source), canvas, canvas, dtype=torch.bool)
            for j, (digit, box) in enumerate(zip(drawn, placed)):
                x, y = int(box[0]), int(box[1])
                mask[j, y:y + digit.shape[0], x:x + digit.shape[1]] = digit > ink_threshold
            masks.append(mask)
    ids = list(range(1, count + 1))
    return DetectionSet(images=torch.from_numpy(images).unsqueeze(1), boxes=boxes, labels=labels,
                        categories=list(DIGIT_NAMES), image_ids=ids, file_names=[f"{n:06d}.png" for n in ids],
                        sources=sources, masks=masks if return_masks else None)


# --------------------------------------------------------------------------- COCO


def _check(dataset: DetectionSet) -> None:
    """A one-line TricksError when the set's parts disagree in length or shape."""
    n = len(dataset)
    if dataset.images.ndim != 4 or dataset.images.dtype != torch.uint8:
        raise TricksError(f"images must be uint8 [N, C, H, W], got {dataset.images.dtype} "
                          f"{list(dataset.images.shape)}")
    for name in ("boxes", "labels", "image_ids", "file_names"):
        if len(getattr(dataset, name)) != n:
            raise TricksError(f"the set has {n} images but {len(getattr(dataset, name))} {name}; give one per image")
    if len(set(dataset.image_ids)) != n or len(set(dataset.file_names)) != n:
        raise TricksError("image ids and file names must be unique; renumber the images")


def coco_dict(dataset: DetectionSet) -> dict:
    """The COCO ``instances`` dict of ``dataset`` (no files): ``images`` (id, file_name, width,
    height), ``annotations`` (id from 1, image_id, category_id = label + 1, bbox ``[x, y, w, h]``
    floats, area = w * h, iscrowd 0) and ``categories`` (id = label + 1, name)."""
    _check(dataset)
    height, width = int(dataset.images.shape[2]), int(dataset.images.shape[3])
    images, annotations = [], []
    for image_id, name, boxes, labels in zip(dataset.image_ids, dataset.file_names, dataset.boxes, dataset.labels):
        images.append({"id": int(image_id), "file_name": str(name), "width": width, "height": height})
        for box, label in zip(boxes.tolist(), labels.tolist()):
            x1, y1, x2, y2 = (float(v) for v in box)
            w, h = x2 - x1, y2 - y1
            annotations.append({"id": len(annotations) + 1, "image_id": int(image_id), "category_id": int(label) + 1,
                                "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0})
    categories = [{"id": k + 1, "name": str(name)} for k, name in enumerate(dataset.categories)]
    return {"info": {"description": "tricks detection set"}, "licenses": [], "images": images,
            "annotations": annotations, "categories": categories}


def _write_png(path: Path, image: torch.Tensor) -> None:
    """``image`` (uint8 ``[C, H, W]``, C = 1 or 3) as a PNG at ``path``: written to a temporary
    file in the same folder, then renamed over it, so a reader never sees a torn image."""
    from PIL import Image

    if image.shape[0] == 1:
        picture = Image.fromarray(image[0].numpy())
    elif image.shape[0] == 3:
        picture = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    else:
        raise TricksError(f"cannot write {path}: PNG images need 1 or 3 channels, got {image.shape[0]}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            picture.save(f, format="PNG")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_coco(dataset: DetectionSet, folder, split: str) -> Path:
    """Write ``dataset`` as COCO: the images as PNG at ``folder/<split>/<file_name>`` and the
    annotations at ``folder/annotations/instances_<split>.json`` (see ``coco_dict``). Every file
    is written atomically (temporary file, then rename), the JSON last, so a complete annotation
    file only ever names images already written. Returns the JSON file's path."""
    from tricks.atomic import dumps, write_text

    if not split or "/" in split or "\\" in split or split in (".", ".."):
        raise TricksError(f"split must be a plain folder name such as 'train' or 'val', got {split!r}")
    coco = coco_dict(dataset)
    folder = Path(folder)
    images = folder / split
    try:
        images.mkdir(parents=True, exist_ok=True)
        for image, name in zip(dataset.images, dataset.file_names):
            path = images / name
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_png(path, image)
    except OSError as error:
        raise TricksError(f"cannot write images to {images} ({error.strerror or error}); "
                          "free space or choose another folder") from None
    target = folder / "annotations" / f"instances_{split}.json"
    write_text(target, dumps(coco) + "\n")
    return target


def _load_image(path: Path) -> torch.Tensor:
    """The image at ``path`` as uint8 ``[C, H, W]``: grayscale (with or without alpha, or
    1-bit) as one channel, anything else as RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            mode = "L" if picture.mode in ("1", "L", "LA") else "RGB"
            array = np.asarray(picture.convert(mode))
    except FileNotFoundError:
        raise TricksError(f"image {path} is missing; restore it or remove it from the annotation file") from None
    except (UnidentifiedImageError, OSError) as error:
        raise TricksError(f"cannot read image {path} ({error}); replace the file") from None
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def read_coco(folder, split: str) -> DetectionSet:
    """The set that ``write_coco(dataset, folder, split)`` wrote, or any COCO ``instances`` file
    laid out the same way (``folder/annotations/instances_<split>.json``, images in
    ``folder/<split>/``).

    Images are read with Pillow to uint8 ``[C, H, W]`` (grayscale stays one channel, colour is
    RGB) in the order of the file's ``images``; all must share one size and channel count.
    Categories, sorted by id, become the contiguous labels ``0..K-1``. Boxes become ``(x1, y1,
    x2, y2)``. Annotations with ``iscrowd = 1`` and boxes without area (w or h <= 0) are ignored.
    Problems (a missing file, an unreadable one, mixed sizes) raise a one-line TricksError.
    """
    folder = Path(folder)
    path = folder / "annotations" / f"instances_{split}.json"
    if not path.is_file():
        raise TricksError(f"COCO annotations {path} not found; write a set there first (tricks detection-data --out FOLDER) "
                          f"or point at the folder that holds annotations/instances_{split}.json")
    try:
        coco = json.loads(path.read_text())
        entries, annotations, categories = coco["images"], coco.get("annotations", []), coco["categories"]
    except (ValueError, KeyError, TypeError) as error:
        raise TricksError(f"{path} is not a COCO instances file ({type(error).__name__}: {error}); "
                          "rewrite it with write_coco") from None
    if not entries:
        raise TricksError(f"{path} lists no images; write a set with at least one image")
    categories = sorted(categories, key=lambda c: int(c["id"]))
    label_of = {int(c["id"]): k for k, c in enumerate(categories)}
    per_image: dict[int, tuple[list, list]] = {int(e["id"]): ([], []) for e in entries}
    for a in annotations:
        if a.get("iscrowd", 0):
            continue
        image_id, category = int(a["image_id"]), int(a["category_id"])
        if image_id not in per_image:
            raise TricksError(f"{path}: annotation {a.get('id')} names image {image_id}, which the file does not "
                              "list; fix or remove the annotation")
        if category not in label_of:
            raise TricksError(f"{path}: annotation {a.get('id')} names category {category}, which the file does "
                              "not list; fix or remove the annotation")
        x, y, w, h = (float(v) for v in a["bbox"])
        if w <= 0 or h <= 0:
            continue
        per_image[image_id][0].append([x, y, x + w, y + h])
        per_image[image_id][1].append(label_of[category])

    images = []
    root = folder / split
    if not root.is_dir():
        raise TricksError(f"image folder {root} not found; write the images there (write_coco) or fix the path")
    for e in entries:
        image = _load_image(root / e["file_name"])
        if images and image.shape != images[0].shape:
            raise TricksError(f"{root / e['file_name']} is {_shape(image)} but {root / entries[0]['file_name']} is "
                              f"{_shape(images[0])}; all images of a split must share one size and channel count: "
                              "resize or pad them to one size")
        images.append(image)
    boxes = [torch.tensor(per_image[int(e["id"])][0], dtype=torch.float32).reshape(-1, 4) for e in entries]
    labels = [torch.tensor(per_image[int(e["id"])][1], dtype=torch.int64) for e in entries]
    return DetectionSet(images=torch.stack(images), boxes=boxes, labels=labels,
                        categories=[str(c["name"]) for c in categories], image_ids=[int(e["id"]) for e in entries],
                        file_names=[str(e["file_name"]) for e in entries])


def _shape(image: torch.Tensor) -> str:
    c, h, w = image.shape
    return f"{w}x{h} with {c} channel{'s' if c > 1 else ''}"
