"""Which classes each specialist learns, and the data it learns them from (Hinton, Vinyals, Dean,
"Distilling the Knowledge in a Neural Network", arXiv 1503.02531, section 5).

A specialist sees a subset ``S`` of confusable classes plus one *dustbin* class standing for all
the others. The subsets come from the generalist's predictions alone (no labels): the columns of
the covariance matrix of its predicted class probabilities, clustered with K-means. Classes the
generalist confuses rise and fall together from image to image, so their columns are close.

Each specialist trains on half-and-half data: every example of its subset plus as many drawn at
random from the rest. That raises its subset's prior against the dustbin; ``dustbin_offset`` is
the constant to add to the dustbin logit afterwards to undo it.

All functions are plain math on tensors, usable without the framework.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

import tricks

__all__ = ["covariance_columns", "confusable_subsets", "coverage", "specialist_labels", "half_and_half",
           "dustbin_offset"]


def _brief(classes: list[int], most: int = 10) -> str:
    shown = ", ".join(str(c) for c in classes[:most])
    return f"[{shown}{', ...' if len(classes) > most else ''}] ({len(classes)} classes)"


def _check_probs(probs: torch.Tensor) -> None:
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2:
        raise tricks.TricksError(f"probs must be a 2-D tensor [examples, classes], got "
                                 f"{tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__}")
    n, c = probs.shape
    if n < 2 or c < 2:
        raise tricks.TricksError(f"probs needs at least 2 examples and 2 classes, got shape {(n, c)}")
    if not probs.is_floating_point() or not bool(torch.isfinite(probs).all()):
        raise tricks.TricksError("probs must be finite floating-point probabilities: check the generalist's outputs")


def _check_int(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise tricks.TricksError(f"{name} must be an integer between {low} and {high}, got {value!r}")


def _check_subset(subset, num_classes: int | None = None) -> list[int]:
    classes = [int(c) for c in subset]
    top = num_classes - 1 if num_classes is not None else None
    if not classes or len(set(classes)) != len(classes) or min(classes) < 0 or (top is not None and max(classes) > top):
        where = f"0..{top}" if top is not None else "non-negative"
        raise tricks.TricksError(f"a subset must be non-empty distinct {where} class indices, got {_brief(classes)}")
    if num_classes is not None and len(classes) >= num_classes:
        raise tricks.TricksError(f"a subset must leave at least one of the {num_classes} classes out for the dustbin, "
                                 f"got all of them")
    return classes


def covariance_columns(probs: torch.Tensor) -> torch.Tensor:
    """The ``[C, C]`` covariance over examples of the generalist's predicted probabilities ``[N, C]``.

    Column ``c`` says how the probability of class ``c`` co-varies with every class's from image to
    image; no labels are needed. Unbiased (divides by ``N - 1``), computed in float64 and returned
    in the input's floating dtype (at least float32).
    """
    _check_probs(probs)
    p = probs.to(torch.float64)
    centred = p - p.mean(dim=0, keepdim=True)
    cov = centred.T @ centred / (p.shape[0] - 1)
    return cov.to(torch.promote_types(probs.dtype, torch.float32))


def confusable_subsets(probs: torch.Tensor, n_subsets: int, size: int | None = None, overlap: bool = False,
                       seed: int = 0, require_cover: bool = True) -> list[list[int]]:
    """Confusable class subsets: K-means on the columns of ``covariance_columns(probs)``.

    ``sklearn.cluster.KMeans(n_clusters=n_subsets, n_init=10, random_state=seed)`` (the paper used
    online K-means and reports that other clustering algorithms gave similar results).

    - ``size=None``: the clusters as found, all of them: disjoint, every class in exactly one.
      Needs ``n_subsets >= 2`` so that each subset leaves a class for the dustbin; ``overlap`` is
      ignored.
    - ``size=k``, ``overlap=False``: a class belongs only to its own cluster's subset, which keeps
      its ``k`` members nearest to the centroid (all of them when the cluster has ``k`` or fewer).
      Disjoint; a cluster larger than ``k`` leaves classes uncovered.
    - ``size=k``, ``overlap=True``: each subset has exactly ``k`` classes: its own cluster's members
      nearest to the centroid first, then the other classes nearest to the centroid (Euclidean in
      column space). Subsets may share classes, as the paper's specialists do. Ranking the cluster's
      own members first is what guarantees cover once ``k`` is at least the largest cluster; two
      subsets can come out equal.

    Every class is covered with ``size=None`` and with ``overlap=True`` when ``size`` is at least
    the largest cluster. Cover can fail with ``size`` smaller than a cluster (always possible with
    ``overlap=False``); then ``require_cover=True`` raises a ``TricksError`` naming the classes left
    out, and ``require_cover=False`` returns the subsets anyway (``coverage`` lists the gaps).

    Each subset is sorted; the list is sorted (by smallest class index, then the next). The same
    ``probs`` and ``seed`` give the same subsets.
    """
    _check_probs(probs)
    num_classes = probs.shape[1]
    _check_int("n_subsets", n_subsets, 1, num_classes)
    if size is None:
        if n_subsets < 2:
            raise tricks.TricksError("n_subsets=1 with size=None puts every class in one subset and leaves none for "
                                     "the dustbin: use n_subsets >= 2 or give a size")
    else:
        _check_int("size", size, 1, num_classes - 1)
    from sklearn.cluster import KMeans  # imported here: scikit-learn is slow to import

    columns = covariance_columns(probs).to(torch.float64).cpu().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fewer distinct clusters than n_clusters": checked below
        kmeans = KMeans(n_clusters=n_subsets, n_init=10, random_state=seed).fit(columns)
    labels = kmeans.labels_
    members = [np.flatnonzero(labels == m) for m in range(n_subsets)]
    empty = sum(1 for mem in members if mem.size == 0)
    if empty:
        raise tricks.TricksError(f"K-means found only {n_subsets - empty} distinct clusters of class columns for "
                                 f"n_subsets={n_subsets}: lower n_subsets or use more (or more varied) predictions")
    if size is None:
        subsets = [sorted(int(c) for c in mem) for mem in members]
    else:
        dist = np.linalg.norm(columns[None, :, :] - kmeans.cluster_centers_[:, None, :], axis=2)  # [M, C]
        subsets = []
        for m, mem in enumerate(members):
            # stable sort by (not a member, distance, class index): members first, nearest first
            order = np.lexsort((np.arange(num_classes), dist[m], labels != m))
            chosen = order[:size] if overlap else order[:min(size, mem.size)]
            subsets.append(sorted(int(c) for c in chosen))
    subsets.sort()
    if require_cover:
        missing = coverage(subsets, num_classes)
        if missing:
            raise tricks.TricksError(f"no subset covers classes {_brief(missing)}: use size=None, overlap=True with a "
                                     f"size of at least the largest cluster, or require_cover=False")
    return subsets


def coverage(subsets: list[list[int]], num_classes: int) -> list[int]:
    """The classes in ``0 .. num_classes - 1`` that no subset covers, in increasing order."""
    _check_int("num_classes", num_classes, 1, 2**62)
    covered = set()
    for subset in subsets:
        covered.update(int(c) for c in subset)
    outside = sorted(c for c in covered if not 0 <= c < num_classes)
    if outside:
        raise tricks.TricksError(f"subsets hold classes outside 0..{num_classes - 1}: {_brief(outside)}")
    return [c for c in range(num_classes) if c not in covered]


def specialist_labels(targets: torch.Tensor, subset: list[int]) -> torch.Tensor:
    """A specialist's labels: subset class ``subset[i]`` becomes ``i``, every other class the
    dustbin ``len(subset)``. Same shape and device as ``targets``; no host synchronisation."""
    classes = _check_subset(subset)
    k = len(classes)
    table = torch.full((max(classes) + 1,), k, dtype=torch.long, device=targets.device)
    table[torch.tensor(classes, dtype=torch.long, device=targets.device)] = torch.arange(k, device=targets.device)
    targets = targets.long()
    inside = (targets >= 0) & (targets < table.numel())
    return torch.where(inside, table[targets.clamp(0, table.numel() - 1)], torch.full_like(targets, k))


def _split(targets: torch.Tensor, subset: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.is_floating_point():
        raise tricks.TricksError("targets must be a 1-D tensor of integer class labels")
    classes = _check_subset(subset)
    in_subset = torch.isin(targets, torch.tensor(classes, dtype=targets.dtype, device=targets.device))
    return torch.nonzero(in_subset).flatten(), torch.nonzero(~in_subset).flatten()


def half_and_half(targets: torch.Tensor, subset: list[int], generator: torch.Generator) -> torch.Tensor:
    """Indices into ``targets`` for one specialist epoch, shuffled: every example of the subset
    once, plus as many examples drawn uniformly without replacement from the rest (all of the rest
    when it has fewer). The same generator state gives the same indices; on ``targets``' device.
    """
    inside, rest = _split(targets, subset)
    if inside.numel() == 0:
        raise tricks.TricksError(f"no example of subset {_brief(sorted(int(c) for c in subset))} in targets: "
                                 f"check the subset against the dataset's classes")

    def perm(n: int) -> torch.Tensor:
        return torch.randperm(n, generator=generator, device=generator.device).to(targets.device)

    drawn = rest[perm(rest.numel())[:min(inside.numel(), rest.numel())]]
    epoch = torch.cat([inside, drawn])
    return epoch[perm(epoch.numel())]


def dustbin_offset(targets: torch.Tensor, subset: list[int]) -> float:
    """The constant to add to a specialist's dustbin logit after ``half_and_half`` training.

    ``log((R / S) / (R_s / S_s))``, with ``S`` and ``R`` the numbers of examples in and out of the
    subset in ``targets``, ``S_s`` and ``R_s`` those in one ``half_and_half`` epoch (``S_s = S``,
    ``R_s = min(R, S)``); it equals ``log(R / min(R, S))``, ``log(R / S)`` when the rest is the
    larger part and 0 otherwise.

    Derivation: a softmax classifier trained to convergence on data with class priors ``pi``
    estimates ``p(y | x) ∝ p(x | y) pi(y)``, so its logits are ``log p(x | y) + log pi(y)`` up to a
    constant shared by all outputs. Sampling keeps every subset example and draws the rest
    uniformly, so no class-conditional ``p(x | y)`` changes (the dustbin's is the mixture of the
    other classes, with their proportions kept in expectation) and each subset class keeps its
    share of the subset; only the dustbin's prior relative to every subset class is multiplied by
    ``f = (R_s / S_s) / (R / S)``. Adding ``-log f`` to the dustbin logit restores the true prior,
    and leaves the subset classes' probabilities relative to each other unchanged.
    """
    inside, rest = _split(targets, subset)
    s, r = inside.numel(), rest.numel()
    if s == 0 or r == 0:
        raise tricks.TricksError(f"the dustbin offset needs examples both in and out of the subset, got {s} in and "
                                 f"{r} out: check the subset against the dataset's classes")
    s_sampled, r_sampled = s, min(r, s)
    return math.log((r / s) / (r_sampled / s_sampled))
