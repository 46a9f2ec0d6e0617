"""The math of DropBlock (Ghiasi, Lin, Le, NeurIPS 2018, arXiv 1810.12890), as plain functions.

In training, every activation ``(n, c, i, j)`` of a feature map can seed a block: seeds are
Bernoulli(gamma), drawn independently per example and per channel, only where a
``block_size x block_size`` square fits entirely inside the map (the "valid" region). Every
seed zeroes its square; the kept activations are scaled by ``numel / count(kept)``, counted over
the whole tensor, so that the mean of an all-ones input stays exactly 1.

``gamma = (1 - keep_prob) / block_size**2 * H * W / ((H - block_size + 1) * (W - block_size + 1))``:
with ``(1 - keep_prob) / block_size**2`` of the positions seeding, ``1 - keep_prob`` of the map
would be covered if blocks never overlapped; the second factor corrects for seeds being drawn
on the valid region only. Overlaps make the dropped fraction a little smaller than
``1 - keep_prob``. ``block_size`` is clipped to the map's shorter side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_block_size(block_size: int, height: int, width: int) -> int:
    """The block side used on an ``height x width`` map: at most its shorter side."""
    return max(1, min(block_size, height, width))


def dropblock_gamma(keep_prob: float, block_size: int, height: int, width: int) -> float:
    """The seed probability for a (clipped) ``block_size`` on an ``height x width`` map, at most 1."""
    bs = clip_block_size(block_size, height, width)
    drop = 1.0 - keep_prob
    gamma = drop * height * width / (bs**2 * ((height - bs + 1) * (width - bs + 1)))
    return min(max(gamma, 0.0), 1.0)


def expand_seeds(seeds: torch.Tensor, block_size: int) -> torch.Tensor:
    """Grow every seed into a square: ``seeds`` is ``[N, C, H - bs + 1, W - bs + 1]`` of 0/1, one
    entry per block position (the block's top-left corner); returns the boolean ``[N, C, H, W]``
    mask that is True on every square of a seed: position ``(i, j)`` is dropped when a seed lies
    in ``[i - bs + 1, i] x [j - bs + 1, j]`` - a max-pool of the zero-padded seeds. On CUDA it is
    computed with ``max_pool2d``; elsewhere as a separable OR of shifted boolean copies, which
    gives the same mask several times faster on a CPU (its ``max_pool2d`` is slow)."""
    if seeds.is_cuda:
        return _expand_by_pooling(seeds, block_size)
    return _expand_by_shifts(seeds, block_size)


def _expand_by_pooling(seeds: torch.Tensor, block_size: int) -> torch.Tensor:
    pad = block_size - 1
    return F.max_pool2d(F.pad(seeds, (pad, pad, pad, pad)), block_size, stride=1) > 0


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _expand_by_shifts(seeds: torch.Tensor, block_size: int) -> torch.Tensor:
    fmt = _memory_format(seeds)
    seeds = seeds > 0
    n, c, h, w = seeds.shape
    new = dict(dtype=torch.bool, device=seeds.device, memory_format=fmt)
    rows = torch.empty((n, c, h, w + block_size - 1), **new).zero_()
    for k in range(block_size):  # OR along the width: rows[.., j] = any(seeds[.., j - bs + 1 .. j])
        rows[..., k:k + w] |= seeds
    out = torch.empty((n, c, h + block_size - 1, w + block_size - 1), **new).zero_()
    for k in range(block_size):  # then along the height
        out[..., k:k + h, :] |= rows
    return out


def sample_seeds(x: torch.Tensor, gamma: float, block_size: int) -> torch.Tensor:
    """Bernoulli(``gamma``) seeds on the valid block positions of ``x``, one per example, channel
    and position, in ``x``'s dtype. For a contiguous ``x`` the draws are the ones
    ``torchvision.ops.drop_block2d`` makes from the same generator state."""
    n, c, h, w = x.shape
    seeds = torch.empty((n, c, h - block_size + 1, w - block_size + 1), dtype=x.dtype, device=x.device,
                        memory_format=_memory_format(x))
    return seeds.bernoulli_(gamma)


def apply_block_mask(x: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """``x`` with the ``dropped`` positions (True or non-zero) zeroed and the rest scaled by
    ``numel / count(kept)``, counted exactly over the whole tensor (an integer count, no overflow
    in float16); all zeros, not NaN, when everything is dropped."""
    if dropped.dtype != torch.bool:
        dropped = dropped != 0
    kept = (dropped.numel() - torch.count_nonzero(dropped)).clamp_min(1)
    scale = (dropped.numel() / kept.to(torch.float64 if x.dtype == torch.float64 else torch.float32)).to(x.dtype)
    return (x * scale).masked_fill_(dropped, 0)


def drop_block(x: torch.Tensor, keep_prob: float, block_size: int, training: bool = True) -> torch.Tensor:
    """DropBlock on a ``[N, C, H, W]`` tensor: the identity in eval mode or at ``keep_prob >= 1``;
    else per-example, per-channel block masks as in the paper, batch-globally renormalized.
    ``keep_prob`` is a Python number (no device synchronization)."""
    if not training or keep_prob >= 1.0:
        return x
    if x.dim() != 4:
        raise ValueError(f"DropBlock expects a [N, C, H, W] feature map, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    bs = clip_block_size(block_size, h, w)
    seeds = sample_seeds(x, dropblock_gamma(keep_prob, bs, h, w), bs)
    return apply_block_mask(x, expand_seeds(seeds, bs))


def expected_drop_fraction(keep_prob: float, block_size: int, height: int, width: int) -> float:
    """The exact expected fraction of a ``height x width`` map that DropBlock zeroes: a position is
    kept when none of the ``k`` valid seeds whose square covers it fires, with probability
    ``(1 - gamma)**k``; averaged over positions."""
    bs = clip_block_size(block_size, height, width)
    gamma = dropblock_gamma(keep_prob, bs, height, width)
    ones = torch.ones(1, 1, height - bs + 1, width - bs + 1, dtype=torch.float64)
    covering = F.conv2d(F.pad(ones, (bs - 1,) * 4), torch.ones(1, 1, bs, bs, dtype=torch.float64))
    return float((1 - (1 - gamma) ** covering).mean())


def linear_keep_prob(step: int, total_steps: int, target: float) -> float:
    """The keep probability at ``step`` (0-based) of ``total_steps``: 1 at the first step, falling
    linearly to ``target`` at the last (``total_steps - 1``), then held."""
    if total_steps <= 1:
        return target
    t = min(max(step, 0), total_steps - 1) / (total_steps - 1)
    return 1.0 - t * (1.0 - target)


def stage_keep_prob(keep_prob: float, stage: int, last_stage: int) -> float:
    """The official ResNet code's per-stage scaling: stage ``g`` drops ``(1 - keep_prob) / 4**(last - g)``,
    so the last stage gets the full drop rate and the one before it a quarter."""
    return 1.0 - (1.0 - keep_prob) / 4 ** (last_stage - stage)
