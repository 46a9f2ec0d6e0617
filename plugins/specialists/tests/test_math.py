"""Tests of the specialists' math: the combination against the paper's invariants (no active
specialist gives the generalist, models over the same classes give their arithmetic mean, one
specialist gives the mean dustbin mass), against the paper's gradient descent, and its monotone
EM objective; the K-means subsets on predictions with planted confusable pairs; the specialists'
labels, half-and-half epochs and dustbin offset against direct computations; the errors."""

from __future__ import annotations

import math

import pytest
import torch

import tricks
from tricks_specialists.combine import (active_specialists, collapse, combine, combine_gradient, em_step,
                                        objective)
from tricks_specialists.subsets import (confusable_subsets, coverage, covariance_columns, dustbin_offset,
                                        half_and_half, specialist_labels)

C = 10
PAIRS = [[1, 9], [3, 5]]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def probs(seed: int, b: int, k: int, scale: float = 2.0, dtype=torch.float64) -> torch.Tensor:
    return torch.softmax(torch.randn(b, k, generator=gen(seed), dtype=dtype) * scale, dim=1)


def random_problem(seed: int, b: int = 6, c: int = 8, sizes=(3, 4, 2, 5)):
    g = gen(seed)
    subsets = [sorted(torch.randperm(c, generator=g)[:k].tolist()) for k in sizes]
    p_g = probs(seed + 1, b, c)
    p_s = [probs(seed + 2 + m, b, len(s) + 1) for m, s in enumerate(subsets)]
    active = torch.rand(b, len(subsets), generator=g) < 0.6
    active[0] = True  # one image with every specialist
    return p_g, p_s, subsets, active


def expand(p_m: torch.Tensor, subset: list[int], dustbin_class: int) -> torch.Tensor:
    full = torch.zeros(p_m.shape[0], C, dtype=p_m.dtype)
    full[:, subset] = p_m[:, :-1]
    full[:, dustbin_class] = p_m[:, -1]
    return full


# --- combine -------------------------------------------------------------------------------


def test_no_active_specialist_gives_the_generalist_exactly():
    p_g, p_s, subsets, _ = random_problem(0)
    for dtype in (torch.float64, torch.float32):
        g = p_g.to(dtype)
        none = torch.zeros(g.shape[0], len(subsets), dtype=torch.bool)
        q = combine(g, [p.to(dtype) for p in p_s], subsets, none)
        assert q.dtype == dtype and torch.equal(q, g)
    active = torch.zeros(p_g.shape[0], len(subsets), dtype=torch.bool)
    active[0] = True
    q = combine(p_g, p_s, subsets, active)
    assert torch.equal(q[1:], p_g[1:]) and not torch.allclose(q[0], p_g[0])


def test_specialists_over_the_same_classes_give_the_arithmetic_mean():
    # a dustbin of one class: collapse is a permutation, so every model is a full distribution
    subsets = [[0, 2, 1, 3, 4, 5, 6, 8, 9], [9, 8, 7, 6, 5, 4, 3, 2, 1]]  # dustbins: class 7, class 0
    dust = [7, 0]
    p_g = probs(1, 5, C)
    p_s = [probs(2 + m, 5, len(s) + 1) for m, s in enumerate(subsets)]
    active = torch.ones(5, 2, dtype=torch.bool)
    q = combine(p_g, p_s, subsets, active)
    mean = (p_g + sum(expand(p, s, d) for p, s, d in zip(p_s, subsets, dust))) / 3
    torch.testing.assert_close(q, mean, rtol=0, atol=1e-12)
    active[:, 1] = False
    torch.testing.assert_close(combine(p_g, p_s, subsets, active), (p_g + expand(p_s[0], subsets[0], 7)) / 2,
                               rtol=0, atol=1e-12)


def test_one_specialist_gives_the_mean_dustbin_mass():
    p_g = probs(3, 16, C, scale=3.0)
    subset = [2, 4, 7]
    p_m = probs(4, 16, 4, scale=3.0)
    q = combine(p_g, [p_m], [subset], torch.ones(16, 1, dtype=torch.bool))
    rest = [c for c in range(C) if c not in subset]
    torch.testing.assert_close(q[:, rest].sum(1), (p_g[:, rest].sum(1) + p_m[:, -1]) / 2, rtol=0, atol=1e-6)
    torch.testing.assert_close(q[:, subset], (p_g[:, subset] + p_m[:, :-1]) / 2, rtol=0, atol=1e-6)
    # within the dustbin, q keeps the generalist's proportions
    torch.testing.assert_close(q[:, rest] / q[:, rest].sum(1, keepdim=True),
                               p_g[:, rest] / p_g[:, rest].sum(1, keepdim=True), rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 10])
def test_em_agrees_with_the_papers_gradient_descent(seed):
    p_g, p_s, subsets, active = random_problem(seed)
    q_em = combine(p_g, p_s, subsets, active, iters=2000, tol=1e-12)
    q_gd = combine_gradient(p_g, p_s, subsets, active)
    f_em, f_gd = objective(q_em, p_g, p_s, subsets, active), objective(q_gd, p_g, p_s, subsets, active)
    assert (f_em - f_gd).abs().max() < 1e-5
    assert (q_em - q_gd).abs().max() < 1e-3
    torch.testing.assert_close(q_em.sum(1), torch.ones(p_g.shape[0], dtype=p_g.dtype))
    # the defaults are accurate enough
    q_default = combine(p_g, p_s, subsets, active)
    assert (objective(q_default, p_g, p_s, subsets, active) - f_em).abs().max() < 1e-5


def test_em_objective_never_increases():
    p_g, p_s, subsets, active = random_problem(3, b=8)
    q = torch.full_like(p_g, 1 / p_g.shape[1])
    before = objective(q, p_g, p_s, subsets, active)
    for _ in range(60):
        q = em_step(q, p_g, p_s, subsets, active)
        after = objective(q, p_g, p_s, subsets, active)
        assert bool((after <= before + 1e-12).all())
        before = after


def test_zero_probabilities_give_no_nan_and_float32_comes_back():
    subsets = [[0, 1], [1, 2, 3]]
    p_g = torch.tensor([[0.6, 0.4, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]], dtype=torch.float32)
    p_s = [torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.0, 1.0]]), torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]])]
    active = torch.ones(2, 2, dtype=torch.bool)
    q = combine(p_g, p_s, subsets, active)
    assert q.dtype == torch.float32 and bool(torch.isfinite(q).all())
    torch.testing.assert_close(q.sum(1), torch.ones(2))
    assert bool(torch.isfinite(objective(q.double(), p_g.double(), [p.double() for p in p_s], subsets, active)).all())


def test_active_specialists_and_collapse():
    p_g = probs(5, 12, C)
    subsets = [[0, 1, 2], [2, 3], [7, 8, 9]]
    for top_n in (1, 3):
        top = p_g.topk(top_n, dim=1).indices.tolist()
        want = torch.tensor([[bool(set(t) & set(s)) for s in subsets] for t in top])
        assert torch.equal(active_specialists(p_g, subsets, top_n), want)
    q = probs(6, 4, C)
    got = collapse(q, [5, 1])
    torch.testing.assert_close(got[:, :2], q[:, [5, 1]])
    torch.testing.assert_close(got[:, 2], q.sum(1) - q[:, 5] - q[:, 1])


def test_combine_rejects_bad_arguments():
    p_g, p_s, subsets, active = random_problem(0)
    with pytest.raises(tricks.TricksError, match="specialists' probabilities"):
        combine(p_g, p_s[:-1], subsets, active)
    with pytest.raises(tricks.TricksError, match="shape"):
        combine(p_g, [p_s[1]] + p_s[1:], subsets, active)
    with pytest.raises(tricks.TricksError, match="active must be"):
        combine(p_g, p_s, subsets, active.float())
    with pytest.raises(tricks.TricksError, match="dustbin"):
        combine(p_g, [probs(0, 6, 9)], [list(range(8))], active[:, :1])
    with pytest.raises(tricks.TricksError, match="top_n"):
        active_specialists(p_g, subsets, top_n=0)


# --- subsets -------------------------------------------------------------------------------


def planted_predictions(n: int = 1000, seed: int = 0) -> torch.Tensor:
    """A generalist that cannot tell 3 from 5 nor 1 from 9: on images of either class of a pair
    it splits 0.9 between the two at random; on the other classes it gives 0.9 to the right one."""
    g = gen(seed)
    y = torch.randint(0, C, (n,), generator=g)
    p = torch.rand(n, C, generator=g)
    p = 0.1 * p / p.sum(1, keepdim=True)
    rows = torch.arange(n)
    p[rows, y] += 0.9
    for a, b in PAIRS:
        mixed = (y == a) | (y == b)
        u = 0.4 + 0.2 * torch.rand(n, generator=g)
        top = p[:, a] + p[:, b]
        p[mixed, a], p[mixed, b] = (u * top)[mixed], ((1 - u) * top)[mixed]
    return p


def test_covariance_columns_is_the_covariance_of_the_predictions():
    p = planted_predictions(200)
    torch.testing.assert_close(covariance_columns(p), torch.cov(p.T.double()).float())


def test_kmeans_recovers_the_planted_pairs_and_covers_every_class():
    p = planted_predictions()
    subsets = confusable_subsets(p, n_subsets=8)
    assert all(pair in subsets for pair in PAIRS)
    assert sorted(c for s in subsets for c in s) == list(range(C))  # disjoint, every class once
    assert subsets == sorted(subsets) and all(s == sorted(s) for s in subsets)
    assert coverage(subsets, C) == []
    assert confusable_subsets(p, n_subsets=8) == subsets  # deterministic
    # no cluster is larger than 2: size=2 without overlap keeps the clusters
    assert confusable_subsets(p, n_subsets=8, size=2) == subsets


def test_size_and_overlap():
    p = planted_predictions()
    clusters = confusable_subsets(p, n_subsets=8)
    with pytest.raises(tricks.TricksError, match=r"no subset covers classes \[(1|3|5|9), (1|3|5|9)\]") as error:
        confusable_subsets(p, n_subsets=8, size=1)
    assert "require_cover=False" in str(error.value) and "\n" not in str(error.value)
    trimmed = confusable_subsets(p, n_subsets=8, size=1, require_cover=False)
    assert len(trimmed) == 8 and all(len(s) == 1 for s in trimmed)
    missing = coverage(trimmed, C)
    assert len(missing) == 2 and {c for c in missing} & {1, 9} and {c for c in missing} & {3, 5}
    overlapping = confusable_subsets(p, n_subsets=8, size=3, overlap=True)
    assert len(overlapping) == 8 and all(len(s) == 3 for s in overlapping)
    assert all(any(set(cl) <= set(s) for s in overlapping) for cl in clusters)  # each keeps its cluster
    assert coverage(overlapping, C) == []
    assert len({c for s in overlapping for c in s}) == C and sum(map(len, overlapping)) > C  # they share


def test_subsets_reject_bad_arguments():
    p = planted_predictions(50)
    for kwargs, match in [(dict(n_subsets=0), "n_subsets"), (dict(n_subsets=C + 1), "n_subsets"),
                          (dict(n_subsets=True), "n_subsets"), (dict(n_subsets=1), "dustbin"),
                          (dict(n_subsets=2, size=0), "size"), (dict(n_subsets=2, size=C), "size")]:
        with pytest.raises(tricks.TricksError, match=match):
            confusable_subsets(p, **kwargs)
    bad = p.clone()
    bad[0, 0] = float("nan")
    for probs_, match in [(bad, "finite"), (p[0], "2-D"), (p[:1], "at least 2")]:
        with pytest.raises(tricks.TricksError, match=match):
            confusable_subsets(probs_, n_subsets=2)
    with pytest.raises(tricks.TricksError, match="outside"):
        coverage([[0, C]], C)


# --- training data -------------------------------------------------------------------------


def test_specialist_labels():
    targets = torch.randint(0, C, (100,), generator=gen(0))
    subset = [7, 2, 4]
    want = torch.tensor([subset.index(t) if t in subset else 3 for t in targets.tolist()])
    assert torch.equal(specialist_labels(targets, subset), want)
    with pytest.raises(tricks.TricksError, match="distinct"):
        specialist_labels(targets, [2, 2])


def test_half_and_half_and_dustbin_offset():
    targets = torch.randint(0, C, (400,), generator=gen(1))
    subset = [3, 5]
    inside = torch.isin(targets, torch.tensor(subset))
    idx = half_and_half(targets, subset, gen(7))
    assert idx.unique().numel() == idx.numel()
    assert torch.equal(idx[inside[idx]].sort().values, torch.nonzero(inside).flatten())  # each once
    assert int((~inside[idx]).sum()) == int(inside.sum())  # as many from the rest
    assert torch.equal(idx, half_and_half(targets, subset, gen(7)))
    assert not torch.equal(idx, half_and_half(targets, subset, gen(8)))
    s, r = int(inside.sum()), int((~inside).sum())
    s_sampled, r_sampled = int(inside[idx].sum()), int((~inside[idx]).sum())
    assert dustbin_offset(targets, subset) == pytest.approx(math.log((r / s) / (r_sampled / s_sampled)), abs=1e-12)
    assert dustbin_offset(targets, subset) > 0
    # a subset larger than the rest: all of the rest, no offset
    big = list(range(8))
    idx = half_and_half(targets, big, gen(7))
    assert idx.sort().values.tolist() == list(range(400))
    assert dustbin_offset(targets, big) == 0.0
    with pytest.raises(tricks.TricksError, match="no example"):
        half_and_half(torch.zeros(5, dtype=torch.long), [3], gen(0))
