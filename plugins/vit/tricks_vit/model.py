"""The Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021,
arXiv 2010.11929, section 3.1, equations 1-4):

    z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}
    z_l = MLP(LN(z'_l)) + z'_l
    y = LN(z_L^0)  -> linear head

The image is cut into ``patch x patch`` patches, each linearly embedded (a strided convolution),
a learned class token is prepended and learned position embeddings are added; the encoder is
``depth`` pre-norm blocks of multi-head self-attention and a two-layer GELU MLP; the head reads
the class token. Parameter names follow timm's ``VisionTransformer`` (``blocks.0.attn.qkv.weight``,
...), so the standard shapes have timm's parameter counts and state dicts load across.

Position embeddings are learned for one grid (``image_size / patch``); an image of another size
gets them resampled (bicubic, :func:`timm.layers.resample_abs_pos_embed`), and a state dict saved
at another size is resampled when loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from timm.layers import resample_abs_pos_embed, trunc_normal_

from .attention import Attention


@dataclass(frozen=True)
class Shape:
    """A ViT's shape: patch side, width, depth, heads, MLP ratio, and the image side it is made for."""

    patch: int
    dim: int
    depth: int
    heads: int
    mlp_ratio: float
    image_size: int

    def describe(self) -> str:
        return (f"patch {self.patch}, width {self.dim}, depth {self.depth}, {self.heads} heads, "
                f"MLP {int(self.dim * self.mlp_ratio)}")


# The standard shapes (the paper's Table 1 for Base; Ti and S from DeiT, as timm names them) and
# the CIFAR shape of this project: 32x32 images in 4x4 patches, 64 tokens and the class token.
SHAPES: dict[str, Shape] = {
    "vit_cifar": Shape(patch=4, dim=192, depth=6, heads=3, mlp_ratio=2.0, image_size=32),
    "vit_tiny_patch16_224": Shape(16, 192, 12, 3, 4.0, 224),
    "vit_small_patch16_224": Shape(16, 384, 12, 6, 4.0, 224),
    "vit_base_patch16_224": Shape(16, 768, 12, 12, 4.0, 224),
}
ALIASES = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224"}


def shape_of(name: str, **overrides) -> Shape | None:
    """The shape a model name stands for, with the given fields replaced (``None`` values ignored);
    ``None`` for a name that is not a ViT of this plugin."""
    shape = SHAPES.get(ALIASES.get(name, name))
    if shape is None:
        return None
    return replace(shape, **{k: v for k, v in overrides.items() if v is not None})


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` patches, each mapped linearly to ``dim`` (a strided conv)."""

    def __init__(self, patch: int, in_chans: int, dim: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, dim]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """A pre-norm encoder block: ``x + MSA(LN(x))``, then ``x + MLP(LN(x))``.

    ``drop_path1`` and ``drop_path2`` act on the two residual branches (identity here; the
    ``drop_path`` plugin puts stochastic depth there, as timm names them)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop: float = 0.0, attn_drop: float = 0.0,
                 fused: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, attn_drop=attn_drop, proj_drop=drop, fused=fused)
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path2 = nn.Identity()

    def forward(self, x: torch.Tensor, need_weights: bool = False):
        if need_weights:
            out, weights = self.attn(self.norm1(x), need_weights=True)
            x = x + self.drop_path1(out)
            return x + self.drop_path2(self.mlp(self.norm2(x))), weights
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """A ViT classifier of the given :class:`Shape` for ``in_chans``-channel images."""

    def __init__(self, shape: Shape, num_classes: int = 10, in_chans: int = 3, drop: float = 0.0,
                 attn_drop: float = 0.0, fused: bool = True):
        super().__init__()
        if shape.image_size % shape.patch:
            raise ValueError(f"image size {shape.image_size} is not a multiple of the patch size {shape.patch}")
        self.shape = shape
        self.grid = (shape.image_size // shape.patch,) * 2
        d = shape.dim
        self.patch_embed = PatchEmbed(shape.patch, in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + 1, d))
        self.pos_drop = nn.Dropout(drop)
        self.blocks = nn.Sequential(*[Block(d, shape.heads, shape.mlp_ratio, drop, attn_drop, fused)
                                      for _ in range(shape.depth)])
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, num_classes)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """timm's initialization: truncated normal (std 0.02) for the position embedding and the
        linear weights, zero biases, a near-zero class token; the patch convolution keeps
        PyTorch's default."""
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """The parameters timm's optimizer factory leaves undecayed by name."""
        return {"pos_embed", "cls_token"}

    def prune_exclude(self) -> list[str]:
        """Layers whose output channels channel pruning must keep (the ``prune`` plugin reads
        this): the attention's ``qkv``, whose output is split into heads; pruning whole heads is
        not channel pruning. The MLPs' hidden units stay prunable."""
        return ["blocks.*.attn.qkv"]

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position embedding for a ``grid`` of patches: the learned one, or it resampled."""
        if tuple(grid) == self.grid:
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, list(grid), list(self.grid), num_prefix_tokens=1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``z_0``: the class token and the embedded patches, plus position embeddings."""
        p = self.shape.patch
        if x.shape[-1] % p or x.shape[-2] % p:
            raise ValueError(f"image of {x.shape[-2]}x{x.shape[-1]} is not a multiple of the patch size {p}")
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        z = self.patch_embed(x)
        z = torch.cat([self.cls_token.expand(len(z), -1, -1), z], dim=1)
        return self.pos_drop(z + self.pos_embed_for(grid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(self.blocks(self.tokens(x)))
        return self.head(z[:, 0])

    def forward_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The logits and every block's attention weights (``[B, heads, N+1, N+1]`` each, through
        the reference formula)."""
        z, maps = self.tokens(x), []
        for block in self.blocks:
            z, weights = block(z, need_weights=True)
            maps.append(weights)
        return self.head(self.norm(z)[:, 0]), maps

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "pos_embed"
        saved = state_dict.get(key)
        if saved is not None and saved.shape != self.pos_embed.shape and saved.shape[-1] == self.pos_embed.shape[-1]:
            side = int(round((saved.shape[1] - 1) ** 0.5))
            if side * side == saved.shape[1] - 1:  # a square grid saved at another image size
                state_dict[key] = resample_abs_pos_embed(saved, list(self.grid), [side, side], num_prefix_tokens=1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def vit(name: str, num_classes: int = 1000, in_chans: int = 3, image_size: int | None = None, **overrides) -> VisionTransformer:
    """A ViT by name (``vit_cifar``, ``vit_tiny_patch16_224``, ...), for ``image_size`` images
    (default: the shape's own), with shape fields replaced by ``overrides``."""
    drop = overrides.pop("drop", 0.0)
    attn_drop = overrides.pop("attn_drop", 0.0)
    fused = overrides.pop("fused", True)
    shape = shape_of(name, image_size=image_size, **overrides)
    if shape is None:
        raise KeyError(name)
    return VisionTransformer(shape, num_classes, in_chans, drop, attn_drop, fused)
