"""GridMask (Pengguang Chen et al., arXiv 2001.04086).

``x~ = x * M``: ``M`` is a grid of period ``d`` (the unit), rotated about the image centre. In
each unit a band of width ``l = ceil(r * d)`` runs along the top and the left (the kept
"stripes"); the ``(d - l) x (d - l)`` squares between them are dropped (``mode = 1``, the
paper's GridMask) or kept while the stripes are dropped (``mode = 0``). Without rotation the
dropped share is ``(1 - l / d)^2``, about ``(1 - r)^2``. Each image gets its own ``d``,
offsets and angle, and is masked with probability ``p``, which ramps up linearly over the first
epochs: ``p(epoch) = P * min(1, epoch / ramp_epochs)``.

The paper's code draws the stripes on a canvas as large as the image's diagonal and rotates
it with PIL; here the mask is evaluated analytically at every pixel instead: the pixel's
centre is rotated back by the image's angle, and the grid is tested there with
``(u + offset) mod d < l``, which is the test of the pixel ``floor(u)`` of the unrotated grid
(nearest neighbour, as PIL's rotation). Everything is batch-wise on the device, with no loop
over images; :class:`GridMask` wires it to ``on_batch``.
"""

from __future__ import annotations

import math

import torch
from pydantic import field_validator
from pydantic_core.core_schema import ValidationInfo

import tricks

__version__ = "0.1.0"

# The paper's ImageNet unit range: d ~ randint(96, 224) for 224-pixel images.
PAPER_D_MIN = 96 / 224


def d_range(side: int, d_min: float = PAPER_D_MIN, d_max: float = 1.0,
            d_min_pixels: int | None = None, d_max_pixels: int | None = None) -> tuple[int, int]:
    """The unit range ``[lo, hi)`` in pixels for images of ``side`` pixels: fractions of the
    side (rounded) unless pixels are given; at least 2 pixels, and ``hi > lo``."""
    lo = d_min_pixels if d_min_pixels is not None else round(d_min * side)
    hi = d_max_pixels if d_max_pixels is not None else round(d_max * side)
    lo = max(2, int(lo))
    return lo, max(lo + 1, int(hi))


def ramp_prob(epoch: int, prob: float, ramp_epochs: float) -> float:
    """``P * min(1, epoch / ramp_epochs)`` (``P`` from the start when ``ramp_epochs`` is 0)."""
    if ramp_epochs <= 0:
        return prob
    return prob * min(1.0, epoch / ramp_epochs)


def sample_grids(batch: int, d_lo: int, d_hi: int, rotate: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None):
    """Per-image grid parameters, on ``device``: unit ``d ~ randint(d_lo, d_hi)``, offsets
    ``randint(0, d)`` along rows and columns, angle ``randint(0, rotate)`` degrees (0 when
    ``rotate <= 1``). Returns ``(d, offset_y, offset_x, angle)``, int64 ``[batch]`` each."""
    d = torch.randint(d_lo, d_hi, (batch,), device=device, generator=generator)
    offsets = (torch.rand(2, batch, device=device, generator=generator) * d).long()
    offsets = torch.minimum(offsets, d - 1)  # guard the rounding of rand * d
    if rotate > 1:
        angle = torch.randint(0, rotate, (batch,), device=device, generator=generator)
    else:
        angle = torch.zeros(batch, dtype=torch.long, device=device)
    return d, offsets[0], offsets[1], angle


def stripe_width(d: torch.Tensor, ratio: float) -> torch.Tensor:
    """``l = ceil(ratio * d)``, clamped to ``[1, d - 1]`` so that both squares and stripes exist."""
    l = torch.ceil(d.double() * ratio).long()
    return torch.minimum(l.clamp(min=1), d - 1)


def grid_mask(height: int, width: int, d: torch.Tensor, offset_y: torch.Tensor, offset_x: torch.Tensor,
              angle: torch.Tensor, ratio: float = 0.6, mode: int = 1, apply: torch.Tensor | None = None) -> torch.Tensor:
    """Which pixels GridMask drops: bool ``[B, height, width]`` for per-image ``d``, offsets
    and ``angle`` (degrees), all ``[B]``; ``apply`` (bool ``[B]``, default all) leaves the
    images where it is false untouched.

    Pixel ``(i, j)`` has its centre ``(i + 0.5, j + 0.5)`` rotated by ``-angle`` about the
    image centre to ``(v, u)``; it lies on a stripe when ``(v + offset_y) mod d < l`` or
    ``(u + offset_x) mod d < l`` (the same as testing ``floor(v)``, the pixel of an unrotated
    grid it falls in, since ``l`` and ``d`` are whole). ``mode = 1`` drops the squares between
    the stripes, ``mode = 0`` drops the stripes. Unrotated, the mask has period ``d`` along
    both axes.
    """
    dev = d.device
    df = d.view(-1, 1, 1).float()
    l = stripe_width(d, ratio).view(-1, 1, 1).float()
    if apply is not None:  # a threshold no remainder passes: nothing dropped in those images
        l = torch.where(apply.view(-1, 1, 1), l, math.inf if mode == 1 else -math.inf)
    theta = torch.deg2rad(angle.double()).view(-1, 1, 1)
    cos, sin = torch.cos(theta).float(), torch.sin(theta).float()
    cy, cx = height / 2.0, width / 2.0
    ys = (torch.arange(height, device=dev, dtype=torch.float32) + 0.5 - cy).view(1, -1, 1)
    xs = (torch.arange(width, device=dev, dtype=torch.float32) + 0.5 - cx).view(1, 1, -1)
    # u + offset_x = cos*x - sin*y + cx + offset_x; the per-row and per-column parts are
    # small [B, 1, W] and [B, H, 1] tensors, so only their sum is image-sized.
    u = torch.remainder((cos * xs + (offset_x.view(-1, 1, 1).float() + cx)) - sin * ys, df)   # [B, H, W]
    v = torch.remainder((sin * xs + (offset_y.view(-1, 1, 1).float() + cy)) + cos * ys, df)
    if mode == 1:
        return (u >= l) & (v >= l)
    return (u < l) | (v < l)


def gridmask(x: torch.Tensor, ratio: float = 0.6, d_lo: int | None = None, d_hi: int | None = None,
             rotate: int = 360, mode: int = 1, prob: float = 1.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """GridMask of a normalized batch ``[B, C, H, W]``: each image, with probability ``prob``,
    loses its grid (same mask in every channel). The unit range defaults to the paper's,
    relative to the shorter side (``[96/224, 1)`` of it). Returns a new tensor."""
    b, _, h, w = x.shape
    lo, hi = d_range(min(h, w))
    d_lo = lo if d_lo is None else d_lo
    d_hi = hi if d_hi is None else d_hi
    params = sample_grids(b, d_lo, d_hi, rotate, x.device, generator)
    apply = torch.rand(b, device=x.device, generator=generator) < prob if prob < 1.0 else None
    return x.masked_fill(grid_mask(h, w, *params, ratio=ratio, mode=mode, apply=apply).unsqueeze(1), 0)


class GridMaskSettings(tricks.Settings):
    ratio: float = tricks.Field(0.6, gt=0, lt=1, description=(
        "r: stripe width l = ceil(r * d) (kept in mode 1); about (1 - r)^2 of the image is dropped. 0.6 in the paper (ImageNet)"))
    d_min: float = tricks.Field(PAPER_D_MIN, gt=0, description=(
        "smallest unit d as a fraction of the shorter image side (the paper: 96 of 224 pixels)"))
    d_max: float = tricks.Field(1.0, gt=0, description=(
        "unit d is drawn below this fraction of the shorter side (the paper: 224 of 224, exclusive)"))
    d_min_pixels: int | None = tricks.Field(None, ge=2, description="smallest unit d in pixels; overrides d_min")
    d_max_pixels: int | None = tricks.Field(None, ge=3, description="unit d is drawn below this many pixels; overrides d_max")
    rotate: int = tricks.Field(360, ge=0, description="angle ~ randint(0, rotate) degrees per image; 0 or 1 = no rotation (the paper: 360)")
    mode: int = tricks.Field(1, ge=0, le=1, description="1: drop the squares, keep the stripes (GridMask, default); 0: keep the squares")
    prob: float = tricks.Field(0.8, ge=0, le=1, description="P: the largest probability of masking an image, reached after the ramp (the paper: 0.8)")
    ramp: float = tricks.Field(0.8, ge=0, description=(
        "the probability rises linearly from 0 over this fraction of the run's epochs (the paper: 240 of 300 = 0.8); 0 = none"))
    ramp_epochs: int | None = tricks.Field(None, ge=0, description="the ramp's length in epochs; overrides ramp")

    @field_validator("d_max")
    @classmethod
    def _d_max_above_d_min(cls, value: float, info: ValidationInfo) -> float:
        d_min = info.data.get("d_min")
        if d_min is not None and value <= d_min:
            raise ValueError(f"d_max ({value}) must be larger than d_min ({d_min}); raise d_max or lower d_min")
        return value

    @field_validator("d_max_pixels")
    @classmethod
    def _d_max_pixels_above_d_min_pixels(cls, value: int | None, info: ValidationInfo) -> int | None:
        d_min = info.data.get("d_min_pixels")
        if value is not None and d_min is not None and value <= d_min:
            raise ValueError(f"d_max_pixels ({value}) must be larger than d_min_pixels ({d_min})")
        return value


class GridMask(tricks.Plugin):
    """Drop a rotated grid of squares from each image, with a probability that ramps up over epochs."""

    Settings = GridMaskSettings

    @classmethod
    def example_settings(cls, workdir) -> dict:
        # With the default ramp a one-epoch run never masks (p = 0 in epoch 0); start at P at once.
        return {"ramp": 0}

    def ramp_epochs(self, epochs: int) -> float:
        s = self.settings
        return float(s.ramp_epochs) if s.ramp_epochs is not None else s.ramp * epochs

    def probability(self, ctx) -> float:
        """``p`` for the current epoch: ``P * min(1, epoch / ramp_epochs)``."""
        return ramp_prob(ctx.epoch, self.settings.prob, self.ramp_epochs(ctx.epochs))

    @tricks.hookimpl
    def on_batch(self, ctx, batch):
        s = self.settings
        x = batch["input"]
        if x.ndim != 4:
            raise tricks.TricksError(
                f"gridmask needs image batches [B, C, H, W], got input of shape {tuple(x.shape)}; drop gridmask for this data")
        p = self.probability(ctx)
        if p <= 0.0:
            return None
        b, _, h, w = x.shape
        d_lo, d_hi = d_range(min(h, w), s.d_min, s.d_max, s.d_min_pixels, s.d_max_pixels)
        params = sample_grids(b, d_lo, d_hi, s.rotate, x.device)
        apply = torch.rand(b, device=x.device) < p if p < 1.0 else None
        x.masked_fill_(grid_mask(h, w, *params, ratio=s.ratio, mode=s.mode, apply=apply).unsqueeze(1), 0)
        return batch
