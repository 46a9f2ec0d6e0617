"""One run = one resolved config: the core's settings plus one section per plugin.

Sources, later wins: defaults (the core's and each plugin's), a YAML recipe (``--config``),
CLI flags, then ``--set section.key=value``. The resolved config is written to the run
directory as ``config.yaml`` and reads back as a recipe, so any run repeats from it.

Every YAML file tricks reads (recipes, registries, design-space files) and every ``--set`` value
goes through :func:`read_yaml` / :func:`parse_yaml_value`: UTF-8 (or UTF-16 with a byte-order
mark) text, at most :data:`MAX_BYTES`, nested at most :data:`MAX_DEPTH` levels, at most
:data:`MAX_NODES` values once aliases are expanded, no key twice in a mapping. Aliases are allowed
(they share a value, which recipes do) but an alias counts as the whole value it stands for, so
a few hundred bytes of nested aliases (a "billion laughs") are refused while they are read, before
anything expands them. A problem is a one-line :class:`TricksError` naming the file, the line and
the column.
"""

from __future__ import annotations

import codecs
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator
from yaml.composer import ComposerError

from .errors import TricksError
from .plugin import Plugin, Settings
from .registry import RESERVED_NAMES, Catalog, PluginInfo

CORE = "core"
RESERVED = set(RESERVED_NAMES)

# --- reading YAML --------------------------------------------------------------------------------
MAX_BYTES = 8 << 20  # a recipe, a registry or a space file is a few kilobytes
MAX_DEPTH = 64  # levels of nested lists and mappings (a recipe needs 3)
MAX_NODES = 100_000  # values, aliases expanded (the shipped registry has about 1,500)


class _Refused(ComposerError):
    """A YAML document that is well-formed but refused: too deep, too large once expanded, a key
    given twice, or an alias inside the value it names."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with the limits above, checked while the document is composed."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values in it, aliases expanded

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None and id(target) not in self._sizes:
                raise _Refused(None, None, f"the alias *{event.anchor} is inside the value it names (a cycle); "
                               "use the alias after that value", event.start_mark)
            return super().compose_node(parent, index)
        event = self.peek_event()
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        if isinstance(node, yaml.ScalarNode):
            size = 1
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else [n for pair in node.value for n in pair]
            size = 1 + sum(self._sizes.get(id(child), 1) for child in children)
        if size > MAX_NODES:
            raise _Refused(None, None, f"this value holds more than {MAX_NODES:,} values once its aliases are "
                           "expanded; write it out or use fewer aliases", node.start_mark)
        self._sizes[id(node)] = size
        return node

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        seen = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                first = seen.setdefault((key.tag, key.value), key.start_mark)
                if first is not key.start_mark:
                    raise _Refused(None, None, f"the key '{key.value}' appears twice in this mapping (first at "
                                   f"line {first.line + 1}); keep one", key.start_mark)
        return node


def _position(text: str, index: int) -> str:
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return f"line {line}, column {column}"


def _mark(mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _yaml_problem(error: yaml.YAMLError, text: str) -> str:
    """``line L, column C: what is wrong`` from a PyYAML error, on one line."""
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        problem = error.problem or error.context or "not valid YAML"
        if error.problem and error.context:
            at = error.context_mark
            problem += f" ({error.context}{' at ' + _mark(at) if at is not None and at != mark else ''})"
        where = _mark(mark) if mark is not None else ""
    elif isinstance(error, yaml.reader.ReaderError):
        where = _position(text, error.position) if isinstance(error.position, int) else ""
        problem = f"character #x{error.character:04x} is not allowed in YAML ({error.reason})" \
            if isinstance(error.character, int) else str(error)
    else:
        where, problem = "", str(error)
    if "\t" in problem or "'\\t'" in problem:  # PyYAML shows the tab as '\t'
        problem = problem.replace("\t", "\\t") + "; indent with spaces, not tabs"
    problem = " ".join(problem.split())
    return f"{where}: {problem}" if where else problem


class YamlMapping(dict):
    """A mapping read by :func:`read_yaml`: a plain ``dict`` that also knows where it came from.

    ``source`` is how messages name the file (``config file recipes/a.yaml``); :meth:`at` gives
    the line and column of a key (``at("core", "lr")``), for messages that point at it. A copy made
    with ``dict(...)`` is a plain dict again."""

    source: str = ""
    marks: dict[tuple[str, ...], str]

    def at(self, *keys: Any) -> str:
        """``config file F, line L, column C`` of the deepest known key of ``keys``, or ``config file F``."""
        marks = getattr(self, "marks", {})
        path = tuple(str(k) for k in keys)
        while path and path not in marks:
            path = path[:-1]
        return f"{self.source}, {marks[path]}" if path else self.source


def _yaml_mapping_representer(dumper, data):
    return dumper.represent_dict(dict(data))


yaml.SafeDumper.add_representer(YamlMapping, _yaml_mapping_representer)


def _key_marks(loader: _Loader, node, path=(), marks=None, depth=4) -> dict[tuple[str, ...], str]:
    """The line and column of every key (and list item) of the first ``depth`` levels of ``node``,
    by path of keys as ``str(key)`` (``("plugins", "mixup", "after")``, ``("plugins", "0")``)."""
    marks = {} if marks is None else marks
    if depth == 0:
        return marks
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:  # merged keys (<<) come first: a key of the mapping's own wins
            if isinstance(key, yaml.ScalarNode):
                try:
                    name = str(loader.construct_object(key))
                except yaml.YAMLError:
                    name = key.value
                here = (*path, name)
                marks[here] = _mark(key.start_mark)
                _key_marks(loader, value, here, marks, depth - 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            here = (*path, str(i))
            marks.setdefault(here, _mark(item.start_mark))
            _key_marks(loader, item, here, marks, depth - 1)
    return marks


def _kind(value: Any) -> str:
    """How a message names the type of a YAML value: ``a list``, ``a number``, ..."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    for kind, name in ((dict, "a mapping"), (list, "a list"), (str, "a string"), (type(None), "empty")):
        if isinstance(value, kind):
            return name
    return f"a {type(value).__name__}"


def read_yaml(path: str | Path, what: str, shape: str, empty_ok: bool = False) -> YamlMapping:
    """Read the YAML file ``path`` whose top level must be a mapping; ``what`` names the file in
    messages (``config file``, ``registry``, ``space file``) and ``shape`` says what the mapping
    holds (for the message when it is something else). An empty file is ``{}`` when ``empty_ok``."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise TricksError(f"{what} {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise TricksError(f"{what} {path} is a folder; pass a YAML file") from None
    except OSError as error:
        raise TricksError(f"{what} {path} cannot be read ({error.strerror or error}); check the path and its permissions") from None
    if len(data) > MAX_BYTES:
        raise TricksError(f"{what} {path} is larger than {MAX_BYTES >> 20} MiB, which no {what} is; check the path")
    text = _decode(data, f"{what} {path}")
    loader = None
    try:
        loader = _Loader(text)  # checks the characters first
        node = loader.get_single_node()
        value = loader.construct_document(node) if node is not None else None
        marks = _key_marks(loader, node) if isinstance(value, dict) else {}
    except _Refused as error:
        raise TricksError(f"{what} {path}, {_yaml_problem(error, text)}") from None
    except yaml.YAMLError as error:
        raise TricksError(f"{what} {path} is not valid YAML: {_yaml_problem(error, text)}") from None
    except RecursionError:  # the limits above prevent it; kept so that no input can give a traceback
        raise TricksError(f"{what} {path} is nested too deeply; simplify it") from None
    finally:
        if loader is not None:
            loader.dispose()
    if value is None and empty_ok:
        value = {}
    if not isinstance(value, dict):
        got = "empty" if value is None else _kind(value)
        raise TricksError(f"{what} {path} must be a mapping at the top level ({shape}), but it is {got}")
    result = YamlMapping(value)
    result.source = f"{what} {path}"
    result.marks = marks
    return result


def _decode(data: bytes, name: str) -> str:
    """UTF-8 text (a UTF-8 byte-order mark is dropped; UTF-16 with its byte-order mark is read too)."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise TricksError(f"{name} starts as UTF-16 text but is not; save it as UTF-8") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        at = error.start
        line = data.count(b"\n", 0, at) + 1
        column = at - (data.rfind(b"\n", 0, at) + 1) + 1
        raise TricksError(f"{name} is not UTF-8 text: byte 0x{data[at]:02x} at line {line}, column {column} "
                          f"(byte {at}); save it as UTF-8") from None


def parse_yaml_value(text: str, what: str) -> Any:
    """A value given on the command line (``--set k=VALUE``), read as YAML within the limits of
    :func:`read_yaml`: ``0.4`` is a number, ``[1, 2]`` a list; text that is not valid YAML stays the
    string it is. A value over the limits is a :class:`TricksError` naming ``what``."""
    loader = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        return loader.construct_document(node) if node is not None else None
    except _Refused as error:
        raise TricksError(f"{what}: {_yaml_problem(error, text)}") from None
    except yaml.YAMLError:
        return text
    finally:
        if loader is not None:
            loader.dispose()


class CoreSettings(Settings):
    """The training core's settings (section ``core`` of a config)."""

    model: str = Field("resnet20", description="model name: resnet8/14/20/32/44/56/110, resnet18/34/50 (CIFAR-style), or timm:NAME")
    task: str = Field("classification", description="the task: classification (the core's), or one a plugin brings (detection, retrieval)")
    dataset: str = Field("digits", description="digits (bundled), mnist (torchvision's MNIST/raw layout), cifar10, cifar100, npz (a folder of .npz shards) or imagefolder")
    data_dir: str | None = Field(None, description="where the data set lies (not used by digits)")
    download: bool = Field(False, description="allow torchvision to download CIFAR or MNIST into data_dir")
    train_limit: int | None = Field(None, ge=1, description="use only the first N training examples")
    val_limit: int | None = Field(None, ge=1, description="use only the first N validation examples")
    image_size: int | None = Field(None, ge=8, description="resize inputs to this side (default: the data set's own; 224 for imagefolder)")
    augment: bool = Field(True, description="the data set's standard augmentation (random crop with padding, flip where it applies)")
    crop_pad: int | None = Field(None, ge=0, description="padding of the random crop in pixels, i.e. the largest shift of the image "
                                 "(default: the data set's own, 4 per 32 px; 0: no crop)")
    epochs: int = Field(20, ge=1, description="training epochs")
    batch_size: int = Field(64, ge=1, description="global batch size (split across processes)")
    lr: float = Field(0.1, gt=0, description="base learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(True, description="Nesterov momentum")
    weight_decay: float = Field(5e-4, ge=0, description="L2 weight decay")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="fp32, or autocast to bf16/fp16 (fp16 with loss scaling)")
    channels_last: bool = Field(False, description="channels_last memory format for model and inputs")
    seed: int = Field(0, description="random seed (CPU runs with the same seed and thread count are identical)")
    workers: int = Field(2, ge=0, description="loader processes for imagefolder data")
    log_every: int = Field(25, ge=1, description="steps between live loss updates (each is one host sync)")
    curves: bool = Field(True, description="plot the learning curves to curves.png at the end of the run")
    init_from: str | None = Field(None, description="a run directory whose last weights the model starts from (fine-tuning)")
    structure_from: str | None = Field(None, description="a run directory whose model structure (its recorded structural changes, e.g. "
                                       "pruning) the model takes, with fresh weights: training a pruned architecture from scratch")

    # inf and nan are no learning rate, momentum or decay: refused like any value out of range
    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("train_limit", "val_limit", "image_size", "crop_pad", "epochs", "batch_size", "lr", "momentum",
                     "weight_decay", "workers", "log_every", mode="wrap")
    @classmethod
    def _in_range(cls, value, handler, info):
        """A number out of its range (or not a number) is refused with the range it must be in."""
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(f"must be {allowed_range(cls.model_fields[info.field_name])}") from None

    @field_validator("device")
    @classmethod
    def _device(cls, value):
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("must be auto, cpu, cuda or cuda:N")


def allowed_range(field_info) -> str:
    """``a finite number > 0``, ``a whole number >= 1``: what a numeric field accepts."""
    import typing

    args = typing.get_args(field_info.annotation) or (field_info.annotation,)
    kind = "a whole number" if int in args else "a finite number"
    bounds = []
    for rule in field_info.metadata:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(rule, attr, None) is not None:
                bounds.append(f"{sign} {getattr(rule, attr)}")
    return f"{kind} {' and '.join(bounds)}" if bounds else kind


@dataclass
class RunConfig:
    """A resolved config: plugin order, the core's settings, each plugin's settings."""

    plugins: list[str]
    core: CoreSettings
    settings: dict[str, Settings]
    infos: dict[str, PluginInfo] = field(default_factory=dict, repr=False)
    adhoc: list[Plugin] = field(default_factory=list, repr=False)

    @property
    def versions(self) -> dict[str, str | None]:
        from . import __version__

        versions = {"tricks": __version__}
        versions.update({n: self.infos[n].version for n in self.plugins if n in self.infos})
        return versions

    def version_drift(self, recorded: dict[str, Any] | None) -> list[str]:
        """Where the versions a recipe was written with differ from the ones installed now."""
        now = self.versions
        return [f"{name} {old} -> {now[name]}" for name, old in (recorded or {}).items()
                if name in now and now[name] is not None and str(old) != str(now[name])]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"plugins": list(self.plugins), CORE: self.core.model_dump()}
        for name in self.plugins:
            data[name] = self.settings[name].model_dump()
        data["versions"] = self.versions
        if self.adhoc:
            data["adhoc_plugins"] = [type(p).__name__ for p in self.adhoc]
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def instantiate(self) -> list[tuple[str, Plugin]]:
        """Fresh plugin instances, in the resolved order, ad-hoc instances last."""
        made = [(n, self.infos[n].load()(self.settings[n])) for n in self.plugins]
        made += [(getattr(p, "name", "") or type(p).__name__, p) for p in self.adhoc]
        return made


def _validation_message(section: str, model: type[Settings], error: ValidationError) -> tuple[str, str]:
    """(the key, a one-line message) for the first problem pydantic found in a section."""
    err = error.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    accepted = ", ".join(model.model_fields)
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, list(model.model_fields), n=1)
        hint = f" (did you mean {section}.{close[0]}?)" if close else ""
        return key, f"unknown setting '{section}.{key}'{hint}; {section} accepts: {accepted}"
    if not key:  # a check across several settings of the section
        return key, f"bad settings for '{section}': {err['msg'].removeprefix('Value error, ')}"
    field_info = model.model_fields.get(key)
    desc = f" ({field_info.description})" if field_info is not None and field_info.description else ""
    return key, f"bad value for '{section}.{key}': {err['msg'].removeprefix('Value error, ')}{desc}"


def make_settings(section: str, model: type[Settings], values: dict[str, Any],
                  where: Callable[[str], str] | None = None) -> Settings:
    """``model(**values)``; a refused value is a one-line :class:`TricksError` naming the key, and,
    when ``where(key)`` says where the value was written (``config file F, line L, column C``), that."""
    try:
        return model(**values)
    except ValidationError as error:
        key, message = _validation_message(section, model, error)
        at = where(key.split(".")[0]) if where is not None and key else ""
        raise TricksError(f"{at}: {message}" if at else message) from None


SET_USAGE = "expected section.key=value, e.g. --set mixup.alpha=0.4 or --set core.lr=0.05"


def parse_set(item: str) -> tuple[str, str, Any]:
    """``section.key=value`` (a key without a section is the core's) -> (section, key, value)."""
    shown = item if len(item) <= 80 else item[:77] + "..."
    if "=" not in item:
        raise TricksError(f"--set {shown!r}: {SET_USAGE}")
    key, raw = item.split("=", 1)
    key = key.strip()
    section, _, name = key.rpartition(".")
    section = section or CORE
    if not name:
        raise TricksError(f"--set {shown!r}: {SET_USAGE}")
    if "." in section:
        raise TricksError(f"--set {shown!r}: the key has more than one dot; {SET_USAGE} "
                          "(a setting that holds a mapping takes one: --set section.key='{a: 1}')")
    value = parse_yaml_value(raw, f"--set {shown}") if raw.strip() else None
    return section, name, value


def _names(value: Any, at: Callable[..., str]) -> list[str]:
    """A recipe's ``plugins``: a list of names, or one string of comma-separated names (as
    ``--plugins`` takes them); anything else is refused with the fix."""
    fix = "write plugins: [mixup, cosine] (or plugins: mixup,cosine)"
    if value is None:
        return []
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    if not isinstance(value, (list, tuple)):
        raise TricksError(f"{at('plugins')}: plugins must be a list of plugin names, not {_kind(value)}; {fix}")
    names = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise TricksError(f"{at('plugins', i)}: plugins[{i}] must be a plugin name, not {_kind(item)}; {fix}")
        names.append(item.strip())
    return names


def check_recipe(data: dict[str, Any]) -> dict[str, Any]:
    """The shape of a recipe, checked where no plugin needs to be known: ``plugins`` a list of
    names (a comma-separated string is split), ``core`` and every other section a mapping of
    settings, named by strings. Returns a plain dict with ``plugins`` as a list; a problem is a
    one-line :class:`TricksError` that names the file, line and column when ``data`` was read by
    :func:`read_recipe`."""
    located = data if isinstance(data, YamlMapping) else None

    def at(*keys: Any) -> str:
        return located.at(*keys) if located is not None else "recipe"

    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or not key.strip():
            raise TricksError(f"{at(key)}: section names are plugin names or core, not {key!r}; rename the section")
        if key == "plugins":
            out[key] = _names(value, at)
        elif key == "adhoc_plugins":
            if value is not None and not isinstance(value, list):
                raise TricksError(f"{at(key)}: adhoc_plugins (written by tricks) must be a list; remove the line")
            out[key] = value
        else:
            if value is not None and not isinstance(value, dict):
                example = "core: {epochs: 10, lr: 0.05}" if key == CORE else f"{key}: {{KEY: VALUE}}"
                raise TricksError(f"{at(key)}: section '{key}' must be a mapping of settings, not {_kind(value)}; "
                                  f"write {example}")
            for name in value or {}:
                if not isinstance(name, str):
                    raise TricksError(f"{at(key)}: section '{key}' has the key {name!r}; setting names are words, "
                                      f"e.g. {key}.KEY")
            out[key] = dict(value or {})
    return out


def read_recipe(path: str | Path) -> YamlMapping:
    """A recipe file (or a run directory's ``config.yaml``), its shape checked (:func:`check_recipe`);
    the mapping remembers the file, and the line and column of each key, for later messages."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.yaml").exists():
            raise TricksError(f"config file {path} is a folder without a config.yaml; pass a recipe YAML file "
                              "or a run directory")
        path = path / "config.yaml"
    data = read_yaml(path, "config file", "plugins:, core:, one section per plugin", empty_ok=True)
    checked = YamlMapping(check_recipe(data))
    checked.source, checked.marks = data.source, data.marks
    return checked


def _core_value(data: dict, overrides: dict | None, sets: list[str] | None, key: str) -> str | None:
    """The run's core setting ``key`` (``model``, ``task``), from the same sources as :func:`resolve` (later wins)."""
    value = (data.get(CORE) or {}).get(key)
    if (overrides or {}).get(key) is not None:
        value = overrides[key]
    for item in sets or []:
        section, name, given = parse_set(item)
        if section == CORE and name == key:
            value = given
    return value if isinstance(value, str) else None


def _with_task_provider(names: list[str], task: str | None, catalog: Catalog, adhoc: list[Plugin]) -> list[str]:
    """Add the plugin that brings ``task`` (``--task detection`` brings ``detection``); an
    unknown task is refused with the tasks there are."""
    if not task or task == "classification" or any(getattr(p, "task", None) == task for p in adhoc):
        return names
    provider = catalog.task_provider(task)
    if provider is None:
        for name in names:  # an installed plugin outside the registry that brings it
            info = catalog.plugins.get(name)
            if info is not None and info.installed and info.entry is None and getattr(info.load(), "task", None) == task:
                return names
        close = difflib.get_close_matches(task, catalog.tasks(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise TricksError(f"unknown task '{task}'{hint}; tasks: {', '.join(catalog.tasks())}")
    return names if provider in names else [provider, *names]


def _check_tasks(task: str, infos: list, adhoc: list[Plugin]) -> None:
    """Refuse a plugin that does not work in the run's task (mixup on a detector's boxes)."""
    described = [(info.name, info.meta("tasks") or ["classification"], info.meta("task"), "its registry entry's tasks")
                 for info in infos]
    described += [(getattr(p, "name", "") or type(p).__name__, list(getattr(p, "tasks", ("classification",))),
                   getattr(p, "task", None), "its class's tasks") for p in adhoc]
    for name, tasks, brings, where in described:
        if task not in tasks and "*" not in tasks and brings != task:
            raise TricksError(f"plugin '{name}' does not apply to the {task} task: it works for {', '.join(tasks)} "
                              f"({where}); leave it out of this run, or run it with --task {tasks[0]}")


def _with_model_provider(names: list[str], model: str | None, catalog: Catalog, adhoc: list[str]) -> list[str]:
    """Add the plugin that builds ``model`` (``--model regnetx_200mf`` brings ``regnet``) unless
    the run already names it or another plugin that provides the model."""
    if not model:
        return names
    provider = catalog.model_provider(model)
    if provider is None or provider in names or provider in adhoc:
        return names
    for name in names:
        info = catalog.plugins.get(name)
        if info is not None and info.installed and "model" in (info.meta("provides") or []):
            return names
    return [*names, provider]


def resolve(
    plugins: list[str | Plugin] | str | None = None,
    recipe: str | Path | dict | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    registries: list[Path] | None = None,
    catalog: Catalog | None = None,
) -> RunConfig:
    """Resolve a run's config from its sources (later wins).

    ``plugins``: names (a list or "a,b") and/or ad-hoc :class:`Plugin` instances; when given,
    the names replace the recipe's list. ``overrides``: core settings (CLI flags).
    ``sets``: ``section.key=value`` strings.
    """
    if isinstance(recipe, (str, Path)):
        recipe = read_recipe(recipe)
    if recipe is not None and not isinstance(recipe, dict):
        raise TricksError(f"recipe must be a YAML file, a run directory or a dict, not {type(recipe).__name__}")
    located = recipe if isinstance(recipe, YamlMapping) else None
    data = check_recipe(recipe or {})

    def at(*keys: Any) -> str:
        return located.at(*keys) if located is not None else "recipe"

    adhoc: list[Plugin] = []
    if isinstance(plugins, str):
        plugins = [p for p in plugins.split(",")]
    if plugins is not None:
        if not isinstance(plugins, (list, tuple)):
            raise TricksError(f"plugins must be a list of names and/or Plugin instances, or 'a,b', not {_kind(plugins)}")
        adhoc = [p for p in plugins if isinstance(p, Plugin)]
        odd = [p for p in plugins if not isinstance(p, (str, Plugin))]
        if odd:
            raise TricksError(f"plugins holds {odd[0]!r}, which is neither a plugin name nor a tricks.Plugin instance")
        names = [p.strip() for p in plugins if isinstance(p, str) and p.strip()]
    else:
        names = list(data.get("plugins") or [])
    catalog = catalog or Catalog(registries)
    names = _with_model_provider(names, _core_value(data, overrides, sets, "model"), catalog, [getattr(p, 'name', '') for p in adhoc])
    names = _with_task_provider(names, _core_value(data, overrides, sets, "task"), catalog, adhoc)
    infos = catalog.resolve(names)
    order = [i.name for i in infos]

    sections: dict[str, dict[str, Any]] = {CORE: dict(data.get(CORE) or {})}
    recipe_own = set(data.get("plugins") or [])
    for key, value in data.items():
        if key in RESERVED:
            continue
        if key not in order:
            if key not in catalog.plugins and key not in recipe_own:
                close = difflib.get_close_matches(key, [*catalog.plugins, CORE], n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise TricksError(f"{at(key)}: config section '{key}' names no plugin{hint}; "
                                  "fix the name or remove the section")
            if plugins is not None:
                continue  # the recipe's section of a plugin this run does not use
            raise TricksError(f"{at(key)}: config section '{key}' names no plugin of this run; "
                              f"add '{key}' to plugins or remove the section")
        sections[key] = dict(value or {})
    # where each value was written: the recipe's line for the message when it is refused
    from_recipe = {(section, key) for section, values in sections.items() for key in values}
    for key, value in (overrides or {}).items():
        if value is not None:
            sections[CORE][key] = value
            from_recipe.discard((CORE, key))
    for item in sets or []:
        section, name, value = parse_set(item)
        if section != CORE and section not in order:
            shown = item if len(item) <= 80 else item[:77] + "..."
            raise TricksError(
                f"--set {shown}: '{section}' is not a plugin of this run (plugins: {', '.join(order) or 'none'}); "
                "add it to --plugins or use core.KEY"
            )
        sections.setdefault(section, {})[name] = value
        from_recipe.discard((section, name))

    def where(section: str) -> Callable[[str], str]:
        return lambda key: located.at(section, key) if located is not None and (section, key) in from_recipe else ""

    core = make_settings(CORE, CoreSettings, sections[CORE], where(CORE))
    _check_tasks(core.task, infos, adhoc)
    settings = {}
    for info in infos:
        cls = info.load()
        settings[info.name] = make_settings(info.name, cls.Settings, sections.get(info.name, {}), where(info.name))
    return RunConfig(order, core, settings, {i.name: i for i in infos}, adhoc)
