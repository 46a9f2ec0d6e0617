"""The curated plugin registry, entry-point discovery, and resolution of ``--plugins``.

``registry.yaml`` (at the project root, shipped inside the ``tricks`` package) lists every
curated plugin. Extra registry files come from ``--registry FILE`` or the ``TRICKS_REGISTRY``
environment variable (paths separated by ``os.pathsep``); a later file's entry replaces an
earlier one of the same name. A plugin is *installed* when an entry point named after it
exists in the group ``tricks.plugins``; installed plugins missing from every registry are
*third-party* and usable all the same.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import TricksError
from .hookspecs import RULES
from .plugin import Plugin, implemented_hooks

GROUP = "tricks.plugins"
# What a plugin provides that only one plugin of a run may provide.
EXCLUSIVE = ("model", "optimizer", "schedule", "loss", "evaluation")
# Top-level keys of a config that are not plugin sections: no plugin may take these names.
RESERVED_NAMES = ("core", "plugins", "versions", "adhoc_plugins")


class Paper(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str
    year: int
    arxiv: str | None = None


class Entry(BaseModel):
    """One plugin of the registry."""

    model_config = ConfigDict(extra="forbid")
    distribution: str
    entry_point: str
    path: str
    hooks: list[str] = Field(min_length=1)
    provides: list[str] = []
    conflicts: list[str] = []
    requires: list[str] = []
    after: list[str] = []
    before: list[str] = []
    category: str
    paper: Paper | None = None
    summary: str
    models: list[str] = []  # model names (shell-style patterns) that this plugin builds
    task: str | None = None  # the task this plugin brings: --task NAME adds it to a run
    tasks: list[str] = ["classification"]  # the tasks this plugin works in; it is refused in any other
    reasons: dict[str, str] = {}  # why a listed conflict holds, by the other plugin's name: shown in the refusal
    # where the entry and each of its fields are written: "registry F, line L, column C" ("" is the entry's name)
    _where: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("hooks")
    @classmethod
    def _known_hooks(cls, hooks):
        unknown = [h for h in hooks if h not in RULES]
        if unknown:
            raise ValueError(f"unknown hook {unknown[0]!r}; hooks are: {', '.join(RULES)}")
        return hooks

    @field_validator("entry_point")
    @classmethod
    def _entry_point(cls, value):
        if ":" not in value:
            raise ValueError("must look like 'module:Object'")
        return value

    @model_validator(mode="after")
    def _reasons(self):
        stray = [name for name in self.reasons if name not in self.conflicts]
        if stray:
            raise ValueError(f"reasons names {stray[0]!r}, which is not in conflicts; add it there or drop the reason")
        return self


REFERENCES = ("conflicts", "requires", "after", "before")  # fields that name other plugins
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


def _first_error(error: ValidationError) -> tuple[str, str]:
    """(the field, ``field 'F': what is wrong``) for the first problem pydantic found in an entry."""
    err = error.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "list_type":
        message += f" (write a list: {where}: [a, b])"
    elif err["type"] == "extra_forbidden":
        message += f"; an entry has the fields {', '.join(Entry.model_fields)}"
    elif err["type"] == "missing":
        message += "; add it to the entry"
    return str(err["loc"][0]) if err["loc"] else "", (f"field '{where}': {message}" if where else message)


def default_registry_file() -> Path:
    return Path(str(resources.files("tricks") / "registry.yaml"))


def check_name(name: Any) -> str | None:
    """Why ``name`` cannot be a plugin's short name, or None when it can."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        return "a plugin's name is letters, digits, '_' and '-' (it is typed in --plugins and --set NAME.KEY)"
    if name in RESERVED_NAMES:
        return f"'{name}' is a section of every config ({', '.join(RESERVED_NAMES)} are taken)"
    return None


def load_registry_file(path: Path, what: str = "registry") -> dict[str, tuple[Entry, Path]]:
    """Read and validate one registry file; entries keep the file's folder for their path, and
    where each of their fields is written (for messages, which call the file ``what``)."""
    from .config import _kind, read_yaml

    data = read_yaml(path, what, "version: 1 and plugins: a mapping of name -> entry")
    unknown = [k for k in data if k not in ("version", "plugins")]
    if unknown:
        raise TricksError(f"{data.at(unknown[0])}: unknown top-level key {unknown[0]!r}; a registry has "
                          "version: 1 and plugins: (a mapping of name -> entry)")
    if data.get("version", 1) != 1:
        raise TricksError(f"{data.at('version')}: version {data['version']!r} is not one this tricks reads (1); "
                          "upgrade tricks or write version: 1")
    plugins = data.get("plugins")
    if not isinstance(plugins, dict):
        got = "missing" if "plugins" not in data else _kind(plugins)
        raise TricksError(f"{data.at('plugins')}: plugins must be a mapping of name -> entry (e.g. plugins: {{mixup: "
                          f"{{distribution: ..., entry_point: ...}}}}), but it is {got}")
    entries = {}
    for name, raw in plugins.items():
        at = data.at("plugins", name)
        why = check_name(name)
        if why is not None:
            raise TricksError(f"{at}: the entry {name!r} has a name no plugin can have: {why}; rename it")
        if not isinstance(raw, dict):
            raise TricksError(f"{at}: entry '{name}' must be a mapping of fields (distribution, entry_point, path, "
                              "hooks, category, summary, ...)")
        try:
            entry = Entry(**{str(k): v for k, v in raw.items()})
        except ValidationError as error:
            field_, message = _first_error(error)
            raise TricksError(f"{data.at('plugins', name, field_)}: entry '{name}': {message}") from None
        for field_ in REFERENCES:
            if name in getattr(entry, field_):
                raise TricksError(f"{data.at('plugins', name, field_)}: entry '{name}' names itself in {field_}; "
                                  "remove it there")
        entry._where = {f: data.at("plugins", name, f) for f in ("", *raw)}
        entries[name] = (entry, Path(path).resolve().parent)
    return entries


@dataclass
class PluginInfo:
    """Everything known about one plugin: its registry entry and/or its installed entry point."""

    name: str
    entry: Entry | None = None
    root: Path | None = None  # the folder the registry entry's path is relative to
    entry_point: metadata.EntryPoint | None = None
    _class: type | None = field(default=None, repr=False)

    @property
    def installed(self) -> bool:
        return self.entry_point is not None

    @property
    def third_party(self) -> bool:
        return self.entry is None

    @property
    def version(self) -> str | None:
        """The installed distribution's version (None when not installed or its metadata is unreadable)."""
        if self.entry_point is None:
            return None
        try:
            dist = getattr(self.entry_point, "dist", None)
            version = dist.version if dist is not None else None
        except Exception:  # a distribution whose metadata cannot be read: listed without a version
            return None
        return str(version) if version else None

    def load(self) -> type:
        """The plugin's class, imported from its entry point; a plugin that fails to import (or
        exits while it does) is a one-line :class:`TricksError` with the reinstall command."""
        if self._class is None:
            try:
                obj = self.entry_point.load()
            except (Exception, SystemExit) as error:
                detail = " ".join(f"{type(error).__name__}: {error}".split())
                raise TricksError(
                    f"plugin '{self.name}' is installed but fails to import "
                    f"({detail}); reinstall it: {self.install_command()}"
                ) from None
            if not (isinstance(obj, type) and issubclass(obj, Plugin)):
                raise TricksError(
                    f"entry point '{self.name}' in group {GROUP} must name a tricks.Plugin subclass, "
                    f"got {obj!r}; fix the plugin's pyproject.toml"
                )
            self._class = obj
        return self._class

    def declared(self, key: str = "") -> str:
        """Where this plugin's ``key`` is declared: ``registry F, line L, column C``, or its class."""
        if self.entry is not None:
            where = self.entry._where
            return where.get(key) or where.get("") or "the registry"
        cls = self._class
        return f"class {cls.__module__}.{cls.__qualname__}" if cls is not None else f"third-party plugin '{self.name}'"

    def meta(self, key: str) -> Any:
        """A metadata field: the registry's value, else the plugin class attribute (a list of names
        for ``provides``, ``conflicts``, ``requires``, ``after`` and ``before``)."""
        if self.entry is not None:
            return getattr(self.entry, key)
        cls = self.load()
        value = getattr(cls, key)
        if key in (*REFERENCES, "provides"):
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or \
                    not all(isinstance(v, str) for v in value):
                raise TricksError(f"plugin '{self.name}': {self.declared()} has {key} = {value!r}, which is not a "
                                  f"tuple of names; write {key} = ('mixup',) in the class")
            return list(value)
        return value

    @property
    def hooks(self) -> list[str]:
        if self.entry is not None:
            return list(self.entry.hooks)
        return implemented_hooks(self.load())

    @property
    def summary(self) -> str:
        if self.entry is not None:
            return self.entry.summary
        cls = self.load()
        return str(cls.summary or (cls.__doc__ or "").strip().split("\n")[0])

    def install_command(self) -> str:
        if self.entry is not None and self.root is not None:
            local = (self.root / self.entry.path).resolve()
            if local.exists():
                try:
                    shown = os.path.relpath(local)
                except ValueError:
                    shown = str(local)
                return f"pip install -e {shown}"
            return f"pip install {self.entry.distribution}"
        return f"pip install tricks-{self.name}"


def _installed_entry_points() -> tuple[list[metadata.EntryPoint], list[str]]:
    """The entry points of the group ``tricks.plugins``, and a line for each installed distribution
    whose metadata could not be read (the others are still found)."""
    try:
        return list(metadata.entry_points(group=GROUP)), []
    except Exception:  # one distribution's metadata is broken: read them one by one
        pass
    found, problems, seen = [], [], set()
    for dist in metadata.distributions():
        try:
            name = dist.metadata["Name"] or "?"
            if name.lower() in seen:
                continue
            seen.add(name.lower())
            found += [ep for ep in dist.entry_points if ep.group == GROUP]
        except Exception as error:
            where = getattr(dist, "_path", "an installed distribution")
            problems.append(f"{where}: unreadable metadata ({type(error).__name__}: {error}); reinstall or remove it")
    return found, problems


class Catalog:
    """The registry files merged with the installed entry points.

    Every name a registry entry gives in ``conflicts``, ``requires``, ``after`` or ``before`` must
    be a plugin of the catalog (a registry entry or an installed plugin): a misspelt name would
    otherwise be ignored for ever. ``problems`` lists installed plugins that cannot be used as
    they are (a name no plugin can have, two distributions with one name, unreadable metadata)."""

    def __init__(self, registry_files: list[Path] | None = None):
        files = [(default_registry_file(), "registry")]
        env = os.environ.get("TRICKS_REGISTRY")
        if env:
            files += [(Path(p), "registry (from TRICKS_REGISTRY)") for p in env.split(os.pathsep) if p]
        files += [(Path(p), "registry") for p in registry_files or []]
        self.plugins: dict[str, PluginInfo] = {}
        for f, what in files:
            for name, (entry, root) in load_registry_file(f, what).items():
                self.plugins[name] = PluginInfo(name, entry=entry, root=root)
        eps, self.problems = _installed_entry_points()
        for ep in eps:
            why = check_name(ep.name)
            if why is not None:
                self.problems.append(f"installed entry point {ep.name!r} ({ep.value}) cannot be used: {why}; "
                                     "rename it in the plugin's pyproject.toml")
                continue
            info = self.plugins.setdefault(ep.name, PluginInfo(ep.name))
            if info.entry_point is not None and info.entry_point.value != ep.value:
                self.problems.append(f"plugin '{ep.name}' is installed twice ({info.entry_point.value} and {ep.value}); "
                                     f"the first is used: uninstall the other")
                continue
            info.entry_point = info.entry_point or ep
        for info in self.plugins.values():
            for key in REFERENCES if info.entry is not None else ():
                for other in getattr(info.entry, key):
                    if other not in self.plugins:
                        raise TricksError(f"{info.declared(key)}: entry '{info.name}' names '{other}' in {key}, "
                                          f"which is no plugin{self._hint(other)}; fix the name, or add the registry "
                                          "that lists it (--registry or TRICKS_REGISTRY)")

    def _hint(self, name: str) -> str:
        close = difflib.get_close_matches(name, list(self.plugins), n=1, cutoff=0.6)
        return f" (did you mean {close[0]}?)" if close else ""

    def get(self, name: str) -> PluginInfo:
        if name not in self.plugins:
            close = difflib.get_close_matches(name, list(self.plugins), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else "see `tricks plugins list`"
            raise TricksError(f"unknown plugin '{name}': {hint}")
        info = self.plugins[name]
        if not info.installed:
            raise TricksError(
                f"plugin '{name}' is registered but not installed: run `{info.install_command()}`"
            )
        return info

    def model_provider(self, model: str) -> str | None:
        """The registered plugin whose ``models`` patterns match ``model`` (``regnetx_200mf``), if any."""
        for name, info in self.plugins.items():
            if info.entry is not None and any(fnmatch.fnmatchcase(model, p) for p in info.entry.models):
                return name
        return None

    def task_provider(self, task: str) -> str | None:
        """The registered plugin that brings ``task`` (``detection``), if any."""
        for name, info in self.plugins.items():
            if info.entry is not None and info.entry.task == task:
                return name
        return None

    def tasks(self) -> list[str]:
        """Every task a run can have: the core's classification and the registered plugins' tasks."""
        return ["classification", *sorted({i.entry.task for i in self.plugins.values() if i.entry is not None and i.entry.task})]

    def resolve(self, names: list[str]) -> list[PluginInfo]:
        """Check names, conflicts and requirements; return the plugins in a deterministic order."""
        seen = []
        for raw in names:
            name = raw.strip()
            if not name:
                continue
            if name in seen:
                raise TricksError(f"plugin '{name}' is named twice in the plugin list; name it once")
            seen.append(name)
        infos = [self.get(n) for n in seen]
        for info in infos:  # a third-party plugin's class names others that the registry never saw
            for key in REFERENCES if info.entry is None else ():
                for other in info.meta(key):
                    if other not in self.plugins:
                        raise TricksError(f"plugin '{info.name}': {info.declared(key)} names '{other}' in {key}, "
                                          f"which is no plugin{self._hint(other)}; fix the name in the class")
        for i, a in enumerate(infos):
            for b in infos[i + 1:]:
                if b.name in a.meta("conflicts") or a.name in b.meta("conflicts"):
                    why = self._reason(a, b) or self._reason(b, a)
                    raise TricksError(f"plugins '{a.name}' and '{b.name}' conflict: {why + '; ' if why else ''}use one of them")
                shared = set(a.meta("provides")) & set(b.meta("provides")) & set(EXCLUSIVE)
                if shared:
                    raise TricksError(
                        f"plugins '{a.name}' and '{b.name}' conflict: both provide the {sorted(shared)[0]}; "
                        "use one of them"
                    )
        for a in infos:
            for req in a.meta("requires"):
                if req not in seen:
                    raise TricksError(f"plugin '{a.name}' requires '{req}': add it to --plugins")
        return self._order(infos)

    @staticmethod
    def _reason(a: PluginInfo, b: PluginInfo) -> str:
        """Why ``a`` declares a conflict with ``b``, where its registry entry says."""
        return a.entry.reasons.get(b.name, "") if a.entry is not None else ""

    @staticmethod
    def _order(infos: list[PluginInfo]) -> list[PluginInfo]:
        """Topological order from after/before; ties keep the order the user gave. Names of
        plugins that are not in the run are ignored."""
        names = [i.name for i in infos]
        by_name = {i.name: i for i in infos}
        deps = {n: {} for n in names}  # n runs after every key of deps[n]; the value says who declared it
        for info in infos:
            for other in info.meta("after"):
                if other in deps and other != info.name:
                    deps[info.name].setdefault(other, f"{info.name} after {other} ({info.declared('after')})")
            for other in info.meta("before"):
                if other in deps and other != info.name:
                    deps[other].setdefault(info.name, f"{info.name} before {other} ({info.declared('before')})")
        ordered: list[str] = []
        while len(ordered) < len(names):
            ready = [n for n in names if n not in ordered and set(deps[n]) <= set(ordered)]
            if not ready:
                cycle = _cycle({n: [d for d in deps[n] if d not in ordered] for n in names if n not in ordered})
                edges = [deps[a][b] for a, b in zip(cycle, cycle[1:] + cycle[:1])]
                raise TricksError(f"plugins {', '.join(cycle)} have circular after/before constraints: "
                                  f"{'; '.join(edges)}; remove one of these after/before entries")
            ordered.append(ready[0])
        return [by_name[n] for n in ordered]


def _cycle(graph: dict[str, list[str]]) -> list[str]:
    """One cycle of a graph in which every node has an edge to another (a list of nodes, each
    pointing at the next and the last at the first)."""
    path, at = [], next(iter(graph))
    while at not in path:
        path.append(at)
        at = graph[at][0]
    return path[path.index(at):]
