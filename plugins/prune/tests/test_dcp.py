"""Tests of discrimination-aware channel pruning's pieces: the reconstruction loss against its
definition, the channel scores against the analytic gradient of a 1x1 convolution, the greedy
selection (exactly K sorted channels, a planted subset recovered, the auxiliary term able to change
the choice, all channels kept reproducing the layer, re-optimization lowering the error), the
auxiliary heads on the CIFAR ResNet (stage outputs captured, the final logits untouched, the model
left as it was), one layer of the ResNet selected end to end, and the bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tricks
from tricks.models import create_model
from tricks_prune.dcp import (AuxHead, attach_aux_heads, channel_scores, forward_with_aux, layer_io,
                              reconstruction_loss, select_channels, stage_aux_loss)

STAGES = ["stages.0", "stages.1", "stages.2"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def conv_layer(c_in: int, c_out: int, k: int = 3, stride: int = 1, seed: int = 0, bias: bool = False) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=bias)


def images(seed: int, b: int, c: int, h: int = 8) -> torch.Tensor:
    return torch.randn(b, c, h, h, generator=gen(seed))


def recon_with(conv: nn.Conv2d, x: torch.Tensor, target: torch.Tensor, idx: list[int], weight: torch.Tensor) -> float:
    """The reconstruction loss of a conv that reads only channels ``idx`` of ``x`` with ``weight``."""
    with torch.no_grad():
        return float(reconstruction_loss(target, conv._conv_forward(x[:, idx], weight, conv.bias)))


def planted(conv: nn.Conv2d, x: torch.Tensor, subset: list[int]) -> torch.Tensor:
    """The layer's output when only the channels in ``subset`` contribute."""
    w = torch.zeros_like(conv.weight)
    w[:, subset] = conv.weight.detach()[:, subset]
    with torch.no_grad():
        return conv._conv_forward(x, w, conv.bias)


# --- loss and scores ------------------------------------------------------------------------


def test_reconstruction_loss_is_half_the_squared_error_per_sample():
    a, b = torch.randn(5, 3, 4, 4, generator=gen(1)), torch.randn(5, 3, 4, 4, generator=gen(2))
    per_sample = [float(((a[i] - b[i]) ** 2).sum()) for i in range(5)]
    assert float(reconstruction_loss(a, b)) == pytest.approx(sum(per_sample) / 5 / 2, rel=1e-6)
    assert float(reconstruction_loss(a, a)) == 0.0


def test_channel_scores_match_the_analytic_gradient_and_are_non_negative():
    conv = conv_layer(6, 4, k=1, seed=3)
    x, target = images(4, 7, 6), images(5, 7, 4)
    w = conv.weight.detach().clone().requires_grad_(True)
    loss = reconstruction_loss(target, F.conv2d(x, w))
    scores = channel_scores(w, loss)
    # 1x1 conv: dL/dW[o, k] = -(1/Q) sum_{n,h,w} (F - W X)[n, o] X[n, k]
    residual = target - F.conv2d(x, conv.weight.detach())
    grad = -torch.einsum("nohw,nkhw->ok", residual, x) / x.shape[0]
    assert scores.shape == (6,)
    assert torch.allclose(scores, grad.pow(2).sum(0), rtol=1e-4, atol=1e-7)
    assert (scores >= 0).all() and (scores > 0).any()


def test_channel_scores_are_non_negative_for_any_loss():
    w = torch.randn(5, 3, 3, 3, generator=gen(6), requires_grad=True)
    loss = (F.conv2d(images(7, 2, 3), w) * images(8, 2, 5, 6)).sum()  # a loss that is negative and linear in w
    scores = channel_scores(w, loss)
    assert float(loss.detach()) != 0 and (scores >= 0).all()


# --- greedy selection -----------------------------------------------------------------------


@pytest.mark.parametrize("keep", [1, 3, 5, 8])
def test_selection_returns_exactly_keep_distinct_sorted_channels(keep):
    conv = conv_layer(8, 6, seed=keep)
    x = images(10 + keep, 6, 8)
    with torch.no_grad():
        target = conv(x)
    idx, w = select_channels(conv, x, target, keep, steps=3)
    assert len(idx) == keep == len(set(idx)) and idx == sorted(idx)
    assert all(isinstance(i, int) and 0 <= i < 8 for i in idx)
    assert w.shape == (6, keep, 3, 3)


def test_all_channels_kept_reproduce_the_layer_exactly():
    conv = conv_layer(5, 4, stride=2, seed=11, bias=True)
    before = conv.weight.detach().clone()
    x = images(12, 4, 5)
    with torch.no_grad():
        target = conv(x)
    idx, w = select_channels(conv, x, target, 5)
    assert idx == list(range(5))
    assert torch.equal(w, before) and torch.equal(conv.weight, before)  # the layer itself is not changed
    assert recon_with(conv, x, target, idx, w) == 0.0
    assert torch.equal(conv._conv_forward(x, w, conv.bias), target)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_selection_recovers_the_channels_the_target_depends_on(seed):
    conv = conv_layer(10, 6, seed=20 + seed)
    x = images(30 + seed, 16, 10)
    subset = sorted(torch.randperm(10, generator=gen(40 + seed))[:4].tolist())
    target = planted(conv, x, subset)
    idx, w = select_channels(conv, x, target, 4)
    assert idx == subset
    assert recon_with(conv, x, target, idx, w) < 1e-3 * float(reconstruction_loss(target, torch.zeros_like(target)))


def test_the_auxiliary_term_can_change_the_choice():
    conv = conv_layer(6, 4, seed=50)
    x = images(51, 16, 6)
    target = planted(conv, x, [0, 1])  # the reconstruction wants channel 0 or 1
    wanted = planted(conv, x, [5]) * 5  # the auxiliary loss wants channel 5

    def aux(out):
        return reconstruction_loss(wanted, out)

    plain, _ = select_channels(conv, x, target, 1, steps=2)
    with_aux, _ = select_channels(conv, x, target, 1, aux_loss=aux, alpha=1.0, steps=2)
    switched_off, _ = select_channels(conv, x, target, 1, aux_loss=aux, alpha=0.0, steps=2)
    assert plain[0] in (0, 1) and switched_off == plain
    assert with_aux == [5]


def test_reoptimization_lowers_the_reconstruction_error_of_the_kept_channels():
    conv = conv_layer(8, 6, seed=60)
    x = images(61, 16, 8)
    x = x + 0.8 * x[:, :1]  # correlated channels: the kept ones can stand in for the removed ones
    with torch.no_grad():
        target = conv(x)
    idx0, w0 = select_channels(conv, x, target, 4, steps=0)
    assert torch.equal(w0, conv.weight.detach()[:, idx0])  # no steps: the baseline weights
    idx, w = select_channels(conv, x, target, 4)
    original = recon_with(conv, x, target, idx, conv.weight.detach()[:, idx])
    assert recon_with(conv, x, target, idx, w) < 0.9 * original


def test_a_given_step_size_too_large_is_halved_instead_of_diverging():
    conv = conv_layer(6, 4, seed=70)
    x = images(71, 8, 6)
    with torch.no_grad():
        target = conv(x) + images(72, 8, 4)
    idx, w = select_channels(conv, x, target, 3, steps=8, lr=1e3)
    assert torch.isfinite(w).all()
    assert recon_with(conv, x, target, idx, w) <= recon_with(conv, x, target, idx, conv.weight.detach()[:, idx])


# --- auxiliary heads on the CIFAR ResNet ----------------------------------------------------


def resnet20(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("resnet20", 10, 3).eval()


def test_aux_heads_capture_each_stage_and_leave_the_model_alone():
    model = resnet20()
    keys = set(model.state_dict())
    heads = attach_aux_heads(model, STAGES)
    assert [h.bn.num_features for h in heads.values()] == [16, 32, 64]
    assert all(h.fc.out_features == 10 for h in heads.values())
    heads.eval()
    x = torch.randn(3, 3, 32, 32, generator=gen(80))
    with torch.no_grad():
        logits, aux = forward_with_aux(model, heads, x)
        plain = model(x)
        feats, h = [], model.stem(x)
        for stage in model.stages:
            h = stage(h)
            feats.append(h)
    assert torch.equal(logits, plain)
    assert list(aux) == STAGES and all(a.shape == (3, 10) for a in aux.values())
    for name, feat, head in zip(STAGES, feats, heads.values(), strict=True):
        assert torch.equal(aux[name], head(feat))
    assert set(model.state_dict()) == keys
    assert not any(m._forward_hooks for m in model.modules())


def test_aux_heads_from_an_example_input_and_with_the_conv_variant():
    model = resnet20()
    heads = attach_aux_heads(model, ["stages.1", "stages.2"], num_classes=7,
                             example_input=torch.zeros(1, 3, 32, 32), conv_width=24)
    sizes = [(h.conv.in_channels, h.fc.in_features, h.fc.out_features) for h in heads.values()]
    assert sizes == [(32, 24, 7), (64, 24, 7)]
    assert AuxHead(16, 10)(torch.randn(2, 16, 5, 5)).shape == (2, 10)


def test_one_resnet_layer_selected_with_its_stage_head_then_the_narrow_model_runs():
    baseline = resnet20(1)
    pruned = copy.deepcopy(baseline)
    heads = attach_aux_heads(pruned, STAGES).eval()
    x = torch.randn(8, 3, 32, 32, generator=gen(90))
    labels = torch.arange(8) % 10
    block = pruned.stages[1][1]
    with torch.no_grad():
        expected = F.cross_entropy(forward_with_aux(pruned, heads, x)[1]["stages.1"], labels)  # eval mode
    pruned.train()  # selection runs in eval mode and leaves the modes and the running statistics alone
    stats = [m.running_mean.clone() for m in pruned.modules() if isinstance(m, nn.BatchNorm2d)]
    inputs, _ = layer_io(pruned, block.conv2, x)
    _, target = layer_io(baseline, baseline.stages[1][1].conv2, x)
    stage_in, _ = layer_io(pruned, pruned.stages[1], x)
    aux = stage_aux_loss(pruned.stages[1], block.conv2, heads["stages_1"], stage_in, labels)
    # the layer's own output in place of itself: the head's loss of a plain forward
    assert float(aux(target).detach()) == pytest.approx(float(expected), rel=1e-5)
    idx, w = select_channels(block.conv2, inputs, target, 16, aux_loss=aux, steps=3)
    assert len(idx) == 16 == len(set(idx)) and w.shape == (32, 16, 3, 3)
    assert all(m.training for m in pruned.modules()) and not any(m._forward_hooks for m in pruned.modules())
    norms = [m for m in pruned.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(m.running_mean, s) for m, s in zip(norms, stats, strict=True))
    pruned.eval()
    # the previous layer keeps the selected output channels; the layer reads them with the new weights
    with torch.no_grad():
        block.conv1.weight = nn.Parameter(block.conv1.weight[idx].clone())
        for name in ("weight", "bias", "running_mean", "running_var"):
            setattr(block.bn1, name, type(getattr(block.bn1, name))(getattr(block.bn1, name)[idx].clone()))
        block.bn1.num_features = block.conv1.out_channels = block.conv2.in_channels = 16
        block.conv2.weight = nn.Parameter(w)
        assert pruned(x).shape == (8, 10)
        _, out = layer_io(pruned, block.conv2, x)
    assert float(reconstruction_loss(target, out)) < float(reconstruction_loss(target, torch.zeros_like(target)))


# --- bad inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("call, fragments", [
    (lambda c, x, t: select_channels(c, x, t, 0), ["keep", "from 1 to 4"]),
    (lambda c, x, t: select_channels(c, x, t, 5), ["keep", "from 1 to 4"]),
    (lambda c, x, t: select_channels(c, x, t, 2.0), ["keep", "whole number"]),
    (lambda c, x, t: select_channels(c, x, t, 2, steps=-1), ["steps"]),
    (lambda c, x, t: select_channels(c, x, t, 2, lr=0.0), ["lr", "positive"]),
    (lambda c, x, t: select_channels(c, x, t, 2, alpha=float("nan")), ["alpha"]),
    (lambda c, x, t: select_channels(c, x[:, :3], t, 2), ["inputs", "(batch, 4"]),
    (lambda c, x, t: select_channels(c, x, t[:, :2], 2), ["target", "baseline"]),
    (lambda c, x, t: select_channels(nn.Conv2d(4, 4, 3, groups=2), x, t, 2), ["grouped", "leave"]),
    (lambda c, x, t: select_channels(nn.Linear(4, 3), x, t, 2), ["nn.Conv2d", "Linear"]),
    (lambda c, x, t: reconstruction_loss(t, t[:1]), ["shape", "same batch"]),
    (lambda c, x, t: channel_scores(c.weight.detach(), t.sum()), ["requires_grad"]),
])
def test_bad_inputs_are_one_line_errors_that_say_the_fix(call, fragments):
    conv = conv_layer(4, 3, seed=99)
    x = images(98, 2, 4)
    with torch.no_grad():
        t = conv(x)
    with pytest.raises(tricks.TricksError) as err:
        call(conv, x, t)
    assert "\n" not in str(err.value) and all(f in str(err.value) for f in fragments)


def test_bad_stage_names_are_one_line_errors():
    model = resnet20()
    for names, fragment in ([["stage.0"]], "no module 'stage.0'"), ([[]], "at least one"):
        with pytest.raises(tricks.TricksError) as err:
            attach_aux_heads(model, *names)
        assert fragment in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(tricks.TricksError, match="not inside the stage"):
        stage_aux_loss(model.stages[0], model.stages[1][0].conv1, AuxHead(16, 10), torch.zeros(1, 16, 8, 8),
                       torch.zeros(1, dtype=torch.long))
    with pytest.raises(tricks.TricksError, match="no nn.Linear"):
        attach_aux_heads(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), ["1"])
