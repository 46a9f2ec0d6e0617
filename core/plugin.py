"""What a plugin author subclasses: :class:`Plugin` and its typed :class:`Settings`."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class Settings(BaseModel):
    """A plugin's settings: typed fields with defaults and descriptions (pydantic).

    Declare each setting as ``name: type = Field(default, description=..., ge=..., ...)``.
    Unknown keys and values of the wrong type or range are errors that name the key.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Plugin:
    """Base class of a tricks plugin.

    The core makes one instance per run, ``Plugin(settings)``, registers it with the run's
    plugin manager, and calls the methods marked ``@tricks.hookimpl``. Per-run state lives on
    the instance; implement the ``state_dict``/``load_state_dict`` hooks to keep it across a
    resume.

    Class attributes describe the plugin to ``tricks plugins list`` when it is not in the
    registry (a third-party plugin); for registered plugins the registry is authoritative.
    """

    Settings: ClassVar[type[Settings]] = Settings
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    category: ClassVar[str] = "third-party"
    provides: ClassVar[tuple[str, ...]] = ()
    conflicts: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()
    after: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    # A model provider whose model names are not the core's: the --model that its
    # example_settings() are for (the shared tests train with it when the plugin is in the run).
    example_model: ClassVar[str | None] = None
    # The task this plugin brings (``detection``: ``--task detection`` adds it to a run), and the
    # tasks it works in (a classification trick such as mixup makes no sense on boxes; "*": every
    # task, for an observer of the loop).
    task: ClassVar[str | None] = None
    tasks: ClassVar[tuple[str, ...]] = ("classification",)
    # Core settings the shared tests train this plugin with, beside its example_settings (a task
    # plugin's task and data set: {"task": "detection", "dataset": "digits_detection"}).
    example_core: ClassVar[dict] = {}

    def __init__(self, settings: Settings | None = None):
        self.settings = settings if settings is not None else self.Settings()

    @classmethod
    def example_settings(cls, workdir) -> dict:
        """Settings with which this plugin can run alone on the default data set (``digits``).

        The contract test and the composition tests run every registered plugin with these.
        The defaults serve most plugins (``{}``); a plugin that needs something to exist - a
        teacher to distil, a file to read - creates it under ``workdir`` (a fresh directory)
        and returns the settings that point at it.
        """
        return {}


def implemented_hooks(plugin_class: type) -> list[str]:
    """The hook names a plugin class implements (methods carrying the hookimpl marker)."""
    from .hookspecs import PROJECT

    names = []
    for attr in dir(plugin_class):
        if attr.startswith("_"):
            continue
        if hasattr(getattr(plugin_class, attr, None), PROJECT + "_impl"):
            names.append(attr)
    return sorted(names)
