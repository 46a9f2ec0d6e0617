"""Localization-aware channel pruning (LCP) of an object detector's backbone.

Xie, Zhu, Wu, Lu, Xu, Li, Li and Yan, "Localization-aware Channel Pruning for Object Detection",
Neurocomputing 2020 (arXiv 1911.02237). LCP is discrimination-aware channel pruning (DCP) with an
auxiliary network that keeps what the features need to *localize*: on a layer's features, the
ground-truth box ``B`` and the smallest box ``C`` enclosing ``B`` and its matched default box
``A`` are pooled (contextual RoIAlign: ``RoIAlign(F, B) + RoIAlign(F, C)``); the auxiliary loss is
a classification loss plus ``m * (1 - GIoU)`` of the box regressed from ``A``
(:class:`tricks_lcp.auxiliary.AuxiliaryNetwork`). Channels are selected layer by layer by the
gradient norm of ``L_re + alpha * L_a`` (the reconstruction of the layer's output plus the
auxiliary loss), greedily, with the kept weights re-optimized (``tricks_prune.dcp``).

In a run (``--task detection --plugins lcp``) the plugin attaches an auxiliary network after each
backbone stage it prunes, trains it with the detector (``L_f = L_a + L_c + L_r``: the auxiliary loss
beside the detector's own losses), and at the end of epoch ``at`` prunes the input channels of the
layers inside those stages (the block-internal channels; residual streams and the stage outputs
that feed the feature pyramid keep their widths). ``tricks lcp`` runs the method's stages as a job:
one such run per backbone stage, each starting from the previous one, then a fine-tuning run
(:mod:`tricks_lcp.job`). ``aux=dcp`` swaps the auxiliary loss for DCP's discrimination-only loss on
the objects' own regions (no enclosing box, no regression), for the comparison.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

import tricks
from tricks.errors import TricksError

from .auxiliary import AuxiliaryNetwork, grid_default_boxes

__version__ = "0.1.0"


class LCPSettings(tricks.Settings):
    ratio: float = Field(0.5, ge=0, lt=1, description="fraction of the input channels removed from every pruned layer "
                                                      "(the backbone's block-internal channels)")
    stages: list[int] | None = Field(None, min_length=1, description="backbone stages (indices of its stages) pruned by this run; "
                                                       "none: every stage")
    at: int | None = Field(None, ge=1, description="epoch (from 1) at whose end the layers are pruned; none: the last")
    aux: Literal["lcp", "dcp"] = Field("lcp", description="lcp: contextual RoIAlign, classification + m (1 - GIoU); "
                                                          "dcp: classification of the objects' own regions only")
    alpha: float = Field(1.0, ge=0, description="weight of the auxiliary loss against the reconstruction loss in selection")
    m: float = Field(1.0, ge=0, description="weight of the GIoU loss in the auxiliary loss (lcp)")
    aux_weight: float = Field(1.0, ge=0, description="weight of the auxiliary loss beside the detector's losses in training")
    samples: int = Field(64, ge=1, description="training images (the first of the pruning epoch) channels are selected on")
    refit_steps: int = Field(5, ge=0, description="gradient steps re-optimizing the kept weights after each selected channel")
    box_sizes: list[float] = Field([16.0, 32.0], min_length=1, description="sides (pixels) of the auxiliary network's default boxes")
    aspect_ratios: list[float] = Field([0.5, 1.0, 2.0], min_length=1, description="aspect ratios of the default boxes")
    iou_threshold: float = Field(0.5, gt=0, le=1, description="IoU of a default box with a ground-truth box that makes it positive")
    max_positives: int = Field(8, ge=1, description="positives per image the auxiliary network pools (the best-overlapping)")


class LossHead(torch.nn.Module):
    """A stage's auxiliary loss as a module of the stage's output, for ``tricks_prune.dcp``'s
    channel selection: the auxiliary network with the batch's boxes bound to it."""

    def __init__(self, aux: AuxiliaryNetwork, boxes, labels, image_hw, settings):
        super().__init__()
        self.aux, self.boxes, self.labels, self.image_hw, self.s = aux, boxes, labels, image_hw, settings

    def forward(self, features):
        return auxiliary_loss(self.aux, features, self.boxes, self.labels, self.image_hw, self.s)


def auxiliary_loss(aux: AuxiliaryNetwork, features, boxes, labels, image_hw, s) -> torch.Tensor:
    """``L_a`` of one stage's features for the batch's ground truth (labels ``0..K-1``)."""
    h, w = features.shape[-2:]
    defaults = grid_default_boxes((h, w), image_hw, s.box_sizes, s.aspect_ratios, device=features.device)
    return aux(features.float(), boxes, labels, defaults, w / image_hw[1])["loss"]


class LCP(tricks.Plugin):
    """Localization-aware channel pruning of a detector's backbone (Xie et al.)."""

    Settings = LCPSettings
    name = "lcp"
    tasks = ("detection",)
    example_model = "fcos:resnet8"
    example_core = {"task": "detection", "dataset": "digits_detection"}

    @classmethod
    def example_settings(cls, workdir) -> dict:
        return {"samples": 8, "refit_steps": 1, "box_sizes": [12.0]}

    def __init__(self, settings=None):
        super().__init__(settings)
        self.aux: torch.nn.ModuleDict | None = None
        self.done = False
        self._features: dict[str, torch.Tensor] = {}
        self._hooks: list = []
        self._samples: list[tuple[torch.Tensor, list]] = []

    # --- where -------------------------------------------------------------------------------
    @staticmethod
    def body(model) -> torch.nn.Module:
        root = getattr(model, "prune_root", None)
        if not root:
            raise TricksError(f"lcp prunes a detector's backbone, and {type(model).__name__} names none (prune_root); "
                              "train a detector: --task detection --model fcos:resnet20")
        return model.get_submodule(root)

    def stage_names(self, body) -> list[str]:
        count = len(body.stages)
        chosen = self.settings.stages if self.settings.stages is not None else list(range(count))
        bad = [p for p in chosen if not 0 <= p < count]
        if bad:
            raise TricksError(f"lcp.stages={chosen}: the backbone has stages 0 to {count - 1}; choose among them")
        return [f"stages.{p}" for p in chosen]

    def _at(self, ctx) -> int:
        return self.settings.at if self.settings.at is not None else ctx.epochs

    @staticmethod
    def _example(ctx, model) -> torch.Tensor:
        device = next(model.parameters()).device
        return torch.zeros(1, ctx.in_chans, ctx.image_size, ctx.image_size, device=device)

    # --- the auxiliary networks, trained with the detector -----------------------------------
    def _networks(self, ctx, model) -> torch.nn.ModuleDict:
        if self.aux is None:
            body = self.body(model)
            names = self.stage_names(body)
            widths = {}
            hooks = [body.get_submodule(n).register_forward_hook(lambda mod, i, o, n=n: widths.__setitem__(n, o.shape[1]))
                     for n in names]
            try:
                was = body.training
                body.eval()
                with torch.no_grad(), torch.random.fork_rng(devices=[]):
                    body(self._example(ctx, model))
                body.train(was)
            finally:
                for hook in hooks:
                    hook.remove()
            s = self.settings
            device = next(model.parameters()).device
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(ctx.core.seed)
                self.aux = torch.nn.ModuleDict({
                    n.replace(".", "_"): AuxiliaryNetwork(widths[n], ctx.num_classes, m=s.m if s.aux == "lcp" else 0.0,
                                                          iou_threshold=s.iou_threshold, context=s.aux == "lcp",
                                                          max_positives=s.max_positives)
                    for n in names}).to(device)
        return self.aux

    def _attach(self, model) -> None:
        self._detach()
        body = self.body(model)
        for name in self.stage_names(body):
            def grab(module, args, output, name=name):
                if module.training and torch.is_grad_enabled():
                    self._features[name] = output
            self._hooks.append(body.get_submodule(name).register_forward_hook(grab))

    def _detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._features = [], {}

    @tricks.hookimpl(wrapper=True, tryfirst=True)
    def configure_optimizer(self, ctx, model):
        optimizer = yield
        if optimizer is None:
            return optimizer
        # always in the optimizer, pruning done or not, so that a resumed run's optimizer has the
        # groups its checkpoint holds (after the pruning step they get no gradient and stay)
        aux = self._networks(ctx, model)
        group = {k: v for k, v in optimizer.defaults.items() if k not in ("params", "initial_lr")}
        group["lr"] = optimizer.param_groups[0]["lr"]
        optimizer.add_param_group({**group, "params": list(aux.parameters())})
        return optimizer

    @tricks.hookimpl
    def on_fit_start(self, ctx):
        if ctx.core.task != "detection":
            raise TricksError("lcp prunes a detector: run it with --task detection")
        if not self.done:
            at = self._at(ctx)
            if at > ctx.epochs:
                raise TricksError(f"lcp.at={at}, but the run has {ctx.epochs} epochs; choose lcp.at <= {ctx.epochs}")
            self._attach(ctx.model)

    @tricks.hookimpl(wrapper=True)
    def build_loss(self, ctx):
        base = yield
        s = self.settings

        def with_aux(output, batch):
            value = base(output, batch)
            features, self._features = self._features, {}
            if self.done or not features:
                return value
            boxes = [t["boxes"] for t in batch["target"]]
            labels = [t["labels"] - 1 for t in batch["target"]]  # the detector's labels count the background
            if ctx.epoch + 1 == self._at(ctx):
                self._collect(batch, boxes, labels)
            image_hw = tuple(batch["input"].shape[-2:])
            for name, feats in features.items():
                value = value + s.aux_weight * auxiliary_loss(self.aux[name.replace(".", "_")], feats, boxes, labels,
                                                              image_hw, s)
            return value

        return with_aux

    def _collect(self, batch, boxes, labels) -> None:
        have = sum(len(x) for x, _ in self._samples)
        need = self.settings.samples - have
        if need > 0:
            x = batch["input"][:need].detach().clone()
            self._samples.append((x, [(b.detach().clone(), lab.detach().clone()) for b, lab in zip(boxes[:need], labels[:need])]))

    # --- pruning -------------------------------------------------------------------------------
    @tricks.hookimpl
    def prune(self, ctx, model):
        if self.done or ctx.epoch + 1 != self._at(ctx):
            return None
        from tricks_prune.dcp import AuxHeads, prune_dcp
        from tricks_prune.graph import complexity

        s = self.settings
        self._detach()
        body = self.body(model)
        x = self._example(ctx, model)
        before = complexity(body, x)
        if ctx.rank == 0:
            if not self._samples:
                raise TricksError("lcp selects channels on the images of the pruning epoch, and none was seen; "
                                  "the epoch before the pruning step must train")
            images = torch.cat([a for a, _ in self._samples])
            pairs = [p for _, ps in self._samples for p in ps]
            boxes, labels = [b for b, _ in pairs], [lab for _, lab in pairs]
            image_hw = tuple(images.shape[-2:])
            heads = AuxHeads({n: LossHead(self.aux[n.replace(".", "_")], boxes, labels, image_hw, s)
                              for n in self.stage_names(body)})
            change = prune_dcp(body, x, images, None, s.ratio, heads, (), 1, s.alpha, s.refit_steps,
                               log=ctx.log, loss_fn=lambda loss, _: loss, within=self.stage_names(body))
        else:
            change = None
        self._samples = []
        if ctx.world_size > 1:
            from tricks.distributed import broadcast_object
            from tricks_prune.graph import apply_steps

            change = broadcast_object(change)
            if ctx.rank != 0:
                apply_steps(body, x, change["steps"])
        self.done = True
        after = complexity(body, x)
        ctx.log(f"lcp ({s.aux}): {', '.join(self.stage_names(body))} pruned: backbone params {before['params']:,} -> "
                f"{after['params']:,}, MACs {before['macs']:,} -> {after['macs']:,}")
        steps = change.pop("steps")
        if not steps:
            return None
        return {"steps": steps, **change, "before": before, "after": after}

    @tricks.hookimpl
    def replay_structure(self, ctx, model, change):
        from tricks_prune.pruning import replay

        replay(self.body(model), self._example(ctx, model), change)

    @tricks.hookimpl
    def on_epoch_end(self, ctx, epoch, metrics):
        body = self.body(ctx.model)
        metrics["backbone_params"] = sum(p.numel() for p in body.parameters())

    @tricks.hookimpl
    def state_dict(self, ctx):
        state = {"done": self.done}
        if self.aux is not None:
            state["aux"] = {k: v.detach().clone() for k, v in self.aux.state_dict().items()}
        return state

    @tricks.hookimpl
    def load_state_dict(self, ctx, state):
        self.done = bool(state.get("done", False))
        if self.aux is not None and state.get("aux"):
            self.aux.load_state_dict(state["aux"])  # in place: the optimizer holds these parameters
        if self.done:
            self._detach()

    @tricks.hookimpl
    def on_fit_end(self, ctx, summary):
        self._detach()
        body = self.body(ctx.model)
        summary["backbone_params"] = sum(p.numel() for p in body.parameters())

    @tricks.hookimpl
    def on_exception(self, ctx, error):
        self._detach()


__all__ = ["LCP", "LCPSettings", "LossHead", "auxiliary_loss"]
