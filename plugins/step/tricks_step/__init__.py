"""Step decay of the learning rate: multiply it by ``gamma`` at each milestone (He et al. 2016;
the baseline schedule of "Bag of Tricks for Image Classification", arXiv 1812.01187: 120 epochs,
lr 0.1 divided by 10 at epochs 30, 60 and 90).

``lr(t) = base * gamma ** (number of milestones <= t)``, with ``t`` and the milestones in optimizer
steps. The function is the math, usable without the framework; :class:`Step` provides it as the
run's schedule, with milestones given in epochs or as fractions of the run.
"""

from __future__ import annotations

import bisect

import tricks

__version__ = "0.1.0"


def step_lr(step: int, milestones: list[int], base_lr: float, gamma: float = 0.1) -> float:
    """The rate at ``step``: ``base_lr * gamma ** k`` after ``k`` milestones (sorted, in steps)."""
    return base_lr * gamma ** bisect.bisect_right(milestones, step)


class StepSettings(tricks.Settings):
    milestones: list[float] = tricks.Field(
        default_factory=list, description="epochs at which the rate is multiplied by gamma (e.g. [30, 60, 90]); empty: use fractions")
    fractions: list[float] = tricks.Field(
        [0.25, 0.5, 0.75], description="milestones as fractions of the schedule's length, used when milestones is empty (the paper's 30/60/90 of 120 epochs)")
    gamma: float = tricks.Field(0.1, gt=0, le=1, description="factor applied at each milestone (the paper: 0.1)")


class Step(tricks.Plugin):
    """Step decay: the base rate times gamma at each milestone."""

    Settings = StepSettings

    @tricks.hookimpl
    def configure_schedule(self, ctx, optimizer):
        s = self.settings
        if any(not 0 < f < 1 for f in s.fractions) and not s.milestones:
            raise tricks.TricksError(f"step.fractions must lie strictly between 0 and 1, got {s.fractions}: "
                                     "set e.g. --set 'step.fractions=[0.5,0.75]'")
        per_epoch, gamma = ctx.steps_per_epoch, s.gamma
        epochs, fractions = sorted(s.milestones), sorted(s.fractions)
        if epochs and epochs[-1] >= ctx.epochs:
            ctx.log(f"step: milestone epoch {epochs[-1]:g} is at or after the end of the run ({ctx.epochs} epochs)")

        def schedule(step: int, total: int, base_lr: float) -> float:
            if epochs:  # absolute epochs of the run
                marks = [round(e * per_epoch) for e in epochs]
            else:  # fractions of the schedule's own length (which a shifting warmup shortens)
                marks = [round(f * total) for f in fractions]
            return step_lr(step, marks, base_lr, gamma)

        return schedule
