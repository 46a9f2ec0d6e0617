"""The one place that knows a run directory: its files, how to read them and how to write them.

A run directory holds::

    config.yaml             the resolved config (plugins, core settings, each plugin's settings, versions)
    metrics.jsonl           one JSON object per finished epoch
    summary.json            what the run ended with (written last)
    checkpoints/last.pt     the state after the last finished epoch: data only (tensors, numbers,
                            strings), loaded with ``weights_only=True``, never a pickled object
    curves.png              the learning curves
    error.txt               the traceback of a run that failed inside a job
    .lock                   held (``flock``) by the process writing the run; holds its PID

Every write is atomic (a temporary ``.NAME.*`` file beside the target, fsync, rename), so a reader
sees a whole file or the previous one. An epoch is committed by one rename, its checkpoint's: the
checkpoint holds the metrics of every finished epoch (and, after the last, the summary), and
``metrics.jsonl``, ``curves.png`` and, last, ``summary.json`` are written from it afterwards. A run
killed between those renames is completed from its checkpoint when it is resumed
(:meth:`RunDir.complete`), so an epoch is either all there or trained again. The training loop writes through :class:`RunDir`; jobs,
ablations, sampling and plugins (a teacher to distil, a model to fine-tune) read through it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from . import atomic
from .errors import TricksError

if TYPE_CHECKING:  # torch is imported only by the methods that need it
    import torch

    from .config import RunConfig

Status = Literal["empty", "started", "interrupted", "finished", "diverged"]


class RunDir:
    """A run directory at ``path`` (which need not exist yet)."""

    CONFIG = Path("config.yaml")
    METRICS = Path("metrics.jsonl")
    SUMMARY = Path("summary.json")
    CHECKPOINT = Path("checkpoints") / "last.pt"
    CURVES = Path("curves.png")
    ERROR = Path("error.txt")
    # Every file the run writes, each atomically through a temporary ``.NAME.*`` file beside it.
    FILES = (CONFIG, METRICS, SUMMARY, CURVES, CHECKPOINT, ERROR)

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def file(self, name: Path) -> Path:
        return self.path / name

    @property
    def checkpoint_path(self) -> Path:
        return self.path / self.CHECKPOINT

    # --- reading -------------------------------------------------------------------------------
    def has_run(self) -> bool:
        """Whether a run was started here (its config was written)."""
        return (self.path / self.CONFIG).is_file()

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.exists()

    def config(self) -> dict[str, Any]:
        """The run's resolved config as a recipe (a mapping; ``tricks.run(RunDir.config())`` repeats it)."""
        from .config import read_recipe

        if not self.has_run():
            raise TricksError(f"{self.path} holds no run (no {self.CONFIG}); start one with --out {self.path}")
        return read_recipe(self.path / self.CONFIG)

    def run_config(self, registries: list[Path] | None = None, overrides: dict[str, Any] | None = None) -> "RunConfig":
        """The run's config resolved again with the plugins installed now (ad-hoc plugins, which
        cannot be re-created from a file, are left out)."""
        from .config import resolve

        recipe = {k: v for k, v in self.config().items() if k != "adhoc_plugins"}
        try:
            return resolve(recipe=recipe, overrides=overrides, registries=registries)
        except TricksError as error:
            raise TricksError(f"cannot resolve the run in {self.path} again: {error}") from None

    def metrics(self) -> list[dict]:
        """The rows of ``metrics.jsonl``, one per finished epoch (empty when there are none); a
        file that is not JSON lines is a TricksError."""
        path = self.path / self.METRICS
        if not path.is_file():
            return []
        return [_json(path, line) for line in _text(path).splitlines() if line.strip()]

    def summary(self) -> dict | None:
        """``summary.json``, or None while the run has not finished; a file that is not JSON is a
        TricksError."""
        path = self.path / self.SUMMARY
        return _json(path, _text(path)) if path.is_file() else None

    def epochs(self) -> int | None:
        """The number of epochs the run was configured for (None without a config)."""
        if not self.has_run():
            return None
        return int((self.config().get("core") or {}).get("epochs", 0)) or None

    def status(self, epochs: int | None = None) -> Status:
        """``empty`` (nothing here), ``started`` (a config but nothing trained: nothing to resume),
        ``diverged`` (stopped by a non-finite loss: see the summary's ``diverged_at``),
        ``interrupted`` (a checkpoint, fewer than ``epochs`` finished epochs, or no summary) or
        ``finished`` (``epochs`` epochs in the metrics and a summary; ``epochs`` defaults to the
        config's)."""
        if not self.has_run():
            return "empty"
        summary = self.summary_or_none()  # a damaged summary is written again from the checkpoint
        if summary is not None and summary.get("status") == "diverged":
            return "diverged"
        if not self.has_checkpoint():
            return "started"
        want = epochs if epochs is not None else self.epochs()
        if summary is not None and len(self.metrics_or_none() or []) >= (want or 0):
            return "finished"
        return "interrupted"

    def lock(self):
        """Hold the run directory's lock (``.lock``, with this process's PID) for as long as the
        returned handle is open; the OS releases it when the process ends. A run directory in use
        by another process is a TricksError naming its PID."""
        return atomic.hold_lock(self.path, "the run directory",
                                "wait for that run to finish, or choose another --out")

    def load_checkpoint(self, map_location: Any = "cpu") -> dict | None:
        """The last checkpoint (None when the run has none); an unreadable file is a TricksError."""
        path = self.checkpoint_path
        return read_checkpoint(path, map_location) if path.exists() else None

    def build_model(self, device: Any = "cpu", registries: list[Path] | None = None, **shape: int) -> "torch.nn.Module":
        """The run's model with its last weights, rebuilt through the run's own plugins and
        settings (a model whose structure changed during the run is the one its checkpoint kept).

        The data shape (``num_classes``, ``in_chans``, ``image_size``) is the one the run
        recorded; pass it to build for other data (weights that do not fit are then an error)."""
        checkpoint = self.load_checkpoint()
        if checkpoint is None:
            raise TricksError(f"the run in {self.path} has no checkpoint ({self.CHECKPOINT}); train it first")
        model = checkpoint_model(checkpoint, str(self.path), device, registries, **shape)
        load_state(model, checkpoint["model"], str(self.checkpoint_path))
        return model.to(device)

    # --- writing (the training loop) --------------------------------------------------------------
    def clean_stale(self) -> None:
        """Remove the temporary files of writes that a killed run never renamed into place."""
        for name in self.FILES:
            target = self.path / name
            if target.parent.is_dir():
                for stale in target.parent.glob(f".{target.name}.*"):
                    stale.unlink(missing_ok=True)

    def write_config(self, cfg: "RunConfig") -> None:
        atomic.write_text(self.path / self.CONFIG, cfg.to_yaml())

    def save_checkpoint(self, payload: dict) -> None:
        atomic.torch_save(payload, self.checkpoint_path)

    def write_metrics(self, history: list[dict]) -> None:
        atomic.write_jsonl(self.path / self.METRICS, history)

    def write_summary(self, summary: dict) -> None:
        atomic.write_json(self.path / self.SUMMARY, summary)

    def commit_epoch(self, payload: dict, curves: Any = None) -> None:
        """Commit a finished epoch: the checkpoint (holding ``history`` and, after the last epoch,
        ``summary``) is renamed into place first, and is the commit; the metrics, ``curves(path)``
        and the summary are then written from it, in that order. :meth:`complete` redoes those after a kill."""
        self.save_checkpoint(payload)
        self._write_from(payload, curves)

    def _write_from(self, checkpoint: dict, curves: Any = None) -> None:
        """The metrics; after the last epoch the curves, and the summary last of all: a summary
        on disk means every file of the run is there."""
        self.write_metrics(checkpoint["history"])
        if checkpoint.get("summary") is not None:
            if curves is not None and checkpoint["history"]:
                curves(self.path / self.CURVES)
            self.write_summary(checkpoint["summary"])

    def complete(self, checkpoint: dict, curves: Any = None) -> bool:
        """Write again, from the committed ``checkpoint``, the files a kill after its rename left
        behind (metrics, summary, curves). True when anything was missing."""
        rows = self.metrics_or_none()
        summary = self.summary_or_none()
        want_summary = checkpoint.get("summary")
        behind = rows != _plain_json(checkpoint["history"]) or (
            want_summary is not None and summary != _plain_json(want_summary))
        missing_curves = (curves is not None and want_summary is not None and checkpoint["history"]
                          and not (self.path / self.CURVES).is_file())
        if behind:
            self._write_from(checkpoint, curves)
        elif missing_curves:
            curves(self.path / self.CURVES)
        return bool(behind or missing_curves)

    def metrics_or_none(self) -> list[dict] | None:
        """The metrics rows, or None when the file is missing or unreadable."""
        try:
            return self.metrics() if (self.path / self.METRICS).is_file() else None
        except TricksError:
            return None

    def summary_or_none(self) -> dict | None:
        try:
            summary = self.summary()
        except TricksError:
            return None
        return summary if isinstance(summary, dict) else None

    def write_error(self, text: str) -> None:
        atomic.write_text(self.path / self.ERROR, text)

    def remove_files(self) -> None:
        """Delete the run's own files, not the folder or its lock (a run that never finished an
        epoch, started again by the process that holds the lock)."""
        import shutil

        for name in self.FILES:
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / self.CHECKPOINT.parent, ignore_errors=True)

    def remove(self) -> None:
        """Delete the run's files (a run started but killed before its first checkpoint)."""
        import shutil

        if self.path.exists():
            shutil.rmtree(self.path)


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TricksError(f"cannot read {path} ({error}); remove it: the run's checkpoint holds what it "
                          "recorded, and --resume writes it again") from None


def _json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as error:
        raise TricksError(f"{path} is not valid JSON ({error}); remove it: the run's checkpoint holds what it "
                          "recorded, and --resume writes it again") from None


def safe_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load`` of data only (``weights_only=True``): tensors, numbers, strings, lists and
    dicts. A file that cannot be read, or that holds pickled objects (which could run code when
    loaded), is a TricksError and nothing in it is run."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses a pickled object by naming its class ("Unsupported global: GLOBAL
        # os.system"); other complaints ("Unsupported operand", "invalid load key") mean the file
        # is not a torch file at all.
        if "GLOBAL" in str(error) or "Unsupported global" in str(error):
            raise TricksError(f"{path} holds pickled objects, which tricks does not load because loading them "
                              "can run code; load only checkpoints that hold data (tricks writes no other kind), "
                              "or re-save the weights as a state dict") from None
        raise TricksError(f"cannot read {path}: it is not a torch file saved with torch.save; remove it, "
                          "or name another file") from None
    except Exception as error:  # truncated, not a torch file, a folder, ...
        raise TricksError(f"cannot read {path} ({type(error).__name__}: {_first_line(error)}); "
                          "remove it, or name another file") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else "unreadable"


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """A tricks checkpoint file, loaded as data only; one that cannot be read, holds objects, or
    is not a checkpoint is a TricksError."""
    import torch

    checkpoint = safe_load(path, map_location)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise TricksError(f"{path} is not a tricks checkpoint (no 'model' and 'config'); remove it, or name another checkpoint")
    if not isinstance(checkpoint["model"], dict) or not isinstance(checkpoint["config"], dict):
        raise TricksError(f"{path} is not a tricks checkpoint ('model' and 'config' must be mappings); "
                          "remove it, or name another checkpoint")
    bad = next((k for k, v in checkpoint["model"].items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise TricksError(f"{path} is not a tricks checkpoint (its weight {bad!r} is not a tensor); "
                          "remove it, or name another checkpoint")
    structure = checkpoint.get("structure") or []
    if not isinstance(structure, list) or not all(
            isinstance(r, dict) and isinstance(r.get("plugin"), str) and "change" in r for r in structure):
        raise TricksError(f"{path} is not a tricks checkpoint (its 'structure' must be a list of "
                          "{{plugin, change}} records); remove it, or name another checkpoint")
    return checkpoint


def plain_data(obj: Any, where: str) -> None:
    """Check that ``obj`` is what a data-only checkpoint may hold (None, booleans, numbers,
    strings, tensors, and lists, tuples and dicts of them); anything else is a TricksError
    naming ``where``."""
    import torch

    def bad(value: Any, path: str) -> str | None:
        if value is None or isinstance(value, (bool, int, float, str, bytes, torch.Tensor, torch.Size,
                                                torch.dtype, torch.device)):
            return None
        if isinstance(value, (list, tuple)):
            return next((b for i, v in enumerate(value) if (b := bad(v, f"{path}[{i}]"))), None)
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, (str, int, float, bool)) and k is not None:
                    return f"{path} has a key of type {type(k).__name__}"
                if (b := bad(v, f"{path}[{k!r}]")):
                    return b
            return None
        return f"{path} is a {type(value).__module__}.{type(value).__qualname__}"

    problem = bad(obj, "it")
    if problem:
        raise TricksError(f"{where} returned what a checkpoint cannot hold ({problem}); return data only: "
                          "tensors, numbers, strings, and lists and dicts of them")


def _plain_json(obj: Any) -> Any:
    """``obj`` as it reads back from a JSON file tricks wrote."""
    return json.loads(atomic.dumps(obj))


def checkpoint_model(checkpoint: dict, source: str, device: Any = "cpu", registries: list[Path] | None = None,
                     **shape: int) -> "torch.nn.Module":
    """The model of a checkpoint, fresh weights: the model its recorded config builds through the
    run's plugins for data of the recorded shape (``shape`` overrides it), with the structural
    changes recorded in the checkpoint replayed by the plugins that made them. Load
    ``checkpoint["model"]`` into it to get the trained weights."""
    from .config import resolve
    from .loop import build_model

    recipe = {k: v for k, v in checkpoint["config"].items() if k != "adhoc_plugins"}
    try:
        cfg = resolve(recipe=recipe, registries=registries)
    except TricksError as error:
        raise TricksError(f"cannot rebuild the model of {source}: {error}") from None
    shape = {**(checkpoint.get("shape") or {}), **{k: v for k, v in shape.items() if v is not None}}
    if not {"num_classes", "in_chans", "image_size"} <= set(shape):
        from .data import load_data

        data = load_data(cfg.core)  # a checkpoint from before the shape was recorded
        shape = {"num_classes": data.num_classes, "in_chans": data.in_chans, "image_size": data.image_size, **shape}
    return build_model(cfg, device, num_classes=shape["num_classes"], in_chans=shape["in_chans"],
                       image_size=shape["image_size"], structure=checkpoint.get("structure") or [],
                       registries=registries, source=source)


def strip_prefix(state: dict) -> dict:
    """Drop a ``module.`` prefix that DistributedDataParallel leaves on every key."""
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def load_state(model: "torch.nn.Module", state: dict, source: str) -> None:
    """Load ``state`` into ``model`` strictly; a shape or key mismatch is a TricksError naming ``source``."""
    import torch

    if not isinstance(state, dict):
        raise TricksError(f"the weights in {source} are not a state dict; use weights saved with torch.save(model.state_dict())")
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise TricksError(f"the weights in {source} are not all tensors ({bad!r} is a {type(state[bad]).__name__}); "
                          "use weights saved with torch.save(model.state_dict())")
    state = strip_prefix(state)
    own = model.state_dict()
    shapes = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
              if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape)]
    if shapes:
        key, got, want = shapes[0]
        raise TricksError(f"the weights in {source} do not fit the model: {key} has shape {list(got)}, the model "
                          f"needs {list(want)}; use weights of the same architecture, classes and input channels")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise TricksError(f"the weights in {source} do not match the model ({what}); use weights of the same architecture")
