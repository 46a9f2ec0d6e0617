"""Tests of DCP as a criterion of the prune plugin: ``prune_dcp`` on a whole ResNet (nothing removed
changes nothing; half of every block's inner channels go and the residual streams stay; with only
the reconstruction loss it reproduces the unpruned outputs more closely than L1 or random pruning at
the same widths), and in runs (auxiliary heads trained in the optimizer and kept in the checkpoint,
their losses in the training loss, the model rebuilt from its run directory, the bad settings).
Kill-and-resume of a DCP run is in ``test_prune_plugin.py``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tricks
from tricks.models import create_model
from tricks.testing import tiny_run
from tricks_prune import find_groups, prune_model, replay, stream_layers
from tricks_prune.dcp import attach_aux_heads, find_stages, prune_dcp

DCP = ["prune.criterion=dcp", "prune.samples=32", "prune.refit_steps=2"]


def resnet8(seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """resnet8 on 1-channel 8x8 images, BatchNorm statistics from one batch, in eval mode; the batch
    and its labels."""
    torch.manual_seed(seed)
    model = create_model("resnet8", 10, 1)
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.train()(x)
    return model.eval(), x, torch.arange(64) % 10


def widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# --- prune_dcp on a whole model -------------------------------------------------------------------


def test_nothing_removed_changes_nothing():
    model, x, y = resnet8(0)
    before = copy.deepcopy(model.state_dict())
    change = prune_dcp(model, x[:1], x, y, 0.0, attach_aux_heads(model, find_stages(model)))
    assert change["steps"] == [] and change["channels"] == [112, 112]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_half_of_every_inner_layer_goes_the_streams_stay_and_the_change_replays():
    model, x, y = resnet8(1)
    fresh = copy.deepcopy(model)
    heads = attach_aux_heads(model, find_stages(model)).eval()
    change = prune_dcp(model, x[:1], x, y, 0.5, heads, steps=2)
    assert change["criterion"] == "dcp" and change["groups"] == 3 and change["channels"] == [112, 56]
    got = widths(model)
    assert [got[f"stages.{i}.0.conv1"] for i in range(3)] == [8, 16, 32]
    assert [got[f"stages.{i}.0.conv2"] for i in range(3)] == [16, 32, 64] and got["stem.0"] == 16
    # the change is data: replayed on the unpruned model it gives the same shapes
    replay(fresh, x[:1], change)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    # and the heads still read their stages (they were left their channels)
    with torch.no_grad():
        assert model(x).shape == (64, 10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selection_with_reoptimized_weights_reconstructs_better_than_l1_or_random(seed):
    # DCP's reconstruction term alone (alpha = 0) chooses the channels and refits the kept weights to
    # reproduce each layer's unpruned output; L1 and random keep weights as they were.
    model, x, y = resnet8(seed)
    with torch.no_grad():
        base = model(x)
    streams = stream_layers(find_groups(model, x[:1])[1])
    dcp, l1, rand = (copy.deepcopy(model) for _ in range(3))
    prune_dcp(dcp, x[:1], x, y, 0.5, None, streams, alpha=0.0, steps=5)
    prune_model(l1, x[:1], 0.5, "l1", "layer", exclude=streams)
    prune_model(rand, x[:1], 0.5, "random", "layer", exclude=streams, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        errors = [float((base - m(x)).pow(2).mean()) for m in (dcp, l1, rand)]
    assert widths(dcp) == widths(l1) == widths(rand)
    assert errors[0] < min(errors[1:])


# --- in a run -------------------------------------------------------------------------------------


class Watch(tricks.Plugin):
    """The optimizer's parameter groups as training starts, the model's forward hooks and outputs
    as it ends."""

    def __init__(self):
        super().__init__()
        self.x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    @tricks.hookimpl
    def on_fit_start(self, ctx):
        self.groups = [len(g["params"]) for g in ctx.optimizer.param_groups]

    @tricks.hookimpl
    def on_epoch_end(self, ctx, epoch):
        self.hooked = [n for n, m in ctx.model.named_modules() if m._forward_hooks]

    @tricks.hookimpl
    def on_fit_end(self, ctx):
        ctx.model.eval()
        with torch.no_grad():
            self.y = ctx.model(self.x.to(ctx.device)).cpu()


def test_a_dcp_run_trains_heads_then_prunes_inside_the_blocks_and_is_rebuilt(tmp_path):
    watch = Watch()
    run = tiny_run(plugins=["prune", watch], out=tmp_path / "dcp", epochs=2, set=[*DCP, "prune.at=1"])
    plain = tiny_run(plugins=["prune"], out=tmp_path / "l1", epochs=2, set=["prune.at=1"])
    # three heads (BN + linear each: 4 tensors) in a second parameter group beside the model's
    assert len(watch.groups) == 2 and watch.groups[1] == 3 * 4
    checkpoint = run.load_checkpoint()
    [record] = checkpoint["structure"]
    assert record["change"]["criterion"] == "dcp" and record["change"]["scope"] == "layer"
    assert record["change"]["channels"] == [112, 56]
    heads = checkpoint["plugins"]["prune"]["heads"]
    assert {k.split(".")[0] for k in heads} == {"stages_0", "stages_1", "stages_2"}
    # the heads' cross-entropies are part of the training loss until pruning (same seed, same data)
    dcp_loss, l1_loss = run.metrics()[0]["train_loss"], plain.metrics()[0]["train_loss"]
    assert dcp_loss > l1_loss + 3 * 0.5
    assert watch.hooked == []  # after the last step no head runs
    model = run.build_model().eval()
    assert sum(p.numel() for p in model.parameters()) == run.summary()["params"] < run.summary()["params_start"]
    assert widths(model)["stem.0"] == 16 and widths(model)["stages.0.0.conv1"] == 8
    with torch.no_grad():
        torch.testing.assert_close(model(watch.x), watch.y)


@pytest.mark.parametrize("sets, fragment", [
    (["prune.criterion=dcp", "prune.scope=global"], "bad settings for 'prune': dcp selects the same fraction"),
    (["prune.criterion=dcp", "prune.target=macs"], "dcp prunes a fraction of the channels, not a macs budget"),
    (["prune.alpha=-1"], "prune.alpha"), (["prune.samples=0"], "prune.samples"),
    (["prune.refit_steps=-1"], "prune.refit_steps"),
])
def test_bad_dcp_settings_are_one_line_errors(sets, fragment):
    with pytest.raises(tricks.TricksError) as caught:
        tricks.resolve(plugins=["prune"], sets=sets)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


class Plain(tricks.Plugin):
    """A network with prunable channels none of which one plain convolution alone reads: the first
    conv's channels run through a depthwise conv (cut in positions) into the third, whose own
    channels the classifier reads."""

    @tricks.hookimpl
    def build_model(self, ctx):
        return nn.Sequential(nn.Conv2d(ctx.in_chans, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, ctx.num_classes))


@pytest.mark.parametrize("sets, plugins, fragment", [
    ([*DCP, "prune.aux_stages=[stages.9]"], [], "prune.aux_stages: ResNet has no module 'stages.9'"),
    ([*DCP, "prune.aux_stages=['0']"], [Plain()], "no prunable channel of Sequential is read that way"),
    ([*DCP], [Plain()], "cannot tell the stages of Sequential"),
])
def test_a_dcp_plan_that_does_not_fit_the_model_stops_the_run_before_training(tmp_path, sets, plugins, fragment):
    with pytest.raises(tricks.TricksError) as caught:
        tiny_run(plugins=["prune", *plugins], out=tmp_path / "run", epochs=2, set=sets)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)
    assert not tricks.RunDir(tmp_path / "run").has_checkpoint()


@pytest.mark.parametrize("others, core", [
    (["mixup"], {"precision": "bf16"}), (["label_smoothing", "zero_gamma"], {}), (["dropblock", "cosine"], {}),
    (["kd"], {}),
], ids=["mixup-bf16", "label_smoothing+zero_gamma", "dropblock+cosine", "kd"])
def test_dcp_composes_with_the_other_tricks(tmp_path, others, core):
    # soft targets (mixup), smoothed ones, a distillation loss, low precision: the heads' losses add up
    sets = [*DCP, "prune.at=1"]
    if "kd" in others:
        from tricks.registry import Catalog

        example = Catalog().plugins["kd"].load().example_settings(tmp_path / "teacher")
        sets += [f"kd.{k}={v}" for k, v in example.items()]
    run = tiny_run(plugins=["prune", *others], out=tmp_path / "run", epochs=2, set=sets, **core)
    rows, summary = run.metrics(), run.summary()
    assert summary["status"] == "complete" and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)
    assert run.load_checkpoint()["structure"][0]["change"]["channels"] == [112, 56]
