"""Batches of ``m`` images of each of ``C`` classes, the batches a pair loss needs.

Every batch of every process holds ``classes_per_batch`` distinct classes, drawn at random, and
``per_class`` images of each, taken from a shuffled round of the class's images (a new round,
reshuffled, when one runs out, so a class with fewer images than asked repeats some). The order of
an epoch depends on ``(seed, epoch)`` alone: every process draws the same one, and a resumed run
the one it would have drawn uninterrupted.
"""

from __future__ import annotations

import torch

from tricks.data import Sampler, epoch_generator


class ClassBatchSampler(Sampler):
    """A :class:`tricks.data.Sampler` whose order, cut as the core's loaders cut it (every
    ``world``-th index from ``rank``, in batches of ``batch_size``), gives each process batches
    of ``per_class`` images of each of ``batch_size // per_class`` classes.

    ``labels``: the training split's labels; ``steps``: batches per epoch and process.
    """

    def __init__(self, labels: torch.Tensor, batch_size: int, per_class: int, steps: int, world: int = 1):
        if per_class < 1 or batch_size % per_class:
            raise ValueError(f"a batch of {batch_size} does not split into groups of {per_class} images")
        labels = labels.cpu()
        self.classes = torch.unique(labels)
        self.members = [torch.nonzero(labels == c).flatten() for c in self.classes]
        self.batch_size, self.per_class, self.steps, self.world = batch_size, per_class, steps, world
        self.classes_per_batch = batch_size // per_class
        if self.classes_per_batch > len(self.classes):
            raise ValueError(f"a batch of {batch_size} in groups of {per_class} needs {self.classes_per_batch} classes, "
                             f"the labels hold {len(self.classes)}")

    def __len__(self) -> int:
        return self.steps * self.batch_size * self.world

    def batches(self, seed: int, epoch: int) -> torch.Tensor:
        """``[steps, world, batch_size]``: the batch of every step and process."""
        g = epoch_generator(seed, epoch)
        rounds = [torch.empty(0, dtype=torch.long) for _ in self.members]
        out = torch.empty(self.steps, self.world, self.batch_size, dtype=torch.long)
        for step in range(self.steps):
            for rank in range(self.world):
                chosen = torch.randperm(len(self.classes), generator=g)[: self.classes_per_batch]
                parts = []
                for c in chosen.tolist():
                    while len(rounds[c]) < self.per_class:  # a new shuffled round of the class's images
                        members = self.members[c]
                        rounds[c] = torch.cat([rounds[c], members[torch.randperm(len(members), generator=g)]])
                    parts.append(rounds[c][: self.per_class])
                    rounds[c] = rounds[c][self.per_class:]
                out[step, rank] = torch.cat(parts)
        return out

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        # position (step * batch_size + i) * world + rank: what rank `rank` takes as the i-th image
        # of its batch `step` when it keeps every world-th index
        return self.batches(seed, epoch).permute(0, 2, 1).reshape(-1)


def classes_per_batch(batch_size: int, num_classes: int) -> int | None:
    """The most classes, at most ``num_classes``, that split a batch into equal groups of at
    least 2 images; None when none does."""
    for c in range(min(num_classes, batch_size // 2), 1, -1):
        if batch_size % c == 0:
            return c
    return None
