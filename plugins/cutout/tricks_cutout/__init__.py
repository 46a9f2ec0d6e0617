"""Cutout (DeVries & Taylor, arXiv 1708.04552).

Zero ``n_holes`` squares of side ``length`` in each training image, after normalization (so the
erased value is the data set's mean). Each centre is uniform over all pixels, the square is
rows ``cy - length // 2 : cy + length // 2`` and the same for columns, clipped at the border,
and every channel shares the mask. The functions below are the math, batch-wise (one centre per
image and hole, no loop over images), usable without the framework; :class:`Cutout` wires them
to ``on_batch``.
"""

from __future__ import annotations

import torch

import tricks

__version__ = "0.1.0"


def sample_centres(batch: int, n_holes: int, height: int, width: int, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hole centres, uniform over the pixels: ``(cy, cx)``, each ``int64 [batch, n_holes]`` on ``device``."""
    cy = torch.randint(height, (batch, n_holes), device=device, generator=generator)
    cx = torch.randint(width, (batch, n_holes), device=device, generator=generator)
    return cy, cx


def cutout_mask(cy: torch.Tensor, cx: torch.Tensor, length: int, height: int, width: int,
                apply: torch.Tensor | None = None) -> torch.Tensor:
    """Where the holes are: bool ``[B, height, width]``, true inside any hole of image ``b``.

    Hole ``n`` of image ``b`` covers rows ``cy[b, n] - length // 2 <= r < cy[b, n] + length // 2``
    and the same columns around ``cx[b, n]``, clipped to the image (the paper's code): ``length``
    rows when it is even, ``length - 1`` when odd, fewer at the border. ``apply`` (bool ``[B]``,
    default all) leaves the images where it is false without holes. Built with broadcast
    comparisons of ``arange`` against the centres, on the centres' device.
    """
    half = length // 2
    rows = torch.arange(height, device=cy.device)
    cols = torch.arange(width, device=cx.device)
    cy, cx = cy.unsqueeze(-1), cx.unsqueeze(-1)                       # [B, n, 1]
    in_rows = (rows >= cy - half) & (rows < cy + half)                # [B, n, H]
    in_cols = (cols >= cx - half) & (cols < cx + half)                # [B, n, W]
    if apply is not None:
        in_rows &= apply.view(-1, 1, 1)
    holes = in_rows.unsqueeze(-1) & in_cols.unsqueeze(-2)             # [B, n, H, W]
    return holes[:, 0] if holes.shape[1] == 1 else holes.any(dim=1)


def apply_mask(x: torch.Tensor, mask: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Zero ``x [B, C, H, W]`` where ``mask [B, H, W]`` is true, in every channel."""
    mask = mask.unsqueeze(1)
    return x.masked_fill_(mask, 0) if inplace else x.masked_fill(mask, 0)


def cutout(x: torch.Tensor, length: int = 16, n_holes: int = 1, prob: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Cutout of a normalized batch ``[B, C, H, W]``: each image, with probability ``prob``,
    gets ``n_holes`` zeroed squares of side ``length``. Draws on ``x``'s device; returns a new
    tensor."""
    b, _, h, w = x.shape
    centres = sample_centres(b, n_holes, h, w, x.device, generator)
    apply = torch.rand(b, device=x.device, generator=generator) < prob if prob < 1.0 else None
    return apply_mask(x, cutout_mask(*centres, length, h, w, apply))


class CutoutSettings(tricks.Settings):
    length: int = tricks.Field(16, ge=1, description=(
        "side of each square in pixels; the paper uses 16 on CIFAR-10, 8 on CIFAR-100, 20 on SVHN"))
    n_holes: int = tricks.Field(1, ge=1, description="squares per image (1 in the paper)")
    prob: float = tricks.Field(1.0, ge=0, le=1, description="probability of cutting an image (each image on its own; 1 in the paper)")


class Cutout(tricks.Plugin):
    """Zero square holes of each training image, after normalization."""

    Settings = CutoutSettings

    def __init__(self, settings=None):
        super().__init__(settings)
        self._warned = False

    @classmethod
    def example_settings(cls, workdir) -> dict:
        # The default side (16, CIFAR-10's) covers all of an 8x8 digit; 4 is half the side, as 16 is on CIFAR.
        return {"length": 4}

    @tricks.hookimpl
    def on_batch(self, ctx, batch):
        s = self.settings
        x = batch["input"]
        if x.ndim != 4:
            raise tricks.TricksError(
                f"cutout needs image batches [B, C, H, W], got input of shape {tuple(x.shape)}; drop cutout for this data")
        b, _, h, w = x.shape
        if not self._warned and s.length // 2 >= max(h, w):
            self._warned = True
            log = getattr(ctx, "log", None)
            if log is not None:
                log(f"cutout: length {s.length} is at least twice the image side ({h}x{w}): every image is erased "
                    f"entirely; set e.g. --set cutout.length={max(1, max(h, w) // 2)}")
        if s.prob <= 0.0:
            return None
        centres = sample_centres(b, s.n_holes, h, w, x.device)
        apply = torch.rand(b, device=x.device) < s.prob if s.prob < 1.0 else None
        apply_mask(x, cutout_mask(*centres, s.length, h, w, apply), inplace=True)
        return batch
