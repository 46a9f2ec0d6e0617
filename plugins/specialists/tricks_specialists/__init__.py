"""Generalist + specialist ensembles (Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural
Network", arXiv 1503.02531, section 5).

* :mod:`.subsets`: confusable class subsets (K-means on the columns of the covariance matrix of
  the generalist's predictions), a specialist's labels (its classes plus one dustbin class), its
  half-and-half epochs and the dustbin's log-prior correction;
* :mod:`.combine`: the paper's inference, the distribution ``q`` minimising
  ``KL(p_g || q) + sum_m KL(p_m || collapse_m(q))`` over the active specialists, batched;
* :class:`Specialist`: the plugin that turns a run into a specialist's (``--plugins specialists
  --set specialists.subset=[3,5] --set specialists.generalist=RUN``);
* :mod:`.job`: the whole procedure as one resumable job (``tricks specialists``).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import tricks
from tricks.data import Sampler, Split, epoch_generator

from .combine import active_specialists, collapse, combine, combine_gradient, objective
from .subsets import confusable_subsets, coverage, covariance_columns, dustbin_offset, half_and_half, specialist_labels

__version__ = "0.1.0"
__all__ = ["Specialist", "SpecialistSettings", "HalfAndHalf", "generalist_start", "active_specialists", "collapse",
           "combine", "combine_gradient", "objective", "confusable_subsets", "coverage", "covariance_columns",
           "dustbin_offset", "half_and_half", "specialist_labels"]


class HalfAndHalf(Sampler):
    """A specialist's epochs: every training example of its subset, plus as many drawn afresh each
    epoch from the other classes (the paper: "half its examples coming from its special subset and
    half sampled at random from the remainder of the training set")."""

    def __init__(self, targets: torch.Tensor, subset: list[int]):
        self.targets, self.subset = targets.cpu(), list(subset)
        inside = int(torch.isin(self.targets, torch.tensor(self.subset)).sum())
        self.n = inside + min(inside, len(self.targets) - inside)

    def __len__(self) -> int:
        return self.n

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        return half_and_half(self.targets, self.subset, epoch_generator(seed, epoch))


def _head_rows(generalist: torch.Tensor, subset: list[int]) -> torch.Tensor:
    """A specialist's head rows from the generalist's (``[C, ...]`` weight or ``[C]`` bias): the
    subset's rows in order, then the dustbin's: the mean of the other classes' weights, and for a
    bias their mean plus log(their number), so that the dustbin starts near the log of the summed
    probability of the classes it stands for (exactly so when their logits are equal)."""
    rest = [c for c in range(generalist.shape[0]) if c not in set(subset)]
    dustbin = generalist[rest].mean(0, keepdim=True)
    if generalist.ndim == 1:
        dustbin = dustbin + math.log(len(rest))
    return torch.cat([generalist[subset], dustbin])


def generalist_start(model: torch.nn.Module, state: dict, subset: list[int], source: str) -> None:
    """Load the generalist's weights ``state`` into a specialist ``model`` (built for
    ``len(subset) + 1`` classes): every tensor as it is, except the head's, whose rows are mapped
    by :func:`_head_rows`. Any other difference is a TricksError naming the tensor."""
    own = model.state_dict()
    k = len(subset) + 1
    loaded = {}
    for key, value in own.items():
        theirs = state.get(key)
        if not isinstance(theirs, torch.Tensor):
            raise tricks.TricksError(f"specialists.generalist {source} has no tensor {key}; a specialist starts from a generalist "
                                     "of the same model (--model)")
        if theirs.shape == value.shape:
            loaded[key] = theirs
        elif value.shape[:1] == (k,) and theirs.shape[1:] == value.shape[1:] and theirs.shape[0] > max(subset):
            loaded[key] = _head_rows(theirs.to(value.dtype), subset)
        else:
            raise tricks.TricksError(f"specialists.generalist {source}: {key} is {tuple(theirs.shape)} there but "
                                     f"{tuple(value.shape)} here; a specialist starts from a generalist of the same model (--model)")
    model.load_state_dict(loaded)


class SpecialistSettings(tricks.Settings):
    subset: list[int] = tricks.Field(default_factory=list, description="the specialist's classes (indices of the data set's "
                                     "classes); every other class becomes its one dustbin class")
    generalist: str = tricks.Field("", description="the generalist's run directory: the specialist starts from its weights "
                                   "(and takes its soft targets with soft_targets)")
    resample: bool = tricks.Field(True, description="each epoch: every example of the subset plus as many drawn from the "
                                  "rest (the paper's half and half); false: the whole training set, relabelled")
    soft_targets: bool = tricks.Field(False, description="add the generalist's soft targets, collapsed onto the subset and the dustbin")
    temperature: float = tricks.Field(2.0, gt=0, description="temperature of the generalist's soft targets")
    soft_weight: float = tricks.Field(0.5, ge=0, le=1, description="weight of the soft-target term (times T^2); the hard loss gets the rest")

    @classmethod
    def check_subset(cls, subset: list[int], num_classes: int) -> None:
        if not subset:
            raise tricks.TricksError("the specialists plugin needs the specialist's classes: --set 'specialists.subset=[3,5]' "
                                     "(or run the whole procedure with tricks specialists)")
        bad = [c for c in subset if c < 0 or c >= num_classes]
        if bad:
            raise tricks.TricksError(f"specialists.subset holds class {bad[0]}, but the data set has classes 0-{num_classes - 1}; "
                                     "name classes of the data set")
        if len(set(subset)) != len(subset):
            raise tricks.TricksError("specialists.subset names a class twice; name each class once")
        if len(subset) >= num_classes:
            raise tricks.TricksError(f"specialists.subset holds all {num_classes} classes, which leaves nothing for the dustbin; "
                                     "name fewer classes")


class Specialist(tricks.Plugin):
    """A specialist: the run's classes become the subset's plus one dustbin class; half-and-half
    epochs; it starts from the generalist's weights."""

    Settings = SpecialistSettings

    def __init__(self, settings: SpecialistSettings | None = None):
        super().__init__(settings)
        self.offset = 0.0
        self.classes = 0

    @classmethod
    def example_settings(cls, workdir) -> dict:
        """A specialist on digits 0-4 (half the classes, so that its epochs are as long as a full one), from scratch."""
        return {"subset": [0, 1, 2, 3, 4]}

    @tricks.hookimpl
    def prepare_data(self, ctx, data):
        s = self.settings
        SpecialistSettings.check_subset(s.subset, data.num_classes)
        if data.train is None:
            raise tricks.TricksError("a specialist relabels an in-memory data set, and imagefolder data is read from files; "
                                     "store it as npz shards (--dataset npz) to train specialists on it")
        subset = list(s.subset)
        self.classes = data.num_classes
        self.offset = dustbin_offset(data.train.y, subset) if s.resample else 0.0
        relabel = lambda split: Split(split.x, specialist_labels(split.y, subset))  # noqa: E731
        ctx.log(f"specialists: classes {subset} plus a dustbin for the other {data.num_classes - len(subset)}"
                + (f"; epochs of {len(HalfAndHalf(data.train.y, subset))} examples, half from the subset "
                   f"(dustbin offset {self.offset:.3f})" if s.resample else ""))
        return dataclasses.replace(data, train=relabel(data.train), val=relabel(data.val), num_classes=len(subset) + 1,
                                   train_sampler=HalfAndHalf(data.train.y, subset) if s.resample else None)

    def _generalist(self) -> tuple[dict, str]:
        source = self.settings.generalist.strip()
        run = tricks.RunDir(Path(source).expanduser())
        checkpoint = run.load_checkpoint() if run.has_checkpoint() else None
        if checkpoint is None:
            raise tricks.TricksError(f"specialists.generalist {source} holds no trained run (no {tricks.RunDir.CHECKPOINT}); "
                                     "train the generalist first, or point at its run directory")
        if checkpoint.get("structure"):
            raise tricks.TricksError(f"specialists.generalist {source} changed its structure while training (pruning); "
                                     "start specialists from an unpruned generalist")
        return checkpoint, source

    @tricks.hookimpl(wrapper=True)
    def build_model(self, ctx):
        model = yield
        if self.settings.generalist.strip():
            checkpoint, source = self._generalist()
            generalist_start(model, tricks.rundir.strip_prefix(checkpoint["model"]), list(self.settings.subset), source)
            ctx.log(f"specialists: starts from the generalist {source}")
        return model

    @tricks.hookimpl(wrapper=True)
    def build_loss(self, ctx):
        inner = yield
        s = self.settings
        if not s.soft_targets:
            return inner
        if not s.generalist.strip():
            raise tricks.TricksError("specialists.soft_targets needs specialists.generalist (the run whose soft targets it takes)")
        checkpoint, source = self._generalist()
        with torch.random.fork_rng(devices=[]):
            teacher = tricks.rundir.checkpoint_model(checkpoint, f"the generalist {source}", num_classes=self.classes,
                                                     in_chans=ctx.in_chans, image_size=ctx.image_size)
        tricks.rundir.load_state(teacher, checkpoint["model"], source)
        teacher = teacher.to(ctx.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        subset, t, w = list(s.subset), s.temperature, s.soft_weight

        def loss(output, batch):
            with torch.no_grad(), ctx.autocast():
                logits = teacher(batch["input"])
            target = collapse(F.softmax(logits.float() / t, dim=1), subset)
            soft = F.kl_div(F.log_softmax(output.float() / t, dim=1), target, reduction="batchmean") * t * t
            return (1 - w) * inner(output, batch) + w * soft

        return loss

    @tricks.hookimpl
    def on_fit_end(self, ctx, summary):
        summary["subset"] = list(self.settings.subset)
        summary["dustbin_offset"] = self.offset
