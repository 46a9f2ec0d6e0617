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
