"""Detection data on the device: splits of canvases with padded box tensors, box-aware batch-wise
augmentation (horizontal flip, scale jitter) and the loaders the run trains and evaluates with.

A batch is ``{"input": float [B, C, H, W] (normalized), "target": [{"boxes": float [k, 4],
"labels": int64 [k]}, ...], "image_id": int64 [B]}``: the images plus one dict of targets per
image, the form torchvision's detectors take. Labels in a batch are the data set's class indices
plus one (index 0 is the background of Faster R-CNN and SSD; the sigmoid heads of FCOS and
RetinaNet simply never see it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tricks.data import ShardedBatches

from .mnist_detection import DetectionSet


@dataclass
class DetectionSplit:
    """One split: uint8 images ``[N, C, H, W]``, boxes padded to ``[N, M, 4]`` (xyxy pixels),
    labels padded to ``[N, M]`` with ``-1``, and the COCO image ids ``[N]``."""

    images: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    image_ids: torch.Tensor

    @classmethod
    def from_set(cls, dataset: DetectionSet) -> "DetectionSplit":
        n, most = len(dataset.image_ids), max([len(b) for b in dataset.boxes] + [1])
        boxes = torch.zeros(n, most, 4)
        labels = torch.full((n, most), -1, dtype=torch.int64)
        for i, (b, lab) in enumerate(zip(dataset.boxes, dataset.labels)):
            boxes[i, : len(b)], labels[i, : len(lab)] = b, lab
        return cls(dataset.images, boxes, labels, torch.tensor(dataset.image_ids, dtype=torch.int64))

    def to(self, device) -> "DetectionSplit":
        return DetectionSplit(self.images.to(device), self.boxes.to(device), self.labels.to(device), self.image_ids.to(device))

    def __len__(self) -> int:
        return len(self.image_ids)


@dataclass
class DetectionData:
    """The data of a detection run (what the ``load_data`` hook returns for ``--task detection``)."""

    name: str
    train: DetectionSplit
    val: DetectionSplit
    categories: list[str]
    in_chans: int
    image_size: int
    mean: tuple[float, ...]  # per channel, 0-255 scale
    std: tuple[float, ...]
    flip: bool
    jitter: tuple[float, float]
    ground_truth: dict  # the validation split as a COCO dict, for the evaluation
    notes: list[str] = field(default_factory=list)
    metric: str = "val_map"
    train_sampler: object = None

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def train_size(self) -> int:
        return len(self.train)


def flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Boxes ``[..., 4]`` (xyxy) of an image flipped left-right: ``x1' = W - x2``, ``x2' = W - x1``."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([width - x2, y1, width - x1, y2], dim=-1)


def zoom(images: torch.Tensor, boxes: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each image's content by ``scale[i]`` about the origin and move it by ``shift[i]``
    (pixels, ``[B, 2]`` as x, y), keeping the canvas size: a point at ``p`` moves to
    ``scale * p + shift``. Batch-wise with one ``grid_sample``; uncovered pixels are 0. Returns the
    images and the boxes moved the same way (not clipped)."""
    b, _, h, w = images.shape
    size = torch.tensor([w, h], device=images.device, dtype=images.dtype)
    theta = torch.zeros(b, 2, 3, device=images.device, dtype=images.dtype)
    inv = 1.0 / scale
    theta[:, 0, 0], theta[:, 1, 1] = inv, inv
    # normalized output x_n in [-1, 1] samples the input at (x_n + 1) / s - 2 t / (s W) - 1
    theta[:, :, 2] = inv[:, None] - 2 * shift * inv[:, None] / size - 1
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    moved = boxes * scale[:, None, None] + shift.repeat(1, 2)[:, None, :]
    return out, moved


class DetectionLoader(ShardedBatches):
    """Batches of a split held on the device, each process its shard of every epoch (the core's
    :class:`tricks.data.ShardedBatches`: the training order drawn from ``(seed, epoch)`` alone, the
    validation images once each, in order); training batches are flipped and zoomed batch-wise on
    the device, boxes with them."""

    def __init__(self, split: DetectionSplit, data: DetectionData, batch_size: int, train: bool, seed: int,
                 rank: int = 0, world: int = 1, min_visible: float = 0.5):
        super().__init__(len(split), batch_size, train, seed, rank, world, device=split.images.device, what="images")
        self.split, self.min_visible = split, min_visible
        device = split.images.device
        self.mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(data.std, device=device).view(1, -1, 1, 1)
        self.flip, self.jitter = data.flip and train, tuple(data.jitter) if train else (1.0, 1.0)

    def __iter__(self):
        split = self.split
        for idx in self.index_batches():
            yield self.batch(split.images[idx], split.boxes[idx], split.labels[idx], split.image_ids[idx])

    def batch(self, images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> dict:
        """The batch of these images: augmented when training, normalized, targets per image."""
        x = images.float()
        b, _, h, w = x.shape
        if self.flip:
            flip = torch.rand(b, device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            boxes = torch.where(flip[:, None, None], flip_boxes(boxes, w), boxes)
        lo, hi = self.jitter
        if (lo, hi) != (1.0, 1.0):
            scale = torch.empty(b, device=x.device).uniform_(lo, hi)
            room = torch.tensor([w, h], device=x.device) * (1 - scale[:, None])  # > 0: margin, < 0: overhang
            shift = torch.rand(b, 2, device=x.device) * room
            x, moved = zoom(x, boxes, scale, shift)
            clipped = torch.stack([moved[..., 0].clamp(0, w), moved[..., 1].clamp(0, h),
                                   moved[..., 2].clamp(0, w), moved[..., 3].clamp(0, h)], dim=-1)
            area = lambda t: (t[..., 2] - t[..., 0]).clamp(min=0) * (t[..., 3] - t[..., 1]).clamp(min=0)  # noqa: E731
            # a box mostly pushed off the canvas is dropped; the rest are clipped to it
            keep = (area(clipped) >= self.min_visible * area(moved)) & (area(clipped) > 0)
            labels = torch.where(keep, labels, torch.full_like(labels, -1))
            boxes = clipped
        x = (x - self.mean) * self.inv_std
        valid = (labels >= 0).cpu()  # one copy to the host: how many boxes each image has
        targets = [{"boxes": boxes[j][valid[j]], "labels": labels[j][valid[j]] + 1} for j in range(b)]
        return {"input": x, "target": targets, "image_id": ids}
