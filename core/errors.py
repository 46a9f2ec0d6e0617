"""Errors a user can act on.

``TricksError`` is bad input: the CLI prints its message on one line and exits with status 2.
``PluginHookError`` is an exception raised inside a plugin's hook; it names the plugin and the
hook, and keeps the original exception as ``__cause__``.
"""

from __future__ import annotations


class TricksError(Exception):
    """A problem with the user's input: one line that names the problem and the fix."""

    exit_code = 2


class PluginHookError(Exception):
    """An exception raised inside a plugin's hook implementation."""

    exit_code = 1

    def __init__(self, plugin: str, hook: str, error: BaseException):
        self.plugin, self.hook, self.error = plugin, hook, error
        super().__init__(f"plugin '{plugin}' failed in hook '{hook}': {type(error).__name__}: {error}")


class Diverged(Exception):
    """The training loss became non-finite: the run stopped at ``step`` (of ``epoch``, counted from
    0), keeping the checkpoint and the metrics of the last finished epoch. The CLI prints the
    message on one line and exits with status 3; a job records the run as ``diverged``."""

    exit_code = 3

    def __init__(self, epoch: int, step: int, loss: float | None = None, cause: str = ""):
        self.epoch, self.step, self.loss, self.cause = epoch, step, loss, cause
        what = "non-finite" if loss is None else str(loss)
        super().__init__(f"the training loss became {what} at step {step} (epoch {epoch + 1}); the run stopped there "
                         f"and kept its last good checkpoint{'; ' + cause if cause else ''}")
