"""Tests of DropBlock's surgery and wiring: the layers inserted in each model family (how many,
where, with which per-stage rate), that the model is unchanged in eval mode, that the branch
layer sits before the addition and the shortcut layer on the shortcut, the schedule applied by
``on_batch``, errors, and short runs - alone, in low precision and channels_last, after a resume,
and composed with resnet_tweaks and zero_gamma."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import tricks
from tricks.blocks import BlockFamily, BlockSites, register_block_family, unregister_block_family
from tricks.testing import BatchWatcher, call_wrapper, make_ctx, tiny_run
from tricks_dropblock import (DropBlock, DropBlock2d, DropBlockSettings, block_sites, dropblock_layers,
                              insert_dropblock, linear_keep_prob, residual_blocks)


def core_model(name, num_classes=10, in_chans=3):
    from tricks.models import create_model

    return create_model(name, num_classes, in_chans)


def timm_model(name, **kwargs):
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


def tv_model(name):
    import torchvision

    return getattr(torchvision.models, name)(weights=None)


def tweaked(depth, variant="D", shape="cifar", **kwargs):
    from tricks_resnet_tweaks import create_resnet

    return create_resnet(depth, variant, shape, **kwargs)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# (factory, stages, blocks in the last two stages, blocks per stage kind: basic or bottleneck)
FAMILIES = {
    "core resnet20": (lambda: core_model("resnet20"), 3, 3 + 3, "basic"),
    "core resnet8": (lambda: core_model("resnet8"), 3, 1 + 1, "basic"),
    "core resnet50": (lambda: core_model("resnet50"), 4, 6 + 3, "bottleneck"),
    "resnet_tweaks resnet8-D": (lambda: tweaked(8, num_classes=10), 3, 1 + 1, "basic"),
    "resnet_tweaks resnet50-D imagenet": (lambda: tweaked(50, "D", "imagenet"), 4, 6 + 3, "bottleneck"),
    "timm resnet50": (lambda: timm_model("resnet50"), 4, 6 + 3, "bottleneck"),
    "timm resnet18": (lambda: timm_model("resnet18"), 4, 2 + 2, "basic"),
    "torchvision resnet50": (lambda: tv_model("resnet50"), 4, 6 + 3, "bottleneck"),
    "timm regnetx_002": (lambda: timm_model("regnetx_002"), 4, 4 + 7, "bottleneck"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_surgery_inserts_two_layers_per_block_of_the_last_two_stages(family):
    make, n_stages, blocks, kind = FAMILIES[family]
    with torch.device("meta"):  # structure only: no memory, no initialization
        model = make()
        keys = list(model.state_dict())
        done = insert_dropblock(model)
        assert done.num_stages == n_stages
        assert [(g, r) for g, _, r in done.stages] == [(n_stages - 1, 0.25), (n_stages, 1.0)]
        assert sum(b for _, b, _ in done.stages) == blocks
        assert len(done.layers) == 2 * blocks == len(dropblock_layers(model))
        assert sorted(layer.rate_scale for layer in done.layers) == sorted(
            [0.25] * 2 * done.stages[0][1] + [1.0] * 2 * done.stages[1][1])
        assert list(model.state_dict()) == keys  # no new state: checkpoints of the plain model still load
        # with inner=True, one more layer per inner BN (one in a basic block, two in a bottleneck)
        per_block = 3 if kind == "basic" else 4
        assert len(insert_dropblock(make(), inner=True).layers) == per_block * blocks
        assert len(insert_dropblock(make(), shortcut=False).layers) == blocks


@pytest.mark.parametrize("family", ["core resnet20", "resnet_tweaks resnet50-D imagenet", "timm resnet18",
                                    "torchvision resnet50", "timm regnetx_002"])
def test_the_model_is_unchanged_in_eval_mode_and_regularized_in_training(family):
    make = FAMILIES[family][0]
    model = make()
    reference = copy.deepcopy(model).eval()
    done = insert_dropblock(model, inner=True)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
        model.train(), reference.train()
        assert torch.equal(model(x), reference(x))  # keep_prob 1 until the schedule sets it
        for layer in done.layers:
            layer.set_keep_prob(0.5)
        out = model(x)
        assert torch.isfinite(out).all() and not torch.allclose(out, reference(x))


def test_stages_can_be_chosen_and_counted_from_either_end():
    for stages, expected in [([1], [(1, 3, 1 / 16)]), ([-1], [(3, 3, 1.0)]), ([1, 2, 3], [(1, 3, 1 / 16), (2, 3, 0.25), (3, 3, 1.0)]),
                             ([3, -1, 2], [(2, 3, 0.25), (3, 3, 1.0)])]:
        done = insert_dropblock(core_model("resnet20"), stages=stages)
        assert done.stages == expected
    done = insert_dropblock(core_model("resnet20"), stages=[2, 3], scale_per_stage=False)
    assert {layer.rate_scale for layer in done.layers} == {1.0}


@pytest.mark.parametrize("stages", [[4], [-4], [0]])
def test_a_stage_that_does_not_exist_is_an_error(stages):
    with pytest.raises(ValueError, match=r"3 stages"):
        insert_dropblock(core_model("resnet20"), stages=stages)


def _one_stage(block):
    model = nn.Module()
    model.stages = nn.Sequential(nn.Sequential(block))
    return model


def _all_dropped(model):
    for layer in dropblock_layers(model):
        layer.keep_prob = 0.0  # with block_size >= the map: gamma = 1, everything dropped


def test_the_branch_layer_sits_before_the_addition_and_the_other_on_the_shortcut():
    from tricks.models import BasicBlock, Bottleneck

    x = torch.relu(torch.randn(2, 8, 5, 5))
    for make in (lambda: BasicBlock(8, 8), lambda: Bottleneck(8, 2)):
        # branch only: the block adds nothing to its (identity) shortcut
        block = make().train()
        insert_dropblock(_one_stage(block), block_size=9, stages=[1], shortcut=False)
        _all_dropped(block)
        assert torch.equal(block(x), x)  # relu(0 + x), x >= 0
        # branch and shortcut: nothing is left
        block = make().train()
        insert_dropblock(_one_stage(block), block_size=9, stages=[1])
        assert isinstance(block.shortcut, DropBlock2d)  # the identity became DropBlock on the input
        _all_dropped(block)
        assert torch.equal(block(x), torch.zeros_like(x))
    # a projection shortcut: its output (after its BN) is dropped
    block = Bottleneck(8, 4, stride=2).train()
    insert_dropblock(_one_stage(block), block_size=9, stages=[1], shortcut=False)
    _all_dropped(block)
    with torch.no_grad():
        expected = torch.relu(block.shortcut(x))
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("make", [lambda: timm_model("resnet18").layer2[1], lambda: tv_model("resnet18").layer2[1],
                                  lambda: timm_model("regnetx_002").s3.b2], ids=["timm", "torchvision", "regnet"])
def test_library_blocks_drop_before_the_addition(make):
    block = make().train()
    c = next(m for m in block.modules() if isinstance(m, nn.Conv2d)).in_channels
    x = torch.relu(torch.randn(2, c, 4, 4))
    insert_dropblock(_one_stage(block), block_size=9, stages=[1], shortcut=False)
    _all_dropped(block)
    assert torch.equal(block(x), x)
    block = make().train()
    insert_dropblock(_one_stage(block), block_size=9, stages=[1])
    _all_dropped(block)
    assert torch.equal(block(x), torch.zeros_like(x))


def test_a_regnet_block_without_shortcut_is_not_residual():
    block = timm_model("regnetx_002").s2.b1
    assert block_sites(block) is not None
    block.downsample = None
    assert block_sites(block) is None


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.skip = None

    def forward(self, x):
        return torch.relu(self.body(x) + (x if self.skip is None else self.skip(x)))


def test_other_plugins_can_register_a_block():
    model = nn.Module()
    model.stages = nn.Sequential(nn.Sequential(_Block(4), _Block(4)), nn.Sequential(_Block(4)))
    assert residual_blocks(model) == []
    register_block_family(BlockFamily("test block", (_Block,), sites=lambda b: BlockSites(b.body, "skip")))
    try:
        done = insert_dropblock(model)
        assert len(done.layers) == 6 and done.stages == [(1, 2, 0.25), (2, 1, 1.0)]
    finally:
        unregister_block_family("test block")


def test_digits_sized_maps_clip_the_block_to_the_map():
    # resnet8 on 8x8 digits: stages 2 and 3 see 4x4 and 2x2 maps; block_size 7 becomes 4 and 2
    model = core_model("resnet8", in_chans=1).train()
    done = insert_dropblock(model)
    seen = []
    for layer in done.layers:
        layer.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape[-2:])))
        layer.set_keep_prob(0.9)
    model(torch.randn(4, 1, 8, 8))
    assert sorted(set(seen)) == [(2, 2), (4, 4)]


# --- the plugin -----------------------------------------------------------------------------------


def _ctx(step=0, total=100, model=None):
    """A one-epoch run of ``total`` steps at ``step``."""
    return make_ctx(step=step, steps_per_epoch=total, epochs=1, model=model)


def test_on_batch_applies_the_linear_schedule_with_the_stage_scaling():
    plugin = DropBlock(DropBlockSettings(keep_prob=0.8))
    model = core_model("resnet20")
    assert call_wrapper(plugin.build_model(_ctx()), model) is model
    last = [layer for layer in plugin._layers if layer.rate_scale == 1.0]
    before = [layer for layer in plugin._layers if layer.rate_scale == 0.25]
    assert len(last) == len(before) == 6
    for step, expected in [(0, 1.0), (50, 1 - 0.2 * 50 / 99), (99, 0.8), (150, 0.8)]:
        assert plugin.on_batch(_ctx(step, 100, model)) is None  # the batch is untouched
        assert all(layer.keep_prob == pytest.approx(expected) for layer in last)
        assert all(layer.keep_prob == pytest.approx(1 - (1 - expected) / 4) for layer in before)
    constant = DropBlock(DropBlockSettings(keep_prob=0.8, schedule="constant"))
    constant._model, constant._layers = model, plugin._layers
    constant.on_batch(_ctx(0, 100, model))
    assert all(layer.keep_prob == pytest.approx(0.8) for layer in last)


def test_on_batch_finds_the_layers_of_a_rebuilt_model():
    plugin = DropBlock()
    model = core_model("resnet20")
    insert_dropblock(model)
    plugin.on_batch(_ctx(99, 100, model))
    assert plugin._model is model and len(plugin._layers) == 12
    assert {round(layer.keep_prob, 6) for layer in plugin._layers} == {0.9, 0.975}


def test_settings_errors_name_the_key():
    for bad, key in [("dropblock.keep_prob=0", "keep_prob"), ("dropblock.keep_prob=1.5", "keep_prob"),
                     ("dropblock.block_size=0", "block_size"), ("dropblock.stages=[0]", "stages"),
                     ("dropblock.stages=[]", "stages"), ("dropblock.schedule=cosine", "schedule")]:
        with pytest.raises(tricks.TricksError, match=rf"dropblock\.{key}"):
            tricks.resolve(plugins=["dropblock"], sets=[bad])
    cfg = tricks.resolve(plugins=["dropblock"], sets=["dropblock.stages=[3,4]", "dropblock.block_size=5"])
    assert cfg.settings["dropblock"].stages == [3, 4] and cfg.settings["dropblock"].block_size == 5


class _Watch(BatchWatcher):
    """Runs after dropblock: the model, its DropBlock layers and last BN gammas when training starts,
    and in ``batches`` the keep_prob of the last stage's layers at every step."""

    def __init__(self):
        super().__init__(record=self.last_stage_keep_prob)
        self.layers, self.model, self.last_gammas = None, None, None

    def last_stage_keep_prob(self, batch):
        return max(l.keep_prob for l in self.layers if l.rate_scale == 1.0) if self.layers else None

    @tricks.hookimpl
    def on_fit_start(self, ctx):
        self.model = ctx.model
        self.layers = dropblock_layers(ctx.model)
        self.last_gammas = [b.bn2.weight.detach().clone() for stage in ctx.model.stages for b in stage]


def finite_losses(run):
    return all(math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"]) for row in run.metrics())


def test_a_run_inserts_the_layers_and_ramps_keep_prob(tmp_path):
    watch = _Watch()
    run = tiny_run(plugins=["dropblock", watch], out=tmp_path / "run", set=["dropblock.keep_prob=0.8"])
    assert finite_losses(run)
    assert len(watch.layers) == 4  # resnet8: one block in each of the last two stages
    assert len(watch.batches) == 8  # 256 / 32 steps
    assert watch.batches[0] == 1.0 and watch.batches[-1] == pytest.approx(0.8)
    assert watch.batches == pytest.approx([linear_keep_prob(s, 8, 0.8) for s in range(8)])


@pytest.mark.parametrize("precision, channels_last", [("bf16", False), ("fp32", True), ("fp16", True)])
def test_a_run_in_low_precision_and_channels_last(tmp_path, precision, channels_last):
    run = tiny_run(plugins=["dropblock"], out=tmp_path / "run", precision=precision, channels_last=channels_last,
                   set=["dropblock.keep_prob=0.7", "dropblock.inner=true"])
    assert len(run.metrics()) == 1 and finite_losses(run)


def test_a_resumed_run_continues_the_schedule(tmp_path):
    run = tiny_run(plugins=["dropblock"], out=tmp_path / "run")
    watch = _Watch()
    tricks.run(plugins=["dropblock", watch], resume=run.path, epochs=2)
    assert [row["epoch"] for row in run.metrics()] == [1, 2]
    assert watch.batches == pytest.approx([linear_keep_prob(s, 16, 0.9) for s in range(8, 16)])


def test_a_model_without_stages_is_an_error_naming_it(tmp_path):
    class Plain(tricks.Plugin):
        @tricks.hookimpl
        def build_model(self, ctx):
            return nn.Sequential(nn.Conv2d(ctx.in_chans, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, ctx.num_classes))

    with pytest.raises(tricks.TricksError, match=r"dropblock: cannot find the stages of Sequential"):
        tiny_run(plugins=["dropblock", Plain()], out=tmp_path / "run")
    with pytest.raises(tricks.TricksError, match=r"dropblock: ResNet has 3 stages; stage 4"):
        tiny_run(plugins=["dropblock"], out=tmp_path / "run2", set=["dropblock.stages=[4]"])


# --- composition with resnet_tweaks and zero_gamma --------------------------------------------------


@pytest.mark.parametrize("order", [["resnet_tweaks", "zero_gamma", "dropblock"], ["resnet_tweaks", "dropblock", "zero_gamma"]])
def test_the_three_model_plugins_compose(tmp_path, order):
    from tricks_resnet_tweaks import TweakedResNet

    watch = _Watch()
    run = tiny_run(plugins=[*order, watch], out=tmp_path / "run", model="resnet20")
    assert finite_losses(run)
    assert run.config()["plugins"] == order
    model = watch.model
    assert isinstance(model, TweakedResNet) and model.variant == "D"
    assert len(watch.layers) == 12  # resnet20: 3 + 3 blocks in the last two stages, 2 layers each
    # zero_gamma found every block, with or without the DropBlock layers inside
    from tricks_zero_gamma import find_residual_blocks

    assert len(find_residual_blocks(model)) == 9
    assert len(watch.last_gammas) == 9 and not any(g.any() for g in watch.last_gammas)
    assert watch.batches[0] == 1.0 and watch.batches[-1] == pytest.approx(0.9)


def test_a_model_with_dropblock_pickles_with_its_hooks(tmp_path):
    # the core saves the model object itself when a plugin changes its structure (pruning)
    model = core_model("resnet8")
    insert_dropblock(model, block_size=9)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    layers = dropblock_layers(loaded)
    assert len(layers) == 4
    block = loaded.stages[2][0]
    x = torch.relu(torch.randn(2, 32, 4, 4))
    _all_dropped(loaded)
    loaded.train()
    assert torch.equal(block(x), torch.zeros(2, 64, 2, 2))  # the hooks came along: everything dropped
    copied = copy.deepcopy(loaded)
    assert torch.equal(copied.stages[2][0](x), torch.zeros(2, 64, 2, 2))
    # the hooks run the very layers the model holds (so the schedule reaches them), not copies
    for model in (loaded, copied):
        for layer in dropblock_layers(model):
            layer.keep_prob = 1.0
        assert (model.stages[2][0](x) > 0).any()
