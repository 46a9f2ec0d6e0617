"""DropBlock (Ghiasi, Lin, Le, "DropBlock: A regularization method for convolutional networks",
NeurIPS 2018, arXiv 1810.12890).

``functional`` holds the math (seed probability, block masks, the schedule) as plain functions;
``surgery`` the :class:`DropBlock2d` layer and its insertion into residual networks, whose blocks
and stages the core's :mod:`tricks.blocks` finds;
:class:`DropBlock` wires them to a run: it inserts the layers when the model is built and sets
their keep probability before every step, falling linearly from 1 to ``keep_prob``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

import tricks
from tricks.blocks import BlockSites, block_sites, find_stages, register_stage_finder

from .functional import (apply_block_mask, clip_block_size, drop_block, dropblock_gamma, expand_seeds,
                         expected_drop_fraction, linear_keep_prob, sample_seeds, stage_keep_prob)
from .surgery import DropBlock2d, Insertion, SurgeryError, dropblock_layers, insert_dropblock, residual_blocks

__version__ = "0.1.0"
__all__ = [
    "drop_block", "dropblock_gamma", "clip_block_size", "expand_seeds", "sample_seeds", "apply_block_mask",
    "expected_drop_fraction", "linear_keep_prob", "stage_keep_prob", "DropBlock2d", "BlockSites", "Insertion",
    "SurgeryError", "insert_dropblock", "dropblock_layers", "find_stages", "block_sites", "residual_blocks",
    "register_stage_finder", "DropBlock", "DropBlockSettings",
]


class DropBlockSettings(tricks.Settings):
    keep_prob: float = tricks.Field(0.9, gt=0, le=1, description="final keep probability (of the last stage); 1 - drop rate")
    block_size: int = tricks.Field(7, ge=1, description="side of the dropped squares; clipped to the feature map's side")
    stages: list[int] = tricks.Field([-2, -1], min_length=1, description="stages to regularize, from 1 (negative: from the end; default the last two)")
    scale_per_stage: bool = tricks.Field(True, description="drop rate / 4^(last - stage), as the official ResNet code")
    schedule: Literal["linear", "constant"] = tricks.Field("linear", description="linear: keep_prob falls from 1 over all steps; constant: from the start")
    shortcut: bool = tricks.Field(True, description="also drop on each block's shortcut, as the official code")
    inner: bool = tricks.Field(False, description="also after the inner BN layers of each branch, as the official code")

    @field_validator("stages")
    @classmethod
    def _stages(cls, value):
        if any(s == 0 for s in value):
            raise ValueError("stages count from 1 (or from -1 at the end); 0 is none")
        return value


class DropBlock(tricks.Plugin):
    """Drop contiguous blocks of feature maps in the later stages; keep_prob falls linearly to its target."""

    Settings = DropBlockSettings

    def __init__(self, settings=None):
        super().__init__(settings)
        self._model = None
        self._layers: list[DropBlock2d] = []

    def keep_prob_at(self, step: int, total_steps: int) -> float:
        """The scheduled keep probability of the last stage at ``step``."""
        s = self.settings
        return s.keep_prob if s.schedule == "constant" else linear_keep_prob(step, total_steps, s.keep_prob)

    @tricks.hookimpl(wrapper=True)
    def build_model(self, ctx):
        model = yield
        s = self.settings
        try:
            done = insert_dropblock(model, s.block_size, s.stages, s.scale_per_stage, s.shortcut, s.inner)
        except SurgeryError as error:
            raise tricks.TricksError(
                f"dropblock: {error}; DropBlock needs a residual model with stages (e.g. --model resnet20, "
                f"timm:resnet50, timm:regnetx_002) and --set dropblock.stages=... among them") from None
        self._model, self._layers = model, done.layers
        where = ", ".join(f"stage {g}/{done.num_stages}: {b} blocks, drop x{r:g}" for g, b, r in done.stages)
        ctx.log(f"dropblock: {len(done.layers)} DropBlock layers ({where}); block_size {s.block_size}, "
                f"keep_prob {'1 -> ' if s.schedule == 'linear' else ''}{s.keep_prob}")
        return model

    @tricks.hookimpl
    def on_batch(self, ctx):
        model = getattr(ctx, "model", None)
        if model is not None and model is not self._model:  # a resumed or rebuilt model
            self._model, self._layers = model, dropblock_layers(model)
        keep_prob = self.keep_prob_at(ctx.step, ctx.total_steps)
        for layer in self._layers:
            layer.set_keep_prob(keep_prob)
