"""Generalized cross-entropy, from "Generalized Cross Entropy Loss for Training Deep Neural
Networks with Noisy Labels" (Zhang and Sabuncu, NeurIPS 2018, arXiv 1805.07836).

For the softmax probability ``p_y`` of the labelled class, the ``L_q`` loss is

    L_q = (1 - p_y ** q) / q,        0 < q <= 1,

the Box-Cox transform of ``p_y``: it tends to the cross-entropy ``-log p_y`` as ``q -> 0`` and is
``1 - p_y`` (the mean absolute error of the one-hot target, halved) at ``q = 1``. Its gradient is
the cross-entropy's weighted by ``p_y ** q``: an example the model finds unlikely (a flipped
label, often) pulls less than under the cross-entropy, yet training keeps the cross-entropy's
speed on the examples it fits. A soft target ``t`` (mixup, label smoothing) gives
``sum_k t_k (1 - p_k ** q) / q``, the expectation of ``L_q`` under ``t``.

The loss is computed from ``log_softmax`` in float32 (``p ** q = exp(q * log p)``), so fp16 and
bf16 logits give no underflow of ``p``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import tricks

__version__ = "0.1.0"


def gce_loss(logits: torch.Tensor, target: torch.Tensor, q: float = 0.7) -> torch.Tensor:
    """The mean ``L_q`` over the batch: ``target`` class indices ``[B]`` or distributions ``[B, K]``."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1], got {q}")
    logp = F.log_softmax(logits.float(), dim=1)
    per_class = -torch.expm1(q * logp) / q  # (1 - p ** q) / q, exact for small q
    if target.is_floating_point():
        return (target.float() * per_class).sum(1).mean()
    return per_class.gather(1, target.unsqueeze(1)).mean()


class GCESettings(tricks.Settings):
    q: float = tricks.Field(0.7, gt=0, le=1, description="the exponent: towards 0 the cross-entropy, 1 the mean absolute error (paper: 0.7)")


class GCE(tricks.Plugin):
    """Train with the generalized cross-entropy ``L_q`` instead of the cross-entropy."""

    Settings = GCESettings

    @tricks.hookimpl
    def build_loss(self, ctx):
        q = self.settings.q

        def loss(output, batch):
            return gce_loss(output, batch["target"], q)

        return loss
