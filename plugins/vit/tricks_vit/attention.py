"""Scaled dot-product attention ("Attention Is All You Need", Vaswani et al. 2017, arXiv 1706.03762,
section 3.2): ``Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V``, and its multi-head form.

:func:`reference_attention` is the formula written out, returning the attention weights too; the
layer calls ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels where the device
has them) unless the weights are asked for. Masks follow SDPA's convention: a boolean mask is
``True`` where a query may attend; a float mask is added to the scores.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                        dropout_p: float = 0.0, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(q k^T * scale + mask) v, weights)`` for ``q [..., L, d]``, ``k, v [..., S, d]``;
    ``scale`` defaults to ``1 / sqrt(d)``. The weights are taken before dropout."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    weights = scores.softmax(dim=-1)
    dropped = F.dropout(weights, dropout_p) if dropout_p > 0 else weights
    return dropped @ v, weights


class Attention(nn.Module):
    """Multi-head self-attention: one linear map to queries, keys and values of ``heads`` heads,
    scaled dot-product attention per head, the heads concatenated and projected back.

    ``fused``: through ``F.scaled_dot_product_attention`` (the default); else the reference
    formula. Either way ``forward(x, need_weights=True)`` returns the weights, through the reference.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 fused: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim, self.fused = heads, dim // heads, fused
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, need_weights: bool = False):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        p = self.attn_drop if self.training else 0.0
        weights = None
        if self.fused and not need_weights:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            out, weights = reference_attention(q, k, v, mask, p)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))
        return (out, weights) if need_weights else out
