"""Circle loss, as in "Circle Loss: A Unified Perspective of Pair Similarity Optimization" (Sun,
Cheng, Zhang, Zhang, Zheng, Wang, Wei; CVPR 2020, arXiv 2002.10857).

For an anchor with within-class similarities ``s_p`` and between-class similarities ``s_n``
(cosines), the loss is

    L = log(1 + sum_j exp(gamma * a_n_j * (s_n_j - d_n)) * sum_i exp(-gamma * a_p_i * (s_p_i - d_p)))

with ``a_p = [1 + m - s_p]_+``, ``a_n = [s_n + m]_+`` (treated as constants: no gradient flows
through them), ``d_p = 1 - m`` and ``d_n = m``. It is computed as
``softplus(logsumexp(negative terms) + logsumexp(positive terms))``, which stays finite at
``gamma = 256`` where the literal formula overflows.

Two forms, one for each task the plugin works in:

* class-level (``--task classification``): the model's last linear layer becomes a cosine
  classifier (:class:`CosineClassifier`); ``s_p`` is the cosine to the own class's weight, the
  ``s_n`` the cosines to the others'. The loss is then the softmax cross-entropy over the modified
  logits ``gamma*a_p*(s_p - d_p)`` (target) and ``gamma*a_n*(s_n - d_n)`` (others); soft targets
  (mixup, cutmix, label smoothing) weight the loss of each target class by its probability.
* pair-level (``--task retrieval``): every same-label pair of a batch is a positive and every
  different-label pair a negative of its anchor; anchors without a positive (or a negative) give 0
  and the loss is the mean over the anchors whose loss is not 0.

The functions below are the math, usable without the framework; :class:`CircleLoss` wires them
to a run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import tricks
from tricks.errors import TricksError

__version__ = "0.1.0"

# The paper's settings: face recognition (class-level labels) and fine-grained retrieval (pairs).
CLASS_DEFAULTS = {"gamma": 256.0, "m": 0.25}
PAIR_DEFAULTS = {"gamma": 80.0, "m": 0.4}


# --- the math -------------------------------------------------------------------------------------


def positive_logits(s_p: torch.Tensor, m: float, gamma: float) -> torch.Tensor:
    """``gamma * a_p * (s_p - d_p)`` with ``a_p = [1 + m - s_p]_+`` detached and ``d_p = 1 - m``."""
    alpha = torch.relu(1.0 + m - s_p.detach())
    return gamma * alpha * (s_p - (1.0 - m))


def negative_logits(s_n: torch.Tensor, m: float, gamma: float) -> torch.Tensor:
    """``gamma * a_n * (s_n - d_n)`` with ``a_n = [s_n + m]_+`` detached and ``d_n = m``."""
    alpha = torch.relu(s_n.detach() + m)
    return gamma * alpha * (s_n - m)


def circle_logits(cosines: torch.Tensor, target: torch.Tensor, m: float = 0.25, gamma: float = 256.0) -> torch.Tensor:
    """The class-level modified logits ``[B, K]``: the target class's cosine through
    :func:`positive_logits`, every other cosine through :func:`negative_logits`. Computed in float32
    (or float64 for float64 input)."""
    s = _wide(cosines)
    own = F.one_hot(target, s.shape[1]).bool()
    return torch.where(own, positive_logits(s, m, gamma), negative_logits(s, m, gamma))


def class_circle_loss(cosines: torch.Tensor, target: torch.Tensor, m: float = 0.25, gamma: float = 256.0) -> torch.Tensor:
    """The class-level circle loss of cosines ``[B, K]``, averaged over the batch.

    ``target``: class indices (``int64 [B]``): ``F.cross_entropy(circle_logits(...), target)``;
    or soft targets (floating ``[B, K]``, rows summing to 1): ``sum_k t_k * L(k)``, the loss of
    each class as the target, weighted by its probability (for a one-hot row, the loss of its class).
    """
    if not target.is_floating_point():
        return F.cross_entropy(circle_logits(cosines, target, m, gamma), target)
    s = _wide(cosines)
    if target.shape != s.shape:
        raise ValueError(f"soft targets of shape {tuple(target.shape)} for cosines of shape {tuple(s.shape)}")
    # L(k) = logsumexp(p_k, n_j for j != k) - p_k = softplus(logsumexp_{j != k} n_j - p_k)
    losses = F.softplus(_logsumexp_of_the_others(negative_logits(s, m, gamma)) - positive_logits(s, m, gamma))
    return (target.to(losses.dtype) * losses).sum(1).mean()


def _logsumexp_of_the_others(x: torch.Tensor) -> torch.Tensor:
    """``out[b, k] = logsumexp_{j != k} x[b, j]``, from running logsumexps from both ends (stable,
    O(B*K)); needs at least 2 columns."""
    if x.shape[1] < 2:
        raise ValueError("the logsumexp of the other classes needs at least 2 classes")
    edge = torch.full_like(x[:, :1], float("-inf"))
    before = torch.cat([edge, torch.logcumsumexp(x, 1)[:, :-1]], 1)
    after = torch.cat([torch.logcumsumexp(x.flip(1), 1).flip(1)[:, 1:], edge], 1)
    return torch.logaddexp(before, after)


def pair_circle_losses(embeddings: torch.Tensor, labels: torch.Tensor, m: float = 0.4, gamma: float = 80.0) -> torch.Tensor:
    """The pair-level circle loss of every anchor of a batch, ``[B]``: the cosine similarities of
    the (L2-normalized) embeddings; positives: the other embeddings of the anchor's label;
    negatives: those of other labels. An anchor without a positive or without a negative gives 0
    (and no gradient)."""
    x = F.normalize(_wide(embeddings), dim=1)
    s = x @ x.T
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    negative = ~same
    valid = positive.any(1) & negative.any(1)
    # rows that are not valid get zeros throughout (finite, and their gradient is dropped below)
    ninf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    keep = valid[:, None]
    # L = log(1 + sum exp(n) * sum exp(-p)): the positive terms enter with their sign flipped
    pos = torch.where(keep, torch.where(positive, -positive_logits(s, m, gamma), ninf), 0.0)
    neg = torch.where(keep, torch.where(negative, negative_logits(s, m, gamma), ninf), 0.0)
    losses = F.softplus(torch.logsumexp(pos, 1) + torch.logsumexp(neg, 1))
    return torch.where(valid, losses, 0.0)


def pair_circle_loss(embeddings: torch.Tensor, labels: torch.Tensor, m: float = 0.4, gamma: float = 80.0) -> torch.Tensor:
    """The pair-level circle loss of a batch: the mean of :func:`pair_circle_losses` over the
    anchors whose loss is not 0 (0 when there is none)."""
    losses = pair_circle_losses(embeddings, labels, m, gamma)
    counted = losses > 0
    return losses.sum() / counted.sum().clamp(min=1)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float32, or float64 when given: the exponents reach gamma * 2 (1 + m), which float16 and
    bfloat16 hold too coarsely."""
    return x if x.dtype == torch.float64 else x.float()


class CosineClassifier(nn.Module):
    """A linear classifier on the unit sphere: ``scale * cos(feature, weight_k)`` for every class.

    It holds one weight row per class (the replaced linear layer's ``weight`` shape, no bias). The
    cosines are computed in float32 whatever the autocast in force, so that a ``scale`` of 256 does
    not multiply bfloat16 rounding."""

    def __init__(self, in_features: int, num_classes: int, scale: float):
        super().__init__()
        self.in_features, self.out_features, self.scale = in_features, num_classes, float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.normal_(self.weight, std=0.01)  # only the directions matter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            cos = F.linear(F.normalize(_wide(x), dim=1), F.normalize(_wide(self.weight), dim=1))
        return self.scale * cos

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale:g}"


def replace_classifier(model: nn.Module, num_classes: int, scale: float) -> str:
    """Replace the last ``nn.Linear`` of ``model`` with ``num_classes`` outputs by a
    :class:`CosineClassifier`, in place; returns the layer's name. ``ValueError`` when there is none."""
    name = None
    for key, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            name = key
    if not name:
        raise ValueError(f"{type(model).__name__} has no linear layer with {num_classes} outputs (its classifier)")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    head = CosineClassifier(old.in_features, num_classes, scale).to(old.weight.device)
    setattr(parent, child, head)
    return name


# --- the plugin -----------------------------------------------------------------------------------


class CircleLossSettings(tricks.Settings):
    gamma: float | None = tricks.Field(None, gt=0, description="the scale factor gamma (default: 256 for the class-level form, "
                                       "80 for the pair-level form, the paper's face-recognition and retrieval values)")
    m: float | None = tricks.Field(None, ge=0, lt=1, description="the relaxation factor m: margins d_p = 1 - m, d_n = m "
                                   "(default: 0.25 class-level, 0.4 pair-level)")


class CircleLoss(tricks.Plugin):
    """Train with circle loss: a cosine classifier and its loss in classification, the pair loss in retrieval."""

    Settings = CircleLossSettings
    tasks = ("classification", "retrieval")

    def values(self, pairs: bool) -> tuple[float, float]:
        """``(gamma, m)`` of the run's form, the paper's values where the settings leave them out."""
        defaults = PAIR_DEFAULTS if pairs else CLASS_DEFAULTS
        s = self.settings
        return (defaults["gamma"] if s.gamma is None else s.gamma), (defaults["m"] if s.m is None else s.m)

    @staticmethod
    def _pairs(ctx) -> bool:
        if ctx.core.task == "classification":
            return False
        if ctx.core.task == "retrieval":
            return True
        raise TricksError(f"circle_loss works in the classification task (class-level form) and the retrieval task "
                          f"(pair-level form), not in {ctx.core.task}; leave circle_loss out of this run")

    @tricks.hookimpl(wrapper=True)
    def build_model(self, ctx):
        model = yield
        if self._pairs(ctx):
            return model  # the pair-level form works on the task's embeddings as they are
        gamma, _ = self.values(pairs=False)
        if ctx.num_classes < 2:
            raise TricksError(f"circle_loss needs at least 2 classes, the data has {ctx.num_classes}; leave circle_loss out")
        try:
            replace_classifier(model, ctx.num_classes, gamma)
        except ValueError as error:
            raise TricksError(f"circle_loss replaces the model's last linear layer by a cosine classifier, but {error}; "
                              f"use a model that ends in a linear classifier (resnet20, timm:NAME), or leave circle_loss out") from None
        return model

    @tricks.hookimpl
    def build_loss(self, ctx):
        pairs = self._pairs(ctx)
        gamma, m = self.values(pairs)
        if pairs:
            def loss(output, batch):
                target = batch["target"]
                if target.is_floating_point() or target.dim() != 1:
                    raise TricksError("the pair-level circle loss needs one integer label per image; a plugin of the run "
                                      "changed the targets into soft ones: leave it out")
                return pair_circle_loss(output, target, m, gamma)
            return loss

        k = ctx.num_classes

        def loss(output, batch):
            target = batch["target"]
            if target.is_floating_point() and target.shape[-1] != k:
                raise TricksError(f"circle_loss got soft targets over {target.shape[-1]} classes for a model of {k}; "
                                  "the plugin that makes them must use the data set's classes")
            # the cosine classifier's outputs are gamma * cos: the cosines are recovered exactly enough
            return class_circle_loss(_wide(output) / gamma, target, m, gamma)
        return loss


__all__ = ["CircleLoss", "CircleLossSettings", "CosineClassifier", "circle_logits", "class_circle_loss",
           "negative_logits", "pair_circle_loss", "pair_circle_losses", "positive_logits", "replace_classifier"]
