"""The lcp plugin and job on a tiny detector (fcos:resnet8 on 32 px digit canvases): what a run
prunes (the block-internal channels of the chosen stages, by the ratio, nothing else), that the
two auxiliary losses select differently, that the auxiliary networks train and are checkpointed
(a stopped run resumes to the uninterrupted result), the replay of the pruned structure (rebuilt
and fine-tuned from), the refusals, and the job: its items, the same architecture for every
method, a finished job not trained again, and a killed job resumed to the uninterrupted result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import tricks
from tricks.jobs import JobProgress
from tricks.loop import build_model
from tricks.testing import CLOCK_COLUMNS, one_torch_thread, tiny_run
from tricks_lcp.job import lcp_job, plan
from tricks_prune.dcp import selectable
from tricks_prune.graph import find_groups

from processes import StopAtEpoch, cli_in_process, finish_killed, one_line_error, snapshot, start_script

# A detection run that finishes in seconds on one core: 64 canvases of 32 px, batches of 16.
SMALL = ["detection.train_images=64", "detection.val_images=16", "detection.canvas=32", "detection.draw=0"]
CORE = dict(task="detection", dataset="digits_detection", model="fcos:resnet8", batch_size=16, lr=0.01,
            train_limit=None, val_limit=None, curves=False)
# channel selection on 8 images, one re-optimizing step per selected channel
FAST = ["lcp.samples=8", "lcp.refit_steps=1"]
CLI_CORE = ["--task", "detection", "--dataset", "digits_detection", "--model", "fcos:resnet8", "--batch-size", "16",
            "--lr", "0.01", *(arg for s in SMALL for arg in ("--set", s))]
BODY = "backbone.body."  # the detector's prune_root, as a prefix of its state_dict keys


def detection(base):
    """``base`` (an ad-hoc plugin class) made to join detection runs (ad-hoc plugins are classification-only)."""
    return type(f"Detection{base.__name__}", (base,), {"tasks": ("detection",)})


def shapes(state: dict) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items()}


def fresh_model(run: tricks.RunDir) -> torch.nn.Module:
    """The run's detector as built before any structural change (its config, no structure)."""
    checkpoint = run.load_checkpoint()
    cfg = tricks.resolve(recipe=checkpoint["config"])
    return build_model(cfg, "cpu", **checkpoint["shape"])


def body_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.get_submodule(model.prune_root).parameters())


def stage_widths(model: torch.nn.Module, image_size: int = 32) -> list[int]:
    """The output channels of each backbone stage (what the feature pyramid reads)."""
    body = model.get_submodule(model.prune_root)
    seen = {}
    hooks = [stage.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.shape[1]))
             for n, stage in enumerate(body.stages)]
    try:
        with torch.no_grad():
            body.eval()(torch.zeros(1, 1, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()
    return [seen[n] for n in range(len(body.stages))]


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for a, b in zip(got, want):
        assert {k: v for k, v in a.items() if k not in CLOCK_COLUMNS} == {k: v for k, v in b.items() if k not in CLOCK_COLUMNS}


def assert_same_tensors(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def assert_same_run(got: tricks.RunDir, want: tricks.RunDir) -> None:
    """The same metrics (the clock's columns left out), weights, structure and lcp state."""
    assert_same_rows(got.metrics(), want.metrics())
    a, b = got.load_checkpoint(), want.load_checkpoint()
    assert_same_tensors(a["model"], b["model"])
    assert a["structure"] == b["structure"]
    if "lcp" in b["plugins"]:
        assert a["plugins"]["lcp"]["done"] == b["plugins"]["lcp"]["done"]
        assert_same_tensors(a["plugins"]["lcp"]["aux"], b["plugins"]["lcp"]["aux"])


def lcp_run(out: Path, sets: list[str], plugins=("lcp",), epochs: int = 1) -> tricks.RunDir:
    with one_torch_thread():
        return tiny_run(plugins=list(plugins), set=[*SMALL, *FAST, *sets], out=out, epochs=epochs, **CORE)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """The trained detector the jobs start from (2 epochs, about 3 s)."""
    out = tmp_path_factory.mktemp("baseline") / "base"
    with one_torch_thread():
        tiny_run(plugins=["detection"], set=SMALL, out=out, epochs=2, **CORE)
    return out


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> tricks.RunDir:
    """A run that prunes half of stage 1's block-internal channels at the end of epoch 1 of 2."""
    out = tmp_path_factory.mktemp("pruned") / "run"
    return lcp_run(out, ["lcp.stages=[1]", "lcp.ratio=0.5", "lcp.at=1"], epochs=2)


# --- what a run prunes ---------------------------------------------------------------------------


def test_a_run_prunes_the_ratio_of_each_selectable_layer_inside_the_chosen_stage_and_nothing_else(pruned):
    ratio, stage = 0.5, "stages.1"
    fresh = fresh_model(pruned)
    checkpoint = pruned.load_checkpoint()
    before, after = shapes(fresh.state_dict()), shapes(checkpoint["model"])
    assert before.keys() == after.keys()

    # the layers lcp may prune: the convolutions that alone read a group of channels, in stage 1
    body = fresh.get_submodule(fresh.prune_root)
    _, groups = find_groups(body, torch.zeros(1, 1, 32, 32), [], 1)
    inside = [(g, reader) for g, reader in selectable(groups) if reader.startswith(stage + ".")]
    assert inside, "stage 1 of resnet8 has a block-internal layer (conv2 reads conv1's channels)"
    removed = {}
    for g, reader in inside:
        k = round(ratio * g.size)
        key = f"{BODY}{reader}.weight"
        assert after[key][1] == g.size - k, (reader, before[key], after[key])
        assert after[key][0] == before[key][0], reader  # its output (the stage's stream) keeps its width
        removed[g.size] = k

    # every other tensor keeps its shape; those that changed are in stage 1 and lost k of a group's channels
    changed = {k for k in before if before[k] != after[k]}
    assert changed and all(k.startswith(f"{BODY}{stage}.") for k in changed), sorted(changed)
    for key in changed:
        diff = [(b, a) for b, a in zip(before[key], after[key]) if b != a]
        assert len(diff) == 1 and diff[0][0] in removed and diff[0][1] == diff[0][0] - removed[diff[0][0]], (key, diff)
    assert any(".fpn." in k for k in before) and all(before[k] == after[k] for k in before if ".fpn." in k)

    model = pruned.build_model()
    assert stage_widths(model) == stage_widths(fresh)  # what the feature pyramid reads keeps its width

    # the record of the change, and the sizes the run reports
    [record] = checkpoint["structure"]
    assert record["plugin"] == "lcp" and record["epoch"] == 0
    change = record["change"]
    total = sum(g.size for g, _ in inside)
    assert change["channels"] == [total, total - sum(round(ratio * g.size) for g, _ in inside)]
    assert all(step["layer"].startswith(stage + ".") for step in change["steps"])
    rows = pruned.metrics()
    assert [r["epoch"] for r in rows] == [1, 2]
    assert body_params(model) < body_params(fresh)
    for row in rows:
        assert math.isfinite(row["train_loss"]) and 0.0 <= row["val_map"] <= 1.0
        assert row["backbone_params"] == body_params(model)  # the epoch that pruned reports the new size
    assert rows[0]["params"] == sum(p.numel() for p in model.parameters())
    assert pruned.summary()["backbone_params"] == body_params(model)
    assert checkpoint["plugins"]["lcp"]["done"] is True


def test_the_two_auxiliary_losses_select_different_channels_from_the_same_trained_detector(tmp_path):
    """With the auxiliary loss left out of training (aux_weight=0) both runs train the same
    detector; only the selection's loss differs (lcp: contextual RoIAlign + GIoU; dcp: the
    objects' own regions, classification only), and so do the channels kept."""
    runs = {aux: lcp_run(tmp_path / aux, ["lcp.stages=[1]", f"lcp.aux={aux}", "lcp.aux_weight=0"])
            for aux in ("lcp", "dcp")}
    a, b = (runs[aux].load_checkpoint() for aux in ("lcp", "dcp"))
    assert runs["lcp"].metrics()[0]["train_loss"] == runs["dcp"].metrics()[0]["train_loss"]
    for key, value in a["model"].items():
        if not key.startswith(f"{BODY}stages.1."):
            assert torch.equal(value, b["model"][key]), key  # the same detector, but for the pruned stage
    assert shapes(a["model"]) == shapes(b["model"])
    steps = [[(s["layer"], s["idxs"]) for s in c["structure"][0]["change"]["steps"]] for c in (a, b)]
    assert [layer for layer, _ in steps[0]] == [layer for layer, _ in steps[1]]
    assert steps[0] != steps[1], steps  # the auxiliary loss changes the choice


# --- the auxiliary networks ----------------------------------------------------------------------


class Snapshot(tricks.Plugin):
    """Keeps the lcp plugin's auxiliary networks as the run starts (before any step)."""

    name = "snapshot"
    tasks = ("detection",)

    def __init__(self):
        super().__init__()
        self.aux = None

    @tricks.hookimpl
    def on_fit_start(self, ctx):
        lcp = ctx.hooks.pm.get_plugin("lcp")
        self.aux = {k: v.detach().clone() for k, v in lcp.aux.state_dict().items()}
        self.params = [k for k, _ in lcp.aux.named_parameters()]


def test_the_auxiliary_networks_train_and_a_run_stopped_before_pruning_resumes_to_the_uninterrupted_one(tmp_path):
    sets = ["lcp.stages=[1,2]"]
    start = Snapshot()
    whole = lcp_run(tmp_path / "whole", sets, plugins=("lcp", start), epochs=2)
    with pytest.raises(tricks.PluginHookError, match="stopped as epoch 1 starts"):
        lcp_run(tmp_path / "stopped", sets, plugins=("lcp", detection(StopAtEpoch)(1)), epochs=2)
    stopped = tricks.RunDir(tmp_path / "stopped")
    checkpoint = stopped.load_checkpoint()
    assert checkpoint["epoch"] == 1 and checkpoint["structure"] == []  # stopped before the pruning epoch
    state = checkpoint["plugins"]["lcp"]
    assert state["done"] is False
    assert set(state["aux"]) == set(start.aux) and {k.split(".")[0] for k in start.aux} == {"stages_1", "stages_2"}
    assert start.params
    for key in start.params:  # every parameter of both auxiliary networks learned in epoch 1
        assert not torch.equal(state["aux"][key], start.aux[key]), key
    assert shapes(checkpoint["model"]) == shapes(fresh_model(stopped).state_dict())

    with one_torch_thread():
        tricks.run(resume=stopped.path)
    assert_same_run(stopped, whole)
    final = whole.load_checkpoint()
    assert final["plugins"]["lcp"]["done"] is True and [r["plugin"] for r in final["structure"]] == ["lcp"]


def test_a_run_stopped_after_pruning_resumes_to_the_uninterrupted_one(pruned, tmp_path):
    """Stopped when epoch 2 starts, after the pruning at the end of epoch 1: the resumed run
    rebuilds the pruned structure, the optimizer with the auxiliary networks' group, and no
    auxiliary loss (the pruning is done), and ends as the uninterrupted run (the fixture)."""
    with pytest.raises(tricks.PluginHookError, match="stopped as epoch 1 starts"):
        lcp_run(tmp_path / "stopped", ["lcp.stages=[1]", "lcp.ratio=0.5", "lcp.at=1"],
                plugins=("lcp", detection(StopAtEpoch)(1)), epochs=2)
    stopped = tricks.RunDir(tmp_path / "stopped")
    checkpoint = stopped.load_checkpoint()
    assert checkpoint["epoch"] == 1 and checkpoint["plugins"]["lcp"]["done"] is True
    assert checkpoint["structure"] == pruned.load_checkpoint()["structure"]
    with one_torch_thread():
        tricks.run(resume=stopped.path)
    assert_same_run(stopped, pruned)


# --- the pruned structure, rebuilt and trained from ----------------------------------------------


def test_the_pruned_model_is_rebuilt_from_its_run_and_fine_tuned_without_the_plugin(pruned, tmp_path):
    checkpoint = pruned.load_checkpoint()
    model = pruned.build_model()
    assert shapes(model.state_dict()) == shapes(checkpoint["model"])
    assert_same_tensors(model.state_dict(), checkpoint["model"])
    assert shapes(model.state_dict()) != shapes(fresh_model(pruned).state_dict())

    with one_torch_thread():
        tuned = tiny_run(plugins=["detection"], set=[*SMALL, f"core.init_from={pruned.path}"],
                         out=tmp_path / "finetune", epochs=1, **CORE)
    assert "lcp" not in tuned.config()["plugins"]
    [row] = tuned.metrics()
    assert math.isfinite(row["train_loss"]) and 0.0 <= row["val_map"] <= 1.0
    again = tuned.load_checkpoint()
    assert again["structure"] == checkpoint["structure"]  # the inherited change stays part of the run
    assert shapes(again["model"]) == shapes(checkpoint["model"])
    assert shapes(tuned.build_model().state_dict()) == shapes(checkpoint["model"])


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, fragments", [
    (["run", "--plugins", "lcp", "--epochs", "1"], ["lcp", "detection"]),
    (["run", *CLI_CORE, "--plugins", "lcp,prune", "--epochs", "1"], ["lcp", "prune", "conflict"]),
    (["run", *CLI_CORE, "--plugins", "lcp", "--set", "lcp.stages=[7]", "--epochs", "1"], ["lcp.stages=[7]", "0 to 2"]),
    (["lcp", "--from", "NONEXISTENT"], ["--from NONEXISTENT", "no trained run"]),
    (["lcp", "--method", "foo"], ["--method foo", "lcp, dcp, l1, random"]),
], ids=["classification", "with-prune", "stage-out-of-range", "no-start", "unknown-method"])
def test_a_refusal_is_one_line_with_status_2_and_leaves_nothing(tmp_path, args, fragments):
    out = tmp_path / "out"
    code, _, stderr = cli_in_process(*args, "--out", str(out))
    one_line_error(code, stderr, *fragments)
    assert not out.exists()


def test_an_empty_stage_list_is_refused_before_training(tmp_path):
    out = tmp_path / "out"
    code, _, stderr = cli_in_process("run", *CLI_CORE, "--plugins", "lcp", "--set", "lcp.stages=[]", "--epochs", "1",
                                     "--no-curves", "--set", "lcp.samples=8", "--set", "lcp.refit_steps=1", "--out", str(out))
    one_line_error(code, stderr, "lcp.stages")
    assert not out.exists()


# --- the job -------------------------------------------------------------------------------------


class Recording(JobProgress):
    def __init__(self):
        self.started: list[tuple[int, int]] = []
        self.trained: list[str] = []

    def start(self, job, total, done, failed, diverged=0):
        self.started.append((total, done))

    def item_start(self, item, resuming):
        self.trained.append(item.id)


JOB = ["--stage-epochs", "1", "--finetune-epochs", "1", "--stages", "2", "--set", "lcp.samples=8",
       "--set", "lcp.refit_steps=1"]


@pytest.mark.slow
def test_the_job_prunes_as_l1_does_and_a_finished_job_trains_nothing_again(baseline, tmp_path):
    out = tmp_path / "lcp"
    with one_torch_thread():
        code, stdout, stderr = cli_in_process("lcp", "--from", str(baseline), "--out", str(out), *JOB, "--json", "-q")
    assert code == 0, stderr
    report = json.loads(stdout.strip().splitlines()[-1])
    assert list(report["items"]) == ["stage-2", "finetune"]
    assert all(r["status"] == "ok" for r in report["items"].values()), report["items"]
    assert sorted(p.name for p in (out / "results").glob("*.json")) == ["finetune.json", "stage-2.json"]
    stage, final = tricks.RunDir(out / "runs" / "stage-2"), tricks.RunDir(out / "runs" / "finetune")
    assert stage.config()["lcp"]["stages"] == [2] and stage.config()["core"]["init_from"] == str(baseline)
    assert "lcp" not in final.config()["plugins"]
    assert [r["plugin"] for r in stage.load_checkpoint()["structure"]] == ["lcp"]
    fresh = fresh_model(stage)
    lcp_model = final.build_model()
    assert report["final"]["backbone_params"] == body_params(lcp_model) < body_params(fresh)
    assert stage_widths(lcp_model) == stage_widths(fresh)

    with one_torch_thread():
        l1 = lcp_job(tmp_path / "l1", method="l1", start=baseline, stage_epochs=1, finetune_epochs=1, stages=[2])
    assert list(l1["items"]) == ["stage-2", "finetune"] and all(r["status"] == "ok" for r in l1["items"].values())
    l1_model = tricks.RunDir(tmp_path / "l1" / "runs" / "finetune").build_model()
    assert l1["final"]["backbone_params"] == report["final"]["backbone_params"]
    assert shapes(l1_model.state_dict()) == shapes(lcp_model.state_dict())  # the same architecture

    before = snapshot(out)
    code, stdout, stderr = cli_in_process("lcp", "--from", str(baseline), "--out", str(out), *JOB)
    assert code == 0, stderr
    assert not any(line.startswith(("stage-2 ", "finetune ")) for line in stdout.splitlines()), stdout
    progress = Recording()
    again = lcp_job(out, start=baseline, stage_epochs=1, finetune_epochs=1, stages=[2],
                    sets=["lcp.samples=8", "lcp.refit_steps=1"], progress=progress)
    assert progress.started == [(2, 2)] and progress.trained == []  # both finished already: nothing trained
    assert again == report
    assert snapshot(out) == before  # results, runs and plan untouched


def _job_args(out: Path, baseline: Path) -> dict:
    return dict(out=str(out), start=str(baseline), stage_epochs=2, finetune_epochs=1, stages=[2], sets=FAST)


@pytest.mark.slow
def test_a_job_killed_in_a_stage_run_resumes_to_the_uninterrupted_result(baseline, tmp_path):
    killed_dir, whole_dir = tmp_path / "killed", tmp_path / "whole"
    killed = start_script(f"""
        import os, signal
        import torch
        import tricks, tricks.jobs
        from tricks_lcp.job import lcp_job, plan

        torch.set_num_threads(1)
        real = tricks.jobs.train_item

        class Kill(tricks.Plugin):
            name = "kill"
            tasks = ("detection",)

            @tricks.hookimpl
            def on_epoch_start(self, ctx, epoch):
                if ctx.run_dir is not None and "stage-2" in str(ctx.run_dir) and epoch == 1:
                    os.kill(os.getpid(), signal.SIGKILL)

        def train_item(task):
            return real({{**task, "extra_plugins": [Kill()]}})

        tricks.jobs.train_item = train_item
        lcp_job(**{_job_args(killed_dir, baseline)!r})
    """)
    with one_torch_thread():
        want = lcp_job(**_job_args(whole_dir, baseline))
    finish_killed(killed)
    stage = tricks.RunDir(killed_dir / "runs" / "stage-2")
    assert stage.status() == "interrupted" and stage.load_checkpoint()["epoch"] == 1
    assert not stage.load_checkpoint()["plugins"]["lcp"]["done"]  # killed before its pruning epoch
    assert not list((killed_dir / "results").glob("*.json")) and not (killed_dir / "runs" / "finetune").exists()

    progress = Recording()
    with one_torch_thread():
        got = lcp_job(**_job_args(killed_dir, baseline), progress=progress)
    assert progress.started == [(2, 0)] and progress.trained == ["stage-2", "finetune"]
    for name in ("stage-2", "finetune"):
        assert_same_run(tricks.RunDir(killed_dir / "runs" / name), tricks.RunDir(whole_dir / "runs" / name))
    assert got["final"] == want["final"]
    assert [r["epoch"] for r in stage.metrics()] == [1, 2]


def test_the_jobs_own_pruning_settings_are_not_overridden_by_set():
    cfg = tricks.resolve(overrides={"task": "detection", "dataset": "digits_detection", "model": "fcos:resnet8"})
    cases = [("lcp", ["lcp.stages=[0]", "lcp.ratio=0.25", "lcp.aux=dcp"], "lcp",
              {"stages": [2], "ratio": 0.5, "aux": "lcp"}),
             ("l1", ["prune.ratio=0.25", "prune.exclude=[]", "prune.criterion=random"], "prune",
              {"ratio": 0.5, "criterion": "l1", "exclude": ["stages.0.*", "stages.1.*"]})]
    for method, sets, section, want in cases:
        try:
            items = plan(cfg, method, 0.5, 1, 1, None, [2], pruning=sets)
        except tricks.TricksError as error:  # refusing them is as good
            assert section + "." in str(error), error
            continue
        got = items[0].recipe[section]
        assert {k: got[k] for k in want} == want, method
