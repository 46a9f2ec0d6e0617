"""The core's settings as command-line options, from one source: :class:`tricks.config.CoreSettings`.

``@core_options()`` gives a command one option per core setting (``--batch-size`` for
``batch_size``): the type, the default and the help text are the field's own, so every command that
uses it spells, types and documents a setting the same way. The command receives ``core``: the
settings the user gave on the command line, checked by ``CoreSettings``, to pass on as the
``overrides`` of ``tricks.resolve`` (settings left at their default are not in it, so a recipe's
value is kept).
"""

from __future__ import annotations

import functools
import inspect
import typing
from enum import Enum
from typing import Any, Callable, Iterable, Optional

import typer
from pydantic import ValidationError
from typer.core import TyperCommand

from tricks.config import CoreSettings
from tricks.errors import TricksError

PANEL = "Core settings (also --set core.KEY=VALUE)"
_PREFIX = "core__"
_CONTEXT = "core__context"


def option_name(field: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + field.replace("_", "-")


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> ``int``; other annotations unchanged."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is not typing.Literal and len(args) == 1:
        return args[0]
    return annotation


def _choices(name: str, annotation: Any) -> type[Enum] | None:
    """A ``Literal`` field's values as a string Enum, which typer shows and checks as choices."""
    if typing.get_origin(annotation) is not typing.Literal:
        return None
    return Enum(name, {str(v): str(v) for v in typing.get_args(annotation)}, type=str)


def _parameter(name: str) -> inspect.Parameter:
    """The typer parameter of the core setting ``name``: its type, default and description."""
    field = CoreSettings.model_fields[name]
    kind = _base_type(field.annotation)
    default = field.default
    choices = _choices(name, kind)
    if choices is not None:
        kind, default = choices, choices(default)
    decls = [f"{option_name(name)}/--no-{name.replace('_', '-')}"] if kind is bool else [option_name(name)]
    option = typer.Option(default, *decls, help=field.description, rich_help_panel=PANEL)
    return inspect.Parameter(_PREFIX + name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[kind])


def check(given: dict[str, Any]) -> None:
    """Raise a one-line :class:`TricksError` naming the option when ``CoreSettings`` refuses a value."""
    try:
        CoreSettings(**given)
    except ValidationError as error:
        problem = error.errors()[0]
        name = str(problem["loc"][0])
        message, description = problem["msg"].removeprefix("Value error, "), CoreSettings.model_fields[name].description
        if description and description not in message:
            message += f" ({description})"
        raise TricksError(f"bad value for {option_name(name)} {given.get(name)!r}: {message}") from None


def core_options(exclude: Iterable[str] = ()) -> Callable[[Callable], Callable]:
    """Add an option for every core setting but those in ``exclude`` to a typer command.

    The decorated function takes a parameter ``core: dict``; it receives the core settings given
    on the command line, by field name, with plain values (a choice as its string). A bad value
    stops the command with a one-line ``TricksError`` from ``CoreSettings`` before any work.
    Called as a plain function, the settings passed as keyword arguments (``core__epochs=2``)
    are the ones given.
    """
    exclude = set(exclude)
    unknown = exclude - set(CoreSettings.model_fields)
    if unknown:
        raise ValueError(f"core_options(exclude=...) names no core setting: {', '.join(sorted(unknown))}")
    names = [n for n in CoreSettings.model_fields if n not in exclude]

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn, eval_str=True)
        if "core" not in signature.parameters:
            raise TypeError(f"{fn.__name__} takes no 'core' parameter for the core settings")
        own = [p for p in signature.parameters.values() if p.name != "core"]
        added = [_parameter(n) for n in names]
        context = inspect.Parameter(_CONTEXT, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=typer.Context)

        @functools.wraps(fn)
        def command(*args, **kwargs):
            ctx = kwargs.pop(_CONTEXT, None)
            given = {}
            for name in names:
                if _PREFIX + name not in kwargs:
                    continue
                value = kwargs.pop(_PREFIX + name)
                source = ctx.get_parameter_source(_PREFIX + name) if ctx is not None else None
                if value is None or (source is not None and source.name == "DEFAULT"):
                    continue
                given[name] = value.value if isinstance(value, Enum) else value
            check(given)
            return fn(*args, core=given, **kwargs)

        params = [*own, *added, context]
        command.__signature__ = signature.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params if p.annotation is not inspect.Parameter.empty}
        return command

    return decorate


class SectionedCommand(TyperCommand):
    """A command whose help lists its options in sections, by their ``rich_help_panel`` (its own
    options, then the core settings), in click's plain layout: it reflows to the terminal's width
    and never cuts an option's name, where a table of five columns does at 80 columns."""

    def format_options(self, ctx, formatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {"Arguments": [], "Options": []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                default = "Arguments" if param.param_type_name == "argument" else "Options"
                sections.setdefault(getattr(param, "rich_help_panel", None) or default, []).append(record)
        for title, rows in sections.items():
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


# --- the options of every command that runs a job (tricks.jobs): one definition each ----------------
JOB_PANEL = "Devices and retries (the job engine)"


def gpus_option():
    return typer.Option(None, "--gpus", help="GPUs to use: all, or indices like 0,1 (when not given: all).",
                        rich_help_panel=JOB_PANEL)


def per_gpu_option():
    return typer.Option(1, "--per-gpu", help="Runs trained at once on each GPU (or on the CPU); more than one "
                                             "slot in all runs a process pool.", rich_help_panel=JOB_PANEL)


def backend_option():
    return typer.Option("local", "--backend", help="local (this process, or a process pool) or ray (a Ray cluster).",
                        rich_help_panel=JOB_PANEL)


def address_option():
    return typer.Option(None, "--address", help="The Ray cluster to join (when not given: start a local one).",
                        rich_help_panel=JOB_PANEL)


def retry_failed_option():
    return typer.Option(False, "--retry-failed", help="Train the runs that failed before again (diverged runs are kept: with "
                        "the same seed and settings they diverge again; change the settings, in another --out, to train them otherwise).",
                        rich_help_panel=JOB_PANEL)
