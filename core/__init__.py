"""tricks: a plugin-based research framework for training image classifiers with the
techniques of the "bag of tricks" literature.

What a plugin author needs (``hookimpl``, ``Plugin``, ``Settings``, ``Field``) imports without
torch; the training API (``run``, ``RunContext``, ``Reporter``) loads on first use.
"""

__version__ = "0.1.0"

from pydantic import Field  # noqa: E402

from .config import CoreSettings, RunConfig, resolve  # noqa: E402
from .errors import Diverged, PluginHookError, TricksError  # noqa: E402
from .hookspecs import hookimpl  # noqa: E402
from .plugin import Plugin, Settings  # noqa: E402
from .rundir import RunDir  # noqa: E402

_LAZY = {"run": "api", "RunContext": "loop", "Reporter": "loop"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tricks' has no attribute {name!r}")


__all__ = [
    "__version__", "hookimpl", "Plugin", "Settings", "Field", "TricksError", "PluginHookError", "Diverged",
    "CoreSettings", "RunConfig", "RunDir", "resolve", "Reporter", "RunContext", "run",
]
