"""Cosine learning-rate decay (Loshchilov & Hutter, SGDR, arXiv 1608.03983, without restarts;
as used in "Bag of Tricks for Image Classification", arXiv 1812.01187).

``lr(t) = final + (base - final) * (1 + cos(pi * t / T)) / 2``, with ``t`` the optimizer step
and ``T`` the number of steps of the schedule. The function is the math, usable without the
framework; :class:`Cosine` provides it as the run's schedule.
"""

from __future__ import annotations

import math

import tricks

__version__ = "0.1.0"


def cosine_lr(step: int, total_steps: int, base_lr: float, final_lr: float = 0.0) -> float:
    """The learning rate at ``step`` of ``total_steps``: ``base_lr`` at 0, ``final_lr`` at the end."""
    t = min(max(step, 0), total_steps) / max(total_steps, 1)
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


class CosineSettings(tricks.Settings):
    final_lr: float = tricks.Field(0.0, ge=0, description="learning rate reached at the last step")


class Cosine(tricks.Plugin):
    """Cosine decay of every parameter group's learning rate, per step, to ``final_lr``."""

    Settings = CosineSettings

    @tricks.hookimpl
    def configure_schedule(self, ctx, optimizer):
        final = self.settings.final_lr

        def schedule(step: int, total_steps: int, base_lr: float) -> float:
            return cosine_lr(step, total_steps, base_lr, final)

        return schedule
