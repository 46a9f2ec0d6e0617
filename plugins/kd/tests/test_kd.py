"""Tests of the kd plugin: the soft term against a reference written with ``F.kl_div`` and
against its definition, Hinton's gradient ``(q - p) / T``, the weighting around the loss in force,
loading the teacher from a run directory, a checkpoint file and timm with a weights file, the
teacher's isolation (eval mode, no gradients, not in the optimizer, the student's exact input),
the errors a user can meet (bad teacher files among them, refused without running anything in
them), short runs composed with mixup and label smoothing, and several teachers: the mean of
their softened distributions against a direct formula, its gradient, one teacher in a list as the
single teacher, and a run distilling two."""

from __future__ import annotations

import gzip
import io
import math
import os
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tricks
from tricks.builtin import cross_entropy
from tricks.models import create_model
from tricks.testing import BatchWatcher, call_wrapper, make_ctx, tiny_run
import tricks_kd
from tricks_kd import (KDSettings, KnowledgeDistillation, distillation_loss, ensemble_soft_loss, load_teacher,
                       soft_loss, teacher_sources)

K = 10  # digits: 10 classes, 1 channel, 8x8
B = 8
SMALL = dict(train_limit=128, val_limit=64)  # tiny_run with 4 steps of 32


def logits(seed: int, b: int = B, k: int = K, scale: float = 3.0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(b, k, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def images(seed: int = 0, b: int = B) -> torch.Tensor:
    return torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def wrap(plugin, ctx, inner):
    """A plugin's build_loss wrapper around ``inner``, as pluggy runs it."""
    return call_wrapper(plugin.build_loss(ctx), inner)


def build(ctx, inner, **settings):
    """The kd loss around ``inner``; returns (loss, plugin)."""
    plugin = KnowledgeDistillation(KDSettings(**settings))
    return wrap(plugin, ctx, inner), plugin


def reference_soft(z, v, T):
    """T^2 KL(p || q) written with F.kl_div on probabilities (not log-probabilities)."""
    return F.kl_div(F.log_softmax(z / T, dim=1), F.softmax(v / T, dim=1), reduction="batchmean") * T * T


# --- the teacher, trained once ----------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A resnet8 trained for one epoch on the digits: the tiny teacher of every test here."""
    out = tmp_path_factory.mktemp("kd") / "teacher"
    tiny_run(out=out, **SMALL)
    return out


def teacher_reference(teacher_dir: Path) -> nn.Module:
    """The teacher rebuilt by hand: the core's resnet8 with the checkpoint's weights, in eval mode."""
    model = create_model("resnet8", K, 1)
    model.load_state_dict(tricks.RunDir(teacher_dir).load_checkpoint()["model"])
    return model.eval()


SEEN: list[dict] = []  # what every forward of the recorded teacher saw


def record_forward(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook: how the teacher is called, before it runs."""
    SEEN.append({"x": args[0], "training": module.training, "grad": torch.is_grad_enabled(),
                 "autocast": torch.is_autocast_enabled("cpu"), "teacher": module})


@pytest.fixture
def recording(teacher_dir, monkeypatch) -> Path:
    """``teacher_dir``, whose model kd rebuilds with a forward pre-hook that records every call in
    SEEN: ``checkpoint_model`` (the one place kd gets the teacher's model from) is watched, the
    model it builds is the one kd uses, unchanged but for the hook."""
    real = tricks_kd.checkpoint_model

    def watched(*args, **kwargs):
        model = real(*args, **kwargs)
        model.register_forward_pre_hook(record_forward)
        return model

    monkeypatch.setattr(tricks_kd, "checkpoint_model", watched)
    SEEN.clear()
    return teacher_dir


# --- the math -------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1.0, 4.0, 20.0])
def test_soft_term_equals_kl_div_reference_and_the_definition(T):
    z, v = logits(0), logits(1)
    torch.testing.assert_close(soft_loss(z, v, T), reference_soft(z, v, T))
    p, log_p, log_q = F.softmax(v / T, 1), F.log_softmax(v / T, 1), F.log_softmax(z / T, 1)
    by_definition = (p * (log_p - log_q)).sum(1).mean()
    torch.testing.assert_close(soft_loss(z, v, T, temperature_squared=False), by_definition)
    torch.testing.assert_close(soft_loss(z, v, T, temperature_squared=True), T * T * by_definition)


def test_kl_and_soft_cross_entropy_differ_by_the_teacher_entropy():
    z, v, T = logits(2), logits(3), 4.0
    p = F.softmax(v / T, 1)
    soft_ce = -(p * F.log_softmax(z / T, 1)).sum(1).mean()
    entropy = -(p * p.log()).sum(1).mean()
    torch.testing.assert_close(soft_loss(z, v, T, False), soft_ce - entropy)
    assert soft_loss(v, v, T) == pytest.approx(0.0, abs=1e-12)  # matching the teacher costs nothing


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("T", [1.0, 3.0, 20.0])
def test_gradient_wrt_student_logits_is_q_minus_p_over_T(T, squared):
    # Hinton, section 2: dC/dz_i = (q_i - p_i) / T for the soft cross-entropy of one example.
    z = logits(4).requires_grad_(True)
    v = logits(5)
    w = 0.3
    hard = cross_entropy(z, torch.randint(0, K, (B,), generator=torch.Generator().manual_seed(6)))
    loss = distillation_loss(z, v, hard, T, w, squared)
    (grad,) = torch.autograd.grad(loss, z)
    q, p = F.softmax(z.detach() / T, 1), F.softmax(v / T, 1)
    hard_grad = (F.softmax(z.detach(), 1) - F.one_hot(torch.randint(0, K, (B,), generator=torch.Generator().manual_seed(6)), K)) / B
    expected = w * hard_grad + (1 - w) * (T * T if squared else 1.0) * (q - p) / T / B
    torch.testing.assert_close(grad, expected)


def test_high_temperature_limit_is_logit_matching():
    # With zero-mean logits and the T^2 factor the gradient tends to (z - v) / (N B) as T grows.
    z = logits(7, scale=1.0)
    v = logits(8, scale=1.0)
    z, v = z - z.mean(1, keepdim=True), v - v.mean(1, keepdim=True)

    def relative_error(T):
        zz = z.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(soft_loss(zz, v, T), zz)
        limit = (z - v) / (K * B)
        return ((grad - limit).norm() / limit.norm()).item()

    assert relative_error(100.0) < relative_error(10.0) < relative_error(2.0)
    assert relative_error(100.0) < 0.01


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_soft_term_is_computed_in_float32_from_low_precision_logits(dtype):
    z, v = logits(9, dtype=torch.float32), logits(10, dtype=torch.float32)
    got = soft_loss(z.to(dtype), v.to(dtype), 4.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference_soft(z.to(dtype).float(), v.to(dtype).float(), 4.0))


# --- the wrapper ----------------------------------------------------------------------------


class RecordingLoss:
    """A stand-in for the loss in force: records its batches, returns CE against their targets."""

    def __init__(self):
        self.batches = []

    def __call__(self, output, batch):
        self.batches.append(batch)
        return cross_entropy(output, batch["target"])


@pytest.mark.parametrize("w", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("squared", [True, False])
def test_loss_is_the_weighted_sum_of_the_loss_in_force_and_the_soft_term(teacher_dir, w, squared):
    inner = RecordingLoss()
    loss, plugin = build(make_ctx(), inner, teacher=str(teacher_dir), hard_weight=w, temperature=3.0,
                         temperature_squared=squared)
    x, y, z = images(11), torch.randint(0, K, (B,)), logits(12, dtype=torch.float32)
    batch = {"input": x, "target": y}
    got = loss(z, batch)
    with torch.no_grad():
        v = teacher_reference(teacher_dir)(x)
    soft = reference_soft(z, v, 3.0) / (1.0 if squared else 9.0)
    expected = w * F.cross_entropy(z, y) + (1 - w) * soft
    torch.testing.assert_close(got, expected)
    assert len(inner.batches) == (0 if w == 0 else 1)
    if w:
        assert inner.batches[0] is batch  # the loss in force gets the batch as it is


def test_label_smoothing_reaches_only_the_hard_term_in_either_order(teacher_dir):
    from tricks_label_smoothing import LabelSmoothing, LabelSmoothingSettings, smooth_targets

    ctx = make_ctx()
    smoothing = LabelSmoothing(LabelSmoothingSettings(epsilon=0.2))
    kd_inside, _ = build(ctx, RecordingLoss(), teacher=str(teacher_dir))
    ls_outside = wrap(smoothing, ctx, kd_inside)
    inner = RecordingLoss()
    kd_outside, _ = build(ctx, wrap(smoothing, ctx, inner), teacher=str(teacher_dir))
    x, y, z = images(20), torch.randint(0, K, (B,)), logits(21, dtype=torch.float32)
    expected_hard = cross_entropy(z, smooth_targets(y, 0.2, K, "paper"))
    with torch.no_grad():
        expected_soft = reference_soft(z, teacher_reference(teacher_dir)(x), 4.0)
    for loss in (ls_outside, kd_outside):
        torch.testing.assert_close(loss(z, {"input": x, "target": y}), 0.5 * expected_hard + 0.5 * expected_soft)


def test_channels_last_puts_the_teacher_in_channels_last(teacher_dir):
    loss, plugin = build(make_ctx(channels_last=True), RecordingLoss(), teacher=str(teacher_dir))
    convs = [m.weight for m in plugin.teacher.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    x = images(22).contiguous(memory_format=torch.channels_last)
    assert math.isfinite(loss(logits(23, dtype=torch.float32), {"input": x, "target": torch.randint(0, K, (B,))}).item())


def test_hard_weight_one_is_the_loss_in_force_and_the_teacher_is_not_run(recording):
    inner = RecordingLoss()
    loss, plugin = build(make_ctx(), inner, teacher=str(recording), hard_weight=1.0)
    assert loss is inner
    SEEN.clear()
    x, y, z = images(13), torch.randint(0, K, (B,)), logits(14, dtype=torch.float32)
    assert torch.equal(loss(z, {"input": x, "target": y}), F.cross_entropy(z, y))
    assert SEEN == []


def test_the_teacher_is_frozen_sees_the_input_itself_and_gets_no_gradient(recording):
    ctx = make_ctx()
    loss, plugin = build(ctx, RecordingLoss(), teacher=str(recording))
    teacher = plugin.teacher
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    SEEN.clear()
    student = create_model("resnet8", K, 1)
    x = images(15)
    out = student(x)
    value = loss(out, {"input": x, "target": torch.randint(0, K, (B,))})
    value.backward()
    (seen,) = SEEN
    assert seen["x"] is x and not seen["training"] and not seen["grad"]
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    teacher.train()  # a plugin that calls .train() on every module: the loss puts it back
    loss(student(x), {"input": x, "target": torch.randint(0, K, (B,))})
    assert not SEEN[-1]["training"] and not teacher.training


# --- teacher sources ------------------------------------------------------------------------


def test_teacher_from_a_run_directory_and_from_its_checkpoint_file(teacher_dir):
    x = images(16)
    with torch.no_grad():
        expected = teacher_reference(teacher_dir)(x)
    for source in (teacher_dir, teacher_dir / "checkpoints" / "last.pt"):
        teacher = load_teacher(str(source), make_ctx())
        assert isinstance(teacher, type(create_model("resnet8", K, 1)))
        with torch.no_grad():
            torch.testing.assert_close(teacher.eval()(x), expected)


def test_loading_the_teacher_leaves_the_random_state_alone(teacher_dir):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    load_teacher(str(teacher_dir), make_ctx())
    assert torch.equal(torch.get_rng_state(), state)


def test_teacher_is_rebuilt_from_the_teacher_runs_own_config(tmp_path):
    # The teacher run used resnet14 (the student resnet8) and itself distilled from another
    # teacher: its model comes from its own core settings, its plugins are instantiated.
    cfg = tricks.resolve(plugins=["mixup", "kd"], overrides={"model": "resnet14"},
                         sets=["kd.teacher=/elsewhere/teacher", "mixup.alpha=1.0"])
    net = create_model("resnet14", K, 1)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": net.state_dict(), "config": cfg.to_dict()}, path)
    teacher = load_teacher(str(path), make_ctx(model="resnet8"))
    assert len(teacher.stages[0]) == 2  # resnet14: two blocks per stage, resnet8 one
    x = images(17)
    with torch.no_grad():
        torch.testing.assert_close(teacher.eval()(x), net.eval()(x))


def test_the_teacher_is_the_model_its_checkpoint_rebuilds_with_the_recorded_structure(teacher_dir, tmp_path, monkeypatch):
    # A checkpoint taken after a structural change records the change as data; kd hands the whole
    # checkpoint to checkpoint_model, which replays it, and distils from the model it returns.
    checkpoint = tricks.RunDir(teacher_dir).load_checkpoint()
    structure = [{"plugin": "a_pruner", "epoch": 0, "change": {"stages.0.0.conv1": [0, 2, 5]}, "settings": {}}]
    path = tmp_path / "pruned.pt"
    torch.save({**checkpoint, "structure": structure}, path)
    replayed = create_model("resnet8", K, 1)
    calls = []

    def rebuilt(checkpoint, source, **shape):
        calls.append((checkpoint, source, shape))
        return replayed

    monkeypatch.setattr(tricks_kd, "checkpoint_model", rebuilt)
    loss, plugin = build(make_ctx(), RecordingLoss(), teacher=str(path))
    ((given, source, shape),) = calls
    assert given["structure"] == structure and str(path) in source
    assert shape == {"num_classes": K, "in_chans": 1, "image_size": 8}  # the student's data shape
    assert plugin.teacher is replayed
    for name, value in replayed.state_dict().items():  # with the checkpoint's weights
        torch.testing.assert_close(value, checkpoint["model"][name])


def test_a_teacher_run_with_ad_hoc_plugins_says_they_are_left_out(tmp_path):
    run = tiny_run(plugins=[BatchWatcher()], out=tmp_path / "adhoc", **SMALL)
    ctx = make_ctx()
    load_teacher(str(run.path), ctx)
    (line,) = [m for m in ctx.logs if "ad-hoc plugins" in m]
    assert "(BatchWatcher)" in line and "rebuilt without them" in line and "replayed" not in line
    checkpoint = run.load_checkpoint()
    change = {"plugin": "BatchWatcher", "epoch": 0, "change": {"width": 4}, "settings": {}}
    torch.save({**checkpoint, "structure": [change]}, tmp_path / "changed.pt")
    ctx = make_ctx()
    with pytest.raises(tricks.TricksError, match="plugin 'BatchWatcher'.*cannot be re-created"):
        load_teacher(str(tmp_path / "changed.pt"), ctx)  # its change cannot be replayed without it
    (line,) = [m for m in ctx.logs if "ad-hoc plugins" in m]
    assert "rebuilt without them, then its recorded structural changes are replayed" in line


@pytest.mark.parametrize("layout", ["state_dict", "checkpoint", "ddp"])
def test_teacher_from_timm_with_a_weights_file(tmp_path, layout):
    import timm

    net = timm.create_model("resnet18", num_classes=K, in_chans=1).eval()
    state = net.state_dict()
    saved = {"state_dict": state, "epoch": 3} if layout == "checkpoint" else state
    if layout == "ddp":
        saved = {f"module.{k}": v for k, v in state.items()}
    torch.save(saved, tmp_path / "weights.pt")
    loss, plugin = build(make_ctx(), RecordingLoss(), teacher="timm:resnet18", teacher_weights=str(tmp_path / "weights.pt"))
    x = images(18)
    with torch.no_grad():
        torch.testing.assert_close(plugin.teacher(x), net(x))


def test_a_timm_teacher_without_weights_is_refused_unless_allowed():
    with pytest.raises(tricks.TricksError, match=r"kd\.teacher_weights=FILE"):
        build(make_ctx(), RecordingLoss(), teacher="timm:resnet18")
    loss, plugin = build(make_ctx(), RecordingLoss(), teacher="timm:resnet18", allow_random_teacher=True)
    assert not plugin.teacher.training


# --- errors ---------------------------------------------------------------------------------


def test_no_teacher_says_how_to_give_one():
    for teacher in ("", "   "):
        with pytest.raises(tricks.TricksError, match=r"--set kd\.teacher=RUN_DIR\|CHECKPOINT\|timm:NAME"):
            build(make_ctx(), RecordingLoss(), teacher=teacher)


def test_bad_teacher_paths_name_the_problem(tmp_path):
    with pytest.raises(tricks.TricksError, match="neither a run directory"):
        build(make_ctx(), RecordingLoss(), teacher=str(tmp_path / "nowhere"))
    with pytest.raises(tricks.TricksError, match="has no checkpoints/last.pt"):
        build(make_ctx(), RecordingLoss(), teacher=str(tmp_path))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(tricks.TricksError, match=r"the teacher checkpoint \S*junk\.pt.*kd\.teacher_weights=FILE"):
        build(make_ctx(), RecordingLoss(), teacher=str(tmp_path / "junk.pt"))
    torch.save({"fc.weight": torch.zeros(K, 4)}, tmp_path / "weights.pt")
    with pytest.raises(tricks.TricksError, match="not a tricks checkpoint.*teacher_weights"):
        build(make_ctx(), RecordingLoss(), teacher=str(tmp_path / "weights.pt"))
    with pytest.raises(tricks.TricksError, match="timm has no model"):
        build(make_ctx(), RecordingLoss(), teacher="timm:resnet_nonexistent", allow_random_teacher=True)


class RunsCode:
    """Pickles into a call of ``os.mkdir(marker)``: a file holding it runs that when unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _zip_not_torch() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("weights.txt", "1 2 3")
    return buffer.getvalue()


# Bad teacher files: name -> what the file holds, built from a real checkpoint or a timm state
# dict (bytes are written as they are, anything else with torch.save).
BAD_FILES = {
    "empty": lambda real, state, marker: b"",
    "random bytes": lambda real, state, marker: bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                                    dtype=torch.uint8).tolist()),
    "truncated": lambda real, state, marker: real[: len(real) // 2],
    "text": lambda real, state, marker: b"teacher: resnet20\n",
    "a zip that is not a torch file": lambda real, state, marker: _zip_not_torch(),
    "gzip of a checkpoint": lambda real, state, marker: gzip.compress(real),
    "numpy arrays": lambda real, state, marker: {k: v.numpy() for k, v in state.items()},
    "code in the pickle": lambda real, state, marker: {**state, "hook": RunsCode(marker)},
    "a list of tensors": lambda real, state, marker: list(state.values()),
    "strings for tensors": lambda real, state, marker: {k: "0" for k in state},
    "missing keys": lambda real, state, marker: dict(list(state.items())[:3]),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
@pytest.mark.parametrize("given_as", ["teacher", "teacher_weights"])
def test_bad_teacher_files_are_one_line_that_names_the_file_and_run_nothing(teacher_dir, tmp_path, kind, given_as):
    import timm

    real = (teacher_dir / "checkpoints" / "last.pt").read_bytes()
    if given_as == "teacher":  # a tricks checkpoint whose weights are bad
        checkpoint = tricks.RunDir(teacher_dir).load_checkpoint()
        content = BAD_FILES[kind](real, checkpoint["model"], tmp_path / "ran")
        if isinstance(content, dict):
            content = {**checkpoint, "model": content}
        settings = {"teacher": str(tmp_path / "bad.pt")}
        fixes = ("--set kd.teacher=timm:NAME --set kd.teacher_weights=FILE", "use weights of the same architecture",
                 "save model.state_dict() with torch.save")
    else:
        state = timm.create_model("resnet18", num_classes=K, in_chans=1).state_dict()
        content = BAD_FILES[kind](real, state, tmp_path / "ran")
        settings = {"teacher": "timm:resnet18", "teacher_weights": str(tmp_path / "bad.pt")}
        fixes = ("torch.save(model.state_dict(), FILE)", "save model.state_dict() with torch.save",
                 "use weights of the same architecture")
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(tricks.TricksError) as caught:
        build(make_ctx(), RecordingLoss(), **settings)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    assert any(fix in message for fix in fixes), message
    assert not (tmp_path / "ran").exists()  # nothing in the file was run


def test_a_numpy_pickle_refused_as_a_teacher_loads_once_saved_as_tensors(tmp_path):
    # Decided: arrays pickled by numpy are objects to torch.load(weights_only=True) and are
    # refused; the same weights converted with torch.from_numpy and saved again are accepted.
    import timm

    net = timm.create_model("resnet18", num_classes=K, in_chans=1).eval()
    arrays = {k: v.numpy() for k, v in net.state_dict().items()}
    torch.save(arrays, tmp_path / "arrays.pt")
    with pytest.raises(tricks.TricksError, match="arrays.pt"):
        build(make_ctx(), RecordingLoss(), teacher="timm:resnet18", teacher_weights=str(tmp_path / "arrays.pt"))
    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, tmp_path / "tensors.pt")
    _, plugin = build(make_ctx(), RecordingLoss(), teacher="timm:resnet18", teacher_weights=str(tmp_path / "tensors.pt"))
    x = images(24)
    with torch.no_grad():
        torch.testing.assert_close(plugin.teacher(x), net(x))


def test_a_teacher_whose_model_cannot_be_rebuilt_is_named(teacher_dir, tmp_path):
    checkpoint = tricks.RunDir(teacher_dir).load_checkpoint()
    core = {**checkpoint["config"]["core"], "model": "resnet_unknown"}
    torch.save({**checkpoint, "config": {**checkpoint["config"], "core": core}}, tmp_path / "other.pt")
    with pytest.raises(tricks.TricksError, match=r"cannot rebuild the teacher \S*other\.pt: .*resnet_unknown"):
        build(make_ctx(), RecordingLoss(), teacher=str(tmp_path / "other.pt"))


def test_class_count_mismatch_names_both(teacher_dir, tmp_path):
    for source in (teacher_dir, teacher_dir / "checkpoints" / "last.pt"):
        with pytest.raises(tricks.TricksError, match=r"has 10 classes but the student's data has 5"):
            build(make_ctx(num_classes=5), RecordingLoss(), teacher=str(source))
    import timm

    torch.save(timm.create_model("resnet18", num_classes=7, in_chans=1).state_dict(), tmp_path / "w7.pt")
    with pytest.raises(tricks.TricksError, match=r"has 7 classes but the student's data has 10"):
        build(make_ctx(), RecordingLoss(), teacher="timm:resnet18", teacher_weights=str(tmp_path / "w7.pt"))


def test_settings_errors_name_the_key():
    with pytest.raises(tricks.TricksError, match=r"kd\.temperature"):
        tricks.resolve(plugins=["kd"], sets=["kd.temperature=0"])
    with pytest.raises(tricks.TricksError, match=r"kd\.hard_weight"):
        tricks.resolve(plugins=["kd"], sets=["kd.hard_weight=1.5"])
    with pytest.raises(tricks.TricksError, match=r"kd\.teacher_weights.*timm:NAME"):
        tricks.resolve(plugins=["kd"], sets=["kd.teacher=runs/t", "kd.teacher_weights=w.pt"])
    cfg = tricks.resolve(plugins=["kd"], sets=["kd.teacher=timm:resnet18", "kd.teacher_weights=w.pt", "kd.temperature=20"])
    assert cfg.settings["kd"].temperature == 20 and cfg.settings["kd"].teacher_weights == "w.pt"


# --- in a run -------------------------------------------------------------------------------


class _Watch(BatchWatcher):
    """The batches' targets, and the tensors the student's forward receives and the optimizer's parameters."""

    def __init__(self):
        super().__init__(record=lambda batch: batch["target"])
        self.model_inputs, self.optimized = [], set()

    @tricks.hookimpl
    def on_fit_start(self, ctx):
        self.optimized = {id(p) for g in ctx.optimizer.param_groups for p in g["params"]}
        ctx.model.register_forward_pre_hook(lambda module, args: self.model_inputs.append(args[0]) if module.training else None)


def test_a_run_composed_with_mixup_and_label_smoothing(teacher_dir, tmp_path):
    watch = _Watch()
    run = tiny_run(plugins=["mixup", "label_smoothing", "kd", watch], set=[f"kd.teacher={teacher_dir}"],
                   out=tmp_path / "run", **SMALL)
    assert run.config()["plugins"] == ["mixup", "label_smoothing", "kd"]
    assert len(watch.model_inputs) == 4 and all(t.shape == (32, K) for t in watch.batches)  # mixed soft targets
    assert all(math.isfinite(row["train_loss"]) for row in run.metrics())


def test_in_a_run_the_teacher_sees_the_students_mixed_input_in_eval_mode_without_gradients(recording, tmp_path):
    watch = _Watch()
    tiny_run(plugins=["mixup", "kd", watch], set=[f"kd.teacher={recording}", "mixup.alpha=1.0"],
             out=tmp_path / "run", **SMALL)
    steps = [s for s in SEEN if s["x"].shape[0] == 32]  # leaves out the one-image shape check at build
    assert len(steps) == len(watch.model_inputs) == 4
    for seen, student_input, target in zip(steps, watch.model_inputs, watch.batches):
        assert seen["x"] is student_input  # the very tensor the student was given
        assert target.is_floating_point()  # ... after mixup
        assert not seen["training"] and not seen["grad"]
    teacher = steps[0]["teacher"]
    assert all(s["teacher"] is teacher for s in steps)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not {id(p) for p in teacher.parameters()} & watch.optimized


def test_a_bf16_run_on_the_cpu(recording, tmp_path):
    run = tiny_run(plugins=["kd"], set=[f"kd.teacher={recording}"], precision="bf16", out=tmp_path / "run", **SMALL)
    assert all(math.isfinite(row["train_loss"]) for row in run.metrics())
    steps = [s for s in SEEN if s["x"].shape[0] == 32]
    assert steps and all(s["autocast"] for s in steps)  # the teacher ran under the run's autocast


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_loss_under_low_precision_autocast(teacher_dir, precision):
    ctx = make_ctx(precision=precision)
    loss, plugin = build(ctx, RecordingLoss(), teacher=str(teacher_dir))
    student = create_model("resnet8", K, 1)
    x = images(19)
    with ctx.autocast():
        value = loss(student(x), {"input": x, "target": torch.randint(0, K, (B,))})
    assert value.dtype == torch.float32 and math.isfinite(value.item())
    value.backward()
    assert all(p.grad is None for p in plugin.teacher.parameters())


# --- several teachers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_teacher(teacher_dir) -> Path:
    """Another tiny teacher, seed 1, beside the first."""
    out = teacher_dir.parent / "teacher-seed1"
    tiny_run(out=out, seed=1, **SMALL)
    return out


def reference_ensemble(z, vs, T):
    """T^2 KL(p || q) with p the plain mean of the teachers' softened probabilities."""
    p = torch.stack([F.softmax(v / T, 1) for v in vs]).mean(0)
    return (p * (p.log() - F.log_softmax(z / T, 1))).sum(1).mean() * T * T


@pytest.mark.parametrize("T", [1.0, 4.0, 20.0])
def test_several_teachers_give_the_mean_of_their_softened_probabilities(T):
    z, vs = logits(30), [logits(31), logits(32), logits(33)]
    torch.testing.assert_close(ensemble_soft_loss(z, vs, T), reference_ensemble(z, vs, T))
    torch.testing.assert_close(ensemble_soft_loss(z, vs, T, temperature_squared=False), reference_ensemble(z, vs, T) / T / T)
    # averaging the logits instead is one teacher with the mean logits
    mean = torch.stack(vs).mean(0)
    torch.testing.assert_close(ensemble_soft_loss(z, vs, T, average="logits"), soft_loss(z, mean, T))
    assert not torch.allclose(ensemble_soft_loss(z, vs, T), ensemble_soft_loss(z, vs, T, average="logits"))
    with pytest.raises(ValueError, match="probs"):
        ensemble_soft_loss(z, vs, T, average="median")


def test_the_mean_of_probabilities_is_finite_where_one_teacher_underflows():
    # A class both teachers rule out: its mean probability underflows to 0 in float32 and its direct
    # log is -inf; the logsumexp form stays finite and agrees with float64.
    z = torch.zeros(1, 3)
    vs = [torch.tensor([[0.0, -300.0, 5.0]]), torch.tensor([[0.0, -250.0, -5.0]])]
    assert torch.isinf(torch.stack([F.softmax(v, 1) for v in vs]).mean(0).log()).any()
    got = ensemble_soft_loss(z, vs, 1.0)
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), ensemble_soft_loss(z.double(), [v.double() for v in vs], 1.0))


@pytest.mark.parametrize("average", ["probs", "logits"])
def test_one_teacher_in_a_list_is_exactly_the_single_teacher_loss(average):
    for T, squared in ((1.0, True), (4.0, False)):
        z, v = logits(34, dtype=torch.float32), logits(35, dtype=torch.float32)
        assert torch.equal(ensemble_soft_loss(z, [v], T, squared, average), soft_loss(z, v, T, squared))


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("T", [1.0, 3.0, 20.0])
def test_gradient_of_several_teachers_is_q_minus_the_mean_p_over_T(T, squared):
    z = logits(36).requires_grad_(True)
    vs = [logits(37), logits(38)]
    (grad,) = torch.autograd.grad(ensemble_soft_loss(z, vs, T, squared), z)
    q = F.softmax(z.detach() / T, 1)
    p = (F.softmax(vs[0] / T, 1) + F.softmax(vs[1] / T, 1)) / 2
    torch.testing.assert_close(grad, (q - p) / T * (T * T if squared else 1.0) / B)


def test_teacher_settings_take_a_list_or_a_comma_separated_string():
    assert teacher_sources("runs/a") == ["runs/a"] and teacher_sources(" runs/a , runs/b,") == ["runs/a", "runs/b"]
    assert teacher_sources(["runs/a", " runs/b "]) == ["runs/a", "runs/b"] and teacher_sources("") == []
    cfg = tricks.resolve(plugins=["kd"], sets=["kd.teacher=[runs/a, runs/b]", "kd.teacher_average=logits"])
    assert cfg.settings["kd"].teacher == ["runs/a", "runs/b"] and cfg.settings["kd"].teacher_average == "logits"
    assert "  - runs/a\n  - runs/b\n" in cfg.to_yaml()
    cfg = tricks.resolve(plugins=["kd"], sets=["kd.teacher=runs/a,runs/b"])
    assert cfg.settings["kd"].teacher == "runs/a,runs/b"  # a string stays a string in config.yaml
    assert "teacher: runs/a,runs/b\n" in cfg.to_yaml()
    assert tricks.resolve(recipe=cfg.to_dict()).settings["kd"].teacher == "runs/a,runs/b"
    for sets in (["kd.teacher=[runs/a, timm:resnet18]"], ["kd.teacher=timm:resnet18,runs/a"]):
        with pytest.raises(tricks.TricksError, match=r"kd\.teacher.*timm:NAME teacher must be the only teacher") as caught:
            tricks.resolve(plugins=["kd"], sets=sets)
        assert "\n" not in str(caught.value)
    with pytest.raises(tricks.TricksError, match=r"kd\.teacher_weights.*timm:NAME"):
        tricks.resolve(plugins=["kd"], sets=["kd.teacher=[runs/a, runs/b]", "kd.teacher_weights=w.pt"])
    with pytest.raises(tricks.TricksError, match=r"kd\.teacher_average"):
        tricks.resolve(plugins=["kd"], sets=["kd.teacher_average=median"])


def test_the_loss_of_two_teachers_uses_both_and_one_in_a_list_is_the_single_teacher(teacher_dir, second_teacher):
    x, y, z = images(40), torch.randint(0, K, (B,)), logits(41, dtype=torch.float32)
    batch = {"input": x, "target": y}
    with torch.no_grad():
        vs = [teacher_reference(teacher_dir)(x), teacher_reference(second_teacher)(x)]
    ctx = make_ctx()
    for teacher in ([str(teacher_dir), str(second_teacher)], f"{teacher_dir},{second_teacher}"):
        loss, plugin = build(ctx, RecordingLoss(), teacher=teacher, hard_weight=0.3)
        assert len(plugin.teachers) == 2 and plugin.teacher is plugin.teachers[0]
        assert all(not t.training and not any(p.requires_grad for p in t.parameters()) for t in plugin.teachers)
        torch.testing.assert_close(loss(z, batch), 0.3 * F.cross_entropy(z, y) + 0.7 * reference_ensemble(z, vs, 4.0))
    assert any("teachers" in m and "averaging their probs" in m for m in ctx.logs)
    single, _ = build(make_ctx(), RecordingLoss(), teacher=str(teacher_dir))
    listed, _ = build(make_ctx(), RecordingLoss(), teacher=[str(teacher_dir)])
    assert torch.equal(single(z, batch), listed(z, batch))


def test_every_teacher_is_checked(teacher_dir, tmp_path):
    with pytest.raises(tricks.TricksError, match="neither a run directory"):
        build(make_ctx(), RecordingLoss(), teacher=[str(teacher_dir), str(tmp_path / "nowhere")])
    with pytest.raises(tricks.TricksError, match=r"has 10 classes but the student's data has 5"):
        build(make_ctx(num_classes=5), RecordingLoss(), teacher=[str(teacher_dir), str(teacher_dir)])
    with pytest.raises(tricks.TricksError, match=r"--set kd\.teacher=RUN_DIR"):
        build(make_ctx(), RecordingLoss(), teacher=[])


def test_a_run_distilling_two_teachers(teacher_dir, second_teacher, tmp_path):
    run = tiny_run(plugins=["kd"], set=[f"kd.teacher=[{teacher_dir}, {second_teacher}]"], out=tmp_path / "run", **SMALL)
    assert run.config()["kd"]["teacher"] == [str(teacher_dir), str(second_teacher)]
    assert all(math.isfinite(row["train_loss"]) for row in run.metrics())


def test_a_transfer_set_without_a_class_keeps_it_for_validation(tmp_path, teacher_dir):
    """kd.omit_classes: Hinton's student that never sees a 3; validation still holds every class."""
    watcher = BatchWatcher()
    run = tiny_run(plugins=["kd", watcher], set=[f"kd.teacher={teacher_dir}", "kd.omit_classes=[3]"],
                   out=tmp_path / "no3", **SMALL)
    seen = torch.cat(watcher.targets)
    from tricks.data import load_digits_data

    everything = torch.from_numpy(load_digits_data()[1][:128])
    assert 3 in everything.tolist() and 3 not in seen.tolist()
    assert sorted(set(seen.tolist())) == sorted(set(everything.tolist()) - {3})
    assert len(seen) == 32 * ((everything != 3).sum().item() // 32)  # the epoch is the smaller split
    assert run.load_checkpoint()["shape"]["num_classes"] == K  # the head keeps the class
    for bad, match in (("[12]", "class 12"), ("[0,1,2,3,4,5,6,7,8,9]", "no training example")):
        with pytest.raises(tricks.TricksError, match=match):
            tiny_run(plugins=["kd"], set=[f"kd.teacher={teacher_dir}", f"kd.omit_classes={bad}"], out=tmp_path / bad, **SMALL)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_pruned_student_distilled_from_its_unpruned_run_and_two_teachers(tmp_path, teacher_dir, precision):
    """kd with pruning: the student (the teacher's own model) is pruned at the end of its first epoch
    while it distils from the unpruned run and a second teacher; low precision; mixup on top."""
    other = tmp_path / "other"
    tiny_run(out=other, seed=1, **SMALL)
    run = tiny_run(plugins=["kd", "prune", "mixup"], set=[f"kd.teacher=[{teacher_dir}, {other}]", "prune.ratio=0.5", "prune.at=1"],
                   out=tmp_path / "pruned", epochs=2, precision=precision, **SMALL)
    rows = run.metrics()
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in rows)
    student = run.load_checkpoint()
    teacher = tricks.RunDir(teacher_dir).load_checkpoint()
    assert student["structure"] and not teacher["structure"]
    params = lambda state: sum(v.numel() for k, v in state.items() if k.endswith("weight"))  # noqa: E731
    assert params(student["model"]) < 0.8 * params(teacher["model"])
    from tricks.ensemble import evaluate_ensemble

    result = evaluate_ensemble([run.path, teacher_dir])  # the pruned run rebuilt by replaying its structure
    assert result["members"][0]["acc"] == pytest.approx(rows[-1]["val_acc"], abs=1 / 64 + 1e-9)  # fp32 against autocast
