"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020,
arXiv 2005.00928): how much each input token feeds the class token through all the layers.

Per layer, the heads' attention is fused (mean by default), the residual connection is accounted
for as ``A' = (A + I) / 2`` with rows renormalized, and the layers are multiplied from the first:
``R = A'_L ... A'_1``. Every ``A'`` is row-stochastic, so every row of ``R`` sums to 1. The class
token's row over the patches, reshaped to the patch grid, is the map that is drawn.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tricks.atomic import write_with

FUSIONS = ("mean", "max", "min")


def rollout(maps: list[torch.Tensor], fusion: str = "mean") -> torch.Tensor:
    """``R [B, N, N]`` from the per-layer attention weights ``[B, heads, N, N]`` (first layer first)."""
    if fusion not in FUSIONS:
        raise ValueError(f"head fusion {fusion!r} is not one of {', '.join(FUSIONS)}")
    result = None
    for weights in maps:
        a = getattr(weights.float(), fusion)(dim=1)
        a = a[0] if isinstance(a, tuple) else a  # max/min return (values, indices)
        a = a + torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    return result


def class_token_map(r: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The class token's row of ``R`` over the patches, as ``[B, gh, gw]`` scaled to [0, 1] per image
    (least-attended patch 0, most-attended 1)."""
    row = r[:, 0, 1:].reshape(len(r), *grid)
    low, high = row.amin(dim=(1, 2), keepdim=True), row.amax(dim=(1, 2), keepdim=True)
    return (row - low) / (high - low).clamp_min(1e-12)


@torch.no_grad()
def attention_maps(model, x: torch.Tensor, fusion: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """``(maps [B, gh, gw], predictions [B])`` of a :class:`VisionTransformer` on a batch."""
    was = model.training
    model.eval()
    try:
        logits, weights = model.forward_attention(x)
    finally:
        model.train(was)
    grid = (x.shape[-2] // model.shape.patch, x.shape[-1] // model.shape.patch)
    return class_token_map(rollout(weights, fusion), grid), logits.argmax(1)


def plot_attention(images: torch.Tensor, maps: torch.Tensor, path: Path, labels=None, predictions=None,
                   classes=None, title: str = "") -> None:
    """A PNG of each image (uint8 ``[B, C, H, W]``) above its rollout map (the image faintly over it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n + 0.4, 3.6), squeeze=False)
    up = F.interpolate(maps[:, None].float().cpu(), size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    name = (lambda k: str(classes[k]) if classes is not None and k < len(classes) else str(k))
    for i in range(n):
        img = images[i].cpu()
        img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
        cmap = "gray" if img.ndim == 2 else None
        axes[0, i].imshow(img.numpy(), cmap=cmap)
        axes[1, i].imshow(up[i].numpy(), cmap="inferno", vmin=0, vmax=1)
        axes[1, i].imshow(img.numpy(), cmap=cmap, alpha=0.3)  # the image faintly over the map
        if labels is not None:
            text = f"true {name(int(labels[i]))}"
            if predictions is not None:
                text += f"\npred {name(int(predictions[i]))}"
            axes[0, i].set_title(text, fontsize=8)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("image", fontsize=8)
    axes[1, 0].set_ylabel("rollout", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    write_with(Path(path), lambda f: fig.savefig(f, dpi=100, format="png"))
    plt.close(fig)
