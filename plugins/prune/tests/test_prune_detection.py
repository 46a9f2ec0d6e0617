"""Tests of the prune plugin on a detector (``--task detection``): the part pruned is the one the
model names with ``prune_root`` (the backbone's stem and stages), the stage outputs the feature
pyramid reads keep their widths (with and without ``prune.streams``), the criteria l1, random,
slimming and taylor in tiny runs on the bundled digits, the change replayed on a fresh detector
(``RunDir.build_model``, ``core.init_from``, a resume that ends as the uninterrupted run), the log
of the backbone's sizes, and dcp refused on one line."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import tricks
from tricks.testing import CLOCK_COLUMNS, call_wrapper, make_ctx, tiny_run
from tricks_detection import DetectionSettings
from tricks_detection.models import build_detector
from tricks_prune import Prune, PruneSettings, format_count, pruned_part
from tricks_prune.graph import find_groups

from processes import StopAtEpoch, cli_in_process, one_line_error, one_torch_thread

# A detection run that finishes in seconds on one core: 64 canvases of 32 px in batches of 16.
SETS = ["detection.train_images=64", "detection.val_images=16", "detection.canvas=32", "detection.fpn_channels=32",
        "detection.draw=0"]
CORE = dict(task="detection", dataset="digits_detection", model="fcos:resnet8", batch_size=16, lr=0.01,
            train_limit=None, val_limit=None, curves=False)
CLI = ["--task", "detection", "--dataset", "digits_detection", "--model", "fcos:resnet8", "--batch-size", "16",
       "--epochs", "2", "--device", "cpu", *(arg for s in SETS for arg in ("--set", s))]
STEPS_PER_EPOCH = 64 // 16
LINE = re.compile(r"prune: (\d+)% of channels removed by (\w+) \(global\): backbone params (\S+) -> (\S+), "
                  r"backbone MACs (\S+) -> (\S+); channels (\d+) -> (\d+) of (\d+)$")


class Logs(tricks.Reporter):
    def __init__(self):
        self.lines: list[str] = []

    def log(self, message):
        self.lines.append(message)


class Final(tricks.Plugin):
    """Keeps the model as the run ends, and which of its parameters still carry gradient hooks."""

    tasks = ("detection",)

    @tricks.hookimpl
    def on_fit_end(self, ctx):
        self.model = ctx.model
        self.state = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        self.hooked = [n for n, p in ctx.model.named_parameters() if p._backward_hooks]


class DetectionStop(StopAtEpoch):
    tasks = ("detection",)


def detector(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    ctx = make_ctx(image_size=32, num_classes=10, in_chans=1)
    return build_detector(ctx, "fcos:resnet8", DetectionSettings(fpn_channels=32))


def stage_widths(model: nn.Module) -> list[int]:
    """The channels of each stage output the backbone returns (what the feature pyramid reads)."""
    body = model.backbone.body
    was = body.training
    body.eval()
    with torch.no_grad():
        out = body(torch.zeros(1, 1, 32, 32, device=next(body.parameters()).device))
    body.train(was)
    return [t.shape[1] for t in out.values()]


def fpn_inputs(model: nn.Module) -> list[int]:
    return [block[0].in_channels for block in model.backbone.fpn.inner_blocks]


def runs_forward(model: nn.Module) -> None:
    """A training step's forward (finite losses) and an evaluation forward (detections) both run."""
    device = next(model.parameters()).device
    images = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    targets = [{"boxes": torch.tensor([[2.0, 3.0, 14.0, 17.0]], device=device), "labels": torch.tensor([3], device=device)},
               {"boxes": torch.tensor([[10.0, 8.0, 30.0, 28.0]], device=device), "labels": torch.tensor([7], device=device)}]
    was = model.training
    try:
        model.train()
        losses = model(images, targets)
        assert losses and all(torch.isfinite(v).all() for v in losses.values())
        model.eval()
        with torch.no_grad():
            detections = model(images)
        assert len(detections) == 2 and all({"boxes", "scores", "labels"} <= set(d) for d in detections)
    finally:
        model.train(was)


def shapes(model: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def finite(rows: list[dict]) -> bool:
    return all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_map"]) for r in rows)


# --- the part pruned -------------------------------------------------------------------------------


@pytest.mark.parametrize("streams", [False, True], ids=["inside-blocks", "streams"])
def test_the_backbone_is_pruned_and_the_stage_outputs_the_pyramid_reads_keep_their_widths(streams):
    model = detector()
    fresh = detector(seed=1)
    assert pruned_part(model) is model.backbone.body and stage_widths(model) == fpn_inputs(model) == [32, 64]
    plugin = Prune(PruneSettings(ratio=0.5, streams=streams))
    plugin.schedule = [1]
    ctx = make_ctx(image_size=32, epochs=1, epoch=0)
    change = plugin.prune(ctx, model)
    assert change["root"] == "backbone.body"
    body = dict(model.backbone.body.named_modules())
    assert change["steps"] and all(step["layer"] in body for step in change["steps"])
    # only the backbone's stem and stages changed; the pyramid, the heads and the stage outputs did not
    before, after = shapes(fresh), shapes(model)
    changed = sorted(k for k in before if before[k] != after[k])
    assert changed and all(k.startswith("backbone.body.") for k in changed)
    assert stage_widths(model) == fpn_inputs(model) == [32, 64]
    assert sum(p.numel() for p in model.backbone.body.parameters()) < 0.7 * sum(
        p.numel() for p in fresh.backbone.body.parameters())
    runs_forward(model)
    # the groups that write a returned stage output (stage 1 is also read by stage 2) stay
    _, groups = find_groups(model.backbone.body, torch.zeros(1, 1, 32, 32))
    outputs = {g.key: g.why for g in groups if "feeds the model's output" in g.why}
    assert set(outputs) == {"stages.1.0.conv2", "stages.2.0.conv2"}
    if streams:
        assert "stem.0" in [s["layer"] for s in change["steps"]]  # stage 0's stream is not returned: it goes too
    # the change replays on a fresh detector (what resume, init_from and RunDir.build_model do)
    plugin.replay_structure(ctx, fresh, change)
    assert shapes(fresh) == shapes(model)
    runs_forward(fresh)


def test_a_change_of_the_backbone_does_not_replay_on_a_classifier_and_a_bad_prune_root_is_one_line():
    model = detector()
    plugin = Prune(PruneSettings())
    plugin.schedule = [1]
    ctx = make_ctx(image_size=32, epochs=1, epoch=0)
    change = plugin.prune(ctx, model)
    from tricks.models import create_model

    with pytest.raises(tricks.TricksError, match="made on the sub-module 'backbone.body'") as caught:
        plugin.replay_structure(make_ctx(), create_model("resnet8", 10, 1), change)
    assert "\n" not in str(caught.value)
    broken = detector()
    broken.prune_root = "backbone.bdy"
    with pytest.raises(tricks.TricksError, match="prune_root is 'backbone.bdy', which names no sub-module") as caught:
        pruned_part(broken)
    assert "\n" not in str(caught.value)


# --- runs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["l1", "random", "slimming"])
def test_a_detection_run_prunes_the_backbone_and_logs_its_sizes(tmp_path, criterion):
    logs, final = Logs(), Final()
    with one_torch_thread():
        run = tiny_run(plugins=["prune", final], set=[*SETS, f"prune.criterion={criterion}"], out=tmp_path / "run",
                       epochs=2, reporter=logs, **CORE)
    rows, summary = run.metrics(), run.summary()
    assert len(rows) == 2 and finite(rows) and all("val_map" in r for r in rows)
    [line] = [line for line in logs.lines if line.startswith("prune")]
    match = LINE.match(line)
    assert match, line
    [record] = run.load_checkpoint()["structure"]
    change = record["change"]
    before, after = change["before"], change["after"]
    assert match.group(2) == criterion and change["root"] == "backbone.body"
    assert match.group(3, 4) == (format_count(before["params"]), format_count(after["params"], like=before["params"]))
    assert match.group(5, 6) == (format_count(before["macs"]), format_count(after["macs"], like=before["macs"]))
    assert after["params"] < 0.7 * before["params"]  # half the channels inside the blocks: a sizeable drop
    assert before["params"] == 77104  # resnet8's stem and stages, on one input channel
    # the run's own sizes count the whole detector: it lost exactly what the backbone lost
    assert summary["params_start"] - summary["params"] == before["params"] - after["params"]
    assert rows[0]["params"] == summary["params"]
    model = final.model
    assert stage_widths(model) == fpn_inputs(model) == [32, 64]
    runs_forward(model)
    if criterion == "l1":
        # the run directory rebuilds the pruned detector with its trained weights
        rebuilt = run.build_model()
        assert rebuilt.state_dict().keys() == final.state.keys()
        for key, value in final.state.items():
            torch.testing.assert_close(rebuilt.state_dict()[key], value.cpu(), rtol=0, atol=0)
        # and a later detection run starts from it (core.init_from), the structure replayed from data
        with one_torch_thread():
            tuned = tiny_run(plugins=[], set=SETS, out=tmp_path / "tuned", epochs=1,
                             **{**CORE, "init_from": str(run.path)})
        assert tuned.load_checkpoint()["structure"] == run.load_checkpoint()["structure"]
        assert tuned.summary()["params"] == tuned.summary()["params_start"] == summary["params"]


class TaylorWatch(Prune):
    """The prune plugin in a detection run, keeping the Taylor scores it ranks by and how many
    batches they were accumulated over."""

    tasks = ("classification", "detection")

    def prune(self, ctx, model):
        if self._taylor is not None:
            self.scores = self._taylor.scores()
            self.batches = self._taylor.batches
        return super().prune(ctx, model)


TaylorWatch.prune = tricks.hookimpl(TaylorWatch.prune)


def test_taylor_ranks_the_backbone_by_the_gradients_of_the_detectors_losses(tmp_path):
    pruner, final, logs = TaylorWatch(PruneSettings(criterion="taylor")), Final(), Logs()
    with one_torch_thread():
        run = tiny_run(plugins=[pruner, final], set=SETS, out=tmp_path / "run", epochs=2, reporter=logs, **CORE)
    assert finite(run.metrics())
    assert pruner.batches == STEPS_PER_EPOCH  # the training steps of the pruning epoch (the first)
    assert pruner.scores and all(v.sum() > 0 and torch.isfinite(v).all() for v in pruner.scores.values())
    assert set(pruner.scores) == {"stages.0.0.conv1", "stages.1.0.conv1", "stages.2.0.conv1"}
    assert pruner._taylor is None and final.hooked == []  # the hooks are gone
    [record] = run.load_checkpoint()["structure"]
    assert record["change"]["criterion"] == "taylor"
    assert record["change"]["after"]["params"] < 0.7 * record["change"]["before"]["params"]
    assert any(line.startswith("prune: 50% of channels removed by taylor (global): backbone params") for line in logs.lines)
    assert stage_widths(final.model) == fpn_inputs(final.model) == [32, 64]


def test_a_detection_run_stopped_after_the_pruning_epoch_and_resumed_ends_as_an_uninterrupted_one(tmp_path):
    sets = [*SETS, "prune.criterion=taylor"]
    with one_torch_thread():
        want = tiny_run(plugins=["prune"], set=sets, out=tmp_path / "whole", epochs=2, **CORE)
        with pytest.raises(tricks.PluginHookError, match="stopped as epoch 1 starts"):
            tiny_run(plugins=["prune", DetectionStop(1)], set=sets, out=tmp_path / "stopped", epochs=2, **CORE)
        stopped = tricks.RunDir(tmp_path / "stopped")
        checkpoint = stopped.load_checkpoint()
        assert checkpoint["epoch"] == 1 and len(checkpoint["structure"]) == 1  # pruned at the end of epoch 1
        assert checkpoint["plugins"]["prune"]["done"] == 1
        tricks.run(resume=stopped.path)
    got_rows, want_rows = stopped.metrics(), want.metrics()
    assert [r["epoch"] for r in got_rows] == [r["epoch"] for r in want_rows] == [1, 2]
    for a, b in zip(got_rows, want_rows):
        assert {k: v for k, v in a.items() if k not in CLOCK_COLUMNS} == {k: v for k, v in b.items() if k not in CLOCK_COLUMNS}
    got, ref = stopped.load_checkpoint(), want.load_checkpoint()
    assert got["structure"] == ref["structure"]
    assert got["model"].keys() == ref["model"].keys()
    for key in ref["model"]:
        assert torch.equal(got["model"][key], ref["model"][key]), key
    assert stopped.summary()["params"] == want.summary()["params"] < want.summary()["params_start"]


# --- dcp ---------------------------------------------------------------------------------------------


FIX = "use prune.criterion=l1, taylor, slimming or random for a detector"


def test_dcp_in_a_detection_run_is_a_one_line_error_from_the_cli(tmp_path):
    out = tmp_path / "run"
    code, _, stderr = cli_in_process("run", *CLI, "--plugins", "prune", "--set", "prune.criterion=dcp", "--out", str(out))
    line = one_line_error(code, stderr, "prune: dcp", "detection run", FIX, "LCP")
    assert "class indices" in line
    assert not tricks.RunDir(out).has_checkpoint()  # nothing trained


def test_dcp_refuses_per_image_targets_and_a_model_that_names_a_part_to_prune():
    plugin = Prune(PruneSettings(criterion="dcp"))
    plugin.schedule = [1]
    loss = call_wrapper(plugin.build_loss(make_ctx()), lambda output, batch: torch.tensor(1.0))
    batch = {"input": torch.zeros(1, 1, 32, 32), "target": [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}]}
    with pytest.raises(tricks.TricksError, match="targets are a list") as caught:
        loss(None, batch)
    assert FIX in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(tricks.TricksError, match=r"names a part to prune \(prune_root='backbone.body'\)") as caught:
        plugin.on_fit_start(make_ctx(model=detector(), image_size=32, epochs=2))
    assert "\n" not in str(caught.value)
