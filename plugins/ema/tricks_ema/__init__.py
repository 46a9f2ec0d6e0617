"""Exponential moving average of the weights (Polyak & Juditsky 1992; as in DeiT, arXiv 2012.12877,
and timm's training script).

After every optimizer step the averaged copy moves towards the trained weights,
``ema = decay * ema + (1 - decay) * weights`` (parameters and floating buffers alike; integer
buffers are copied). The averaging itself is timm's :class:`timm.utils.ModelEmaV3`, updated with
the number of optimizer updates so far, first update 1, as timm's ``train.py`` does; that first
update copies the weights (decay 0). With ``warmup`` the decay of update ``t`` is
``min(decay, 1 - t ** -warmup_power)`` (timm's warmup with gamma 1).

:class:`EMA` keeps the average beside the run's model and evaluates it with the run's own
``evaluate`` after the raw model's, as ``val_ema_*`` metrics.
"""

from __future__ import annotations

import torch
from timm.utils import ModelEmaV3

import tricks
from tricks.distributed import broadcast_buffers

__version__ = "0.1.0"


def warmup_decay(updates: int, decay: float, power: float) -> float:
    """The decay timm's ModelEmaV3 (``use_warmup=True``, gamma 1) applies at update ``updates``
    (1-based): 0 at the first update, then ``min(decay, 1 - updates ** -power)``."""
    step = updates - 1
    if step <= 0:
        return 0.0
    return min(decay, 1.0 - (1.0 + step) ** -power)


def make_ema(model: torch.nn.Module, decay: float, warmup: bool, warmup_power: float) -> ModelEmaV3:
    """A ModelEmaV3 of ``model``: a float32 copy on the model's device that takes no gradients (the
    core's models are float32 already, trained under autocast; the cast is what timm's ``dtype``
    argument does, done here so that any timm 1.x serves)."""
    ema = ModelEmaV3(model, decay=decay, use_warmup=warmup, warmup_power=warmup_power)
    ema.module.to(dtype=torch.float32).requires_grad_(False)
    return ema


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of everything in a model's state dict."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


class EMASettings(tricks.Settings):
    decay: float = tricks.Field(
        0.9998, ge=0, lt=1,
        description="the decay of the average per optimizer update, in [0, 1) (timm's train.py default: 0.9998; DeiT: 0.99996)")
    warmup: bool = tricks.Field(
        True, description="ramp the decay up as 1 - t^-warmup_power at update t, capped at decay (timm's ModelEmaV3 warmup); off: decay from the second update")
    warmup_power: float = tricks.Field(
        2 / 3, gt=0, description="the power of the warmup ramp (timm: 2/3; 3/4 reaches a high decay sooner)")


class EMA(tricks.Plugin):
    """An exponential moving average of the weights after every optimizer step, evaluated beside
    the raw model (val_ema_loss, val_ema_acc) and kept in the checkpoint."""

    Settings = EMASettings

    def __init__(self, settings: EMASettings | None = None):
        super().__init__(settings)
        self.ema: ModelEmaV3 | None = None
        self.updates = 0  # optimizer updates averaged in (steps that fp16's GradScaler skipped are not)
        self.history: list[dict] = []  # {"epoch", "val_ema_acc"} per epoch, for the summary
        self._ctx = None
        self._optimizer = None
        self._handle = None
        self._evaluating = False

    # --- the average ---------------------------------------------------------------------------
    def _create(self, ctx) -> ModelEmaV3:
        s = self.settings
        self.ema = make_ema(ctx.model, s.decay, s.warmup, s.warmup_power)
        self.updates = 0
        return self.ema

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.updates += 1
        self.ema.update(self._ctx.model, step=self.updates)

    def _attach(self, ctx) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._ctx, self._optimizer = ctx, ctx.optimizer
        self._handle = ctx.optimizer.register_step_post_hook(self._after_step)

    @tricks.hookimpl
    def on_fit_start(self, ctx):
        if self.ema is None:
            self._create(ctx)
        self._attach(ctx)

    @tricks.hookimpl
    def on_epoch_end(self, ctx, epoch, metrics):
        if ctx.optimizer is not self._optimizer:  # rebuilt after a structural change (pruning)
            self._attach(ctx)
            if shapes(ctx.model) != shapes(self.ema.module):
                self._create(ctx)
                ctx.log(f"ema: the model's structure changed in epoch {epoch + 1}; the average restarts from its current weights")
        if "val_ema_acc" in metrics:
            self.history.append({"epoch": epoch + 1, "val_ema_acc": float(metrics["val_ema_acc"])})

    @tricks.hookimpl
    def on_fit_end(self, ctx, summary):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.history:
            best = max(self.history, key=lambda r: r["val_ema_acc"])
            summary["final_val_ema_acc"] = self.history[-1]["val_ema_acc"]
            summary["best_val_ema_acc"] = best["val_ema_acc"]
            summary["best_ema_epoch"] = best["epoch"]

    # --- evaluation ------------------------------------------------------------------------------
    @tricks.hookimpl(wrapper=True)
    def evaluate(self, ctx, model, loader):
        if self._evaluating or self.ema is None or model is not ctx.model:
            return (yield)  # the EMA's own evaluation, or a model that is not the run's
        stats = yield
        module = self.ema.module
        broadcast_buffers(module)  # rank 0's averaged BatchNorm statistics on every rank, as for the model
        module.eval()
        self._evaluating = True
        try:
            with torch.no_grad():
                averaged = ctx.hooks.evaluate(ctx, module, loader)
        finally:
            self._evaluating = False
        return {**stats, **{f"ema_{k}": v for k, v in averaged.items() if k != "n"}}

    # --- checkpoint --------------------------------------------------------------------------------
    @tricks.hookimpl
    def state_dict(self, ctx):
        if self.ema is None:
            return None
        return {"module": self.ema.module.state_dict(), "updates": self.updates, "history": list(self.history)}

    @tricks.hookimpl
    def load_state_dict(self, ctx, state):
        self._create(ctx)  # the model is built (and its structure replayed) before plugin states load
        self.ema.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
        self.history = [dict(r) for r in state.get("history", [])]
