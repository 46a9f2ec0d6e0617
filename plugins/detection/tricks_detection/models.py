"""torchvision's detectors, untrained, on the project's own backbones.

A model name is ``DETECTOR:BACKBONE``: ``fcos``, ``retinanet``, ``ssd``, ``ssdlite`` or ``fasterrcnn``, on any
backbone with a ``stem`` and ``stages``: the core's CIFAR ResNets ``resnet8``...``resnet110`` and
``resnet18/34/50``, the ``resnet_tweaks`` plugin's ResNet-B/C/D (``resnet50-d``: the core's name and
the variant), the ``regnet`` plugin's zoo (``regnetx_200mf``; a plugin backbone is built with that
plugin's default settings). The detector reads the outputs of the backbone's last ``levels`` stages:
through a feature pyramid (``torchvision.ops.FeaturePyramidNetwork``) for FCOS, RetinaNet (both
with two extra levels, P6 and P7) and Faster R-CNN; directly, plus one extra stride-2 level, for
SSD and SSDlite (SSD with torchvision's SSDlite head: depthwise-separable 3x3 convolutions, two
aspect-ratio pairs per location). Every detector takes label smoothing on its classification head
(:mod:`.smoothing`). The images reach the detector at the data set's size and already normalized: the detectors'
own transform neither resizes nor normalizes them (:class:`KeepSize`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSRegressionHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.ssd import SSDHead
from torchvision.models.detection.ssdlite import SSDLiteHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from tricks.errors import TricksError

from .smoothing import (FasterRCNNDetector, FCOSDetector, RetinaNetDetector, SmoothedFCOSHead, SmoothedRetinaNetClassificationHead,
                        SmoothedRoIHeads, SSDDetector)

DETECTORS = ("fcos", "retinanet", "ssd", "ssdlite", "fasterrcnn")


class KeepSize(GeneralizedRCNNTransform):
    """The detectors' transform without its resize and normalization: the loaders give images
    of the data set's size, normalized; only the batching (padding to a multiple of 32) stays."""

    def normalize(self, image):
        return image

    def resize(self, image, target=None):
        return image, target


class StageFeatures(nn.Module):
    """A classification model's stem and stages, returning the outputs of the last ``levels``
    stages as an ordered dict ``{"0": ..., "1": ...}`` (shallowest first); the pooling and the
    classifier of the model are dropped."""

    def __init__(self, model: nn.Module, levels: int):
        super().__init__()
        stages = getattr(model, "stages", None)
        if getattr(model, "stem", None) is None or not isinstance(stages, nn.Sequential):
            raise TricksError(f"a {type(model).__name__} has no stem and stages to read features from; use a "
                              "backbone that has them (resnet8..110, resnet18/34/50, resnet_tweaks' and regnet's models)")
        if not 1 <= levels <= len(stages):
            raise TricksError(f"detection.levels={levels}, but the backbone has {len(stages)} stages; choose 1 to {len(stages)}")
        self.stem, self.stages = model.stem, stages
        self.first = len(stages) - levels

    def forward(self, x):
        out = OrderedDict()
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= self.first:
                out[str(i - self.first)] = x
        return out


def feature_shapes(features: nn.Module, in_chans: int, size: int) -> list[tuple[int, int]]:
    """``(channels, stride)`` of each level ``features`` returns, from one forward pass."""
    was = features.training
    features.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        out = features(torch.zeros(1, in_chans, size, size))
    features.train(was)
    return [(t.shape[1], size // t.shape[-1]) for t in out.values()]


class WithFPN(nn.Module):
    """Stage features through a feature pyramid; ``out_channels`` as torchvision's detectors want."""

    def __init__(self, body: StageFeatures, in_channels: list[int], out_channels: int, extra: nn.Module | None):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra)
        self.out_channels = out_channels

    def forward(self, x):
        return self.fpn(self.body(x))


class WithExtra(nn.Module):
    """SSD's feature maps: the stage features plus one extra stride-2 level."""

    def __init__(self, body: StageFeatures, last_channels: int):
        super().__init__()
        self.body = body
        self.extra = nn.Sequential(nn.Conv2d(last_channels, last_channels, 3, 2, 1, bias=False),
                                   nn.BatchNorm2d(last_channels), nn.ReLU(inplace=True))

    def forward(self, x):
        out = self.body(x)
        out[str(len(out))] = self.extra(next(reversed(out.values())))
        return out


def parse_name(name: str) -> tuple[str, str] | None:
    """``("fcos", "resnet20")`` for ``fcos:resnet20``; None for a name that is not a detector's."""
    kind, sep, backbone = name.partition(":")
    if not sep or kind not in DETECTORS:
        return None
    return kind, backbone


def build_backbone(ctx, backbone: str) -> nn.Module:
    """The classification model named ``backbone``, from the core or the plugin that builds it."""
    from tricks.models import MODELS, create_model
    from tricks.registry import Catalog

    if backbone in MODELS:
        return create_model(backbone, ctx.num_classes, ctx.in_chans)
    tweak = re.fullmatch(r"(resnet\d+)-([abcd])", backbone)
    if tweak:  # ResNet-B/C/D of the resnet_tweaks plugin: resnet50-d
        info = Catalog().get("resnet_tweaks")
        cls = info.load()
        sub = dataclasses.replace(ctx, core=ctx.core.model_copy(update={"model": tweak[1]}))
        return cls(cls.Settings(variant=tweak[2].upper())).build_model(sub)
    provider = Catalog().model_provider(backbone)
    if provider is None:
        raise TricksError(f"unknown backbone '{backbone}': use one of {', '.join(MODELS)}, a ResNet-B/C/D of the "
                          "resnet_tweaks plugin (resnet50-d, resnet20-c, ...), or a RegNet of the regnet plugin's zoo (regnetx_200mf)")
    info = Catalog().get(provider)
    plugin = info.load()()
    sub = dataclasses.replace(ctx, core=ctx.core.model_copy(update={"model": backbone}))
    model = plugin.build_model(sub)
    if model is None:
        raise TricksError(f"plugin '{provider}' did not build the backbone '{backbone}'")
    return model


def build_detector(ctx, name: str, settings) -> nn.Module:
    """The detector ``DETECTOR:BACKBONE`` for ``ctx.num_classes`` classes (plus background)."""
    kind, backbone = parse_name(name)
    body = StageFeatures(build_backbone(ctx, backbone), settings.levels)
    size, chans = ctx.image_size, ctx.in_chans
    shapes = feature_shapes(body, chans, size)
    strides = [s for _, s in shapes]
    classes = ctx.num_classes + 1  # label 0 is the background
    common = dict(min_size=size, max_size=size, image_mean=[0.0] * chans, image_std=[1.0] * chans,
                  detections_per_img=settings.detections_per_image)
    width = settings.fpn_channels
    if kind in ("fcos", "retinanet"):
        features = WithFPN(body, [c for c, _ in shapes], width, LastLevelP6P7(width, width))
        strides = strides + [strides[-1] * 2, strides[-1] * 4]
        if kind == "fcos":
            anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
            head = SmoothedFCOSHead(width, 1, classes, num_convs=settings.head_convs)
            head.smoothing_classes = classes - 1  # sigmoid: the real classes' columns
            # group norm with 8 channels a group (torchvision's FCOS: 32 groups of 256): at a small
            # width, 32 groups of one channel cannot be normalized on the coarsest (1x1) levels
            norm = functools.partial(nn.GroupNorm, max(1, width // 8))
            head.classification_head = FCOSClassificationHead(width, 1, classes, settings.head_convs, norm_layer=norm)
            head.regression_head = FCOSRegressionHead(width, 1, settings.head_convs, norm_layer=norm)
            model = FCOSDetector(features, classes, anchor_generator=anchors, head=head, score_thresh=settings.score_threshold,
                         topk_candidates=settings.detections_per_image, **common)
        else:
            octave = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
            anchors = AnchorGenerator(tuple(tuple(4 * s * o for o in octave) for s in strides), ((0.5, 1.0, 2.0),) * len(strides))
            head = RetinaNetHead(width, anchors.num_anchors_per_location()[0], classes)
            head.classification_head.__class__ = SmoothedRetinaNetClassificationHead  # the same module, with the seam
            head.classification_head.smoothing_classes = classes - 1
            model = RetinaNetDetector(features, classes, anchor_generator=anchors, head=head, score_thresh=settings.score_threshold,
                              topk_candidates=settings.detections_per_image, **common)
    elif kind == "fasterrcnn":
        features = WithFPN(body, [c for c, _ in shapes], width, LastLevelMaxPool())
        strides = strides + [strides[-1] * 2]
        anchors = AnchorGenerator(tuple((4 * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides))
        names = [str(i) for i in range(len(shapes))]
        pool = MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2)
        hidden = 4 * width
        model = FasterRCNNDetector(features, rpn_anchor_generator=anchors, box_roi_pool=pool,
                           box_head=TwoMLPHead(width * 49, hidden), box_predictor=FastRCNNPredictor(hidden, classes),
                           box_score_thresh=settings.score_threshold,
                           **{("box_detections_per_img" if k == "detections_per_img" else k): v for k, v in common.items()})
        model.roi_heads.__class__ = SmoothedRoIHeads  # the same module, with the seam
        model.roi_heads.smoothing_classes = classes
    else:  # ssd, ssdlite
        features = WithExtra(body, shapes[-1][0])
        channels = [c for c, _ in shapes] + [shapes[-1][0]]
        steps = strides + [strides[-1] * 2]
        levels = len(channels)
        if kind == "ssd":
            boxes = DefaultBoxGenerator([[2]] * levels, min_ratio=0.15, max_ratio=0.9, steps=steps)
            head = SSDHead(channels, boxes.num_anchors_per_location(), classes)
        else:  # torchvision's SSDlite: aspect ratios 2 and 3, batch norm with its momentum and eps
            boxes = DefaultBoxGenerator([[2, 3]] * levels, min_ratio=0.2, max_ratio=0.95, steps=steps)
            norm = functools.partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
            head = SSDLiteHead(channels, boxes.num_anchors_per_location(), classes, norm)
        model = SSDDetector(features, boxes, (size, size), classes, head=head, score_thresh=settings.score_threshold,
                    topk_candidates=settings.detections_per_image,
                    **{k: v for k, v in common.items() if k not in ("min_size", "max_size")})
        model.smoothing_classes = classes  # softmax over the background and the real classes
    # the part channel pruning changes (tricks_prune reads prune_root): the backbone's stem and
    # stages; the feature pyramid and the heads keep their widths, so the stage outputs stay too
    model.prune_root = "backbone.body"
    model.transform = KeepSize(size, size, [0.0] * chans, [1.0] * chans,
                               size_divisible=1 if kind.startswith("ssd") else 32,
                               fixed_size=(size, size) if kind.startswith("ssd") else None)
    return model
