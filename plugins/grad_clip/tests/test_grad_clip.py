"""Tests of the grad_clip plugin: the hook on the optimizer clips as torch and timm do (and bounds
the norm, leaves small gradients alone, bounds every entry in value mode), sees unscaled gradients
under fp16's GradScaler, follows a rebuilt optimizer, reports the epoch's norm and clipped fraction
in a run, and refuses bad settings on one line."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from timm.utils import adaptive_clip_grad
from torch import nn

import tricks
from tricks.testing import make_ctx, tiny_run
from tricks_grad_clip import GradClip, GradClipSettings

from processes import cli_in_process, one_line_error


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def with_grads(model: nn.Module, scale: float) -> nn.Module:
    """Fixed random gradients of global 2-norm about ``scale``."""
    g = torch.Generator().manual_seed(1)
    params = list(model.parameters())
    raw = [torch.randn(p.shape, generator=g) for p in params]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(r) for r in raw]))
    for p, r in zip(params, raw):
        p.grad = r * (scale / total)
    return model


def twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with copies of its gradients (deepcopy leaves ``.grad`` out)."""
    other = copy.deepcopy(model)
    for p, q in zip(model.parameters(), other.parameters()):
        q.grad = p.grad.clone()
    return other


def hooked(model: nn.Module, **settings) -> tuple[GradClip, torch.optim.Optimizer]:
    """The plugin on a plain SGD optimizer of ``model`` with learning rate 0 (steps leave the weights)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    plugin = GradClip(GradClipSettings(**settings))
    plugin.on_fit_start(ctx=make_ctx(plugins=["grad_clip"], model=model, optimizer=optimizer))
    return plugin, optimizer


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def global_norm(tensors, p: float = 2.0) -> float:
    return float(torch.linalg.vector_norm(torch.cat([t.flatten() for t in tensors]), ord=p))


# --- the clipping ----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_norm_mode_bounds_the_global_norm_and_equals_torch(norm_type):
    model = with_grads(net(), 30.0)
    reference = twin(model)
    before = global_norm(grads(model), norm_type)
    assert before > 1.0
    plugin, optimizer = hooked(model, max_norm=1.0, norm_type=norm_type)
    optimizer.step()
    after = grads(model)
    assert global_norm(after, norm_type) <= 1.0 * (1 + 1e-6)
    returned = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0, norm_type=norm_type)
    for got, want in zip(after, grads(reference)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert plugin._steps == 1
    assert float(plugin._norms) == pytest.approx(float(returned), rel=1e-6) == pytest.approx(before, rel=1e-5)
    assert float(plugin._clipped) == 1.0


def test_gradients_below_the_bound_are_unchanged():
    model = with_grads(net(), 0.5)
    want = grads(model)
    plugin, optimizer = hooked(model, max_norm=1.0)
    optimizer.step()
    for got, w in zip(grads(model), want):
        assert torch.equal(got, w)
    assert float(plugin._clipped) == 0.0 and float(plugin._norms) == pytest.approx(0.5, rel=1e-5)


def test_value_mode_bounds_every_entry_and_equals_torch():
    model = with_grads(net(), 30.0)
    reference = twin(model)
    assert max(float(g.abs().max()) for g in grads(model)) > 0.1
    plugin, optimizer = hooked(model, max_norm=0.1, mode="value")
    optimizer.step()
    bound = torch.tensor(0.1)  # 0.1 in float32, the gradients' precision
    assert all(g.abs().max() <= bound for g in grads(model))
    torch.nn.utils.clip_grad_value_(reference.parameters(), 0.1)
    for got, want in zip(grads(model), grads(reference)):
        assert torch.equal(got, want)
    assert float(plugin._norms) == pytest.approx(30.0, rel=1e-5) and float(plugin._clipped) == 1.0


def test_agc_mode_equals_timm():
    model = with_grads(net(), 30.0)
    reference = twin(model)
    plugin, optimizer = hooked(model, max_norm=0.05, mode="agc")
    optimizer.step()
    adaptive_clip_grad(reference.parameters(), 0.05)
    for got, want in zip(grads(model), grads(reference)):
        assert torch.equal(got, want)
    assert float(plugin._clipped) == 1.0 and global_norm(grads(model)) < 30.0


def test_only_the_optimizers_parameters_are_clipped():
    model = with_grads(net(), 30.0)
    head = list(model[3].parameters())
    optimizer = torch.optim.SGD(head, lr=0.0)  # the conv's parameters are not trained here
    conv_grads = [p.grad.clone() for p in model[0].parameters()]
    GradClip().on_fit_start(ctx=make_ctx(plugins=["grad_clip"], model=model, optimizer=optimizer))
    optimizer.step()
    assert global_norm([p.grad for p in head]) <= 1.0 * (1 + 1e-6)
    for p, want in zip(model[0].parameters(), conv_grads):
        assert torch.equal(p.grad, want)


def test_the_hook_follows_a_rebuilt_optimizer():
    model = with_grads(net(), 30.0)
    first = torch.optim.SGD(model.parameters(), lr=0.0)
    ctx = make_ctx(plugins=["grad_clip"], model=model, optimizer=first)
    plugin = GradClip()
    plugin.on_fit_start(ctx=ctx)
    ctx.optimizer = second = torch.optim.SGD(model.parameters(), lr=0.0)  # as the core does after pruning
    plugin.on_epoch_end(ctx=ctx, epoch=0, metrics={})
    first.step()
    assert global_norm(grads(model)) == pytest.approx(30.0, rel=1e-5)  # the old optimizer is unhooked
    second.step()
    assert global_norm(grads(model)) <= 1.0 * (1 + 1e-6)


def test_under_the_fp16_grad_scaler_the_hook_sees_the_unscaled_gradients():
    x, y = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(2)), torch.arange(8)

    def step(scaler):
        model = net()
        plugin, optimizer = hooked(model, max_norm=0.01)
        optimizer.param_groups[0]["lr"] = 0.1
        loss = nn.functional.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)  # unscales, then calls optimizer.step (and so the hook)
            scaler.update()
        return float(plugin._norms), model

    plain_norm, plain = step(None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaled_norm, scaled = step(scaler)
    assert scaler.get_scale() == 2.0**16  # no overflow: the step was taken
    assert plain_norm > 0.01
    assert scaled_norm == pytest.approx(plain_norm, rel=1e-5)  # not 65536 times larger
    for a, b in zip(scaled.parameters(), plain.parameters()):  # the same clipped update
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --- in a run --------------------------------------------------------------------------------------


class PreClipNorms(tricks.Plugin):
    """The global gradient norm at every optimizer step, seen from a pre-hook registered after the
    plugin's (ad-hoc plugins come last), and the plugin's count of steps before it reports them."""

    def __init__(self):
        super().__init__()
        self.norms, self.counted = [], []

    @tricks.hookimpl
    def on_fit_start(self, ctx):
        def record(optimizer, args, kwargs):
            self.norms.append(global_norm([p.grad for g in optimizer.param_groups for p in g["params"]]))

        ctx.optimizer.register_step_pre_hook(record)

    @tricks.hookimpl
    def on_evaluate_end(self, ctx, metrics):
        self.counted.append(ctx.hooks.pm.get_plugin("grad_clip")._steps)


def test_a_small_bound_clips_every_step(tmp_path):
    watcher = PreClipNorms()
    run = tiny_run(plugins=["grad_clip", watcher], set=["grad_clip.max_norm=0.001"], out=tmp_path / "run",
                   epochs=2, curves=False)
    rows = run.metrics()
    assert [r["grad_clipped"] for r in rows] == [1.0, 1.0]
    assert all(r["grad_norm"] > 0.001 and math.isfinite(r["grad_norm"]) for r in rows)
    assert watcher.counted == [8, 8]  # once per optimizer step, reset every epoch
    assert all(n <= 0.001 * (1 + 1e-6) for n in watcher.norms)  # what the optimizer stepped with


def test_a_bound_never_reached_reports_the_norms_and_leaves_training_as_without_the_plugin(tmp_path):
    watcher = PreClipNorms()
    run = tiny_run(plugins=["grad_clip", watcher], set=["grad_clip.max_norm=1e6"], out=tmp_path / "run", curves=False)
    plain = tiny_run(plugins=[], out=tmp_path / "plain", curves=False)
    [row], [base] = run.metrics(), plain.metrics()
    assert row["grad_clipped"] == 0.0
    assert row["grad_norm"] == pytest.approx(sum(watcher.norms) / len(watcher.norms), rel=1e-6)
    assert (row["train_loss"], row["val_loss"], row["val_acc"]) == (base["train_loss"], base["val_loss"], base["val_acc"])


def test_in_an_fp16_run_the_norms_are_those_of_the_unscaled_gradients(tmp_path):
    # the scaler starts at 2^16: a hook that saw scaled gradients would report norms 65536 times larger
    half = tiny_run(plugins=["grad_clip"], out=tmp_path / "fp16", precision="fp16", curves=False).metrics()[0]
    full = tiny_run(plugins=["grad_clip"], out=tmp_path / "fp32", curves=False).metrics()[0]
    assert half["grad_norm"] == pytest.approx(full["grad_norm"], rel=0.1)
    assert half["grad_clipped"] == full["grad_clipped"] == 1.0  # the first steps' norms are about 2


# --- settings ---------------------------------------------------------------------------------------


def test_the_defaults_and_an_infinite_norm():
    assert GradClipSettings() == GradClipSettings(max_norm=1.0, mode="norm", norm_type=2.0)
    cfg = tricks.resolve(plugins=["grad_clip"], sets=["grad_clip.norm_type=inf"])
    assert cfg.settings["grad_clip"].norm_type == math.inf


@pytest.mark.parametrize("setting, key", [
    ("grad_clip.max_norm=0", "max_norm"), ("grad_clip.max_norm=-1", "max_norm"), ("grad_clip.mode=foo", "mode"),
    ("grad_clip.norm_type=0.5", "norm_type"), ("grad_clip.norm_type=nan", "norm_type"),
])
def test_a_bad_setting_is_a_one_line_error_naming_the_key(setting, key):
    with pytest.raises(tricks.TricksError, match=rf"grad_clip\.{key}") as caught:
        tricks.resolve(plugins=["grad_clip"], sets=[setting])
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("setting, fragments", [
    ("grad_clip.max_norm=0", ["grad_clip.max_norm", "greater than 0"]),
    ("grad_clip.mode=foo", ["grad_clip.mode", "'norm', 'value' or 'agc'"]),
])
def test_the_cli_reports_a_bad_setting_on_one_line_with_exit_status_2(tmp_path, setting, fragments):
    code, _, stderr = cli_in_process("run", "--plugins", "grad_clip", "--set", setting, "--out", str(tmp_path / "r"))
    one_line_error(code, stderr, *fragments)
    assert not (tmp_path / "r").exists()
