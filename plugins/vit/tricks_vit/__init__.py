"""Vision Transformers (Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image
Recognition at Scale", ICLR 2021, arXiv 2010.11929) on multi-head scaled dot-product attention
(Vaswani et al., "Attention Is All You Need", NeurIPS 2017, arXiv 1706.03762).

* :mod:`.attention`: the reference formula and the multi-head layer (``F.scaled_dot_product_attention``);
* :mod:`.model`: patch embedding, class token, position embeddings, pre-norm blocks, the head;
  the shapes ``vit_cifar`` and timm's ``vit_tiny/small/base_patch16_224``;
* :mod:`.rollout`: attention rollout and its PNG (also ``tricks attention RUN``);
* :class:`ViT`: the model provider of a run (``--model vit_cifar`` brings it in), which also
  writes ``attention.png`` in the run directory at the end.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

import tricks

from . import flops  # noqa: F401  (the CPU attention kernel's multiply-adds, for tricks.models.complexity)
from .attention import Attention, reference_attention
from .model import ALIASES, SHAPES, Block, Shape, VisionTransformer, shape_of, vit
from .rollout import attention_maps, class_token_map, plot_attention, rollout

__version__ = "0.1.0"
__all__ = ["Attention", "reference_attention", "Block", "Shape", "SHAPES", "ALIASES", "VisionTransformer",
           "shape_of", "vit", "rollout", "class_token_map", "attention_maps", "plot_attention",
           "validation_images", "ViT", "ViTSettings"]


class ViTSettings(tricks.Settings):
    patch: Optional[int] = tricks.Field(None, ge=1, description="patch side in pixels (default: the model name's)")
    dim: Optional[int] = tricks.Field(None, ge=1, description="token width (default: the model name's)")
    depth: Optional[int] = tricks.Field(None, ge=1, description="number of encoder blocks (default: the model name's)")
    heads: Optional[int] = tricks.Field(None, ge=1, description="attention heads per block; must divide the width (default: the model name's)")
    mlp_ratio: Optional[float] = tricks.Field(None, gt=0, description="MLP hidden width / token width (default: the model name's)")
    dropout: float = tricks.Field(0.0, ge=0, lt=1, description="dropout after the position embedding, the attention projection and in the MLP")
    attn_dropout: float = tricks.Field(0.0, ge=0, lt=1, description="dropout on the attention weights")
    fused: bool = tricks.Field(True, description="attention through torch's scaled_dot_product_attention (false: the reference formula)")
    attention_map: bool = tricks.Field(True, description="write attention.png (class-token attention rollout on validation images) when the run ends")
    attention_images: int = tricks.Field(8, ge=1, le=32, description="how many validation images attention.png shows")
    fusion: Literal["mean", "max", "min"] = tricks.Field("mean", description="how attention rollout fuses the heads of a layer")


def validation_images(data, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first ``n`` validation images (uint8 ``[n, C, H, W]``) and labels of an in-memory data
    set, on the CPU; ``None`` for image folders."""
    if data is None or data.val is None:
        return None
    return data.val.x[:n].cpu(), data.val.y[:n].cpu()


def write_attention_png(model: VisionTransformer, data, path, n: int, fusion: str, device, title: str = "") -> None:
    """Attention rollout of ``model`` on the first ``n`` validation images of ``data``, as a PNG."""
    from tricks.data import Pipeline

    images, labels = validation_images(data, n)
    x = Pipeline(data, device, data.image_size, False)(images.to(device), False)
    maps, predictions = attention_maps(model, x, fusion)
    plot_attention(images, maps, path, labels, predictions, getattr(data, "classes", None), title)


class ViT(tricks.Plugin):
    """Vision Transformers at CIFAR and ImageNet shapes; attention-rollout maps."""

    Settings = ViTSettings
    example_model = "vit_cifar"

    @tricks.hookimpl
    def build_model(self, ctx):
        s = self.settings
        shape = shape_of(ctx.core.model, patch=s.patch, dim=s.dim, depth=s.depth, heads=s.heads,
                         mlp_ratio=s.mlp_ratio, image_size=ctx.image_size)
        if shape is None:
            return None  # not one of this plugin's names: the next provider's
        if shape.image_size % shape.patch:
            fit = -(-shape.image_size // shape.patch) * shape.patch
            raise tricks.TricksError(
                f"vit: images of {shape.image_size}x{shape.image_size} do not split into {shape.patch}x{shape.patch} "
                f"patches; use --image-size {fit} or a patch that divides {shape.image_size} (--set vit.patch=...)")
        if shape.dim % shape.heads:
            raise tricks.TricksError(f"vit: width {shape.dim} does not split into {shape.heads} heads; "
                                     "choose vit.heads dividing vit.dim")
        model = VisionTransformer(shape, ctx.num_classes, ctx.in_chans, s.dropout, s.attn_dropout, s.fused)
        params = sum(p.numel() for p in model.parameters())
        g = model.grid
        ctx.log(f"vit: {ctx.core.model} ({shape.describe()}), {g[0]}x{g[1]} patches + class token, "
                f"{params / 1e6:.2f}M parameters, attention {'fused (SDPA)' if s.fused else 'reference'}")
        return model

    @tricks.hookimpl
    def on_fit_end(self, ctx, summary):
        s = self.settings
        model = ctx.model
        if not (s.attention_map and ctx.is_main and ctx.run_dir is not None and isinstance(model, VisionTransformer)):
            return
        if validation_images(ctx.data, 1) is None:
            ctx.log("vit: no attention.png: the validation images are read from files; "
                    "draw it with tricks attention RUN")
            return
        path = ctx.run_dir / "attention.png"
        write_attention_png(model, ctx.data, path, s.attention_images, s.fusion, ctx.device,
                            title=f"{ctx.core.model}: class-token attention rollout, epoch {ctx.epoch + 1}")
        summary["attention_png"] = path.name
        ctx.log(f"vit: attention rollout of {s.attention_images} validation images in {path.name}")
