"""Tests of the pruning functions, without a run: the pruned model is the architecture built at
the reduced widths; nothing removed changes nothing; channels that carry nothing are removed
without changing the outputs (so the coupling across residual additions, grouped convolutions and
squeeze-and-excitation is right) in every model family; L1 keeps the largest filters, slimming the
largest gammas, the Taylor scores are the paper's formula; what must stay stays; targets in MACs
and params are met; a change replays to the same model; bad input is a one-line error."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tricks
from tricks.models import BasicBlock, Bottleneck, ResNet, create_model
from tricks_prune import (TaylorImportance, apply_steps, complexity, find_groups, input_step, plan_steps, prune_model,
                          replay, slimming_penalty, stream_layers)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def core(name: str, in_chans: int = 3) -> nn.Module:
    return create_model(name, 10, in_chans)


def x_of(model: nn.Module, size: int = 16, batch: int = 1, in_chans: int = 3) -> torch.Tensor:
    return torch.randn(batch, in_chans, size, size)


def shapes(model: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomize_norms(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial BatchNorm scales, shifts and statistics, as in a trained model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


# --- the pruned model is the architecture built at the reduced widths ------------------------------


@pytest.mark.parametrize("depth, ratio, widths", [(20, 0.5, [8, 16, 32]), (20, 0.25, [12, 24, 48]), (8, 0.75, [4, 8, 16])])
def test_a_pruned_cifar_resnet_is_the_resnet_built_at_the_reduced_widths(depth, ratio, widths):
    # Every group (each block's inner channels, each stage's residual stream with the stem for the
    # first) loses the same fraction: the result is the CIFAR ResNet of the narrower stages.
    model = core(f"resnet{depth}")
    x = x_of(model, 32)
    prune_model(model, x, ratio, scope="layer")
    n = (depth - 2) // 6
    direct = ResNet(BasicBlock, [n, n, n], widths, 10, 3)
    assert shapes(model) == shapes(direct)
    assert count(model) == count(direct)
    assert complexity(model, x) == complexity(direct, x)


def test_a_pruned_bottleneck_resnet_is_the_resnet_built_at_the_reduced_widths():
    model = core("resnet50")
    x = x_of(model, 8)
    prune_model(model, x, 0.5, scope="layer")
    direct = ResNet(Bottleneck, [3, 4, 6, 3], [32, 64, 128, 256], 10, 3, stem_width=32)
    assert shapes(model) == shapes(direct) and count(model) == count(direct)


def test_global_pruning_counts_the_parameters_of_the_kept_widths():
    # Widths differ per group under a global ranking: the count follows from the kept channels.
    model = core("resnet8")
    x = x_of(model, 8)
    change = prune_model(model, x, 0.4)
    kept = {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    stem, s1, s2 = kept["stem.0"], kept["stages.1.0.conv2"], kept["stages.2.0.conv2"]
    i0, i1, i2 = kept["stages.0.0.conv1"], kept["stages.1.0.conv1"], kept["stages.2.0.conv1"]
    expected = (3 * 9 * stem + 2 * stem  # stem conv + BN
                + stem * 9 * i0 + 2 * i0 + i0 * 9 * stem + 2 * stem  # block 0: the stream is the stem's width
                + stem * 9 * i1 + 2 * i1 + i1 * 9 * s1 + 2 * s1 + stem * s1 + 2 * s1  # block 1 + projection
                + s1 * 9 * i2 + 2 * i2 + i2 * 9 * s2 + 2 * s2 + s1 * s2 + 2 * s2
                + s2 * 10 + 10)  # classifier
    assert count(model) == expected
    assert change["channels"][0] == 16 + 16 + 32 + 32 + 64 + 64
    assert change["channels"][0] - change["channels"][1] == round(0.4 * change["channels"][0])


# --- nothing removed, nothing changed -------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: core("resnet20"), lambda: anynet(se=0.25)], ids=["resnet20", "anynet-y"])
def test_ratio_zero_leaves_the_model_and_its_outputs_unchanged(make):
    model = make().eval()
    randomize_norms(model)
    x = x_of(model, 16, batch=4)
    before, state = model(x), copy.deepcopy(model.state_dict())
    change = prune_model(model, x, 0.0)
    assert change["steps"] == [] and change["channels"][0] == change["channels"][1]
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# --- removing channels that carry nothing changes nothing -----------------------------------------


def anynet(se: float = 0.0, groups: int = 4):
    from tricks_regnet import AnyNet, check_arch

    cfg = check_arch({"depths": [1, 2], "widths": [16, 32], "bottlenecks": 1, "groups": groups, "stem_width": 8, "se": se})
    return AnyNet(cfg, 10, 3, "cifar")


def tweaked(depth, variant, shape="cifar"):
    from tricks_resnet_tweaks import create_resnet

    return create_resnet(depth, variant, shape, num_classes=10)


def timm_model(name):
    import timm

    return timm.create_model(name, pretrained=False, num_classes=10)


def silence(model: nn.Module, x: torch.Tensor, steps: list[dict]) -> None:
    """Make the channels ``steps`` would remove carry exactly zero: zero the filters, biases and
    norm scales and shifts that produce them."""
    _, groups = find_groups(model, x)
    by_key = {g.key: g for g in groups}
    with torch.no_grad():
        for step in steps:
            g = by_key[step["layer"]]
            gone = set(step["idxs"])
            for m in g.producers:
                idxs = [i for i, r in zip(m.idxs, m.root_idxs) if r in gone]
                for param in (m.module.weight, getattr(m.module, "bias", None)):
                    if param is not None:
                        param[idxs] = 0


FAMILIES = {
    "resnet20": lambda: core("resnet20"),
    "resnet-20-D": lambda: tweaked(20, "D"),
    "anynet-x (grouped convs)": lambda: anynet(),
    "anynet-y (grouped convs, SE)": lambda: anynet(se=0.25),
}
MORE_FAMILIES = {
    "resnet8": lambda: core("resnet8"),
    "resnet56": lambda: core("resnet56"),
    "resnet18": lambda: core("resnet18"),
    "resnet34": lambda: core("resnet34"),
    "resnet50": lambda: core("resnet50"),
    "resnet-20-B": lambda: tweaked(20, "B"),
    "resnet-20-C": lambda: tweaked(20, "C"),
    "resnet-50-D imagenet": lambda: tweaked(50, "D", "imagenet"),
    "regnet RegNetX-200MF": lambda: zoo("regnetx_200mf"),
    "regnet RegNetY-200MF": lambda: zoo("regnety_200mf"),
    "timm resnet18": lambda: timm_model("resnet18"),
    "timm seresnet18": lambda: timm_model("seresnet18"),
    "timm regnetx_002": lambda: timm_model("regnetx_002"),
    "timm regnety_002": lambda: timm_model("regnety_002"),
    "timm mobilenetv3_small_050 (depthwise)": lambda: timm_model("mobilenetv3_small_050"),
}


def zoo(name):
    from tricks_regnet import create_regnet

    return create_regnet(name, 10, 3, "cifar")


def check_silent_channels_go_without_a_trace(make, size=16):
    model = make().eval()
    randomize_norms(model)
    x = x_of(model, size, batch=2)
    steps, info = plan_steps(model, x, 0.4, criterion="random", generator=torch.Generator().manual_seed(3))
    assert steps and info["channels"][1] < info["channels"][0]
    silence(model, x, steps)
    with torch.no_grad():
        before = model(x)
    fresh = copy.deepcopy(model)
    apply_steps(model, x, steps)
    assert count(model) < count(fresh)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)
    # every grouped convolution kept its groups, with equal widths; a depthwise one stayed depthwise
    for (name, a), (_, b) in zip(fresh.named_modules(), model.named_modules()):
        if isinstance(a, nn.Conv2d) and a.groups == a.in_channels == a.out_channels > 1:
            assert b.groups == b.in_channels == b.out_channels, name
        elif isinstance(a, nn.Conv2d) and a.groups > 1:
            assert b.groups == a.groups, name
            assert b.in_channels % b.groups == 0 and b.out_channels % b.groups == 0, name
    # the steps replay on a fresh model of the architecture to the same shapes
    replay(fresh, x, steps)
    assert shapes(fresh) == shapes(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_channels_that_carry_nothing_leaves_the_outputs_unchanged(family):
    check_silent_channels_go_without_a_trace(FAMILIES[family])


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_removing_channels_that_carry_nothing_leaves_the_outputs_unchanged_in_more_families(family):
    check_silent_channels_go_without_a_trace(MORE_FAMILIES[family], size=32)  # strides of 32: 1x1 at the end


def test_grouped_convolutions_lose_the_same_positions_in_every_group():
    model = anynet(groups=4)  # inner widths 16 and 32, groups of 4 channels: 4 and 8 groups
    x = x_of(model, 8)
    _, groups = find_groups(model, x)
    conv1 = next(g for g in groups if g.key == "stages.1.0.conv1")
    assert conv1.ch_groups == 8 and conv1.units == 4
    change = prune_model(model, x, 0.5, scope="layer")
    step = next(s for s in change["steps"] if s["layer"] == "stages.1.0.conv1")
    positions = {i % 4 for i in step["idxs"]}
    assert len(positions) == 2 and sorted(step["idxs"]) == sorted(p + 4 * g for p in positions for g in range(8))
    conv2 = model.stages[1][0].conv2
    assert (conv2.groups, conv2.in_channels, conv2.out_channels) == (8, 16, 16)  # 8 groups of 2 channels


# --- the criteria ----------------------------------------------------------------------------------


def kept(size: int, change: dict, layer: str) -> torch.Tensor:
    """The channels of the group of ``layer`` that ``change`` kept."""
    gone = set(next((s["idxs"] for s in change["steps"] if s["layer"] == layer), []))
    return torch.tensor([i for i in range(size) if i not in gone])


def test_l1_keeps_the_filters_of_largest_norm_in_each_layer():
    model = core("resnet20")
    x = x_of(model, 8)
    name = "stages.1.2.conv1"  # a block's inner layer: a group of its own
    weight = model.get_submodule(name).weight.detach().clone()
    norms = weight.abs().sum((1, 2, 3))
    change = prune_model(model, x, 0.5, criterion="l1", scope="layer")
    top = norms.topk(16).indices.sort().values
    assert torch.equal(kept(32, change, name), top)
    inputs = kept(32, change, "stages.1.0.conv2")  # its input channels: the stage's residual stream
    torch.testing.assert_close(model.get_submodule(name).weight, weight[top][:, inputs], rtol=0, atol=0)
    # a residual stream is ranked by the L1 norms summed over the convolutions that write to it
    model = core("resnet20")
    names = ("stages.2.0.conv2", "stages.2.0.shortcut.0", "stages.2.1.conv2", "stages.2.2.conv2")
    total = sum(model.get_submodule(n).weight.detach().abs().sum((1, 2, 3)) for n in names)
    change = prune_model(model, x, 0.25, criterion="l1", scope="layer")
    assert torch.equal(kept(64, change, "stages.2.0.conv2"), total.topk(48).indices.sort().values)
    assert model.fc.in_features == 48


def test_slimming_removes_the_channels_of_smallest_gamma_across_layers():
    model = core("resnet8")
    x = x_of(model, 8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
        model.stages[1][0].bn1.weight[:10] = 0.01  # 10 of 32 inner channels of one block are nearly off
    change = prune_model(model, x, 10 / 224, criterion="slimming")
    assert change["steps"] == [{"layer": "stages.1.0.conv1", "idxs": list(range(10))}]
    assert model.stages[1][0].conv1.out_channels == 22
    assert slimming_penalty(model).item() == pytest.approx(sum(m.weight.abs().sum().item() for m in model.modules()
                                                               if isinstance(m, nn.BatchNorm2d)))


def test_random_scores_are_the_seeded_generators():
    x = x_of(None, 8)
    a = prune_model(core("resnet8"), x, 0.5, criterion="random", generator=torch.Generator().manual_seed(1))
    b = prune_model(core("resnet8"), x, 0.5, criterion="random", generator=torch.Generator().manual_seed(1))
    c = prune_model(core("resnet8"), x, 0.5, criterion="random", generator=torch.Generator().manual_seed(2))
    assert a["steps"] == b["steps"] and a["steps"] != c["steps"]


def test_taylor_scores_are_the_square_of_grad_times_weight_summed_over_each_channel_per_batch():
    model = core("resnet8", in_chans=1)
    randomize_norms(model)
    x = x_of(model, 8, in_chans=1)
    batches = [(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))) for _ in range(3)]
    loss_fn = nn.CrossEntropyLoss()
    # the expected scores: per batch, s = sum over the channel's producing parameters of grad * weight
    bn1 = model.stages[1][0].bn1  # the inner channels of one block: produced by conv1 and bn1
    conv1 = model.stages[1][0].conv1
    expected = torch.zeros(32)
    for inputs, targets in batches:
        model.zero_grad()
        loss_fn(model(inputs), targets).backward()
        s = (conv1.weight.grad * conv1.weight).sum((1, 2, 3)) + bn1.weight.grad * bn1.weight + bn1.bias.grad * bn1.bias
        expected += s.detach() ** 2
    expected /= len(batches)
    with TaylorImportance(model, x) as taylor:
        for inputs, targets in batches:
            model.zero_grad()
            loss_fn(model(inputs), targets).backward()
        scores = taylor.scores()
    assert taylor.batches == 3
    torch.testing.assert_close(scores["stages.1.0.conv1"], expected, rtol=1e-4, atol=1e-10)
    assert all(not p._backward_hooks for p in model.parameters()) and not model._forward_pre_hooks  # closed
    # pruning with the scores keeps the channels of largest estimated loss change
    change = prune_model(model, x, 0.5, criterion="taylor", scope="layer", importance=scores)
    step = next(s for s in change["steps"] if s["layer"] == "stages.1.0.conv1")
    assert sorted(step["idxs"]) == sorted(expected.topk(16, largest=False).indices.tolist())


def test_a_batch_with_non_finite_gradients_adds_nothing_to_the_taylor_scores():
    model = core("resnet8", in_chans=1)
    x = x_of(model, 8, in_chans=1)
    with TaylorImportance(model, x) as taylor:
        model(torch.randn(2, 1, 8, 8)).sum().backward()
        first = {k: v.clone() for k, v in taylor.scores().items()}
        (model(torch.randn(2, 1, 8, 8)).sum() * float("inf")).backward()
        second = taylor.scores()
    assert all(torch.isfinite(v).all() for v in second.values())
    assert all(torch.allclose(second[k] * 2, first[k]) for k in first)  # the same total over two batches


# --- what stays -----------------------------------------------------------------------------------


def test_the_classifier_keeps_its_outputs_and_excluded_layers_keep_theirs():
    model = core("resnet20")
    x = x_of(model, 8)
    _, groups = find_groups(model, x, exclude=["stem*"])
    fc = next(g for g in groups if g.key == "fc")
    assert not fc.prunable and "feeds the model's output" in fc.why
    stem = next(g for g in groups if g.key == "stem.0")
    assert not stem.prunable and "excluded" in stem.why
    prune_model(model, x, 0.9, exclude=["stem*"])
    assert model.fc.out_features == 10
    # the stem's channels are the first stage's residual stream: it stays whole
    assert model.stem[0].out_channels == 16 and all(b.conv2.out_channels == 16 for b in model.stages[0])
    assert model.stages[0][0].conv1.out_channels < 16


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_every_layer_keeps_its_minimum(scope):
    model = core("resnet20")
    x = x_of(model, 8)
    prune_model(model, x, 0.99, scope=scope, min_channels=3)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert min(m.out_channels for m in convs) == 3
    model(x)
    model = anynet(groups=4)  # grouped convolutions keep at least one position of each group
    prune_model(model, x, 0.99, scope=scope)
    assert all(m.out_channels >= max(1, m.groups) for m in model.modules() if isinstance(m, nn.Conv2d))
    model(x)


@pytest.mark.parametrize("target", ["macs", "params"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_a_macs_or_params_target_is_met_without_pruning_much_more(target, scope):
    model = core("resnet8")
    x = x_of(model, 8)
    start = complexity(model, x)[target]
    change = prune_model(model, x, 0.5, scope=scope, target=target)
    end = complexity(model, x)[target]
    assert 0.4 <= end / start <= 0.5
    assert change["target"] == target and change["steps"]


# --- replay ---------------------------------------------------------------------------------------


def test_replay_on_a_fresh_model_gives_the_same_shapes_and_with_the_weights_the_same_outputs():
    model = anynet(se=0.25).eval()
    randomize_norms(model)
    x = x_of(model, 16, batch=2)
    change = prune_model(model, x, 0.5, criterion="l1")
    fresh = anynet(se=0.25)
    replay(fresh, x, change)
    assert shapes(fresh) == shapes(model)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    # a change is data: it survives a checkpoint's weights_only load, and replays its steps in order
    import io

    buffer = io.BytesIO()
    torch.save({"change": change}, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=True)["change"]
    other = anynet(se=0.25)
    replay(other, x, again["steps"])
    assert shapes(other) == shapes(model)


def test_two_changes_replay_in_order():
    model, x = core("resnet8"), x_of(None, 8)
    first = prune_model(model, x, 0.3)
    second = prune_model(model, x, 0.3, criterion="random", generator=torch.Generator().manual_seed(0))
    fresh = core("resnet8")
    replay(fresh, x, first)
    replay(fresh, x, second)
    assert shapes(fresh) == shapes(model)


def test_a_step_can_name_the_inputs_of_a_layer_to_remove():
    # What a criterion that selects a layer's inputs (DCP) needs: the inputs of stages.1.0.conv2 are
    # the outputs of stages.1.0.conv1; those of stages.2.0.conv1 the stage-1 residual stream.
    model = core("resnet8")
    x = x_of(model, 8)
    _, groups = find_groups(model, x)
    assert input_step(groups, "stages.1.0.conv2", [3, 1]) == {"layer": "stages.1.0.conv1", "idxs": [1, 3]}
    step = input_step(groups, "stages.2.0.conv1", [0, 5])
    assert step == {"layer": "stages.1.0.conv2", "idxs": [0, 5]}
    replay(model, x, [step])
    assert model.stages[2][0].conv1.in_channels == 30 and model.stages[1][0].shortcut[0].out_channels == 30
    _, kept = find_groups(model, x, exclude=["stages.2.0.shortcut*"])
    with pytest.raises(tricks.TricksError, match="the inputs of fc cannot be removed: stages.2.0.shortcut.0 is excluded"):
        input_step(kept, "fc", [0])
    with pytest.raises(tricks.TricksError, match="no group of coupled channels feeds 'stem.0'"):
        input_step(groups, "stem.0", [0])


# --- complexity -----------------------------------------------------------------------------------


def test_complexity_counts_params_and_the_macs_of_one_image():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    got = complexity(conv, torch.zeros(7, 3, 6, 6))  # the batch is cut to one image
    assert got == {"params": 3 * 8 * 9 + 8 * 36 * 5 + 5, "macs": 36 * 8 * 27 + 8 * 36 * 5}
    from tricks.models import complexity as core_complexity

    model = core("resnet20")
    assert complexity(model, torch.zeros(1, 3, 32, 32)) == core_complexity(model, 3, 32)


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(ratio=1.0), "ratio must be at least 0 and below 1"),
    (dict(ratio=-0.1), "ratio must be at least 0 and below 1"),
    (dict(ratio=0.5, criterion="l2"), "unknown criterion 'l2'; choose one of l1, random, slimming, taylor"),
    (dict(ratio=0.5, scope="stage"), "unknown scope 'stage'"),
    (dict(ratio=0.5, target="flops"), "unknown target 'flops'"),
    (dict(ratio=0.5, min_channels=0), "min_channels must be at least 1"),
    (dict(ratio=0.5, exclude=["stme*"]), "'stme*' matches no conv or linear layer of ResNet"),
    (dict(ratio=0.5, criterion="taylor"), "taylor criterion needs gradients"),
    (dict(ratio=0.99, target="macs", exclude=["stages.2*"]), "the macs cannot fall by 99%"),
])
def test_bad_arguments_are_one_line_errors(kwargs, fragment):
    model = core("resnet8")
    with pytest.raises(tricks.TricksError) as caught:
        prune_model(model, x_of(model, 8), **kwargs)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("change, fragment", [
    ({"steps": [{"layer": "stages.0.0.conv9", "idxs": [0]}]}, "layer 'stages.0.0.conv9', which ResNet has not"),
    ({"steps": [{"layer": "stages.0.0.bn1", "idxs": [0]}]}, "which ResNet has not"),
    ({"steps": [{"layer": "stages.0.0.conv1", "idxs": [16]}]}, "removes channel 16 of stages.0.0.conv1, which has 16"),
    ({"steps": [{"layer": "stages.0.0.conv1", "idxs": list(range(16))}]}, "would remove every channel"),
    ({"steps": [{"layer": "stages.0.0.conv1", "idxs": ["0"]}]}, "a change is {'steps'"),
    ("prune everything", "a change is {'steps'"),
])
def test_a_change_that_does_not_fit_the_model_is_a_one_line_error(change, fragment):
    model = core("resnet8")
    with pytest.raises(tricks.TricksError) as caught:
        replay(model, x_of(model, 8), change)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


# --- residual streams -------------------------------------------------------------------------------


def test_the_layers_that_write_residual_streams_are_the_stem_shortcuts_and_last_convolutions():
    model = core("resnet20")
    names = stream_layers(find_groups(model, x_of(model))[1])
    last = [f"stages.{i}.{j}.conv2" for i in range(3) for j in range(3)]
    assert sorted(names) == sorted(["stem.0", *last, "stages.1.0.shortcut.0", "stages.2.0.shortcut.0"])
    # excluded, only the channels inside the blocks go, and the model is still the one built at those widths
    prune_model(model, x_of(model), 0.5, "l1", "layer", exclude=names)
    widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert widths["stem.0"] == 16 and [widths[n] for n in last] == [16] * 3 + [32] * 3 + [64] * 3
    assert [widths[f"stages.{i}.{j}.conv1"] for i in range(3) for j in range(3)] == [8] * 3 + [16] * 3 + [32] * 3


def test_a_plain_network_has_no_residual_stream():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    assert stream_layers(find_groups(model, x_of(model))[1]) == []
