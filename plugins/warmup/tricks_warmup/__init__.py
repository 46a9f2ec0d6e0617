"""Linear learning-rate warmup (Goyal et al. 2017, arXiv 1706.02677; as used in "Bag of Tricks for
Image Classification", arXiv 1812.01187).

For the first ``m`` optimizer steps the rate rises linearly, ``lr(t) = base * (s + (1 - s) * t / m)``
with ``s`` the start factor (0 in the paper: ``lr_i = i * eta / m``); from step ``m`` on the schedule in
force takes over. The functions are the math, usable without the framework; :class:`Warmup` wraps
the run's schedule with them.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import tricks

__version__ = "0.1.0"

ScheduleFn = Callable[[int, int, float], float]


def warmup_factor(step: int, warmup_steps: int, start_factor: float = 0.0) -> float:
    """The multiplier of the base rate at ``step`` of a linear warmup of ``warmup_steps`` steps:
    ``start_factor`` at step 0, 1 at ``warmup_steps`` and after."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return start_factor + (1.0 - start_factor) * max(step, 0) / warmup_steps


def with_warmup(schedule: ScheduleFn, warmup_steps: int, start_factor: float = 0.0,
                mode: str = "shift") -> ScheduleFn:
    """Wrap ``schedule(step, total, base_lr)`` with a linear warmup of ``warmup_steps`` steps.

    ``mode="shift"`` (Bag of Tricks): warmup is excluded from the wrapped schedule, which runs on
    ``(step - m, total - m)`` after it, so a cosine starts its decay at the end of warmup.
    ``mode="overlay"`` (Goyal et al., timm): the wrapped schedule keeps the run's step count and
    warmup replaces its first ``m`` steps, so step-decay milestones stay at their epochs.
    The ramp rises to the wrapped schedule's first value (``shift``) or to the base rate (``overlay``).
    """
    if mode not in ("shift", "overlay"):
        raise ValueError(f"unknown warmup mode {mode!r}: use 'shift' or 'overlay'")

    def warmed(step: int, total: int, base_lr: float) -> float:
        if step >= warmup_steps:
            if mode == "shift":
                return schedule(step - warmup_steps, total - warmup_steps, base_lr)
            return schedule(step, total, base_lr)
        target = schedule(0, total - warmup_steps, base_lr) if mode == "shift" else base_lr
        return target * warmup_factor(step, warmup_steps, start_factor)

    return warmed


class WarmupSettings(tricks.Settings):
    epochs: float = tricks.Field(5.0, ge=0, description="length of the warmup in epochs (the paper: 5); ignored when steps is set")
    steps: int | None = tricks.Field(None, ge=0, description="length of the warmup in optimizer steps (overrides epochs)")
    start_factor: float = tricks.Field(0.0, ge=0, lt=1, description="fraction of the rate at step 0 (the paper: 0)")
    mode: Literal["shift", "overlay"] = tricks.Field(
        "shift", description="shift: the wrapped schedule starts after warmup (Bag of Tricks); overlay: it keeps the run's steps and warmup replaces its start (Goyal et al.)")


class Warmup(tricks.Plugin):
    """Linear warmup over the first epochs or steps, wrapping whatever schedule is in force."""

    Settings = WarmupSettings

    @classmethod
    def example_settings(cls, workdir) -> dict:
        return {"epochs": 0.5}  # the paper's 5 epochs are longer than a one-epoch smoke run

    def warmup_steps(self, ctx) -> int:
        s = self.settings
        return s.steps if s.steps is not None else int(math.ceil(s.epochs * ctx.steps_per_epoch))

    @tricks.hookimpl(wrapper=True)
    def configure_schedule(self, ctx, optimizer):
        schedule = yield
        m = self.warmup_steps(ctx)
        if m >= ctx.total_steps:
            raise tricks.TricksError(
                f"warmup of {m} steps is not shorter than the run ({ctx.total_steps} steps): "
                f"shorten it with --set warmup.epochs=N or --set warmup.steps=N, or train longer")
        ctx.log(f"warmup: {m} steps ({m / max(ctx.steps_per_epoch, 1):.2f} epochs), mode {self.settings.mode}")
        return with_warmup(schedule, m, self.settings.start_factor, self.settings.mode)
