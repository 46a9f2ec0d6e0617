"""TensorBoard logging: every epoch's metrics row as scalars, for ``tensorboard --logdir``.

Each numeric entry of the row that ``metrics.jsonl`` receives (``train_loss``, ``val_loss``,
``val_acc``, ``lr``, ``epoch_seconds``, ``images_per_second``, ``step`` and whatever plugins add)
becomes a scalar of the same name at global step = the epoch (1-based, as in ``metrics.jsonl``),
written through ``torch.utils.tensorboard.SummaryWriter`` into ``RUN_DIR/tensorboard`` (or
``logdir``). Only the main process writes. The row is read once per epoch, after the loop has
already brought it to the host, so logging adds no synchronization to training.

A resumed run starts a new event file with a purge step at its first epoch: TensorBoard then hides
what an earlier process logged for that epoch and later ones (an epoch that finished but was not
checkpointed, and is trained again), so every epoch shows once.
"""

from __future__ import annotations

import numbers
from pathlib import Path

import tricks

__version__ = "0.1.0"


def scalars(row: dict) -> dict[str, float]:
    """The entries of a metrics row that TensorBoard can plot: numbers (not booleans), the epoch
    itself left out (it is the step)."""
    return {k: float(v) for k, v in row.items()
            if k != "epoch" and isinstance(v, numbers.Real) and not isinstance(v, bool)}


class TensorBoardSettings(tricks.Settings):
    logdir: str = tricks.Field("", description="folder for the event files (empty: RUN_DIR/tensorboard)")


class TensorBoard(tricks.Plugin):
    """Logs each epoch's metrics row to TensorBoard, at global step = epoch."""

    Settings = TensorBoardSettings

    def __init__(self, settings: TensorBoardSettings | None = None):
        super().__init__(settings)
        self.writer = None

    def _open(self, ctx, epoch: int):
        from torch.utils.tensorboard import SummaryWriter

        logdir = Path(self.settings.logdir) if self.settings.logdir else Path(ctx.run_dir) / "tensorboard"
        # purge_step: a resumed run hides what an earlier process logged from its first epoch on
        return SummaryWriter(str(logdir), purge_step=epoch + 1 if epoch > 0 else None)

    @tricks.hookimpl(trylast=True)  # after the plugins that add entries to the row
    def on_epoch_end(self, ctx, epoch, metrics):
        if not ctx.is_main:
            return
        if self.writer is None:
            self.writer = self._open(ctx, epoch)
        step = int(metrics.get("epoch", epoch + 1))
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # on disk each epoch: a killed run keeps what it logged

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    @tricks.hookimpl
    def on_fit_end(self, ctx, summary):
        self.close()

    @tricks.hookimpl
    def on_exception(self, ctx, error):
        self.close()
