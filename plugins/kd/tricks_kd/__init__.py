"""Knowledge distillation (Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network",
arXiv 1503.02531), in the weighted form of gluon-cv and "Bag of Tricks" (arXiv 1812.01187).

``loss = w * inner(output, batch) + (1 - w) * T^2 * KL(softmax(v / T) || softmax(z / T))``

with ``z`` the student's logits, ``v`` the teacher's on the same (possibly mixed) input, ``T`` the
temperature, ``w`` the weight of the hard term and ``inner`` the loss in force (cross-entropy,
with smoothed or mixed targets when other plugins change them). The KL is averaged over the batch
(``batchmean``); it differs from the soft-target cross-entropy only by the teacher's entropy, a
constant for the student, so the gradients are the same: ``(1 - w) * T * (q - p)`` per example
with the factor ``T^2`` (``(q - p) / T`` without it), ``q`` and ``p`` the student's and the
teacher's softened distributions.

Several teachers (an ensemble, distilled into one model as in Hinton et al., section 3) give one
soft target, the mean of their softened distributions ``p = (1/K) sum_k softmax(v_k / T)``
(``teacher_average="probs"``), or the softened mean of their logits ``softmax(mean_k v_k / T)``
(``"logits"``); the gradient is then ``(q - p) / T`` with that ``p``.

The functions below are the math, usable without the framework; :class:`KnowledgeDistillation`
loads the teachers and wraps the loss in force.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import field_validator

import tricks
from tricks.rundir import checkpoint_model, load_state, read_checkpoint, safe_load, strip_prefix

__version__ = "0.1.0"

HOW = "give one with --set kd.teacher=RUN_DIR|CHECKPOINT|timm:NAME"


# --- the math ------------------------------------------------------------------------------


def soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
              temperature_squared: bool = True) -> torch.Tensor:
    """``[T^2 *] KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch.

    Computed in float32 (or float64 when given) from ``log_softmax`` of both; the teacher's
    logits are detached. Its gradient with respect to the student's logits is ``(q - p) / T``
    per example (divided by the batch size), times ``T^2`` when ``temperature_squared``.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=1)
    kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    return kl * (temperature * temperature) if temperature_squared else kl


def ensemble_soft_loss(student_logits: torch.Tensor, teacher_logits_list: Sequence[torch.Tensor], temperature: float,
                       temperature_squared: bool = True, average: str = "probs") -> torch.Tensor:
    """``[T^2 *] KL(p || softmax(student / T))`` for the soft target of several teachers,
    averaged over the batch: ``p = (1/K) sum_k softmax(v_k / T)`` (``average="probs"``) or
    ``p = softmax((1/K) sum_k v_k / T)`` (``"logits"``).

    ``log p`` of the mean of probabilities is ``logsumexp_k log_softmax(v_k / T) - log K``, which
    never takes the log of an underflowed probability. Computed in float32 (float64 when given);
    the teachers' logits are detached. One teacher is exactly :func:`soft_loss`. The gradient with
    respect to the student's logits is ``(q - p) / T`` per example (divided by the batch size),
    times ``T^2`` when ``temperature_squared``.
    """
    if average not in ("probs", "logits"):
        raise ValueError(f"average must be 'probs' or 'logits', not {average!r}")
    teachers = list(teacher_logits_list)
    if not teachers:
        raise ValueError("no teacher logits")
    if len(teachers) == 1:
        return soft_loss(student_logits, teachers[0], temperature, temperature_squared)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    stacked = torch.stack([v.detach().to(dtype) for v in teachers])  # [K, B, C]
    if average == "logits":
        return soft_loss(student_logits, stacked.mean(0), temperature, temperature_squared)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    log_p = torch.logsumexp(F.log_softmax(stacked / temperature, dim=2), dim=0) - math.log(len(teachers))
    kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    return kl * (temperature * temperature) if temperature_squared else kl


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, hard_loss: torch.Tensor,
                      temperature: float, hard_weight: float, temperature_squared: bool = True) -> torch.Tensor:
    """``hard_weight * hard_loss + (1 - hard_weight) * soft_loss(...)``."""
    soft = soft_loss(student_logits, teacher_logits, temperature, temperature_squared)
    return hard_weight * hard_loss + (1.0 - hard_weight) * soft


# --- the teacher ---------------------------------------------------------------------------


def teacher_sources(teacher: str | Sequence[str] | None) -> list[str]:
    """The teachers named by ``kd.teacher``: a list, or a string of one or several comma-separated
    run directories, checkpoints or ``timm:NAME``; blanks left out."""
    if teacher is None:
        return []
    items = teacher.split(",") if isinstance(teacher, str) else list(teacher)
    return [str(item).strip() for item in items if str(item).strip()]


def _head_classes(model: torch.nn.Module, state: dict, num_classes: int) -> int | None:
    """The class count a state dict was trained for, read at the model's last linear layer when
    that layer is the head (it has ``num_classes`` outputs in the model); else ``None``."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if linears and linears[-1][1].out_features == num_classes:
        name = linears[-1][0]
        weight = state.get(f"{name}.weight" if name else "weight")
        if isinstance(weight, torch.Tensor) and weight.ndim == 2:
            return int(weight.shape[0])
    return None


def load_weights(model: torch.nn.Module, state: dict, source: str, num_classes: int) -> None:
    """Load ``state`` into ``model`` strictly; a wrong class count or shape is a TricksError."""
    state = strip_prefix(state)
    odd = next((k for k, v in state.items()
                if not isinstance(v, torch.Tensor) and not str(k).endswith("_extra_state")), None)
    if odd is not None:
        raise tricks.TricksError(f"the teacher weights in {source} are not all tensors ({odd!r} is a "
                                 f"{type(state[odd]).__name__}); save model.state_dict() with torch.save")
    theirs = _head_classes(model, state, num_classes)
    if theirs is not None and theirs != num_classes:
        raise tricks.TricksError(f"the teacher {source} has {theirs} classes but the student's data has {num_classes}; "
                                 "distil from a teacher trained on the same classes")
    try:
        load_state(model, state, source)
    except tricks.TricksError as error:
        raise tricks.TricksError(f"teacher: {error}") from None


def load_teacher(teacher: str, ctx, weights: str = "", allow_random: bool = False) -> torch.nn.Module:
    """The teacher model with its weights (on the CPU, unless a model provider put it elsewhere),
    for a student with ``ctx.num_classes`` classes and ``ctx.in_chans`` input channels.

    ``teacher`` is a tricks run directory (its last checkpoint), a checkpoint file, or
    ``timm:NAME`` (then ``weights`` is a state dict file, or a checkpoint dict with
    ``state_dict`` or ``model``). A run's model is rebuilt through its own plugins and settings
    (:class:`tricks.RunDir`), with the structural changes its checkpoint records replayed by the
    plugins that made them. Every file is read with :func:`tricks.rundir.safe_load`: tensors and
    plain data only, never code. The global random state is left as it was.
    """
    teacher = (teacher or "").strip()
    if not teacher:
        raise tricks.TricksError(f"kd needs a teacher; {HOW}")
    with torch.random.fork_rng(devices=[]):
        if teacher.startswith("timm:"):
            return _timm_teacher(teacher, ctx, weights, allow_random)
        path = Path(teacher).expanduser()
        if path.is_dir():
            run = tricks.RunDir(path)
            if not run.has_checkpoint():
                raise tricks.TricksError(f"the teacher run {path} has no {run.CHECKPOINT}; train it first "
                                         f"(tricks run --out {path}) or point kd.teacher at a checkpoint file")
            path = run.checkpoint_path
        elif not path.is_file():
            raise tricks.TricksError(f"the teacher {teacher} is neither a run directory, a checkpoint file nor timm:NAME; {HOW}")
        try:
            checkpoint = read_checkpoint(path)
        except tricks.TricksError as error:
            raise tricks.TricksError(f"{_naming(error, path, 'the teacher checkpoint')}; for other weights use "
                                     "--set kd.teacher=timm:NAME --set kd.teacher_weights=FILE") from None
        config = checkpoint["config"]
        if config.get("adhoc_plugins"):
            replayed = ", then its recorded structural changes are replayed" if checkpoint.get("structure") else ""
            _log(ctx, f"kd: the teacher run also used ad-hoc plugins ({', '.join(config['adhoc_plugins'])}), "
                      f"which cannot be re-created; its model is rebuilt without them{replayed}")
        student_data = getattr(getattr(ctx, "core", None), "dataset", None)
        teacher_data = (config.get("core") or {}).get("dataset")
        if student_data is not None and teacher_data is not None and teacher_data != student_data:
            _log(ctx, f"kd: the teacher was trained on {teacher_data}, the student trains on {student_data}")
        try:
            model = checkpoint_model(checkpoint, f"the teacher {path}", num_classes=ctx.num_classes,
                                     in_chans=ctx.in_chans, image_size=ctx.image_size)
        except tricks.TricksError as error:
            if str(path) in str(error):
                raise
            raise tricks.TricksError(f"cannot rebuild the teacher {path}: {error}") from None
        load_weights(model, checkpoint["model"], str(path), ctx.num_classes)
        return model


def _timm_teacher(teacher: str, ctx, weights: str, allow_random: bool) -> torch.nn.Module:
    from tricks.models import create_model

    if not weights and not allow_random:
        raise tricks.TricksError(f"the teacher {teacher} has no weights, and a random teacher teaches nothing; "
                                 "give them with --set kd.teacher_weights=FILE (or allow_random_teacher=true for tests)")
    model = create_model(teacher, ctx.num_classes, ctx.in_chans)
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise tricks.TricksError(f"kd.teacher_weights {weights} is not a file; give a state dict saved with torch.save")
        try:
            state = safe_load(path)
        except tricks.TricksError as error:
            raise tricks.TricksError(f"{_naming(error, path, 'the teacher weights file')}; kd.teacher_weights needs a "
                                     "state dict saved with torch.save(model.state_dict(), FILE)") from None
        if isinstance(state, dict):
            for key in ("state_dict", "model", "state_dict_ema"):
                if isinstance(state.get(key), dict):
                    state = state[key]
                    break
        if not isinstance(state, dict):
            raise tricks.TricksError(f"the teacher weights {path} hold no state dict; save model.state_dict() with torch.save")
        load_weights(model, state, str(path), ctx.num_classes)
    return model


def _naming(error: tricks.TricksError, path: Path, what: str) -> str:
    """The core's message about the file ``path``, with the file called what it is to kd."""
    message, name = str(error), str(path)
    for prefix in ("cannot read the checkpoint ", "cannot read "):
        if message.startswith(prefix + name):
            return f"cannot read {what} {message[len(prefix):]}"
    return f"{what} {message}" if message.startswith(name) else message


def _log(ctx, message: str) -> None:
    log = getattr(ctx, "log", None)
    if log is not None:
        log(message)


def prepare_teacher(model: torch.nn.Module, device, channels_last: bool = False) -> torch.nn.Module:
    """The teacher frozen: eval mode, no parameter requires a gradient, on ``device``."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _probe(model: torch.nn.Module, ctx, source: str) -> None:
    """One forward pass on a blank input of the student's shape: the teacher must take the
    student's images and return one logit per class."""
    x = torch.zeros(1, ctx.in_chans, ctx.image_size, ctx.image_size, device=ctx.device)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as error:
        raise tricks.TricksError(f"the teacher {source} cannot take the student's {ctx.in_chans}x{ctx.image_size}x"
                                 f"{ctx.image_size} inputs: {type(error).__name__}: {str(error).splitlines()[0]}")
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != ctx.num_classes:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        if isinstance(out, torch.Tensor) and out.ndim == 2:
            raise tricks.TricksError(f"the teacher {source} has {out.shape[1]} classes but the student's data has "
                                     f"{ctx.num_classes}; distil from a teacher trained on the same classes")
        raise tricks.TricksError(f"the teacher {source} returns {got}, not [batch, classes] logits; "
                                 "distil from a classifier of the student's classes")


# --- the plugin ----------------------------------------------------------------------------


class KDSettings(tricks.Settings):
    teacher: str | list[str] = tricks.Field("", description="the teacher: a tricks run directory, a checkpoint file (checkpoints/last.pt), or timm:NAME; "
                                                  "several teachers as a list or a comma-separated string (their soft targets are averaged)")
    teacher_weights: str = tricks.Field("", description="weights of a timm:NAME teacher: a state dict file (or a checkpoint dict with state_dict or model)")
    allow_random_teacher: bool = tricks.Field(False, description="allow a timm:NAME teacher without weights (for tests only: a random teacher teaches nothing)")
    temperature: float = tricks.Field(4.0, gt=0, description="softmax temperature T of teacher and student in the soft term (gluon-cv and Hinton's MNIST: 20)")
    hard_weight: float = tricks.Field(0.5, ge=0, le=1, description="weight w of the loss in force; the soft term gets 1 - w")
    temperature_squared: bool = tricks.Field(True, description="multiply the soft term by T^2 so its gradients keep their size as T changes (Hinton)")
    teacher_average: Literal["probs", "logits"] = tricks.Field("probs", description="several teachers: average their softened probabilities (Hinton), or their logits before the softmax")
    omit_classes: list[int] = tricks.Field(default_factory=list, description="classes left out of the transfer set (the training split; "
                                           "the validation split keeps them): Hinton's MNIST student that never sees a 3")

    @field_validator("teacher")
    @classmethod
    def _timm_teacher_alone(cls, value):
        sources = teacher_sources(value)
        if len(sources) > 1 and any(source.startswith("timm:") for source in sources):
            raise ValueError("a timm:NAME teacher must be the only teacher (kd.teacher_weights holds one model's weights); "
                             "distil several teachers from run directories or checkpoints")
        return value

    @field_validator("teacher_weights")
    @classmethod
    def _weights_need_timm(cls, value, info):
        sources = teacher_sources(info.data.get("teacher"))
        if value and not (len(sources) == 1 and sources[0].startswith("timm:")):
            raise ValueError("only for a timm:NAME teacher; a run directory or checkpoint carries its own weights")
        return value


class KnowledgeDistillation(tricks.Plugin):
    """Distil a frozen teacher (or several, averaged) into the student: the loss in force plus the
    softened KL to the teacher."""

    Settings = KDSettings

    def __init__(self, settings: KDSettings | None = None):
        super().__init__(settings)
        self.teachers: list[torch.nn.Module] = []
        self.teacher: torch.nn.Module | None = None  # the first (or only) teacher

    @classmethod
    def example_settings(cls, workdir) -> dict:
        """A teacher trained for one epoch on the digits (resnet8, a few seconds on a CPU)."""
        out = Path(workdir) / "teacher"
        tricks.run(epochs=1, model="resnet8", batch_size=32, train_limit=256, val_limit=128, out=out,
                   reporter=tricks.Reporter())
        return {"teacher": str(out)}

    @tricks.hookimpl
    def prepare_data(self, ctx, data):
        omit = sorted(set(self.settings.omit_classes))
        if not omit:
            return None
        bad = [c for c in omit if c < 0 or c >= data.num_classes]
        if bad:
            raise tricks.TricksError(f"kd.omit_classes holds class {bad[0]}, but the data set has classes 0-{data.num_classes - 1}; "
                                     "name classes of the data set")
        if data.train is None:
            raise tricks.TricksError("kd.omit_classes filters an in-memory data set, and imagefolder data is read from files; "
                                     "leave the classes' folders out of the training tree instead")
        if data.train_sampler is not None:
            raise tricks.TricksError("kd.omit_classes cannot filter a training split that another plugin resamples; "
                                     "leave one of them out")
        keep = ~torch.isin(data.train.y, torch.tensor(omit))
        if not keep.any():
            raise tricks.TricksError(f"kd.omit_classes={omit} leaves no training example; omit fewer classes")
        import dataclasses

        from tricks.data import Split

        _log(ctx, f"kd: the transfer set leaves out classes {omit} ({int((~keep).sum())} of {len(keep)} training examples); "
                  "the validation split keeps them")
        return dataclasses.replace(data, train=Split(data.train.x[keep], data.train.y[keep]))

    @tricks.hookimpl(wrapper=True)
    def build_loss(self, ctx):
        inner = yield
        s = self.settings
        sources = teacher_sources(s.teacher) or [""]  # none: load_teacher says how to give one
        teachers = []
        for source in sources:
            teacher = load_teacher(source, ctx, s.teacher_weights, s.allow_random_teacher)
            teacher = prepare_teacher(teacher, ctx.device, bool(ctx.core.channels_last))
            _probe(teacher, ctx, source)
            teachers.append(teacher)
        self.teachers, self.teacher = teachers, teachers[0]
        sizes = ", ".join(f"{source} ({sum(p.numel() for p in t.parameters()):,} parameters)"
                          for source, t in zip(sources, teachers))
        several = f", averaging their {s.teacher_average}" if len(teachers) > 1 else ""
        _log(ctx, f"kd: teacher{'s' if len(teachers) > 1 else ''} {sizes}{several}, "
                  f"T={s.temperature:g}, hard_weight={s.hard_weight:g}")
        temperature, hard_weight, squared = s.temperature, s.hard_weight, s.temperature_squared
        average = s.teacher_average
        autocast = getattr(ctx, "autocast", contextlib.nullcontext)

        if hard_weight == 1.0:
            return inner  # the soft term has no weight: the loss in force, and no teacher pass

        def distilled(output, batch):
            logits = []
            for teacher in teachers:
                if teacher.training:  # something called .train() on every module
                    teacher.eval()
                with torch.no_grad(), autocast():
                    logits.append(teacher(batch["input"]))
            soft = ensemble_soft_loss(output, logits, temperature, squared, average)
            if hard_weight == 0.0:
                return soft
            return hard_weight * inner(output, batch) + (1.0 - hard_weight) * soft

        return distilled
