"""The plugin test kit: what a plugin's tests need, for the project's plugins and third-party ones.

* :func:`check_plugin` asserts the contract every plugin keeps (installed, hooks, settings,
  README card, a run in each precision, an exact resume) and names the plugin and the point
  that failed. The project's contract test calls it for every registered plugin; a plugin's
  own tests call it once.
* :func:`make_ctx` makes a real :class:`tricks.RunContext` to call a hook without a run.
* :func:`tiny_run` trains a run that finishes in seconds on a CPU and returns its
  :class:`tricks.RunDir`.
* :class:`BatchWatcher` is an ad-hoc plugin that records the training batches as the plugins
  under test hand them on, to check what a plugin did to the batch in a real run.
* :func:`call_wrapper` drives a ``wrapper=True`` hook implementation as pluggy does.

Importing this module does not import torch; the functions that train do.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import unquote, urlparse

from .errors import PluginHookError, TricksError
from .hookspecs import RULES, hookimpl
from .plugin import Plugin, implemented_hooks
from .rundir import RunDir

__all__ = ["TINY", "BatchWatcher", "call_wrapper", "check_plugin", "make_ctx", "one_torch_thread", "tiny_run"]

# Core settings of a run that finishes in seconds on 2 CPU cores: 256 digits in batches of 32
# (8 steps an epoch), 128 to evaluate, the 8-layer CIFAR ResNet.
TINY = dict(model="resnet8", batch_size=32, train_limit=256, val_limit=128, device="cpu")

# The headings a plugin's README card needs (searched for, case-insensitively, in its headings).
README_SECTIONS = {
    "the paper's claim": r"\bclaims?\b",
    "the defaults": r"\bdefaults?\b",
    "what we measured": r"^what we measured\b",
}

# Metrics columns that time the run: they differ between any two runs.
CLOCK_COLUMNS = {"epoch_seconds", "images_per_second", "train_seconds"}


# --- hooks without a run ------------------------------------------------------------------------


def make_ctx(*, plugins: Sequence[str] = (), set: list[str] | None = None, num_classes: int = 10,
             in_chans: int = 1, image_size: int = 8, device: Any = "cpu", **fields: Any):
    """A real :class:`tricks.RunContext` for calling a hook without a run, shaped like the digits.

    ``plugins`` and ``set`` resolve ``ctx.run_config`` as a run would (``ctx.settings(name)``).
    Other keywords are fields of the context (``epoch=3``, ``step=10``, ``train_size``,
    ``steps_per_epoch``, ``optimizer``, a model object as ``model``) or core settings
    (``model="resnet20"``, ``precision="bf16"``, ``lr=0.4``); ``epochs`` sets both.
    Messages the hook logs with ``ctx.log`` are collected in ``ctx.logs``.
    """
    import torch

    from .config import CoreSettings, resolve
    from .loop import Reporter, RunContext

    context_fields = {f for f in RunContext.__dataclass_fields__ if f not in ("core", "run_config")}
    core = {k: v for k, v in fields.items() if k in CoreSettings.model_fields and not (k == "model" and not isinstance(v, str))}
    context = {k: v for k, v in fields.items() if k in context_fields and k not in core}
    unknown = fields.keys() - core.keys() - context.keys()
    if unknown:
        raise TypeError(f"make_ctx: unknown field {sorted(unknown)[0]!r}; pass RunContext fields or core settings")
    cfg = resolve(plugins=list(plugins), overrides={"device": str(torch.device(device)), **core}, sets=set)

    class Collect(Reporter):
        def __init__(self):
            self.lines: list[str] = []

        def log(self, message: str) -> None:
            self.lines.append(message)

    reporter = Collect()
    train_size = context.pop("train_size", 256)
    context.setdefault("steps_per_epoch", max(1, math.ceil(train_size / cfg.core.batch_size)))
    context = {"rank": 0, "world_size": 1, "run_dir": None, **context}
    ctx = RunContext(core=cfg.core, run_config=cfg, device=torch.device(device), num_classes=num_classes,
                     in_chans=in_chans, image_size=image_size, train_size=train_size, epochs=cfg.core.epochs,
                     reporter=reporter, **context)
    ctx.logs = reporter.lines
    return ctx


def call_wrapper(wrapper: Iterator, inner: Any) -> Any:
    """What a ``wrapper=True`` hook implementation makes of ``inner``, driven as pluggy drives it:
    ``call_wrapper(plugin.build_loss(ctx), base_loss)`` returns the wrapped loss."""
    try:
        next(wrapper)
    except StopIteration:
        raise AssertionError("the wrapper returned before its `yield`; a wrapper must `result = yield` once") from None
    try:
        wrapper.send(inner)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("the wrapper yielded twice; a wrapper must `result = yield` once")


# --- runs ------------------------------------------------------------------------------------------


def tiny_run(plugins: Sequence[str | Plugin] | str | None = None, *, out: str | Path, epochs: int = 1,
             set: list[str] | None = None, config: dict | None = None, reporter: Any = None, **core: Any) -> RunDir:
    """Train a run that finishes in seconds on a CPU (:data:`TINY`: resnet8, batches of 32,
    256 training and 128 validation digits) and return its run directory.

    ``plugins``: names and/or ad-hoc plugin instances (such as a :class:`BatchWatcher`); None
    keeps the recipe's list (none without a recipe).
    ``set``: ``section.key=value`` strings; ``config``: a recipe mapping (``{"mixup": {"alpha": 1}}``);
    other keywords: core settings, which replace TINY's (``model="anynet"``, ``precision="bf16"``).
    """
    from .api import run

    plugins = plugins if plugins is None or isinstance(plugins, str) else list(plugins)
    run(config, plugins=plugins, set=set, out=out, reporter=reporter, **{**TINY, "epochs": epochs, **core})
    return RunDir(out)


class BatchWatcher(Plugin):
    """An ad-hoc plugin that records every training batch as the plugins under test hand it on.

    Ad-hoc plugins run after the named ones, so the watcher sees what they made of the batch::

        watcher = BatchWatcher()
        tiny_run(plugins=["cutout", watcher], out=tmp_path / "run")
        watcher.inputs      # one tensor per training step, as the model received it

    By default it keeps a detached copy of every tensor of the batch (``watcher.batches``,
    one dict per step). ``record`` keeps a statistic instead (``BatchWatcher(lambda b:
    b["input"].std().item())``), which saves memory in long runs. ``watcher.steps`` holds
    ``(epoch, step)`` of each record.
    """

    def __init__(self, record: Callable[[dict], Any] | None = None):
        super().__init__()
        self.record = record
        self.batches: list[Any] = []
        self.steps: list[tuple[int, int]] = []

    @hookimpl
    def on_batch(self, ctx, batch):
        if self.record is not None:
            self.batches.append(self.record(batch))
        else:
            self.batches.append({k: v.detach().clone() if hasattr(v, "detach") else v for k, v in batch.items()})
        self.steps.append((ctx.epoch, ctx.step))

    @property
    def inputs(self) -> list:
        return [b["input"] for b in self.batches]

    @property
    def targets(self) -> list:
        return [b["target"] for b in self.batches]


# --- the contract ------------------------------------------------------------------------------


def check_plugin(plugin: type[Plugin] | str, *, precisions: Sequence[str] = ("fp32", "bf16"), resume: bool = True,
                 workdir: str | Path | None = None) -> None:
    """Assert the contract every tricks plugin keeps; an AssertionError names the plugin and the point.

    ``plugin`` is the plugin class or its short name (its entry point's name). The points, in order:

    1. it is installed: an entry point in group ``tricks.plugins`` names the class (for a plugin of
       the registry, the registry's entry point, declared by the registry's distribution);
    2. its hooks are declared hookspecs whose arguments the implementations accept, and, for a
       plugin of the registry, exactly the registry's ``hooks``; a third-party plugin describes
       itself with its class attributes (``summary`` or a docstring, tuples of names);
    3. every setting has a default and a description, and the defaults validate;
    4. its README is a plugin card: the paper named (with its arXiv id) when the registry names
       one, and sections on the paper's claim, the defaults and "What we measured";
    5. one epoch with only this plugin, its ``example_settings``, ``example_model`` and
       ``example_core`` (a task plugin's task and data set), trains
       in each of ``precisions`` with finite losses;
    6. with ``resume``: a 2-epoch run stopped when its second epoch starts and resumed ends with the
       metrics of an uninterrupted one (same columns, ``step`` and ``val_acc`` equal, losses
       within 1e-6, the clock columns left out).

    Every run is tiny (:data:`TINY`) and trains on one torch thread, under ``workdir`` (a fresh
    temporary folder when None, removed at the end).
    """
    name, cls, info = _installed(plugin)
    _check_hooks(name, cls, info)
    _check_settings(name, cls)
    _check_readme(name, info)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tricks-check-"))
        Path(workdir).mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
        stack.enter_context(one_torch_thread())
        _check_runs(name, cls, work, tuple(precisions), resume)


def _fail(name: str, point: str, detail: str):
    raise AssertionError(f"plugin '{name}': {point}: {detail}")


def _installed(plugin: type[Plugin] | str):
    """(name, class, PluginInfo) of an installed plugin, from its name or its class."""
    from .registry import GROUP, Catalog

    catalog = Catalog()
    if isinstance(plugin, str):
        name, info = plugin, catalog.plugins.get(plugin)
        if info is None or not info.installed:
            hint = info.install_command() if info is not None else "pip install -e the plugin's package"
            _fail(name, "installed", f"no entry point '{name}' in group {GROUP}; install it: {hint}")
    else:
        target = f"{plugin.__module__}:{plugin.__qualname__}"
        found = [i for i in catalog.plugins.values() if i.installed and i.entry_point.value.strip() == target]
        if not found:
            _fail(plugin.__name__, "installed", f"no entry point in group {GROUP} names {target}; declare "
                  f"[project.entry-points.\"{GROUP}\"] NAME = \"{target}\" in pyproject.toml and pip install -e the package")
        info = found[0]
        name = info.name
    try:
        cls = info.load()
    except TricksError as error:
        _fail(name, "installed", str(error))
    if not isinstance(plugin, str) and cls is not plugin:
        _fail(name, "installed", f"the entry point loads {cls!r}, not {plugin!r}")
    entry = info.entry
    if entry is not None:
        if info.entry_point.value != entry.entry_point:
            _fail(name, "installed", f"the installed entry point {info.entry_point.value} is not the registry's "
                  f"{entry.entry_point}; reinstall it: {info.install_command()}")
        try:
            declared = metadata.distribution(entry.distribution).entry_points.select(group=GROUP, name=name)
        except metadata.PackageNotFoundError:
            declared = ()
        if not declared:
            _fail(name, "installed", f"the registry's distribution {entry.distribution} does not declare the entry "
                  f"point; reinstall it: {info.install_command()}")
    return name, cls, info


def _check_hooks(name: str, cls: type, info) -> None:
    import pluggy

    from .hooks import Hooks

    implemented = implemented_hooks(cls)
    if not implemented:
        _fail(name, "hooks", "the class implements no hook (no method marked @tricks.hookimpl)")
    unknown = [h for h in implemented if h not in RULES]
    if unknown:
        _fail(name, "hooks", f"{', '.join(unknown)} is not a hook of tricks; the hooks are: {', '.join(RULES)}")
    if info.entry is not None and sorted(info.entry.hooks) != implemented:
        _fail(name, "hooks", f"registry.yaml lists {sorted(info.entry.hooks)}, the class implements {implemented}; "
              "make the registry's hooks list what the class implements")
    if info.entry is None:
        if not info.summary:
            _fail(name, "description", "a third-party plugin needs a `summary` class attribute or a docstring")
        for key in ("provides", "conflicts", "requires", "after", "before"):
            value = getattr(cls, key)
            if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
                _fail(name, "description", f"class attribute {key} must be a tuple of names, got {value!r}")
    try:
        instance = cls()
    except Exception as error:
        _fail(name, "hooks", f"{cls.__name__}() with the default settings fails: {type(error).__name__}: {error}")
    try:
        Hooks([(name, instance)])
    except (TricksError, pluggy.PluginValidationError) as error:
        _fail(name, "hooks", "; ".join(str(error).splitlines()))


def _check_settings(name: str, cls: type) -> None:
    for key, field in cls.Settings.model_fields.items():
        if field.is_required():
            _fail(name, "settings", f"{name}.{key} has no default")
        if not (field.description and field.description.strip()):
            _fail(name, "settings", f"{name}.{key} has no description (Field(..., description=...))")
    try:
        defaults = cls.Settings()
        again = cls.Settings(**defaults.model_dump())
    except Exception as error:
        _fail(name, "settings", f"the defaults do not validate: {error}")
    if again != defaults:
        _fail(name, "settings", f"the defaults {defaults!r} read back as {again!r}")
    from .config import resolve

    task = (getattr(cls, "example_core", None) or {}).get("task")  # a task plugin resolves in its task
    resolved = resolve(plugins=[name], overrides={"task": task} if task else None).settings[name]
    if resolved != defaults:
        _fail(name, "settings", f"a run resolves the settings to {resolved!r}, not the defaults {defaults!r}")


def _headings(text: str) -> list[str]:
    """The Markdown headings of ``text``, leaving out ``#`` lines inside fenced code."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6}\s+(.+)$", prose, flags=re.MULTILINE)]


def _readme(info) -> tuple[str | None, str]:
    """The plugin's README and where it was read: the registry's path for a plugin of the registry;
    else the package folder of an editable install, else the distribution's long description."""
    if info.entry is not None:
        path = info.root / info.entry.path / "README.md"
        return (path.read_text() if path.is_file() else None), str(path)
    dist = getattr(info.entry_point, "dist", None)
    if dist is None:
        return None, "its distribution (none found for the entry point)"
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct.get("dir_info", {}).get("editable") and direct.get("url", "").startswith("file:"):
        path = Path(unquote(urlparse(direct["url"]).path)) / "README.md"
        if path.is_file():
            return path.read_text(), str(path)
    text = dist.metadata.get("Description") or dist.metadata.get_payload()
    return (text or None), f"the long description of {dist.metadata['Name']} (readme = \"README.md\" in pyproject.toml)"


def _check_readme(name: str, info) -> None:
    text, where = _readme(info)
    if text is None:
        _fail(name, "README", f"no README at {where}")
    paper = info.entry.paper if info.entry is not None else None
    if paper is not None:
        if paper.title.lower() not in text.lower():
            _fail(name, "README", f"{where} does not name the paper {paper.title!r}")
        if paper.arxiv and paper.arxiv not in text:
            _fail(name, "README", f"{where} does not give the paper's arXiv id {paper.arxiv}")
    headings = [h.lower() for h in _headings(text)]
    for section, pattern in README_SECTIONS.items():
        if not any(re.search(pattern, h) for h in headings):
            _fail(name, "README", f"{where} lacks a section on {section} (a heading matching {pattern!r})")


class _Interrupted(Exception):
    """Raised by :class:`_StopAtEpoch` to stop a run."""


class _StopAtEpoch(Plugin):
    """Stop the run when epoch ``epoch`` (0-based) starts: its checkpoint holds the epochs before."""

    tasks = ("*",)  # an observer of the loop: it works in every task

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    @hookimpl
    def on_epoch_start(self, ctx, epoch):
        if epoch == self.epoch:
            raise _Interrupted(f"stopped at the start of epoch {epoch}")


@contextlib.contextmanager
def one_torch_thread():
    """Train in this process on one thread (tiny runs are fastest so on shared cores, and runs
    compared for equality need the same count), then restore the count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_runs(name: str, cls: type, work: Path, precisions: tuple[str, ...], resume: bool) -> None:
    from .api import run

    example = cls.example_settings(work / "example")
    core = {**TINY, "model": cls.example_model or TINY["model"], "curves": False, **(getattr(cls, "example_core", None) or {})}

    def train(point: str, out: Path, epochs: int, precision: str, extra: tuple = ()) -> RunDir:
        try:
            run({name: example}, plugins=[name, *extra], out=out, **{**core, "epochs": epochs, "precision": precision})
        except PluginHookError as error:
            if isinstance(error.error, _Interrupted):
                return RunDir(out)
            _fail(name, point, str(error))
        except Exception as error:
            _fail(name, point, f"{type(error).__name__}: {error}")
        return RunDir(out)

    from .registry import Catalog

    task = core.get("task", "classification")
    provider = Catalog().task_provider(task) if task != "classification" else None
    brought = [provider] if provider and provider != name else []  # --task NAME brings its plugin

    def rows_of(point: str, done: RunDir, epochs: int) -> list[dict]:
        rows = done.metrics()
        if len(rows) != epochs:
            _fail(name, point, f"{len(rows)} rows in {done.path / RunDir.METRICS}, expected {epochs}")
        for row in rows:
            for key, value in row.items():
                if "loss" in key and not math.isfinite(value):
                    _fail(name, point, f"{key} is {value} in epoch {row['epoch']}")
        plugins = done.config()["plugins"]
        if plugins != [name] and sorted(plugins) != sorted([name, *brought]):
            _fail(name, point, f"the run's plugins are {plugins}, expected only [{name!r}]"
                  + (f" and the plugin of its task ({brought[0]})" if brought else ""))
        return rows

    first = precisions[0] if precisions else "fp32"
    whole = None
    for precision in precisions:
        epochs = 2 if resume and precision == first else 1  # the first precision's run is also the resume's reference
        point = f"{epochs} epoch{'s' * (epochs > 1)} in {precision}"
        rows = rows_of(point, train(point, work / precision, epochs, precision), epochs)
        whole = rows if epochs == 2 else whole
    if not resume:
        return
    if whole is None:
        whole = rows_of(f"2 epochs in {first}", train(f"2 epochs in {first}", work / first, 2, first), 2)

    point = f"resume ({first})"
    stopped = train(point, work / "resumed", 2, first, extra=(_StopAtEpoch(1),))
    if stopped.status() != "interrupted" or len(stopped.metrics()) != 1:
        _fail(name, point, f"a run stopped at the start of epoch 2 left status {stopped.status()!r} with "
              f"{len(stopped.metrics())} metrics rows, expected 'interrupted' with 1")
    try:
        run(resume=stopped.path)
    except Exception as error:
        _fail(name, point, f"resuming {stopped.path} failed: {type(error).__name__}: {error}")
    resumed = rows_of(point, stopped, 2)
    for row, want in zip(resumed, whole):
        epoch = want["epoch"]
        if set(row) != set(want):
            _fail(name, point, f"epoch {epoch}: the resumed run's columns {sorted(row)} differ from an "
                  f"uninterrupted run's {sorted(want)}")
        for key in sorted(set(want) - CLOCK_COLUMNS):
            a, b = row[key], want[key]
            same = (abs(a - b) <= 1e-6 * max(1.0, abs(b))) if "loss" in key else a == b
            if not same:
                _fail(name, point, f"epoch {epoch}: {key} is {a} after the resume, {b} uninterrupted; keep the "
                      "plugin's state in the checkpoint (state_dict/load_state_dict hooks) and draw random "
                      "numbers from torch's global generators")
