"""Label smoothing on a detector's classification head: with (on, off) = (1, 0) every detector's
losses equal torchvision's own; with smoothing only the classification loss changes; the sigmoid
heads' targets and SSD's smoothed cross-entropy against the formula; the label_smoothing plugin
reaches the detector in a detection run."""

from __future__ import annotations

import math
import types

import pytest
import torch
from torchvision.models.detection.ssd import SSD

import tricks
from tricks.testing import tiny_run
from tricks_detection import DetectionSettings
from tricks_detection.models import build_detector
from tricks_detection.smoothing import Smoothed, SmoothedSSDLoss, sigmoid_targets
from tricks_label_smoothing import LabelSmoothing, smoothing_values

KINDS = ["fcos", "retinanet", "ssd", "ssdlite", "fasterrcnn"]
IMAGES = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
TARGETS = [{"boxes": torch.tensor([[2.0, 3, 14, 18], [16, 16, 30, 29]]), "labels": torch.tensor([1, 3])},
           {"boxes": torch.tensor([[5.0, 5, 20, 25]]), "labels": torch.tensor([2])}]


def detector(kind: str):
    torch.manual_seed(0)
    ctx = types.SimpleNamespace(num_classes=3, in_chans=1, image_size=32)
    return build_detector(ctx, f"{kind}:resnet8", DetectionSettings(fpn_channels=32)).train()


def losses(model, values) -> dict[str, float]:
    model.set_label_smoothing(values)
    torch.manual_seed(1)  # Faster R-CNN samples proposals: the same draws for every call
    with torch.no_grad():
        return {k: v.item() for k, v in model(IMAGES, TARGETS).items()}


@pytest.mark.parametrize("kind", KINDS)
def test_no_smoothing_through_the_seam_equals_torchvision(kind):
    model = detector(kind)
    stock = losses(model, None)  # torchvision's own loss code
    assert losses(model, lambda k: (1.0, 0.0)) == stock  # ours, with one-hot targets: bit for bit


@pytest.mark.parametrize("kind", KINDS)
def test_smoothing_changes_the_classification_loss_alone(kind):
    model = detector(kind)
    stock = losses(model, None)
    smoothed = losses(model, lambda k: smoothing_values(0.2, k))
    changed = {k for k in stock if smoothed[k] != stock[k]}
    assert changed == ({"loss_classifier"} if kind == "fasterrcnn" else {"classification"}), (stock, smoothed)
    assert all(math.isfinite(v) for v in smoothed.values())


def test_each_head_is_asked_for_its_own_class_count():
    asked = {}
    for kind in KINDS:
        model = detector(kind)
        model.set_label_smoothing(lambda k: asked.setdefault(kind, k) and (0.9, 0.05))
        [head] = [m for m in model.modules() if isinstance(m, Smoothed)]
        assert head.smoothing == (0.9, 0.05)
    # sigmoid heads smooth over the 3 real classes; softmax heads over the background too
    assert asked == {"fcos": 3, "retinanet": 3, "ssd": 4, "ssdlite": 4, "fasterrcnn": 4}


def test_sigmoid_targets():
    logits = torch.zeros(5, 4)  # column 0: background, never a target
    labels = torch.tensor([1, 0, 3, 2, 0])
    fg = torch.tensor([True, False, True, True, False])
    t = sigmoid_targets(logits, labels, fg, 0.8, 0.1)
    assert torch.equal(t[1], torch.zeros(4)) and torch.equal(t[4], torch.zeros(4))
    assert torch.allclose(t[0], torch.tensor([0.0, 0.8, 0.1, 0.1]))
    assert torch.allclose(t[2], torch.tensor([0.0, 0.1, 0.1, 0.8]))
    assert torch.allclose(t[3], torch.tensor([0.0, 0.1, 0.8, 0.1]))


def test_ssd_smoothed_cross_entropy_against_the_formula():
    class Loss(SmoothedSSDLoss, SSD):  # SSD's compute_loss without building a network
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.neg_to_pos_ratio = 1
            self.box_coder = types.SimpleNamespace(encode_single=lambda boxes, anchors: torch.zeros_like(anchors))

    loss = Loss()
    logits = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(3))
    matched = [torch.tensor([0, -1, -1, -1])]  # one positive (label 2); one hard negative is kept
    targets = [{"boxes": torch.tensor([[0.0, 0, 4, 4]]), "labels": torch.tensor([2])}]
    outputs = {"cls_logits": logits, "bbox_regression": torch.zeros(1, 4, 4)}
    anchors = [torch.zeros(4, 4)]
    on, off = 0.8, 0.1
    loss.smoothing = (on, off)
    got = loss.compute_loss(targets, outputs, anchors, matched)["classification"]
    logp = logits[0].log_softmax(-1)
    plain = -logp[torch.arange(4), torch.tensor([2, 0, 0, 0])]
    hardest = 1 + plain[1:].argmax()  # the negative with the largest unsmoothed loss
    def smoothed_ce(row, label):
        target = torch.full((3,), off)
        target[label] = on
        return -(target * logp[row]).sum()
    assert torch.allclose(got, smoothed_ce(0, 2) + smoothed_ce(hardest, 0), atol=1e-6)


def test_the_plugin_reaches_the_detector_in_a_detection_run(tmp_path):
    sets = ["detection.train_images=32", "detection.val_images=8", "detection.canvas=32", "detection.fpn_channels=32",
            "detection.draw=0", "label_smoothing.epsilon=0.2"]
    run = tiny_run(plugins=["detection", "label_smoothing"], set=sets, out=tmp_path / "run", model="ssdlite:resnet8",
                   curves=False, task="detection", dataset="digits_detection", batch_size=16, lr=0.01,
                   train_limit=None, val_limit=None)
    [row] = run.metrics()
    assert math.isfinite(row["train_loss"]) and 0.0 <= row["val_map"] <= 1.0


def test_the_plugin_sets_and_clears_the_heads():
    model = detector("fasterrcnn")
    ctx = types.SimpleNamespace(core=types.SimpleNamespace(task="detection", model="fasterrcnn:resnet8"), num_classes=3,
                                model=model)
    plugin = LabelSmoothing(LabelSmoothing.Settings(epsilon=0.3, form="torch"))
    def call(p):  # the wrapper hook, driven by hand: the loss in force is "LOSS"
        gen = p.build_loss(ctx)
        next(gen)
        try:
            gen.send("LOSS")
        except StopIteration as stop:
            return stop.value
    assert call(plugin) == "LOSS"  # the detector's own loss, unchanged
    assert model.roi_heads.smoothing == pytest.approx(smoothing_values(0.3, 4, "torch"))
    assert call(LabelSmoothing(LabelSmoothing.Settings(epsilon=0.0))) == "LOSS"
    assert model.roi_heads.smoothing is None
    ctx.model = torch.nn.Linear(2, 2)  # a model without the seam
    with pytest.raises(tricks.TricksError, match="set_label_smoothing"):
        call(plugin)
