"""Image retrieval as a tricks task: ``tricks run --task retrieval``.

An embedding run on the classification data sets (digits, mnist, cifar10, cifar100, npz): the
model learns an embedding on some classes (default 0-4) and is judged by how well it retrieves
images of classes it never saw (default: the others), as in the metric-learning benchmarks
(CUB-200, Cars196, SOP), where the test classes are disjoint from the training ones.

What the plugin brings:

* the data: the core's data set, training split cut to the training classes, validation split to
  the evaluation classes;
* the loaders: batches of ``per_class`` images of each of several classes
  (:class:`~tricks_retrieval.sampler.ClassBatchSampler`), drawn from the seed and the epoch alone;
* the model: the run's network with as many outputs as the embedding has dimensions (its pooled
  features -> a linear layer -> the embedding), L2-normalized (:class:`Embedder`);
* a baseline loss, pytorch-metric-learning's triplet-margin or contrastive loss, which any loss
  plugin of the run (circle_loss) replaces;
* the evaluation: Recall@1/2/4/8, MAP@R and precision@1 of every validation image of the unseen
  classes as a query against the others, over the whole validation set (gathered from every
  process), by pytorch-metric-learning's ``AccuracyCalculator``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

import tricks
from tricks.builtin import base_loss
from tricks.data import Data, Pipeline, Split, TensorLoader
from tricks.errors import TricksError

from .metrics import retrieval_metrics
from .sampler import ClassBatchSampler, classes_per_batch

__version__ = "0.1.0"

DATASETS = ("digits", "mnist", "cifar10", "cifar100", "npz")


class RetrievalSettings(tricks.Settings):
    train_classes: list[int] = Field([0, 1, 2, 3, 4], min_length=2, description="the classes trained on (labels of the data set)")
    eval_classes: list[int] | None = Field(None, description="the classes retrieval is evaluated on, never trained on "
                                           "(default: every class not in train_classes)")
    embedding_dim: int = Field(128, ge=2, description="dimensions of the (L2-normalized) embedding")
    per_class: int | None = Field(None, ge=2, description="images of each class in a batch of a process (default: the batch "
                                  "split evenly over as many training classes as divide it)")
    loss: Literal["triplet", "contrastive"] = Field("triplet", description="the baseline loss, used when no loss plugin is in "
                                                    "the run: pytorch-metric-learning's TripletMarginLoss or ContrastiveLoss "
                                                    "(on every triplet or pair of the batch)")
    triplet_margin: float = Field(0.05, gt=0, description="the margin of the triplet loss (pytorch-metric-learning's default)")
    recall_at: list[int] = Field([1, 2, 4, 8], min_length=1, description="the K of the reported Recall@K")


@dataclasses.dataclass
class RetrievalData(Data):
    """The core's :class:`tricks.data.Data` of a retrieval run: ``train`` holds the training
    classes' images, ``val`` the evaluation classes'; ``num_classes`` is the embedding's
    dimension (the width of the model's head)."""

    train_classes: tuple[int, ...] = ()
    eval_classes: tuple[int, ...] = ()


class Embedder(nn.Module):
    """The run's network, its outputs L2-normalized (in float32): an embedding on the unit sphere."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.network(x).float(), dim=1)


def split_classes(split: Split, classes) -> Split:
    """The examples of ``split`` whose label is one of ``classes`` (labels unchanged)."""
    keep = torch.isin(split.y, torch.as_tensor(list(classes), dtype=split.y.dtype))
    return Split(split.x[keep], split.y[keep])


def baseline_loss(kind: str, triplet_margin: float):
    """pytorch-metric-learning's loss of that kind, as a ``loss(output, batch)`` of the run."""
    from pytorch_metric_learning import losses

    metric = losses.TripletMarginLoss(margin=triplet_margin) if kind == "triplet" else losses.ContrastiveLoss()

    def loss(output, batch):
        target = batch["target"]
        if target.is_floating_point() or target.dim() != 1:
            raise TricksError("the retrieval loss needs one integer label per image; a plugin of the run changed the "
                              "targets into soft ones: leave it out")
        return metric(output.float(), target)

    return loss


class Retrieval(tricks.Plugin):
    """The retrieval task: unseen-class retrieval of a learned embedding, Recall@K and MAP@R."""

    Settings = RetrievalSettings
    name = "retrieval"
    task = "retrieval"
    tasks = ("retrieval",)
    # the training classes are half of the digits: 160 of them give batches enough for a warmup
    example_core = {"task": "retrieval", "dataset": "digits", "train_limit": 160}

    def _active(self, ctx) -> bool:
        return ctx.core.task == self.task

    # --- data ---------------------------------------------------------------------------------
    @tricks.hookimpl
    def load_data(self, ctx):
        if not self._active(ctx):
            return None
        core, s = ctx.core, self.settings
        if core.dataset not in DATASETS:
            raise TricksError(f"--task retrieval reads the data sets {', '.join(DATASETS)}, not '{core.dataset}'; "
                              "choose one with --dataset")
        from tricks.data import load_data

        data = load_data(core)
        k = data.num_classes
        train = list(dict.fromkeys(s.train_classes))
        evaluate = list(dict.fromkeys(s.eval_classes)) if s.eval_classes is not None else [c for c in range(k) if c not in train]
        bad = [c for c in train + evaluate if not 0 <= c < k]
        if bad:
            raise TricksError(f"retrieval: class {bad[0]} is not a class of {core.dataset} (labels 0-{k - 1}); "
                              "fix retrieval.train_classes / retrieval.eval_classes")
        both = sorted(set(train) & set(evaluate))
        if both:
            raise TricksError(f"retrieval: class {both[0]} is in both train_classes and eval_classes; the evaluation "
                              "classes must be unseen in training: take it out of one of them")
        if len(evaluate) < 2:
            raise TricksError(f"retrieval: {len(evaluate)} evaluation class(es) ({evaluate}); retrieval is evaluated on at "
                              "least 2 classes: set retrieval.eval_classes, or train on fewer classes")
        tr, va = split_classes(data.train, train), split_classes(data.val, evaluate)
        seen = torch.unique(tr.y).tolist()
        if len(seen) < 2:
            raise TricksError(f"retrieval: the training split holds images of {len(seen)} of the training classes {train} "
                              f"(core.train_limit={core.train_limit}); a pair loss needs 2: raise --train-limit")
        _, counts = torch.unique(va.y, return_counts=True)
        if len(va.y) < max(s.recall_at) + 1 or len(counts) < 2 or int(counts.max()) < 2:
            raise TricksError(f"retrieval: the validation split holds {len(va.y)} images of the evaluation classes "
                              f"{evaluate} (core.val_limit={core.val_limit}); Recall@{max(s.recall_at)} needs "
                              f"{max(s.recall_at) + 1} of at least 2 classes: raise --val-limit")
        notes = [*data.notes, f"retrieval: training on classes {seen} ({len(tr.y)} images), retrieving among classes "
                 f"{sorted(torch.unique(va.y).tolist())} ({len(va.y)} validation images, never trained on)"]
        fields = {f.name: getattr(data, f.name) for f in dataclasses.fields(Data)}
        fields.update(train=tr, val=va, num_classes=s.embedding_dim, notes=notes, metric="val_map_at_r")
        return RetrievalData(**fields, train_classes=tuple(train), eval_classes=tuple(evaluate))

    @tricks.hookimpl
    def make_loaders(self, ctx, data):
        if not self._active(ctx):
            return None
        core, world = ctx.core, ctx.world_size
        if core.batch_size % world:
            raise TricksError(f"--batch-size {core.batch_size} does not split over {world} processes; use a multiple of {world}")
        per = core.batch_size // world
        classes = len(torch.unique(data.train.y))
        m = self.settings.per_class
        if m is None:
            c = classes_per_batch(per, classes)
            if c is None:
                raise TricksError(f"retrieval: a batch of {per} images per process does not split into equal groups of at least "
                                  f"2 images of 2 to {classes} classes; choose another --batch-size (e.g. {4 * min(classes, 4)})")
            m = per // c
        if per % m or not 2 <= per // m <= classes:
            fits = [per // c for c in range(classes, 1, -1) if per % c == 0]
            choose = f"choose one of {', '.join(map(str, fits))}" if fits else "change --batch-size"
            raise TricksError(f"retrieval.per_class={m} does not split a batch of {per} images per process into equal groups of "
                              f"2 to {classes} classes (the training classes): {choose}")
        steps = max(1, len(data.train.y) // core.batch_size)
        sampler = ClassBatchSampler(data.train.y, per, m, steps, world)
        pipeline = Pipeline(data, ctx.device, data.image_size, core.channels_last)
        train = Split(data.train.x.to(ctx.device), data.train.y.to(ctx.device))
        val = Split(data.val.x.to(ctx.device), data.val.y.to(ctx.device))
        return (TensorLoader(train, pipeline, per, True, core.seed, ctx.rank, world, sampler=sampler),
                TensorLoader(val, pipeline, per, False, core.seed, ctx.rank, world))

    # --- model and loss -------------------------------------------------------------------------
    @tricks.hookimpl(wrapper=True)
    def build_model(self, ctx):
        model = yield
        if not self._active(ctx):
            return model
        return Embedder(model)

    @tricks.hookimpl(wrapper=True)
    def build_loss(self, ctx):
        loss = yield
        if not self._active(ctx) or loss is not base_loss:
            return loss  # a loss plugin of the run (circle_loss) brought the loss: it is kept
        # the core's default, a cross-entropy over classes, means nothing on embeddings: the baseline
        return baseline_loss(self.settings.loss, self.settings.triplet_margin)

    # --- evaluation -----------------------------------------------------------------------------
    @tricks.hookimpl
    def evaluate(self, ctx, model, loader):
        if not self._active(ctx):
            return None
        embeddings, labels = [], []
        for batch in loader:
            with ctx.autocast():
                embeddings.append(model(batch["input"]).float())
            labels.append(batch["target"])
        mine = (torch.cat(embeddings), torch.cat(labels))
        everything = gather(mine, ctx.rank, ctx.world_size)
        return {"n": len(mine[1]), "reduced": retrieval_metrics(*everything, ks=self.settings.recall_at)}


def gather(shard: tuple[torch.Tensor, torch.Tensor], rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The embeddings and labels of the whole validation set, from every process's shard (process
    ``r`` holds examples ``r, r + world, ...``), in the set's order, on this process's device."""
    if world == 1:
        return shard
    import torch.distributed as tdist

    parts = [None] * world
    tdist.all_gather_object(parts, tuple(t.cpu() for t in shard))
    n = sum(len(p[1]) for p in parts)
    device = shard[0].device
    embeddings = torch.empty(n, shard[0].shape[1], dtype=shard[0].dtype)
    labels = torch.empty(n, dtype=shard[1].dtype)
    for r, (e, y) in enumerate(parts):
        embeddings[r::world], labels[r::world] = e, y
    return embeddings.to(device), labels.to(device)


__all__ = ["Embedder", "Retrieval", "RetrievalData", "RetrievalSettings", "baseline_loss", "gather",
           "retrieval_metrics", "split_classes", "ClassBatchSampler", "classes_per_batch"]
