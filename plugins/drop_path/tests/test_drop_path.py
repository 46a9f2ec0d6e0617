"""Tests of the drop_path plugin: timm's rate rule, identity in evaluation, the expectation kept in
training, whole branches dropped per sample in the core's ResNets, timm's ViT and ResNet blocks,
unchanged state dicts, a run, and one-line errors for bad settings."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import timm
import torch
import torchvision
from torch import nn

import tricks
from tricks.models import create_model
from tricks.testing import make_ctx, tiny_run
from tricks_drop_path import DropPath, DropPathSettings, apply_drop_path, drop_rates, find_sites


def vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)


def models():
    torch.manual_seed(0)
    yield "resnet20", create_model("resnet20", 10, 3)
    yield "resnet50", create_model("resnet50", 10, 3)
    yield "timm resnet18", timm.create_model("resnet18", pretrained=False, num_classes=10)
    yield "torchvision resnet18", torchvision.models.resnet18(num_classes=10)
    yield "timm vit_tiny", vit()


MODELS = list(models())
IDS = [name for name, _ in MODELS]


# --- the rule ---------------------------------------------------------------------------------


def test_linear_rule_is_timms_linspace_and_uniform_is_constant():
    assert drop_rates(9, 0.1) == torch.linspace(0, 0.1, 9).tolist()
    assert drop_rates(9, 0.1)[0] == 0.0 and drop_rates(9, 0.1)[-1] == pytest.approx(0.1)
    assert drop_rates(5, 0.2) == pytest.approx([0.2 * l / 4 for l in range(5)])
    assert drop_rates(4, 0.3, "uniform") == [0.3] * 4
    assert drop_rates(1, 0.3) == [0.3]  # the deepest block gets `rate`, also when it is the only one
    assert drop_rates(0, 0.3) == []
    with pytest.raises(ValueError, match="rule"):
        drop_rates(3, 0.1, "quadratic")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        drop_rates(3, 1.0)


def test_vit_rates_equal_timms_own_drop_path_rate():
    model = vit()
    applied = apply_drop_path(model, 0.1)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10,
                                  drop_path_rate=0.1)
    assert [site.name for site, _ in applied] == [f"blocks.{i}" for i in range(12)]
    assert {site.kind for site, _ in applied} == {"transformer"}
    for ours, theirs in zip(model.blocks, reference.blocks):
        for attr in ("drop_path1", "drop_path2"):
            got = getattr(ours, attr)
            assert isinstance(got, timm.layers.DropPath)
            want = getattr(theirs, attr)
            assert got.drop_prob == (want.drop_prob if isinstance(want, timm.layers.DropPath) else 0.0)


def test_timm_resnet_rates_equal_timms_own_drop_path_rate():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    applied = apply_drop_path(model, 0.2)
    reference = timm.create_model("resnet18", pretrained=False, num_classes=10, drop_path_rate=0.2)
    theirs = [b.drop_path.drop_prob if b.drop_path is not None else 0.0
              for stage in (reference.layer1, reference.layer2, reference.layer3, reference.layer4) for b in stage]
    assert {site.kind for site, _ in applied} == {"attribute"}
    assert [site.block.drop_path.drop_prob for site, _ in applied] == pytest.approx(theirs, rel=1e-6)


def test_resnet20_rates_are_linear_over_its_nine_blocks():
    model = create_model("resnet20", 10, 3)
    applied = apply_drop_path(model, 0.1)
    blocks = [b for stage in model.stages for b in stage]
    assert [site.block for site, _ in applied] == blocks
    assert {site.kind for site, _ in applied} == {"residual"}
    assert [b.drop_path.drop_prob for b in blocks] == drop_rates(9, 0.1)
    assert [b.drop_path.drop_prob for b in blocks] == pytest.approx([0.1 * l / 8 for l in range(9)])
    assert [site.branch_end for site, _ in applied] == [b.bn2 for b in blocks]


# --- the state dict and evaluation ----------------------------------------------------------------


@pytest.mark.parametrize("name, model", MODELS, ids=IDS)
def test_state_dict_keys_are_unchanged(name, model):
    model = copy.deepcopy(model)
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert apply_drop_path(model, 0.2)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == before


@pytest.mark.parametrize("name, model", MODELS, ids=IDS)
def test_identity_in_eval_mode(name, model):
    plain = copy.deepcopy(model).eval()
    dropped = copy.deepcopy(model)
    apply_drop_path(dropped, 0.5, "uniform")
    dropped.eval()
    torch.manual_seed(1)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dropped(x), plain(x))


# --- training ---------------------------------------------------------------------------------------


def test_a_drop_path_layer_keeps_the_expectation():
    """Each sample is 0 or x / (1 - p): the kept fraction K/N is binomial(N, 1 - p), so the
    sample mean / x - 1 has standard deviation sqrt(p / ((1 - p) N)); allow 5 of them."""
    p, n = 0.3, 100_000
    model = create_model("resnet8", 10, 1)
    applied = apply_drop_path(model, p, "uniform")
    layer = applied[0][0].block.drop_path
    assert layer.drop_prob == pytest.approx(p)
    layer.train()
    x = torch.tensor([1.5, -2.0, 0.25])
    torch.manual_seed(2)
    out = layer(x.expand(n, 3).contiguous())
    kept = (out != 0).all(1)
    assert torch.equal((out == 0).all(1), ~kept)  # whole samples are dropped
    assert torch.allclose(out[kept], (x / (1 - p)).expand(int(kept.sum()), 3))
    sd = math.sqrt(p / ((1 - p) * n))
    assert torch.allclose(out.mean(0), x, rtol=5 * sd, atol=0)
    assert abs((~kept).float().mean().item() - p) <= 5 * math.sqrt(p * (1 - p) / n)


def test_in_training_some_samples_of_a_block_are_the_shortcut_alone():
    model = create_model("resnet20", 10, 3)
    apply_drop_path(model, 0.5, "uniform")
    block = model.stages[0][1]  # identity shortcut: out = relu(branch + x)
    branch = {}
    block.bn2.register_forward_hook(lambda m, a, out: branch.setdefault("out", out.detach().clone()), prepend=True)
    model.train()
    torch.manual_seed(3)
    x = torch.randn(256, 16, 8, 8)
    with torch.no_grad():
        out = block(x)
    shortcut_only = torch.relu(x)
    with_branch = torch.relu(branch["out"] * 2.0 + x)  # kept: scaled by 1 / (1 - 0.5)
    dropped = torch.tensor([torch.equal(o, s) for o, s in zip(out, shortcut_only)])
    kept = torch.tensor([torch.equal(o, w) for o, w in zip(out, with_branch)])
    assert torch.all(dropped ^ kept)  # every sample is exactly one of the two
    assert abs(dropped.float().mean().item() - 0.5) <= 5 * math.sqrt(0.25 / 256)  # binomial(256, 0.5), 5 sd
    with torch.no_grad():
        assert torch.equal(block.eval()(x), torch.relu(block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x))))) + x))


def test_the_masks_come_from_torchs_global_generator():
    model = create_model("resnet20", 10, 3)
    apply_drop_path(model, 0.3)
    model.train()
    x = torch.randn(16, 3, 8, 8)
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(model(x))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_a_deep_copy_follows_its_own_train_and_eval():
    model = create_model("resnet20", 10, 3)
    apply_drop_path(model, 0.5, "uniform")
    twin = copy.deepcopy(model).eval()
    model.train()
    originals = [b for stage in model.stages for b in stage]
    for original, copied in zip(originals, (b for stage in twin.stages for b in stage)):
        (hook,) = copied.bn2._forward_hooks.values()
        assert hook.block is copied and hook.block is not original  # the copy's hook, the copy's layer
    plain = create_model("resnet20", 10, 3).eval()
    plain.load_state_dict(twin.state_dict())
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(twin(x), plain(x))  # in eval, while the original trains


def test_applying_twice_replaces_the_rates_without_a_second_hook():
    model = create_model("resnet8", 10, 1)
    apply_drop_path(model, 0.1)
    apply_drop_path(model, 0.3, "uniform")
    sites = find_sites(model)  # a treated block has a drop_path layer: it is found by its attribute now
    assert [s.kind for s in sites] == ["attribute"] * 3
    assert [s.block.drop_path.drop_prob for s in sites] == [0.3] * 3
    assert all(len(s.block.bn2._forward_hooks) == 1 for s in sites)


# --- in a run ---------------------------------------------------------------------------------------


class Log(tricks.Reporter):
    def __init__(self):
        self.lines = []

    def log(self, message):
        self.lines.append(message)


class Keep(tricks.Plugin):
    @tricks.hookimpl
    def on_fit_start(self, ctx):
        self.model = ctx.model


def test_a_run_trains_with_drop_path(tmp_path):
    log, keep = Log(), Keep()
    run = tiny_run(plugins=["drop_path", keep], out=tmp_path / "run", reporter=log, set=["drop_path.rate=0.2"])
    rows = run.metrics()
    assert len(rows) == 1 and math.isfinite(rows[0]["train_loss"]) and math.isfinite(rows[0]["val_loss"])
    assert "drop_path: 3 blocks (residual), drop rates 0 to 0.2 (linear)" in log.lines
    blocks = [b for stage in keep.model.stages for b in stage]
    assert [b.drop_path.drop_prob for b in blocks] == drop_rates(3, 0.2)
    assert set(run.load_checkpoint()["model"]) == set(create_model("resnet8", 10, 1).state_dict())


def test_the_wrapper_logs_and_returns_the_model():
    from tricks.testing import call_wrapper

    ctx = make_ctx(plugins=["drop_path"], model="resnet20")
    model = create_model("resnet20", 10, 1)
    assert call_wrapper(DropPath(DropPathSettings(rule="uniform")).build_model(ctx), model) is model
    assert ctx.logs == ["drop_path: 9 blocks (residual), drop rates 0.1 to 0.1 (uniform)"]


def test_a_model_without_residual_blocks_is_a_one_line_error():
    from tricks.testing import call_wrapper

    ctx = make_ctx(plugins=["drop_path"], model="resnet8")
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    with pytest.raises(tricks.TricksError, match=r"drop_path: model 'resnet8' \(Sequential\) has no residual blocks") as error:
        call_wrapper(DropPath().build_model(ctx), plain)
    assert "\n" not in str(error.value) and "resnet20" in str(error.value)


def test_settings_errors_name_the_key():
    assert DropPath().settings == DropPathSettings(rate=0.1, rule="linear")
    for bad, key in [("drop_path.rate=1.5", "rate"), ("drop_path.rate=-0.1", "rate"), ("drop_path.rule=foo", "rule")]:
        with pytest.raises(tricks.TricksError, match=rf"drop_path\.{key}"):
            tricks.resolve(plugins=["drop_path"], sets=[bad])


@pytest.mark.parametrize("bad, key", [("drop_path.rate=1.5", "rate"), ("drop_path.rule=foo", "rule")])
def test_the_cli_refuses_bad_settings_with_exit_status_2(bad, key, monkeypatch, capsys, tmp_path):
    from tricks.cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["tricks", "run", "--plugins", "drop_path", "--set", bad, "--device", "cpu"])
    with pytest.raises(SystemExit) as exit:
        main()
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: bad value for 'drop_path.{key}'") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
