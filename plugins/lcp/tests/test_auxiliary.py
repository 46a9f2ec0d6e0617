"""The LCP auxiliary network: box geometry, matching, contextual RoIAlign, losses, channel scores."""

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import generalized_box_iou, generalized_box_iou_loss, roi_align

from tricks import TricksError
from tricks_lcp.auxiliary import (
    AuxiliaryError, AuxiliaryNetwork, channel_scores, contextual_roi_align, decode_boxes, enclosing_box,
    encode_boxes, giou, grid_default_boxes, match_default_boxes, select_channels,
)


def random_boxes(n: int, generator: torch.Generator, scale: float = 100.0, min_size: float = 1.0) -> torch.Tensor:
    """``n`` xyxy boxes of positive size inside ``[0, 2 * scale]``."""
    xy = torch.rand(n, 2, generator=generator) * scale
    wh = torch.rand(n, 2, generator=generator) * scale + min_size
    return torch.cat([xy, xy + wh], dim=1)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


# --- boxes ------------------------------------------------------------------------------------


def test_enclosing_box_contains_both_and_is_smallest(gen):
    a, b = random_boxes(500, gen), random_boxes(500, gen)
    c = enclosing_box(a, b)
    for box in (a, b):
        assert (c[:, :2] <= box[:, :2]).all() and (c[:, 2:] >= box[:, 2:]).all()
    # smallest: every edge is an edge of one of the two boxes
    for k in range(4):
        assert ((c[:, k] == a[:, k]) | (c[:, k] == b[:, k])).all()


def test_enclosing_box_rejects_unpaired():
    with pytest.raises(AuxiliaryError):
        enclosing_box(torch.zeros(2, 4), torch.zeros(3, 4))


def test_giou_matches_torchvision(gen):
    a, b = random_boxes(300, gen), random_boxes(300, gen)
    ours = giou(a, b)
    assert torch.allclose(ours, generalized_box_iou(a, b).diagonal(), atol=1e-6)
    assert torch.allclose(1 - ours, generalized_box_iou_loss(a, b), atol=1e-6)


def test_giou_identical_is_one_and_range(gen):
    a = random_boxes(100, gen)
    assert torch.allclose(giou(a, a), torch.ones(100), atol=1e-6)
    # far apart pairs push GIoU towards -1 but never reach it
    b = a + 1e4
    values = torch.cat([giou(a, b), giou(a, random_boxes(100, gen))])
    assert (values > -1).all() and (values <= 1 + 1e-6).all()
    assert values.min() < -0.9


def test_giou_of_disjoint_boxes_by_hand():
    # two unit squares two apart: IoU 0, enclosing 3x1, union 2 -> GIoU = -1/3
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    assert torch.allclose(giou(a, b), torch.tensor([-1.0 / 3]), atol=1e-6)


def test_encode_decode_roundtrip_and_torchvision(gen):
    ref, target = random_boxes(50, gen), random_boxes(50, gen)
    deltas = encode_boxes(ref, target)
    assert torch.allclose(decode_boxes(ref, deltas), target, atol=1e-3)
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    assert torch.allclose(deltas, coder.encode_single(target, ref), atol=1e-4)
    assert torch.allclose(decode_boxes(ref, deltas), coder.decode_single(deltas, ref), atol=1e-3)


# --- matching and default boxes ---------------------------------------------------------------


def test_match_threshold_and_each_gt_has_a_positive():
    defaults = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [100, 100, 104, 104]])
    gts = torch.tensor([[0.0, 0, 10, 10], [200, 200, 260, 260], [100, 100, 140, 140]])
    d, g = match_default_boxes(defaults, gts, iou_threshold=0.5)
    # defaults 0 and 1 overlap gt 0 above 0.5; gt 2 overlaps only default 3, at IoU 0.01, and claims
    # it; gt 1 overlaps no default box and has no positive; default 2 overlaps nothing.
    assert list(zip(d.tolist(), g.tolist())) == [(0, 0), (1, 0), (3, 2)]


def test_match_every_overlapping_gt_has_a_positive(gen):
    defaults = grid_default_boxes((8, 8), (64, 64), sizes=(8.0,))
    # shifted copies of six default boxes: IoU 49/79 with their own default box, below the threshold
    gts = defaults[[0, 9, 18, 27, 36, 45]] + 1.0
    d, g = match_default_boxes(defaults, gts, iou_threshold=0.9)
    assert d.tolist() == [0, 9, 18, 27, 36, 45] and g.tolist() == list(range(6))
    d, g = match_default_boxes(defaults, gts, iou_threshold=0.9, ensure_each_gt=False)
    assert d.numel() == 0
    d, g = match_default_boxes(defaults, random_boxes(6, gen, scale=30), iou_threshold=0.1)
    assert len(set(d.tolist())) == len(d)  # each default box at most once
    assert d.tolist() == sorted(d.tolist())


def test_match_without_forcing_and_empty():
    defaults = torch.tensor([[0.0, 0, 10, 10], [100, 100, 104, 104]])
    gts = torch.tensor([[0.0, 0, 10, 10], [100, 100, 140, 140]])
    d, g = match_default_boxes(defaults, gts, ensure_each_gt=False)
    assert d.tolist() == [0] and g.tolist() == [0]
    d, g = match_default_boxes(defaults, torch.zeros(0, 4))
    assert d.numel() == 0 and g.numel() == 0 and d.dtype == torch.long


def test_grid_default_boxes():
    boxes = grid_default_boxes((2, 3), (20, 30), sizes=(4.0, 8.0), aspect_ratios=(1.0, 4.0))
    assert boxes.shape == (2 * 3 * 4, 4)
    first = boxes[:4]
    centres = (first[:, :2] + first[:, 2:]) / 2
    assert torch.allclose(centres, torch.tensor([[5.0, 5.0]]).expand(4, 2))
    wh = first[:, 2:] - first[:, :2]
    assert torch.allclose(wh, torch.tensor([[4.0, 4.0], [8.0, 2.0], [8.0, 8.0], [16.0, 4.0]]))
    last_centre = (boxes[-1, :2] + boxes[-1, 2:]) / 2
    assert torch.allclose(last_centre, torch.tensor([25.0, 15.0]))


# --- contextual RoIAlign ----------------------------------------------------------------------


def test_contextual_roi_align_is_sum_of_two_roi_aligns(gen):
    features = torch.randn(2, 3, 16, 16, generator=gen)
    b = [random_boxes(3, gen, scale=30), random_boxes(2, gen, scale=30)]
    a = [random_boxes(3, gen, scale=30), random_boxes(2, gen, scale=30)]
    out = contextual_roi_align(features, b, a, output_size=5, spatial_scale=0.25)
    assert out.shape == (5, 3, 5, 5)
    c = [enclosing_box(ai, bi) for ai, bi in zip(a, b)]
    kw = {"output_size": 5, "spatial_scale": 0.25, "sampling_ratio": 2, "aligned": True}
    expected = roi_align(features, b, **kw) + roi_align(features, c, **kw)
    assert torch.allclose(out, expected, atol=1e-6)


def test_contextual_feature_sees_outside_b():
    # features non-zero only outside B (a strip to its right) but inside C
    features = torch.zeros(1, 1, 32, 32)
    features[..., 4:12, 14:20] = 1.0
    b = torch.tensor([[4.0, 4.0, 12.0, 12.0]])
    a = torch.tensor([[10.0, 4.0, 20.0, 12.0]])
    kw = {"output_size": 4, "spatial_scale": 1.0, "sampling_ratio": 2, "aligned": True}
    assert roi_align(features, [b], **kw).abs().max() == 0
    out = contextual_roi_align(features, [b], [a], output_size=4, spatial_scale=1.0)
    assert out.abs().max() > 0


def test_contextual_roi_align_rejects_unpaired():
    with pytest.raises(AuxiliaryError):
        contextual_roi_align(torch.zeros(1, 1, 8, 8), [torch.zeros(2, 4)], [torch.zeros(1, 4)])


# --- the auxiliary network --------------------------------------------------------------------


def _batch(gen):
    features = torch.randn(2, 8, 16, 16, generator=gen, requires_grad=True)
    gts = [torch.tensor([[8.0, 8.0, 40.0, 36.0], [30.0, 30.0, 60.0, 62.0]]), torch.tensor([[0.0, 10.0, 20.0, 50.0]])]
    labels = [torch.tensor([0, 2]), torch.tensor([1])]
    defaults = grid_default_boxes((16, 16), (64, 64), sizes=(16.0, 32.0), aspect_ratios=(0.5, 1.0, 2.0))
    return features, gts, labels, defaults


def test_auxiliary_network_losses_and_gradients(gen):
    torch.manual_seed(0)
    net = AuxiliaryNetwork(8, num_classes=3, m=2.0)
    features, gts, labels, defaults = _batch(gen)
    out = net(features, gts, labels, defaults, spatial_scale=0.25)
    assert out["positives"] >= 3
    for key in ("cls", "reg", "loss"):
        assert torch.isfinite(out[key])
    assert torch.allclose(out["loss"], out["cls"] + 2.0 * out["reg"])
    assert 0 <= out["reg"] <= 2
    out["loss"].backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    assert net.reg.weight.grad.abs().sum() > 0 and net.cls.weight.grad.abs().sum() > 0


def test_auxiliary_network_sum_reduction_and_list_of_defaults(gen):
    torch.manual_seed(0)
    features, gts, labels, defaults = _batch(gen)
    mean_net = AuxiliaryNetwork(8, 3).eval()
    sum_net = AuxiliaryNetwork(8, 3, reduction="sum").eval()
    sum_net.load_state_dict(mean_net.state_dict())
    mean = mean_net(features, gts, labels, [defaults, defaults], spatial_scale=0.25)
    total = sum_net(features, gts, labels, defaults, spatial_scale=0.25)
    assert torch.allclose(total["cls"], mean["cls"] * mean["positives"], rtol=1e-5)
    assert torch.allclose(total["reg"], mean["reg"] * mean["positives"], rtol=1e-5)


def test_auxiliary_network_no_positives(gen):
    net = AuxiliaryNetwork(8, num_classes=3)
    features = torch.randn(2, 8, 16, 16, generator=gen, requires_grad=True)
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    no_labels = [torch.zeros(0, dtype=torch.long)] * 2
    defaults = grid_default_boxes((16, 16), (64, 64), sizes=(16.0,))
    out = net(features, empty, no_labels, defaults, spatial_scale=0.25)
    assert out["positives"] == 0
    assert out["loss"].item() == 0 and out["loss"].grad_fn is not None
    out["loss"].backward()
    assert features.grad is not None and features.grad.abs().sum() == 0


def test_image_without_ground_truth_contributes_nothing(gen):
    torch.manual_seed(0)
    net = AuxiliaryNetwork(8, num_classes=3).eval()
    features, gts, labels, defaults = _batch(gen)
    one = net(features[:1], gts[:1], labels[:1], defaults, spatial_scale=0.25)
    both = net(features, [gts[0], torch.zeros(0, 4)], [labels[0], torch.zeros(0, dtype=torch.long)], defaults,
               spatial_scale=0.25)
    assert both["positives"] == one["positives"]
    assert torch.allclose(both["loss"], one["loss"], atol=1e-6)


def test_regression_loss_is_zero_for_exact_prediction():
    torch.manual_seed(0)
    net = AuxiliaryNetwork(4, num_classes=2).eval()
    # one image, one ground truth, one default box that matches it
    gt = torch.tensor([[10.0, 12.0, 30.0, 40.0]])
    default = torch.tensor([[8.0, 8.0, 28.0, 36.0]])
    assert match_default_boxes(default, gt)[0].tolist() == [0]
    with torch.no_grad():  # the regressor outputs the true deltas whatever its input
        net.reg.weight.zero_()
        net.reg.bias.copy_(encode_boxes(default, gt)[0])
    features = torch.randn(1, 4, 16, 16, requires_grad=True)
    out = net(features, [gt], [torch.tensor([1])], default, spatial_scale=0.5)
    assert out["positives"] == 1
    assert out["reg"].abs().item() < 1e-5


def test_losses_directly():
    net = AuxiliaryNetwork(4, num_classes=3, m=0.5)
    defaults = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 25.0, 15.0]])
    gts = torch.tensor([[1.0, 2.0, 11.0, 13.0], [4.0, 6.0, 26.0, 14.0]])
    labels = torch.tensor([2, 0])
    logits = torch.tensor([[0.0, 0.0, 10.0], [10.0, 0.0, 0.0]])
    exact = net.losses(logits, encode_boxes(defaults, gts), labels, defaults, gts)
    assert exact["reg"].abs() < 1e-5
    off = net.losses(logits, torch.zeros(2, 4), labels, defaults, gts)
    expected_reg = (1 - giou(defaults, gts)).mean()
    assert torch.allclose(off["reg"], expected_reg, atol=1e-6)
    assert torch.allclose(off["loss"], off["cls"] + 0.5 * off["reg"])


def test_auxiliary_network_rejects_bad_labels(gen):
    net = AuxiliaryNetwork(8, num_classes=2)
    features, gts, labels, defaults = _batch(gen)
    with pytest.raises(AuxiliaryError):
        net(features, gts, labels, defaults, spatial_scale=0.25)  # label 2 with two classes


# --- channel scores ---------------------------------------------------------------------------


def test_channel_scores_manual(gen):
    grad = torch.randn(5, 4, 3, 3, generator=gen)
    scores = channel_scores(grad)
    manual = torch.tensor([sum(float(grad[o, k, i, j]) ** 2 for o in range(5) for i in range(3) for j in range(3))
                           for k in range(4)])
    assert scores.shape == (4,) and (scores >= 0).all()
    assert torch.allclose(scores, manual, rtol=1e-5)
    assert torch.allclose(channel_scores(grad[:, :, 0, 0]), grad[:, :, 0, 0].pow(2).sum(0))


def test_channel_scores_from_auxiliary_loss(gen):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 8, 3, padding=1)
    net = AuxiliaryNetwork(8, num_classes=3)
    _, gts, labels, defaults = _batch(gen)
    x = torch.randn(2, 6, 16, 16, generator=gen)
    loss = net(conv(x), gts, labels, defaults, spatial_scale=0.25)["loss"]
    (grad,) = torch.autograd.grad(loss, conv.weight)
    scores = channel_scores(grad)
    assert scores.shape == (6,) and (scores >= 0).all() and scores.sum() > 0


def test_select_channels(gen):
    scores = torch.rand(20, generator=gen)
    for k in (1, 7, 20):
        chosen = select_channels(scores, k)
        assert chosen.dtype == torch.long and chosen.numel() == k
        assert chosen.tolist() == sorted(chosen.tolist())
        assert set(chosen.tolist()) == set(scores.argsort(descending=True)[:k].tolist())
    for bad in (0, 21, -1, 2.5, True):
        with pytest.raises(ValueError, match="keep"):
            select_channels(scores, bad)
    with pytest.raises(TricksError):
        select_channels(scores, 0)
