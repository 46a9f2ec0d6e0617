"""Object detection as a tricks task: ``tricks run --task detection``.

The plugin brings what differs from classification and nothing else: the data (MNIST-detection
canvases generated from MNIST or the bundled digits, or any COCO JSON set of same-size images),
the loaders (images plus per-image box targets, augmented batch-wise on the device), torchvision's
detectors on the project's backbones (``fcos:resnet20``, ...), the training call (the detector
takes images and targets and returns its losses, summed into the training loss) and the COCO
evaluation (mAP@[.5:.95], mAP@.5, mAP@.75, per-class AP, through pycocotools), plus a PNG of the
predicted boxes on validation images in the run directory.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from pydantic import Field

import tricks
from tricks.errors import TricksError

from . import evaluation
from .data import DetectionData, DetectionLoader, DetectionSplit
from .mnist_detection import EMBEDDED, DetectionSet, coco_dict, generate, read_coco
from .models import DETECTORS, build_detector, parse_name

__version__ = "0.1.0"

DATASETS = ("mnist_detection", "digits_detection", "coco")


class DetectionSettings(tricks.Settings):
    train_images: int = Field(4000, ge=1, description="generated training canvases (mnist_detection, digits_detection)")
    val_images: int = Field(500, ge=1, description="generated validation canvases")
    canvas: int = Field(64, ge=16, description="side of a generated canvas in pixels")
    digits: list[int] = Field([1, 3], min_length=2, max_length=2, description="fewest and most digits on a canvas")
    scale: list[float] | None = Field(None, min_length=2, max_length=2,
                                      description="range of a digit's scale (of its source's pixel size); default "
                                                  "[0.75, 1.5] for MNIST's 28 px digits, [2, 4] for the 8 px bundled digits")
    max_iou: float = Field(0.0, ge=0, le=1, description="largest IoU of two digits' boxes on a canvas (0: no overlap)")
    data_seed: int = Field(0, description="seed of the generated canvases (the same for every run seed)")
    flip: bool | None = Field(None, description="random horizontal flip with the boxes (default: off for digits, "
                                                "which are not mirror-symmetric; on for a COCO set)")
    jitter: list[float] = Field([0.8, 1.2], min_length=2, max_length=2,
                                description="range of the random zoom of a training image (with its boxes), canvas size kept")
    levels: int = Field(2, ge=1, description="backbone stages whose outputs feed the detector (the last ones)")
    fpn_channels: int = Field(64, ge=8, multiple_of=8, description="channels of the feature pyramid (FCOS, RetinaNet, Faster "
                              "R-CNN); a multiple of 8 (FCOS's group norm takes 8 channels a group)")
    head_convs: int = Field(2, ge=1, description="convolutions in each FCOS head branch")
    score_threshold: float = Field(0.05, ge=0, lt=1, description="lowest score of a kept detection")
    detections_per_image: int = Field(100, ge=1, description="most detections kept per image")
    draw: int = Field(16, ge=0, description="validation images drawn with their predicted boxes to detections.png")


class Detection(tricks.Plugin):
    """The detection task: data, loaders, detectors, their losses and COCO mAP."""

    Settings = DetectionSettings
    name = "detection"
    task = "detection"
    tasks = ("detection",)
    example_model = "fcos:resnet8"
    example_core = {"task": "detection", "dataset": "digits_detection"}

    @classmethod
    def example_settings(cls, workdir) -> dict:
        return {"train_images": 64, "val_images": 16, "canvas": 32, "fpn_channels": 32, "draw": 4}

    def __init__(self, settings=None):
        super().__init__(settings)
        self.drawn: tuple | None = None

    def _active(self, ctx) -> bool:
        return ctx.core.task == self.task

    # --- data ---------------------------------------------------------------------------
    @tricks.hookimpl
    def load_data(self, ctx):
        if not self._active(ctx):
            return None
        core, s = ctx.core, self.settings
        if core.dataset not in DATASETS:
            raise TricksError(f"--task detection reads the data sets {', '.join(DATASETS)}, not '{core.dataset}'; "
                              "choose one with --dataset")
        if core.dataset == "coco":
            if not core.data_dir:
                raise TricksError("the coco data set needs --data-dir (a folder with annotations/instances_train.json, "
                                  "instances_val.json and the train/ and val/ images)")
            train, val = read_coco(core.data_dir, "train"), read_coco(core.data_dir, "val")
            flip = True if s.flip is None else s.flip
        else:
            source = EMBEDDED
            if core.dataset == "mnist_detection":
                if not core.data_dir:
                    raise TricksError("the mnist_detection data set needs --data-dir: the folder that holds MNIST/raw/ "
                                      "(torchvision's layout); or use --dataset digits_detection (bundled digits)")
                if not os.path.isdir(os.path.expanduser(core.data_dir)):
                    raise TricksError(f"--data-dir {core.data_dir} is not a folder; point it at the folder that holds MNIST/raw/")
                source = os.path.expanduser(core.data_dir)
            elif core.data_dir:
                raise TricksError("--data-dir is not used by digits_detection (bundled digits); for MNIST use "
                                  "--dataset mnist_detection --data-dir FOLDER")
            scale = s.scale or ([0.75, 1.5] if source != EMBEDDED else [2.0, 4.0])
            args = dict(canvas=s.canvas, digits=tuple(s.digits), scale=tuple(scale), max_iou=s.max_iou, seed=s.data_seed)
            train = generate(source, train=True, count=s.train_images, **args)
            val = generate(source, train=False, count=s.val_images, **args)
            flip = False if s.flip is None else s.flip
        train, val = _limit(train, core.train_limit), _limit(val, core.val_limit)
        if train.images.shape[1:] != val.images.shape[1:]:
            raise TricksError(f"training images are {tuple(train.images.shape[1:])} and validation images "
                              f"{tuple(val.images.shape[1:])}; a detection set needs one size and channel count")
        if core.image_size and core.image_size != train.images.shape[-1]:
            raise TricksError(f"--image-size {core.image_size}: detection trains at the images' own size "
                              f"({train.images.shape[-1]}); leave --image-size out")
        x = train.images.float()
        mean = tuple(x.mean(dim=(0, 2, 3)).tolist())
        std = tuple(max(v, 1e-3) for v in x.std(dim=(0, 2, 3)).tolist())
        size = (val.images.shape[-2], val.images.shape[-1])  # (height, width)
        truth = evaluation.coco_ground_truth(val.boxes, val.labels, val.image_ids, size, val.categories)
        return DetectionData(core.dataset, DetectionSplit.from_set(train), DetectionSplit.from_set(val),
                             list(train.categories), train.images.shape[1], train.images.shape[-1], mean, std,
                             flip and core.augment, tuple(s.jitter) if core.augment else (1.0, 1.0), truth)

    @tricks.hookimpl
    def make_loaders(self, ctx, data):
        if not self._active(ctx):
            return None
        core, world = ctx.core, ctx.world_size
        if core.batch_size % world:
            raise TricksError(f"--batch-size {core.batch_size} does not split over {world} processes; use a multiple of {world}")
        per = core.batch_size // world
        train, val = data.train.to(ctx.device), data.val.to(ctx.device)
        return (DetectionLoader(train, data, per, True, core.seed, ctx.rank, world),
                DetectionLoader(val, data, per, False, core.seed, ctx.rank, world))

    # --- model, training call, loss -------------------------------------------------------
    @tricks.hookimpl
    def build_model(self, ctx):
        name = ctx.core.model
        if parse_name(name) is None:
            if self._active(ctx):
                raise TricksError(f"--task detection needs a detector: --model DETECTOR:BACKBONE with DETECTOR one of "
                                  f"{', '.join(DETECTORS)} (e.g. fcos:resnet20), not '{name}'")
            return None
        if not self._active(ctx):
            raise TricksError(f"model '{name}' is a detector; train it with --task detection")
        return build_detector(ctx, name, self.settings)

    @tricks.hookimpl
    def forward(self, ctx, model, batch):
        if not self._active(ctx):
            return None
        return model(batch["input"], batch["target"])

    @tricks.hookimpl
    def build_loss(self, ctx):
        if not self._active(ctx):
            return None
        return detection_loss

    # --- evaluation -----------------------------------------------------------------------
    @tricks.hookimpl
    def evaluate(self, ctx, model, loader):
        if not self._active(ctx):
            return None
        data, predictions, n = ctx.data, {}, 0
        shown = ([], []) if self.settings.draw else None
        for batch in loader:
            with ctx.autocast():
                outputs = model(batch["input"])
            for image_id, out in zip(batch["image_id"].tolist(), outputs):
                real = out["labels"] > 0  # a sigmoid head's background column (never a target) can still score
                predictions[image_id] = {"boxes": out["boxes"][real].float().cpu(), "scores": out["scores"][real].float().cpu(),
                                         "labels": out["labels"][real].cpu() - 1}
            if shown is not None and len(shown[1]) < self.settings.draw:
                shown[0].append(batch["image_id"].cpu())
                shown[1].extend(predictions[i] for i in batch["image_id"].tolist())
            n += len(outputs)
        everything = evaluation.gather_predictions(predictions)
        figures = evaluation.evaluate_detections(data.ground_truth, everything, data.categories)
        per_class = figures.pop("ap_per_class", {})
        # figures the validation set cannot define (AP of large objects where there are none) are left out
        reduced = {k: float(v) for k, v in figures.items() if not math.isnan(v)}
        reduced.update({f"ap_{name}": float(v) for name, v in per_class.items() if not math.isnan(v)})
        if shown is not None:
            self.drawn = (torch.cat(shown[0])[: self.settings.draw], shown[1][: self.settings.draw])
        return {"n": n, "reduced": reduced}

    @tricks.hookimpl
    def on_fit_end(self, ctx, summary):
        if not self._active(ctx) or not ctx.is_main or self.drawn is None or ctx.run_dir is None:
            return
        ids, predictions = self.drawn
        val = ctx.data.val
        where = {int(i): j for j, i in enumerate(val.image_ids.tolist())}
        rows = [where[int(i)] for i in ids]
        images = val.images[rows].cpu()
        targets = [{"boxes": val.boxes[r][val.labels[r] >= 0].cpu(), "labels": val.labels[r][val.labels[r] >= 0].cpu()}
                   for r in rows]
        path = Path(ctx.run_dir) / "detections.png"
        evaluation.draw_detections(images, predictions, path, ctx.data.categories, targets=targets)
        summary["detections_png"] = str(path)


def detection_loss(output, batch):
    """The training loss of a torchvision detector: the sum of the losses it returns."""
    if not isinstance(output, dict):
        raise TricksError("the detection loss expects the detector's dict of losses; is the model a detector "
                          "(--model fcos:resnet20) trained with --task detection?")
    return sum(v.float() for v in output.values())


def _limit(dataset: DetectionSet, limit: int | None) -> DetectionSet:
    """The first ``limit`` images of a set (``--train-limit``, ``--val-limit``)."""
    if not limit or limit >= len(dataset.image_ids):
        return dataset
    return DetectionSet(dataset.images[:limit], dataset.boxes[:limit], dataset.labels[:limit], dataset.categories,
                        dataset.image_ids[:limit], dataset.file_names[:limit])


__all__ = ["Detection", "DetectionSettings", "detection_loss", "coco_dict", "generate", "read_coco"]
