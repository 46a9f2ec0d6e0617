"""Combining a generalist with specialists at test time (Hinton, Vinyals, Dean, "Distilling the
Knowledge in a Neural Network", arXiv 1503.02531, section 5.2).

For each image: take the generalist's ``top_n`` classes, activate every specialist whose subset
meets them, and find the full distribution ``q`` that minimises

    ``KL(p_g || q) + sum over active m of KL(p_m || collapse_m(q))``

where ``collapse_m(q)`` keeps ``q`` on specialist m's subset and sums the rest into its dustbin.
The paper minimises it by gradient descent on the logits of ``q``; ``combine`` solves the same
problem with an exact EM fixed point (derived in its docstring), batched over images, and
``combine_gradient`` keeps the paper's parametrisation as a reference.

All functions take the probabilities of a batch, ``[B, C]`` for the generalist and
``[B, len(subset) + 1]`` for each specialist (dustbin last), and never loop over images.
"""

from __future__ import annotations

import torch

import tricks

__all__ = ["active_specialists", "collapse", "objective", "em_step", "combine", "combine_gradient"]


def _brief(classes: list[int], most: int = 10) -> str:
    shown = ", ".join(str(c) for c in classes[:most])
    return f"[{shown}{', ...' if len(classes) > most else ''}] ({len(classes)} classes)"


def _check_generalist(p_g: torch.Tensor) -> None:
    if not isinstance(p_g, torch.Tensor) or p_g.dim() != 2 or not p_g.is_floating_point():
        raise tricks.TricksError("the generalist's probabilities must be a floating-point tensor [batch, classes]")


def _subset_index(subset, num_classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The subset's class indices ``[k]`` and its mask of the other (dustbin) classes ``[C]``."""
    classes = [int(c) for c in subset]
    if (not classes or len(set(classes)) != len(classes) or min(classes) < 0 or max(classes) >= num_classes
            or len(classes) >= num_classes):
        raise tricks.TricksError(f"a subset must be distinct class indices in 0..{num_classes - 1} leaving at least "
                                 f"one class for the dustbin, got {_brief(classes)}")
    index = torch.tensor(classes, dtype=torch.long, device=device)
    rest = torch.ones(num_classes, dtype=torch.bool, device=device)
    rest[index] = False
    return index, rest


def _check_all(p_g, specialist_probs, subsets, active) -> list[tuple[torch.Tensor, torch.Tensor]]:
    _check_generalist(p_g)
    b, c = p_g.shape
    if len(specialist_probs) != len(subsets):
        raise tricks.TricksError(f"got {len(specialist_probs)} specialists' probabilities for {len(subsets)} subsets: "
                                 f"give one [batch, len(subset) + 1] tensor per subset")
    if not isinstance(active, torch.Tensor) or active.dtype != torch.bool or tuple(active.shape) != (b, len(subsets)):
        raise tricks.TricksError(f"active must be a bool tensor [{b}, {len(subsets)}] (see active_specialists)")
    index = [_subset_index(s, c, p_g.device) for s in subsets]
    for m, (p_m, (idx, _)) in enumerate(zip(specialist_probs, index)):
        if not isinstance(p_m, torch.Tensor) or tuple(p_m.shape) != (b, idx.numel() + 1):
            got = tuple(p_m.shape) if isinstance(p_m, torch.Tensor) else type(p_m).__name__
            raise tricks.TricksError(f"specialist {m}'s probabilities must have shape [{b}, {idx.numel() + 1}] "
                                     f"(its subset plus the dustbin, last), got {got}")
    return index


def active_specialists(p_g: torch.Tensor, subsets: list[list[int]], top_n: int = 1) -> torch.Tensor:
    """``[B, M]`` bool: specialist m is active for an image when its subset holds one of the
    generalist's ``top_n`` most probable classes for it (the paper uses ``top_n = 1``)."""
    _check_generalist(p_g)
    b, c = p_g.shape
    if isinstance(top_n, bool) or not isinstance(top_n, int) or not 1 <= top_n <= c:
        raise tricks.TricksError(f"top_n must be an integer between 1 and {c}, got {top_n!r}")
    member = torch.zeros(c, len(subsets), dtype=torch.bool, device=p_g.device)
    for m, subset in enumerate(subsets):
        member[_subset_index(subset, c, p_g.device)[0], m] = True
    top = p_g.topk(top_n, dim=1).indices  # [B, n]
    return member[top].any(dim=1)  # [B, n, M] -> [B, M]


def collapse(q: torch.Tensor, subset: list[int]) -> torch.Tensor:
    """``[B, k + 1]``: ``q`` on the subset's ``k`` classes (in the subset's order), then the summed
    mass of all the other classes (the dustbin)."""
    _check_generalist(q)
    index, rest = _subset_index(subset, q.shape[1], q.device)
    return torch.cat([q[:, index], q[:, rest].sum(dim=1, keepdim=True)], dim=1)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row, with ``0 log 0 = 0`` (``inf`` where ``q = 0 < p``)."""
    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(dim=1)


def objective(q: torch.Tensor, p_g: torch.Tensor, specialist_probs: list[torch.Tensor], subsets: list[list[int]],
              active: torch.Tensor) -> torch.Tensor:
    """``[B]``: ``KL(p_g || q) + sum over active m of KL(p_m || collapse_m(q))`` per image."""
    _check_all(p_g, specialist_probs, subsets, active)
    total = _kl(p_g, q)
    for m, (p_m, subset) in enumerate(zip(specialist_probs, subsets)):
        kl = _kl(p_m.to(q.dtype), collapse(q, subset))
        total = total + torch.where(active[:, m], kl, torch.zeros_like(kl))
    return total


def _em_step(q, p_g, specialist_probs, index, active):
    counts = p_g.clone()
    for m, (p_m, (idx, rest)) in enumerate(zip(specialist_probs, index)):
        a = active[:, m:m + 1].to(q.dtype)  # [B, 1]
        counts[:, idx] += a * p_m[:, :-1]
        rest_mass = (q * rest).sum(dim=1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)
        counts += (a * p_m[:, -1:] / rest_mass) * q * rest
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)


def em_step(q: torch.Tensor, p_g: torch.Tensor, specialist_probs: list[torch.Tensor], subsets: list[list[int]],
            active: torch.Tensor) -> torch.Tensor:
    """One EM update of ``q`` (see ``combine``); exposed so that tests can watch the objective fall."""
    index = _check_all(p_g, specialist_probs, subsets, active)
    return _em_step(q, p_g.to(q.dtype), [p.to(q.dtype) for p in specialist_probs], index, active)


def _start(p_g, specialist_probs, index, active):
    """Every source's mass with each dustbin spread evenly over its classes, averaged: positive on
    every class any active model gives mass to, and the exact answer when no dustbin is split."""
    counts = p_g.clone()
    for m, (p_m, (idx, rest)) in enumerate(zip(specialist_probs, index)):
        a = active[:, m:m + 1].to(p_g.dtype)
        counts[:, idx] += a * p_m[:, :-1]
        counts += a * p_m[:, -1:] * rest / rest.sum()
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(torch.finfo(p_g.dtype).tiny)


def combine(p_g: torch.Tensor, specialist_probs: list[torch.Tensor], subsets: list[list[int]], active: torch.Tensor,
            iters: int = 200, tol: float = 1e-7) -> torch.Tensor:
    """The paper's combined distribution ``q`` ``[B, C]``: the minimiser of
    ``KL(p_g || q) + sum over active m of KL(p_m || collapse_m(q))``, found by EM.

    Derivation. Dropping the terms that do not depend on ``q``, the objective is

        ``- sum_i p_g(i) log q(i) - sum_{m active} [ sum_{i in S_m} p_m(pos_m(i)) log q(i)
                                                      + p_m(dust) log sum_{j not in S_m} q(j) ]``,

    minus the log-likelihood of a categorical ``q`` given ``1 + |A|`` units of (fractional)
    observations: ``p_g(i)`` of class ``i``, ``p_m(pos_m(i))`` of each subset class, and
    ``p_m(dust)`` known only to lie somewhere outside ``S_m`` (grouped observations). For grouped
    multinomial data EM is exact: the E step spreads each grouped mass over its classes in
    proportion to the current ``q``, the M step is the normalised count:

        ``q_new(i) = [ p_g(i) + sum_{m active} ( p_m(pos_m(i))                      if i in S_m
                                                 p_m(dust) q(i) / sum_{j not in S_m} q(j)  else ) ]
                     / (1 + |A|)``.

    Each step cannot increase the objective (the EM ascent property) and its fixed points are the
    stationary points; the objective is convex in ``q`` (KL is convex and ``collapse`` is linear),
    so they are minimisers, unique when ``p_g > 0``. The step needs no learning rate and keeps
    ``q`` a distribution, unlike gradient descent on ``softmax(z)``.

    Iterates until the largest change of any ``q(i)`` is below ``tol`` or ``iters`` steps (one host
    synchronisation per step, none per image). Starts from every source's mass with each dustbin
    spread evenly over its classes, which is positive wherever an active model puts mass (EM never
    revives a zero) and is already the answer when no active specialist has a split dustbin (e.g.
    a dustbin of one class: then ``q`` is the arithmetic mean). Computed in float64, returned in
    ``p_g``'s dtype; images with no active specialist get ``p_g`` back unchanged. Denominators are
    clamped, so zero probabilities give no NaN. Specialists' rows should sum to 1 (the normalised
    count divides by the total mass, ``1 + |A|`` when they do).
    """
    index = _check_all(p_g, specialist_probs, subsets, active)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise tricks.TricksError(f"iters must be a non-negative integer, got {iters!r}")
    dtype = torch.float64
    g = p_g.to(dtype)
    ps = [p.to(dtype) for p in specialist_probs]
    q = _start(g, ps, index, active)
    for _ in range(iters):
        q_new = _em_step(q, g, ps, index, active)
        change = (q_new - q).abs().max()
        q = q_new
        if change < tol:
            break
    return torch.where(active.any(dim=1, keepdim=True), q.to(p_g.dtype), p_g)


def combine_gradient(p_g: torch.Tensor, specialist_probs: list[torch.Tensor], subsets: list[list[int]],
                     active: torch.Tensor, steps: int = 500, lr: float = 1.0) -> torch.Tensor:
    """The paper's own method: ``q = softmax(z)``, ``z`` started at ``log p_g`` and moved by L-BFGS
    (strong-Wolfe line search, up to ``steps`` iterations, step size ``lr``) on the summed objective
    of the batch, in float64. Slower than ``combine``; kept as the reference it is tested against.
    """
    _check_all(p_g, specialist_probs, subsets, active)
    dtype = torch.float64
    g = p_g.detach().to(dtype)
    ps = [p.detach().to(dtype) for p in specialist_probs]
    z = torch.log(g.clamp_min(1e-30)).requires_grad_(True)
    optimizer = torch.optim.LBFGS([z], lr=lr, max_iter=steps, max_eval=steps * 2, tolerance_grad=1e-14,
                                  tolerance_change=1e-16, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = objective(torch.softmax(z, dim=1), g, ps, subsets, active).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    q = torch.softmax(z.detach(), dim=1)
    return torch.where(active.any(dim=1, keepdim=True), q.to(p_g.dtype), p_g)
