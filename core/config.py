"""One run = one resolved config: the core's settings plus one section per plugin.

Sources, later wins: defaults (the core's and each plugin's), a YAML recipe (``--config``),
CLI flags, then ``--set section.key=value``. The resolved config is written to the run
directory as ``config.yaml`` and reads back as a recipe, so any run repeats from it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from .errors import TricksError
from .plugin import Plugin, Settings
from .registry import Catalog, PluginInfo

CORE = "core"
RESERVED = {"plugins", CORE, "versions", "adhoc_plugins"}


class CoreSettings(Settings):
    """The training core's settings (section ``core`` of a config)."""

    model: str = Field("resnet20", description="model name: resnet8/14/20/32/44/56/110, resnet18/34/50 (CIFAR-style), or timm:NAME")
    dataset: str = Field("digits", description="digits (bundled), cifar10, cifar100, npz (a folder of .npz shards) or imagefolder")
    data_dir: str | None = Field(None, description="where the data set lies (not used by digits)")
    download: bool = Field(False, description="allow torchvision to download CIFAR into data_dir")
    train_limit: int | None = Field(None, ge=1, description="use only the first N training examples")
    val_limit: int | None = Field(None, ge=1, description="use only the first N validation examples")
    image_size: int | None = Field(None, ge=8, description="resize inputs to this side (default: the data set's own; 224 for imagefolder)")
    augment: bool = Field(True, description="the data set's standard augmentation (random crop with padding, flip where it applies)")
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

    @field_validator("device")
    @classmethod
    def _device(cls, value):
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("must be auto, cpu, cuda or cuda:N")


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


def _validation_message(section: str, model: type[Settings], error: ValidationError) -> str:
    err = error.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    accepted = ", ".join(model.model_fields)
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, list(model.model_fields), n=1)
        hint = f" (did you mean {section}.{close[0]}?)" if close else ""
        return f"unknown setting '{section}.{key}'{hint}; {section} accepts: {accepted}"
    field_info = model.model_fields.get(key)
    desc = f" ({field_info.description})" if field_info is not None and field_info.description else ""
    return f"bad value for '{section}.{key}': {err['msg']}{desc}"


def make_settings(section: str, model: type[Settings], values: dict[str, Any]) -> Settings:
    try:
        return model(**values)
    except ValidationError as error:
        raise TricksError(_validation_message(section, model, error))


def parse_set(item: str) -> tuple[str, str, Any]:
    """``section.key=value`` (a key without a section is the core's) -> (section, key, value)."""
    if "=" not in item:
        raise TricksError(f"--set {item!r}: expected section.key=value, e.g. --set mixup.alpha=0.4")
    key, raw = item.split("=", 1)
    key = key.strip()
    section, _, name = key.rpartition(".")
    section = section or CORE
    if not name:
        raise TricksError(f"--set {item!r}: expected section.key=value, e.g. --set mixup.alpha=0.4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return section, name, value


def read_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise TricksError(f"config file {path} does not exist; pass a recipe YAML or a run directory")
    except yaml.YAMLError as error:
        raise TricksError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}")
    if not isinstance(data, dict):
        raise TricksError(f"config file {path} must be a mapping (plugins:, core:, one section per plugin)")
    return data


def _model_name(data: dict, overrides: dict | None, sets: list[str] | None) -> str | None:
    """The run's ``model`` setting, from the same sources as :func:`resolve` (later wins)."""
    model = (data.get(CORE) or {}).get("model")
    if (overrides or {}).get("model") is not None:
        model = overrides["model"]
    for item in sets or []:
        section, name, value = parse_set(item)
        if section == CORE and name == "model":
            model = value
    return str(model) if model is not None else None


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
    data = read_recipe(recipe) if isinstance(recipe, (str, Path)) else dict(recipe or {})
    adhoc: list[Plugin] = []
    if isinstance(plugins, str):
        plugins = [p for p in plugins.split(",")]
    if plugins is not None:
        adhoc = [p for p in plugins if isinstance(p, Plugin)]
        names = [p.strip() for p in plugins if isinstance(p, str) and p.strip()]
    else:
        names = list(data.get("plugins") or [])
    catalog = catalog or Catalog(registries)
    names = _with_model_provider(names, _model_name(data, overrides, sets), catalog, [getattr(p, 'name', '') for p in adhoc])
    infos = catalog.resolve(names)
    order = [i.name for i in infos]

    sections: dict[str, dict[str, Any]] = {CORE: dict(data.get(CORE) or {})}
    for key, value in data.items():
        if key in RESERVED:
            continue
        if key not in order:
            if plugins is not None:
                continue  # the recipe's section of a plugin this run does not use
            raise TricksError(f"config section '{key}' names no plugin of this run; add '{key}' to plugins or remove the section")
        if value is not None and not isinstance(value, dict):
            raise TricksError(f"config section '{key}' must be a mapping of settings")
        sections[key] = dict(value or {})
    for key, value in (overrides or {}).items():
        if value is not None:
            sections[CORE][key] = value
    for item in sets or []:
        section, name, value = parse_set(item)
        if section != CORE and section not in order:
            raise TricksError(
                f"--set {item}: '{section}' is not a plugin of this run (plugins: {', '.join(order) or 'none'}); "
                "add it to --plugins or use core.KEY"
            )
        sections.setdefault(section, {})[name] = value

    core = make_settings(CORE, CoreSettings, sections[CORE])
    settings = {}
    for info in infos:
        cls = info.load()
        settings[info.name] = make_settings(info.name, cls.Settings, sections.get(info.name, {}))
    return RunConfig(order, core, settings, {i.name: i for i in infos}, adhoc)
