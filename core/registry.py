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
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import TricksError
from .hookspecs import RULES
from .plugin import Plugin, implemented_hooks

GROUP = "tricks.plugins"
# What a plugin provides that only one plugin of a run may provide.
EXCLUSIVE = ("model", "optimizer", "schedule", "loss", "evaluation")


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


def _first_error(error: ValidationError) -> str:
    err = error.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"field '{where}': {err['msg']}" if where else err["msg"]


def default_registry_file() -> Path:
    return Path(str(resources.files("tricks") / "registry.yaml"))


def load_registry_file(path: Path) -> dict[str, tuple[Entry, Path]]:
    """Read and validate one registry file; entries keep the file's folder for their path."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise TricksError(f"registry file {path} does not exist; check --registry or TRICKS_REGISTRY")
    except yaml.YAMLError as error:
        raise TricksError(f"registry {path} is not valid YAML ({error}); fix the file")
    if not isinstance(data, dict) or not isinstance(data.get("plugins"), dict):
        raise TricksError(f"registry {path} must be a mapping with a 'plugins' mapping of name -> entry")
    entries = {}
    for name, raw in data["plugins"].items():
        if not isinstance(raw, dict):
            raise TricksError(f"registry {path}: entry '{name}' must be a mapping of fields")
        try:
            entry = Entry(**raw)
        except ValidationError as error:
            raise TricksError(f"registry {path}: entry '{name}': {_first_error(error)}")
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
        if self.entry_point is None:
            return None
        dist = getattr(self.entry_point, "dist", None)
        return dist.version if dist is not None else None

    def load(self) -> type:
        if self._class is None:
            try:
                obj = self.entry_point.load()
            except Exception as error:
                raise TricksError(
                    f"plugin '{self.name}' is installed but fails to import "
                    f"({type(error).__name__}: {error}); reinstall it: {self.install_command()}"
                )
            if not (isinstance(obj, type) and issubclass(obj, Plugin)):
                raise TricksError(
                    f"entry point '{self.name}' in group {GROUP} must name a tricks.Plugin subclass, "
                    f"got {obj!r}; fix the plugin's pyproject.toml"
                )
            self._class = obj
        return self._class

    def meta(self, key: str) -> Any:
        """A metadata field: the registry's value, else the plugin class attribute."""
        if self.entry is not None:
            return getattr(self.entry, key)
        cls = self.load()
        return list(getattr(cls, key)) if isinstance(getattr(cls, key), tuple) else getattr(cls, key)

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
        return cls.summary or (cls.__doc__ or "").strip().split("\n")[0]

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


class Catalog:
    """The registry files merged with the installed entry points."""

    def __init__(self, registry_files: list[Path] | None = None):
        files = [default_registry_file()]
        env = os.environ.get("TRICKS_REGISTRY")
        if env:
            files += [Path(p) for p in env.split(os.pathsep) if p]
        files += [Path(p) for p in registry_files or []]
        self.plugins: dict[str, PluginInfo] = {}
        for f in files:
            for name, (entry, root) in load_registry_file(f).items():
                self.plugins[name] = PluginInfo(name, entry=entry, root=root)
        for ep in metadata.entry_points(group=GROUP):
            info = self.plugins.setdefault(ep.name, PluginInfo(ep.name))
            info.entry_point = ep

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

    def resolve(self, names: list[str]) -> list[PluginInfo]:
        """Check names, conflicts and requirements; return the plugins in a deterministic order."""
        seen = []
        for raw in names:
            name = raw.strip()
            if not name:
                continue
            if name in seen:
                raise TricksError(f"plugin '{name}' is named twice in --plugins; name it once")
            seen.append(name)
        infos = [self.get(n) for n in seen]
        for i, a in enumerate(infos):
            for b in infos[i + 1:]:
                if b.name in a.meta("conflicts") or a.name in b.meta("conflicts"):
                    raise TricksError(f"plugins '{a.name}' and '{b.name}' conflict: use one of them")
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
    def _order(infos: list[PluginInfo]) -> list[PluginInfo]:
        """Topological order from after/before; ties keep the order the user gave."""
        names = [i.name for i in infos]
        deps = {n: set() for n in names}  # n runs after every member of deps[n]
        for info in infos:
            for other in info.meta("after"):
                if other in deps:
                    deps[info.name].add(other)
            for other in info.meta("before"):
                if other in deps:
                    deps[other].add(info.name)
        ordered = []
        while len(ordered) < len(names):
            ready = [n for n in names if n not in ordered and deps[n] <= set(ordered)]
            if not ready:
                cycle = [n for n in names if n not in ordered]
                raise TricksError(f"plugins {', '.join(cycle)} have circular after/before constraints")
            ordered.append(ready[0])
        by_name = {i.name: i for i in infos}
        return [by_name[n] for n in ordered]
