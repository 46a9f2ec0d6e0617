"""Tests of the ema plugin: the average after every optimizer step against its closed form, timm's
warmup, the val_ema metrics and summary, decay 0, a structural change that restarts the average,
fp16's skipped steps, and resuming (in process and after a real kill) to the uninterrupted result."""

from __future__ import annotations

import math

import pytest
import torch
from timm.utils import ModelEmaV3
from torch import nn

import tricks
from tricks.testing import make_ctx, one_torch_thread, tiny_run
from tricks_ema import EMA, EMASettings, warmup_decay

from processes import StopAtEpoch, cli_in_process, finish_killed, one_line_error, start_script

TINY_API = {"model": "resnet8", "batch_size": 32, "train_limit": 256, "val_limit": 128, "device": "cpu", "curves": False}


def floats(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items() if v.is_floating_point()}


class Recorder(tricks.Plugin):
    """After every optimizer step (after the ema plugin's update: ad-hoc plugins come last, and
    step hooks run in the order they were registered), the model's and the average's floating
    state, the plugin's update count and ctx.step."""

    def __init__(self):
        super().__init__()
        self.weights, self.averages, self.counts = [], [], []

    @tricks.hookimpl
    def on_fit_start(self, ctx):
        plugin = ctx.hooks.pm.get_plugin("ema")

        def record(optimizer, args, kwargs):
            self.weights.append(floats(ctx.model.state_dict()))
            self.averages.append(floats(plugin.ema.module.state_dict()))
            self.counts.append((plugin.updates, ctx.step))

        ctx.optimizer.register_step_post_hook(record)


def assert_states_close(got: dict, want: dict, **tolerance) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, msg=key, **tolerance)


# --- the average ---------------------------------------------------------------------------------


def test_after_every_step_the_average_is_its_closed_form_for_a_constant_decay(tmp_path):
    d = 0.8
    recorder = Recorder()
    tiny_run(plugins=["ema", recorder], set=[f"ema.decay={d}", "ema.warmup=false"], out=tmp_path / "run", curves=False)
    k_max = len(recorder.weights)
    assert k_max == 8
    # update k happens inside optimizer step k, before the core advances ctx.step (k - 1 then)
    assert recorder.counts == [(k, k - 1) for k in range(1, k_max + 1)]
    w = recorder.weights
    for k in range(1, k_max + 1):
        # the first update copies the weights (timm: decay 0 at step 1); then the constant decay
        want = {key: d ** (k - 1) * w[0][key] + sum((1 - d) * d ** (k - j) * w[j - 1][key] for j in range(2, k + 1))
                for key in w[0]}
        assert_states_close(recorder.averages[k - 1], want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(recorder.averages[-1]["fc.weight"], w[-1]["fc.weight"])


def test_timms_warmup_decay():
    ema = ModelEmaV3(nn.Linear(2, 2), decay=0.9998, use_warmup=True, warmup_power=2 / 3)
    assert warmup_decay(1, 0.9998, 2 / 3) == ema.get_decay(1) == 0.0
    for t in (2, 3, 10, 100, 1000, 10**6):
        assert warmup_decay(t, 0.9998, 2 / 3) == pytest.approx(min(0.9998, 1 - t ** (-2 / 3)), rel=1e-12)
        assert warmup_decay(t, 0.9998, 2 / 3) == pytest.approx(ema.get_decay(t), rel=1e-12)
    assert warmup_decay(101, 0.9998, 2 / 3) == pytest.approx(1 - 101 ** (-2 / 3))  # 0.9538...
    assert warmup_decay(10**6, 0.9998, 2 / 3) == 0.9998  # capped once 1 - t^(-2/3) passes the decay (t > 353,553)
    assert warmup_decay(50, 0.9, 0.75) == 0.9


def test_with_warmup_each_step_moves_the_average_by_the_warmup_decay(tmp_path):
    recorder = Recorder()
    tiny_run(plugins=["ema", recorder], out=tmp_path / "run", curves=False)  # the defaults: warmup on
    w, a = recorder.weights, recorder.averages
    assert_states_close(a[0], w[0], rtol=0, atol=0)  # the first update copies
    for t in range(2, len(w) + 1):
        d = 1 - t ** (-2 / 3)
        want = {key: d * a[t - 2][key] + (1 - d) * w[t - 1][key] for key in w[0]}
        assert_states_close(a[t - 1], want, rtol=1e-5, atol=1e-6)


# --- in a run --------------------------------------------------------------------------------------


def test_a_run_reports_the_average_beside_the_model(tmp_path):
    run = tiny_run(plugins=["ema"], out=tmp_path / "run", epochs=2, curves=False)
    rows = run.metrics()
    for row in rows:
        assert math.isfinite(row["val_ema_loss"]) and 0 <= row["val_ema_acc"] <= 1
        assert "val_ema_n" not in row
    summary = run.summary()
    assert summary["final_val_ema_acc"] == rows[-1]["val_ema_acc"]
    assert summary["best_val_ema_acc"] == max(r["val_ema_acc"] for r in rows)
    assert rows[summary["best_ema_epoch"] - 1]["val_ema_acc"] == summary["best_val_ema_acc"]
    checkpoint = run.load_checkpoint()
    state = checkpoint["plugins"]["ema"]
    assert state["updates"] == checkpoint["step"] == 16
    assert state["module"].keys() == checkpoint["model"].keys()
    assert all(v.dtype == checkpoint["model"][k].dtype for k, v in state["module"].items())
    assert not torch.allclose(state["module"]["fc.weight"], checkpoint["model"]["fc.weight"])
    assert rows[-1]["val_ema_loss"] != rows[-1]["val_loss"]


def test_with_decay_zero_the_average_is_the_model(tmp_path):
    run = tiny_run(plugins=["ema"], set=["ema.decay=0"], out=tmp_path / "run", curves=False)
    checkpoint = run.load_checkpoint()
    averaged, model = checkpoint["plugins"]["ema"]["module"], checkpoint["model"]
    for key in model:
        assert torch.equal(averaged[key], model[key]), key
    [row] = run.metrics()
    assert row["val_ema_acc"] == row["val_acc"] and row["val_ema_loss"] == row["val_loss"]


class Narrowing(tricks.Plugin):
    """A small conv net whose conv loses half its channels (and the linear layer its inputs) at the
    end of epoch 1: a structural change, replayable, after which the core rebuilds the optimizer."""

    @tricks.hookimpl
    def build_model(self, ctx):
        return nn.Sequential(nn.Conv2d(ctx.in_chans, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, ctx.num_classes))

    def _narrow(self, model, keep: int) -> None:
        conv, fc = model[0], model[4]
        with torch.no_grad():
            new_conv = nn.Conv2d(conv.in_channels, keep, 3, padding=1).to(conv.weight.device)
            new_conv.weight.copy_(conv.weight[:keep])
            new_conv.bias.copy_(conv.bias[:keep])
            new_fc = nn.Linear(keep, fc.out_features).to(fc.weight.device)
            new_fc.weight.copy_(fc.weight[:, :keep])
            new_fc.bias.copy_(fc.bias)
        model[0], model[4] = new_conv, new_fc

    @tricks.hookimpl
    def prune(self, ctx, model):
        if ctx.epoch == 0:
            self._narrow(model, 4)
            return {"keep": 4}
        return None

    @tricks.hookimpl
    def replay_structure(self, ctx, model, change):
        self._narrow(model, change["keep"])


class Logs(tricks.Reporter):
    def __init__(self):
        self.lines: list[str] = []

    def log(self, message):
        self.lines.append(message)


def test_a_structural_change_restarts_the_average_on_the_new_optimizer(tmp_path):
    logs = Logs()
    run = tiny_run(plugins=["ema", Narrowing()], out=tmp_path / "run", epochs=2, curves=False, reporter=logs)
    assert [line for line in logs.lines if line.startswith("ema:")] == [
        "ema: the model's structure changed in epoch 1; the average restarts from its current weights"]
    checkpoint = run.load_checkpoint()
    state = checkpoint["plugins"]["ema"]
    assert state["module"]["0.weight"].shape == checkpoint["model"]["0.weight"].shape == (4, 1, 3, 3)
    assert state["updates"] == 8  # restarted after epoch 1, then updated by the rebuilt optimizer's 8 steps
    assert all(math.isfinite(r["val_ema_loss"]) for r in run.metrics())


def test_a_step_the_fp16_scaler_skips_is_not_an_update():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = make_ctx(plugins=["ema"], model=model, optimizer=optimizer)
    plugin = EMA(EMASettings(decay=0.5, warmup=False))
    plugin.on_fit_start(ctx=ctx)
    scaler = torch.amp.GradScaler("cpu")
    x = torch.randn(4, 3)

    def step(inputs):
        optimizer.zero_grad()
        scaler.scale(model(inputs).square().mean()).backward()
        scaler.step(optimizer)
        scaler.update()

    step(x)
    assert plugin.updates == 1
    before = floats(plugin.ema.module.state_dict())
    weights = floats(model.state_dict())
    step(torch.full((4, 3), float("inf")))  # overflowing gradients: the scaler skips optimizer.step
    assert plugin.updates == 1
    assert_states_close(floats(model.state_dict()), weights, rtol=0, atol=0)
    assert_states_close(floats(plugin.ema.module.state_dict()), before, rtol=0, atol=0)
    step(x)
    assert plugin.updates == 2
    want = {k: 0.5 * before[k] + 0.5 * v for k, v in floats(model.state_dict()).items()}
    assert_states_close(floats(plugin.ema.module.state_dict()), want)


# --- resume ----------------------------------------------------------------------------------------


def assert_same_run(got: tricks.RunDir, want: tricks.RunDir) -> None:
    got_check, want_check = got.load_checkpoint(), want.load_checkpoint()
    got_ema, want_ema = got_check["plugins"]["ema"], want_check["plugins"]["ema"]
    assert got_ema["updates"] == want_ema["updates"] == 16
    assert_states_close(got_ema["module"], want_ema["module"], rtol=1e-6, atol=1e-7)
    got_rows, want_rows = got.metrics(), want.metrics()
    assert [r["epoch"] for r in got_rows] == [r["epoch"] for r in want_rows] == [1, 2]
    for a, b in zip(got_rows, want_rows):
        assert a["val_ema_acc"] == b["val_ema_acc"] and a["val_acc"] == b["val_acc"]
        assert a["val_ema_loss"] == pytest.approx(b["val_ema_loss"], rel=1e-6)
    for key in ("final_val_ema_acc", "best_val_ema_acc", "best_ema_epoch"):
        assert got.summary()[key] == want.summary()[key]


SETS = ["ema.decay=0.9", "ema.warmup=false"]  # a short window: the average follows the late steps


def test_a_run_stopped_after_epoch_1_and_resumed_ends_as_an_uninterrupted_one(tmp_path):
    want = tiny_run(plugins=["ema"], set=SETS, out=tmp_path / "whole", epochs=2, curves=False)
    with pytest.raises(tricks.PluginHookError, match="stopped as epoch 1 starts"):
        tiny_run(plugins=["ema", StopAtEpoch(1)], set=SETS, out=tmp_path / "stopped", epochs=2, curves=False)
    stopped = tricks.RunDir(tmp_path / "stopped")
    assert len(stopped.metrics()) == 1 and stopped.load_checkpoint()["plugins"]["ema"]["updates"] == 8
    tricks.run(resume=stopped.path)
    assert_same_run(stopped, want)


@pytest.mark.slow
def test_a_run_killed_after_epoch_1_and_resumed_ends_as_an_uninterrupted_one(tmp_path):
    killed_dir, reference = tmp_path / "killed", tmp_path / "uninterrupted"
    killed = start_script(f"""
        import tricks
        from processes import KillAtEpoch
        tricks.run(plugins=["ema", KillAtEpoch(1)], set={SETS!r}, epochs=2, out={str(killed_dir)!r}, **{TINY_API!r})
    """)
    with one_torch_thread():
        tricks.run(plugins=["ema"], set=SETS, epochs=2, out=reference, **TINY_API)
    finish_killed(killed)
    assert tricks.RunDir(killed_dir).load_checkpoint()["epoch"] == 1
    with one_torch_thread():
        tricks.run(resume=killed_dir)
    assert_same_run(tricks.RunDir(killed_dir), tricks.RunDir(reference))


# --- settings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting, key", [("ema.decay=1", "decay"), ("ema.decay=-0.1", "decay"),
                                          ("ema.warmup_power=0", "warmup_power"), ("ema.warmup=maybe", "warmup")])
def test_a_bad_setting_is_a_one_line_error_naming_the_key(setting, key):
    with pytest.raises(tricks.TricksError, match=rf"ema\.{key}") as caught:
        tricks.resolve(plugins=["ema"], sets=[setting])
    assert "\n" not in str(caught.value)


def test_the_cli_reports_a_bad_decay_on_one_line(tmp_path):
    code, _, stderr = cli_in_process("run", "--plugins", "ema", "--set", "ema.decay=1.5", "--out", str(tmp_path / "r"))
    one_line_error(code, stderr, "ema.decay")
