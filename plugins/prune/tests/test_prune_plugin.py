"""Tests of the prune plugin in runs: the schedule (one-shot, iterative, checked against the run's
length), the log of params and MACs, the metrics and summary, the checkpoint's structure record and
``RunDir.build_model``, fine-tuning a pruned run, the slimming penalty and the Taylor gradients,
composition with the model plugins, kill-and-resume, the CLI, the contract, and bad settings."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tricks
from tricks.testing import call_wrapper, check_plugin, make_ctx, tiny_run
from tricks_prune import Prune, PruneSettings, TaylorImportance, batchnorms

from conftest import TINY, TINY_API, read_jsonl
from processes import cli_in_process, finish, finish_killed, one_line_error, one_torch_thread, start, start_script


class Logs(tricks.Reporter):
    def __init__(self):
        self.lines: list[str] = []

    def log(self, message):
        self.lines.append(message)


class Outputs(tricks.Plugin):
    """Records, when training ends, the model's outputs on fixed inputs (eval mode) and its weights."""

    def __init__(self):
        super().__init__()
        self.x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    @tricks.hookimpl
    def on_fit_end(self, ctx):
        model = ctx.model
        was = model.training
        model.eval()
        with torch.no_grad():
            self.y = model(self.x.to(ctx.device)).cpu()
        model.train(was)
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.hooked = [n for n, p in model.named_parameters() if p._backward_hooks]


def finite(run: tricks.RunDir) -> bool:
    return all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in run.metrics())


def convs(state: dict) -> dict:
    return {k: v.shape[0] for k, v in state.items() if k.endswith(".weight") and v.dim() == 4}


# --- a run --------------------------------------------------------------------------------------


def test_a_run_prunes_at_half_its_epochs_logs_the_sizes_and_is_rebuilt_from_its_directory(tmp_path):
    logs, outputs = Logs(), Outputs()
    run = tiny_run(plugins=["prune", "cosine", outputs], out=tmp_path / "run", epochs=2, reporter=logs)
    assert finite(run)
    [line] = [line for line in logs.lines if line.startswith("prune")]
    assert "50% of channels removed by l1 (global)" in line and "params 77.8K -> " in line and "MACs 0.764M -> " in line
    rows, summary = run.metrics(), run.summary()
    assert rows[0]["params"] == summary["params"] < summary["params_start"] == 77754  # resnet8 on digits
    assert rows[0]["macs"] == summary["macs"] < summary["macs_start"]
    assert "params" not in rows[1]
    assert f"{summary['params'] / 1e3:.3g}K" in line
    checkpoint = run.load_checkpoint()
    [record] = checkpoint["structure"]
    assert record["plugin"] == "prune" and record["epoch"] == 0 and record["settings"]["ratio"] == 0.5
    assert record["change"]["channels"] == [112, 56]  # inside the blocks: the residual streams stay
    assert checkpoint["plugins"]["prune"] == {"schedule": [1], "done": 1, "original": {
        "channels": 112, "params": 77754, "macs": summary["macs_start"]}}
    # the run directory rebuilds the pruned model with its trained weights (the plugin is installed)
    model = run.build_model()
    assert sum(p.numel() for p in model.parameters()) == summary["params"]
    for key, value in outputs.state.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(outputs.x), outputs.y)
    # and a later run fine-tunes it, without the prune plugin: the structure is replayed from data
    tuned = tiny_run(plugins=["cosine"], out=tmp_path / "tuned", init_from=str(run.path))
    assert convs(tuned.load_checkpoint()["model"]) == convs(checkpoint["model"])
    assert tuned.load_checkpoint()["structure"] == checkpoint["structure"]
    assert tuned.summary()["params"] == summary["params"]
    # and its architecture trains from scratch (Liu et al. 2019's control): the shapes, fresh weights
    scratch = tiny_run(plugins=["cosine"], out=tmp_path / "scratch", structure_from=str(run.path))
    weights = scratch.load_checkpoint()["model"]
    assert convs(weights) == convs(checkpoint["model"]) and scratch.summary()["params_start"] == summary["params"]
    assert not torch.equal(weights["stem.0.weight"], checkpoint["model"]["stem.0.weight"])


def test_iterative_pruning_reaches_the_ratio_in_equal_steps(tmp_path):
    logs = Logs()
    run = tiny_run(plugins=["prune"], out=tmp_path / "run", epochs=4, reporter=logs,
                   set=["prune.at=2", "prune.steps=2", "prune.every=2", "prune.ratio=0.6", "prune.scope=layer"])
    rows = run.metrics()
    assert [("params" in r) for r in rows] == [False, True, False, True]
    lines = [line for line in logs.lines if line.startswith("prune")]
    assert len(lines) == 2 and lines[0].startswith("prune step 1/2: 30% of channels removed")
    assert lines[1].startswith("prune step 2/2: 60% of channels removed")
    first, second = (line.rsplit("channels ", 1)[1].split() for line in lines)  # "A -> B of C"
    assert first[2] == second[0] and first[4] == second[4] == "112"  # the channels inside resnet8's 3 blocks
    assert abs(int(second[2]) - 0.4 * 112) <= 3  # 40% kept, to a channel per group (3 groups)
    structure = run.load_checkpoint()["structure"]
    assert [r["epoch"] for r in structure] == [1, 3] and [r["change"]["step"] for r in structure] == [1, 2]
    assert rows[1]["params"] > rows[3]["params"]


def test_a_macs_target_is_met_in_a_run(tmp_path):
    run = tiny_run(plugins=["prune"], out=tmp_path / "run", set=["prune.target=macs", "prune.ratio=0.3"])
    summary = run.summary()
    assert 0.65 <= summary["macs"] / summary["macs_start"] <= 0.7


def test_ratio_zero_changes_nothing_and_records_no_structure(tmp_path):
    logs = Logs()
    run = tiny_run(plugins=["prune"], out=tmp_path / "run", reporter=logs, set=["prune.ratio=0"])
    checkpoint = run.load_checkpoint()
    assert checkpoint["structure"] == [] and "params" not in run.metrics()[0]
    assert run.summary()["params"] == run.summary()["params_start"]
    assert any(line.startswith("prune: 0% of channels removed") for line in logs.lines)


class TaylorWatch(Prune):
    """The prune plugin, recording how many batches the Taylor scores were accumulated over."""

    def prune(self, ctx, model):
        if self._taylor is not None:
            self.batches = self._taylor.batches + self._taylor._dirty
        return super().prune(ctx, model)


TaylorWatch.prune = tricks.hookimpl(TaylorWatch.prune)


@pytest.mark.parametrize("precision, channels_last", [("fp32", False), ("fp16", True)])
def test_taylor_accumulates_over_the_epoch_before_pruning_and_leaves_no_hooks(tmp_path, precision, channels_last):
    pruner, outputs = TaylorWatch(PruneSettings(criterion="taylor", at=2)), Outputs()
    run = tiny_run(plugins=[pruner, outputs], out=tmp_path / "run", epochs=2, precision=precision,
                   channels_last=channels_last)
    assert finite(run) and pruner.batches == 8  # the 8 steps of epoch 2, not those of epoch 1
    assert outputs.hooked == [] and pruner._taylor is None
    assert run.summary()["params"] < run.summary()["params_start"]


def test_the_slimming_penalty_is_added_to_the_loss_until_the_last_step():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 10))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, -2.0, 0.5, 0.0]))
    ctx = make_ctx(model=model)
    plugin = Prune(PruneSettings(criterion="slimming", sparsity=0.01))
    plugin.schedule = [1]
    loss = call_wrapper(plugin.build_loss(ctx), lambda output, batch: torch.tensor(2.0))
    assert loss(None, {}).item() == pytest.approx(2.0 + 0.01 * 3.5)
    gamma = model[1].weight
    loss(None, {}).backward()
    torch.testing.assert_close(gamma.grad, 0.01 * torch.tensor([1.0, -1.0, 1.0, 0.0]))  # lambda * sign(gamma)
    plugin.done = 1
    assert loss(None, {}).item() == 2.0  # fine-tuning: no penalty
    base = lambda output, batch: torch.tensor(1.0)
    assert call_wrapper(Prune(PruneSettings(criterion="l1")).build_loss(ctx), base) is base
    assert batchnorms(model) == [model[1]]


def test_the_slimming_penalty_trains_the_gammas_down(tmp_path):
    # The same run (seed, data) with and without the penalty: only the penalty differs.
    plain, sparse = Outputs(), Outputs()
    sets = ["prune.at=2", "prune.ratio=0", "prune.criterion=slimming"]
    tiny_run(plugins=["prune", plain], out=tmp_path / "plain", epochs=2, set=sets + ["prune.sparsity=0"])
    tiny_run(plugins=["prune", sparse], out=tmp_path / "sparse", epochs=2, set=sets + ["prune.sparsity=0.05"])
    gammas = lambda state: sum(v.abs().sum().item() for k, v in state.items() if k.endswith("bn1.weight"))
    assert gammas(sparse.state) < 0.9 * gammas(plain.state)


# --- composition ----------------------------------------------------------------------------------


@pytest.mark.parametrize("plugins, core", [
    (["dropblock", "zero_gamma", "prune"], {"model": "resnet20"}),
    (["resnet_tweaks", "prune"], {"model": "resnet20"}),
    (["regnet", "prune"], {"model": "anynet"}),
], ids=["dropblock+zero_gamma", "resnet_tweaks", "regnet-y"])
def test_models_of_the_other_plugins_prune_in_a_run(tmp_path, plugins, core):
    sets = ["prune.criterion=taylor", "dropblock.keep_prob=0.8"] if "dropblock" in plugins else []
    if "regnet" in plugins:
        sets = ["regnet.arch={depths: [1, 1], widths: [16, 32], bottlenecks: 1, groups: 8, stem_width: 16, se: 0.25}",
                "regnet.stem=cifar"]
    outputs = Outputs()
    run = tiny_run(plugins=[*plugins, outputs], out=tmp_path / "run", set=sets, **core)
    assert finite(run)
    summary = run.summary()
    assert summary["params"] < 0.75 * summary["params_start"]  # half the channels inside the blocks
    model = run.build_model()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(outputs.x), outputs.y)


# --- resume ---------------------------------------------------------------------------------------


SEED, EPOCHS = 5, 4
STEPS = ["prune.at=2", "prune.steps=2", "prune.every=1"]


@pytest.mark.slow
@pytest.mark.parametrize("criterion", [["prune.criterion=taylor"],
                                       ["prune.criterion=dcp", "prune.samples=32", "prune.refit_steps=2"]],
                         ids=["taylor", "dcp"])
def test_kill_and_resume_after_a_pruning_epoch_ends_as_an_uninterrupted_run(tmp_path, criterion):
    # Pruning at the end of epochs 2 and 3; the run is killed as epoch 3 starts, between them (dcp:
    # its auxiliary heads, trained since epoch 1, come back from the checkpoint and keep training).
    resumed = [*criterion, *STEPS]
    reference, run = tmp_path / "uninterrupted", tmp_path / "killed"
    killed = start_script(f"""
        import tricks
        from processes import KillAtEpoch
        tricks.run(plugins=["prune", "cosine", KillAtEpoch(2)], set={resumed!r}, epochs={EPOCHS}, seed={SEED},
                   device="cpu", out={str(run)!r}, **{TINY_API!r})
    """)
    with one_torch_thread():
        want = tricks.run(plugins=["prune", "cosine"], set=resumed, epochs=EPOCHS, seed=SEED, device="cpu",
                          out=reference, **TINY_API)
    finish_killed(killed)
    checkpoint = tricks.RunDir(run).load_checkpoint()
    assert checkpoint["epoch"] == 2 and len(checkpoint["structure"]) == 1
    assert checkpoint["plugins"]["prune"]["done"] == 1
    with one_torch_thread():
        got = tricks.run(resume=run)
    assert got["params"] == want["params"] < want["params_start"] and got["macs"] == want["macs"]
    got_check, want_check = tricks.RunDir(run).load_checkpoint(), tricks.RunDir(reference).load_checkpoint()
    assert [r["change"]["steps"] for r in got_check["structure"]] == [r["change"]["steps"] for r in want_check["structure"]]
    assert got["final_val_acc"] == want["final_val_acc"]
    assert got["final_val_loss"] == pytest.approx(want["final_val_loss"], rel=1e-6)
    got_rows, want_rows = read_jsonl(run / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    assert [r["epoch"] for r in got_rows] == [r["epoch"] for r in want_rows] == list(range(1, EPOCHS + 1))
    for a, b in zip(got_rows, want_rows):
        assert a["val_acc"] == b["val_acc"] and a.get("params") == b.get("params") and a.get("macs") == b.get("macs")
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)


@pytest.mark.slow
def test_taylor_pruning_under_data_parallel_training_prunes_every_rank_alike(tmp_path):
    # Each rank sees its own batches: the Taylor scores are summed over the ranks before ranking,
    # otherwise the ranks would remove different channels and DistributedDataParallel would fail.
    import sys

    out = tmp_path / "run"
    proc = finish(start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                         "-m", "tricks.cli.main", "run", *TINY, "--plugins", "prune", "--set", "prune.criterion=taylor",
                         "--epochs", "2", "--device", "cpu", "--out", str(out)], env={"TRICKS_DIST_BACKEND": "gloo"}))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tricks.RunDir(out)
    assert run.summary()["world_size"] == 2 and run.summary()["params"] < run.summary()["params_start"]
    [record] = run.load_checkpoint()["structure"]
    assert record["change"]["criterion"] == "taylor" and record["change"]["channels"] == [112, 56]


# --- the CLI and the contract --------------------------------------------------------------------------


def test_the_cli_prints_the_sizes_and_the_run_directory_holds_fewer_channels(tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = cli_in_process("run", "--model", "resnet20", "--plugins", "prune,cosine", "--set",
                                          "prune.ratio=0.5", *TINY[2:], "--epochs", "2", "--device", "cpu",
                                          "--out", str(out))
    assert code == 0, stderr
    text = " ".join((stdout + stderr).split())  # the console may wrap the line
    assert "prune: 50% of channels removed by l1 (global): params 0.272M -> " in text and "MACs 2.53M -> " in text
    checkpoint = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    widths = convs(checkpoint["model"])
    # half of the 336 channels inside the blocks go (one global ranking); the residual streams stay
    assert widths["stem.0.weight"] == 16 and all(widths[f"stages.{i}.{j}.conv2.weight"] == 16 << i
                                                 for i in range(3) for j in range(3))
    assert sum(widths.values()) == 16 * 7 + 32 * 6 + 64 * 6 + 32 + 64 - 168


def test_the_plugin_keeps_the_contract(tmp_path):
    check_plugin(Prune, workdir=tmp_path)


# --- bad settings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting, key", [
    ("prune.ratio=1", "ratio"), ("prune.ratio=-0.5", "ratio"), ("prune.criterion=l2", "criterion"),
    ("prune.scope=stage", "scope"), ("prune.target=flops", "target"), ("prune.at=0", "at"),
    ("prune.steps=0", "steps"), ("prune.every=0", "every"), ("prune.min_channels=0", "min_channels"),
    ("prune.sparsity=-1", "sparsity"), ("prune.exclude=stem", "exclude"), ("prune.rate=0.5", "rate"),
])
def test_a_bad_setting_is_an_error_naming_the_key(setting, key):
    with pytest.raises(tricks.TricksError, match=rf"prune\.{key}") as caught:
        tricks.resolve(plugins=["prune"], sets=[setting])
    assert "\n" not in str(caught.value)


class NoNorms(tricks.Plugin):
    @tricks.hookimpl
    def build_model(self, ctx):
        return nn.Sequential(nn.Conv2d(ctx.in_chans, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, ctx.num_classes))


@pytest.mark.parametrize("sets, plugins, fragment", [
    (["prune.at=3"], [], "the pruning step is planned at the end of epoch 3, but the run has 2 epochs"),
    (["prune.at=1", "prune.steps=3"], [], "the last pruning step is planned at the end of epoch 3"),
    (["prune.exclude=[stme*]"], [], "prune.exclude: 'stme*' matches no conv or linear layer of ResNet"),
    (["prune.criterion=slimming"], [NoNorms()], "Sequential has no BatchNorm layer"),
    (["prune.exclude=['*']"], [], "no channel of ResNet may be removed"),
    (["prune.target=macs", "prune.ratio=0.95", "prune.exclude=[stages.2*]"], [], "the macs cannot fall by 95%"),
])
def test_a_plan_that_does_not_fit_the_run_stops_it_before_training(tmp_path, sets, plugins, fragment):
    with pytest.raises(tricks.TricksError) as caught:
        tiny_run(plugins=["prune", *plugins], out=tmp_path / "run", epochs=2, set=sets)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)
    assert not tricks.RunDir(tmp_path / "run").has_checkpoint()  # nothing trained


def test_the_cli_reports_a_bad_setting_on_one_line(tmp_path):
    code, _, stderr = cli_in_process("run", "--plugins", "prune", "--set", "prune.ratio=1.5", "--out", str(tmp_path / "r"))
    one_line_error(code, stderr, "prune.ratio")


def test_the_taylor_importance_of_a_fresh_accumulator_is_zero():
    from tricks.models import create_model

    model = create_model("resnet8", 10, 1)
    with TaylorImportance(model, torch.zeros(1, 1, 8, 8)) as taylor:
        assert taylor.batches == 0 and all(not v.any() for v in taylor.scores().values())


@pytest.mark.slow
def test_a_model_pruned_to_narrow_odd_widths_trains_on_the_cpu(tmp_path):
    """With torch 2.14.1, oneDNN's convolution backward corrupted the heap a few steps after 70%
    of resnet20's channels were removed (an abort or a segfault in the next epoch); the core
    trains a changed structure on the CPU without oneDNN, and restores the flag afterwards."""
    import torch

    with one_torch_thread():
        summary = tricks.run(plugins=["cosine", "prune"], set=["prune.ratio=0.7", "prune.at=1", "prune.streams=true"],
                             model="resnet20",
                             batch_size=128, train_limit=1000, epochs=2, seed=0, device="cpu", out=tmp_path / "run")
    assert summary["status"] == "complete" and summary["params"] < summary["params_start"] / 5
    assert torch.backends.mkldnn.enabled
