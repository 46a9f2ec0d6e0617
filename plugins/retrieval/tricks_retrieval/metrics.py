"""Retrieval metrics through pytorch-metric-learning's ``AccuracyCalculator``.

Every embedding is a query against all the others (the query set is the reference set, the query
itself left out). Recall@K (the share of queries with at least one image of their class among
their K nearest neighbours) is added to the calculator as its own ``calculate_`` method, beside
its MAP@R and precision@1 (which is Recall@1). Similarity: the cosine.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _calculator_class():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator, try_getting_not_lone_labels

    class RetrievalAccuracy(AccuracyCalculator):
        """pytorch-metric-learning's calculator with Recall@K for the ``ks`` given."""

        def __init__(self, ks: Sequence[int], **kwargs):
            self.ks = tuple(ks)
            super().__init__(**kwargs)

        def requires_knn(self):
            return [*super().requires_knn(), "recall_at_k"]

        def calculate_recall_at_k(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):
            knn_labels, query_labels = try_getting_not_lone_labels(knn_labels, query_labels, not_lone_query_mask)
            if knn_labels is None:
                return {k: float("nan") for k in self.ks}
            hit = knn_labels == query_labels[:, None]
            return {k: hit[:, :k].any(1).double().mean().item() for k in self.ks}

    return RetrievalAccuracy


def retrieval_metrics(embeddings: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 2, 4, 8)) -> dict[str, float]:
    """``recall_at_K`` for each K of ``ks``, ``map_at_r`` and ``precision_at_1`` of every embedding
    as a query against the others (cosine similarity), on the embeddings' device.

    Queries whose class has no other image are left out (they can find nothing). Needs at least
    two embeddings of some class and ``max(ks)`` other embeddings.
    """
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.inference import CustomKNN

    embeddings, labels = embeddings.float(), labels.to(embeddings.device)
    n = len(labels)
    _, counts = torch.unique(labels, return_counts=True)
    if n < 2 or int(counts.max()) < 2:
        raise ValueError("retrieval metrics need at least two embeddings of one class")
    if max(ks) > n - 1:
        raise ValueError(f"Recall@{max(ks)} needs at least {max(ks) + 1} embeddings, there are {n}")
    # neighbours enough for MAP@R (the largest class, itself left out) and for the largest K
    k = min(n - 1, max(int(counts.max()), max(ks)))
    calculator = _calculator_class()(ks, include=("mean_average_precision_at_r", "precision_at_1", "recall_at_k"),
                                     k=k, device=embeddings.device, knn_func=CustomKNN(CosineSimilarity()))
    found = calculator.get_accuracy(embeddings, labels)
    out = {f"recall_at_{k}": float(v) for k, v in found["recall_at_k"].items()}
    out["map_at_r"] = float(found["mean_average_precision_at_r"])
    out["precision_at_1"] = float(found["precision_at_1"])
    return out
