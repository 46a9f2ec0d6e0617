"""Complexity of AnyNet/RegNet models, counted from the architecture alone (no network is built).

The counts follow the paper's conventions:

* **flops**: multiply-adds of the convolutions and the classifier, plus one add per output of a
  layer with a bias (batch norm, ReLU, pooling and the residual add are free);
* **params**: every trainable parameter (convolutions, the classifier, the two affine parameters
  of each batch norm, the biases of the squeeze-excitation convolutions);
* **acts**: the number of elements in the output of every convolution and of the classifier.

Every function takes Python numbers or numpy arrays (the sampler counts a whole batch of
candidate architectures at once). :func:`count_model` counts the same three numbers on any
built ``torch.nn.Module`` by tracing one forward pass, and agrees with :func:`complexity`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import AnyNetConfig

STEMS = ("imagenet", "cifar")


@dataclass(frozen=True)
class Complexity:
    flops: int
    params: int
    acts: int

    def as_dict(self) -> dict[str, int]:
        return {"flops": int(self.flops), "params": int(self.params), "acts": int(self.acts)}


def _out(h, stride):
    """Output size of a 3x3 (padding 1) or 1x1 (padding 0) convolution with this stride."""
    return (h - 1) // stride + 1


def conv_cx(h, w_in, w_out, k, stride=1, groups=1, bias=False):
    """``(flops, params, acts, h_out)`` of a k x k convolution on an h x h input (odd k, 'same' padding)."""
    h = _out(h, stride)
    flops = k * k * (w_in // groups) * w_out * h * h + (w_out * h * h if bias else 0)
    params = k * k * (w_in // groups) * w_out + (w_out if bias else 0)
    return flops, params, w_out * h * h, h


def block_cx(h, w_in, w_out, stride, inner, g, w_se):
    """``(flops, params, acts, h_out)`` of one X or Y block (``w_se = 0`` for X).

    1x1 conv (w_in -> inner) + BN, 3x3 group conv (groups = inner / g, stride) + BN, optional SE
    (w_se channels), 1x1 conv (inner -> w_out) + BN, and a projection shortcut (1x1 conv with
    stride + BN) when the shape changes.
    """
    f1, p1, a1, _ = conv_cx(h, w_in, inner, 1)
    f2, p2, a2, h2 = conv_cx(h, inner, inner, 3, stride, inner // g)
    f3, p3, a3, _ = conv_cx(h2, inner, w_out, 1, stride=1)
    flops = f1 + f2 + f3
    params = p1 + p2 + p3 + 2 * (2 * inner + w_out)
    acts = a1 + a2 + a3
    # squeeze-excitation at 1x1 resolution: inner -> w_se -> inner, both with bias
    has_se = np.asarray(w_se) > 0
    se_f = 2 * inner * w_se + w_se + inner
    flops = flops + np.where(has_se, se_f, 0)
    params = params + np.where(has_se, se_f, 0)
    acts = acts + np.where(has_se, w_se + inner, 0)
    proj = (np.asarray(w_in) != np.asarray(w_out)) | (np.asarray(stride) != 1)
    pf = w_in * w_out * h2 * h2
    flops = flops + np.where(proj, pf, 0)
    params = params + np.where(proj, w_in * w_out + 2 * w_out, 0)
    acts = acts + np.where(proj, w_out * h2 * h2, 0)
    return flops, params, acts, h2


def se_width(se, w_in):
    """Channels of the squeeze-excitation of a block with input width ``w_in``: ``round(se * w_in)``."""
    return np.round(np.asarray(se, dtype=np.float64) * np.asarray(w_in)).astype(np.int64)


def stem_cx(resolution, width, stem, in_chans=3):
    stride = 2 if stem == "imagenet" else 1
    f, p, a, h = conv_cx(resolution, in_chans, width, 3, stride)
    return f, p + 2 * width, a, h


def head_cx(width, num_classes):
    return width * num_classes + num_classes, width * num_classes + num_classes, num_classes


def stage_strides(n_stages: int, stem: str) -> list[int]:
    """Every stage halves the resolution, except the first one on 32x32 input (the 'cifar' stem)."""
    return [1 if (i == 0 and stem == "cifar") else 2 for i in range(n_stages)]


def complexity(cfg: AnyNetConfig, resolution: int = 224, stem: str = "imagenet", num_classes: int = 1000,
               in_chans: int = 3) -> Complexity:
    """FLOPs (multiply-adds), parameters and activations of an AnyNet at ``resolution`` x ``resolution``."""
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
    flops, params, acts, h = stem_cx(resolution, cfg.stem_width, stem, in_chans)
    w_in = cfg.stem_width
    for d, w, b, g, s in zip(cfg.depths, cfg.widths, cfg.bottlenecks, cfg.groups, stage_strides(len(cfg.depths), stem)):
        inner = int(round(w / b))
        for i in range(d):
            f, p, a, h = block_cx(h, w_in, w, s if i == 0 else 1, inner, g, int(se_width(cfg.se, w_in)))
            flops, params, acts = flops + int(f), params + int(p), acts + int(a)
            w_in = w
    f, p, a = head_cx(w_in, num_classes)
    return Complexity(int(flops + f), int(params + p), int(acts + a))


def stagewise_complexity(depths, widths, inners, groups, se, resolution, stem, num_classes, stem_width=32):
    """Vectorized :func:`complexity` for ``N`` architectures with the same number of stages.

    ``depths``, ``widths``, ``inners`` (w/b) and ``groups`` are integer arrays ``[N, S]``; ``se`` a
    scalar or ``[N]``. Returns three int64 arrays ``[N]``: flops, params, acts.
    """
    depths, widths, inners, groups = (np.asarray(a, dtype=np.int64) for a in (depths, widths, inners, groups))
    n, n_stages = depths.shape
    f, p, a, h = stem_cx(resolution, stem_width, stem)
    flops = np.full(n, f, dtype=np.int64)
    params = np.full(n, p, dtype=np.int64)
    acts = np.full(n, a, dtype=np.int64)
    w_in = np.full(n, stem_width, dtype=np.int64)
    se = np.broadcast_to(np.asarray(se, dtype=np.float64), (n,))
    for i, s in enumerate(stage_strides(n_stages, stem)):
        w, inner, g, d = widths[:, i], inners[:, i], groups[:, i], depths[:, i]
        f1, p1, a1, h = block_cx(h, w_in, w, s, inner, g, se_width(se, w_in))
        fr, pr, ar, _ = block_cx(h, w, w, 1, inner, g, se_width(se, w))
        flops += f1 + (d - 1) * fr
        params += p1 + (d - 1) * pr
        acts += a1 + (d - 1) * ar
        w_in = w
    f, p, a = head_cx(w_in, num_classes)
    return flops + f, params + p, acts + a


def stagewise_flops(depths, widths, inners, groups, se, resolution, stem, num_classes, stem_width=32):
    """The flops of :func:`stagewise_complexity` alone, with few array operations (float64 ``[N]``).

    The sampler uses it to reject most candidates before counting everything.
    """
    f, _, _, h = stem_cx(resolution, stem_width, stem)
    depths, widths, inners, groups = (np.asarray(a, dtype=np.float64) for a in (depths, widths, inners, groups))
    n, n_stages = depths.shape
    flops = np.full(n, float(f))
    w_in = np.full(n, float(stem_width))
    se = float(se) if np.isscalar(se) else np.asarray(se, dtype=np.float64)
    for i, s in enumerate(stage_strides(n_stages, stem)):
        w, inner, g, d = widths[:, i], inners[:, i], groups[:, i], depths[:, i]
        h2 = (h - 1) // s + 1
        a2 = h2 * h2
        first = inner * (w_in * h * h + (9 * g + w) * a2)
        proj = (w_in != w) | (s != 1)
        first = first + proj * (w_in * w * a2)
        rest = inner * a2 * (2 * w + 9 * g)
        flops += first + (d - 1) * rest
        if np.any(se):
            se_in, se_w = np.round(se * w_in), np.round(se * w)
            flops += (2 * inner * se_in + se_in + inner) * (se_in > 0) + (d - 1) * (2 * inner * se_w + se_w + inner) * (se_w > 0)
        w_in, h = w, h2
    return flops + w_in * num_classes + num_classes


def count_model(model, input_size=(1, 3, 224, 224)) -> Complexity:
    """Count flops, params and acts of a built model by tracing one forward pass on the meta device.

    Counts ``nn.Conv2d`` and ``nn.Linear`` layers by the conventions above; ``params`` is every
    trainable parameter of the model.
    """
    import torch
    from torch import nn

    counts = {"flops": 0, "acts": 0}

    def hook(module, inputs, output):
        out = output.numel() // output.shape[0]
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            macs = out * k * module.in_channels // module.groups
        else:
            macs = out * module.in_features
        counts["flops"] += macs + (out if module.bias is not None else 0)
        counts["acts"] += out

    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    meta = _meta_copy(model)
    handles = [m.register_forward_hook(hook) for m in meta.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            meta.eval()(torch.empty(input_size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return Complexity(counts["flops"], params, counts["acts"])


def _meta_copy(model):
    import copy

    import torch

    clone = copy.deepcopy(model) if not any(p.is_meta for p in model.parameters()) else model
    return clone.to(torch.device("meta"))


def format_count(n: float) -> str:
    """``398.4M``, ``1.60G``, ``5.16M``: the paper's style for flops and params."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.2f}{unit}" if v < 10 else f"{v:.1f}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return str(int(n))


def parse_count(text: str) -> float:
    """``400M`` -> 4e8, ``1.6G`` -> 1.6e9, ``2.5e6`` -> 2.5e6."""
    t = str(text).strip().upper()
    scale = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}.get(t[-1:], None)
    if scale is not None:
        t = t[:-1]
    value = float(t)
    return value * (scale or 1.0)
