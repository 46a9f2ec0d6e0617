"""The one place that knows a run directory: its files, how to read them and how to write them.

A run directory holds::

    config.yaml             the resolved config (plugins, core settings, each plugin's settings, versions)
    metrics.jsonl           one JSON object per finished epoch
    summary.json            what the run ended with (written last)
    checkpoints/last.pt     the state after the last finished epoch
    curves.png              the learning curves
    error.txt               the traceback of a run that failed inside a job

Every write is atomic (a temporary ``.NAME.*`` file beside the target, fsync, rename), so a reader
sees a whole file or the previous one. The training loop writes through :class:`RunDir`; jobs,
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

Status = Literal["empty", "started", "interrupted", "finished"]


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
        return self.checkpoint_path.is_file()

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
        """The rows of ``metrics.jsonl``, one per finished epoch (empty when there are none)."""
        path = self.path / self.METRICS
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def summary(self) -> dict | None:
        """``summary.json``, or None while the run has not finished."""
        path = self.path / self.SUMMARY
        return json.loads(path.read_text()) if path.is_file() else None

    def epochs(self) -> int | None:
        """The number of epochs the run was configured for (None without a config)."""
        if not self.has_run():
            return None
        return int((self.config().get("core") or {}).get("epochs", 0)) or None

    def status(self, epochs: int | None = None) -> Status:
        """``empty`` (nothing here), ``started`` (a config but nothing trained: nothing to resume),
        ``interrupted`` (a checkpoint, fewer than ``epochs`` finished epochs, or no summary) or
        ``finished`` (``epochs`` epochs in the metrics and a summary; ``epochs`` defaults to the
        config's)."""
        if not self.has_run():
            return "empty"
        if not self.has_checkpoint():
            return "started"
        want = epochs if epochs is not None else self.epochs()
        if self.summary() is not None and len(self.metrics()) >= (want or 0):
            return "finished"
        return "interrupted"

    def load_checkpoint(self, map_location: Any = "cpu") -> dict | None:
        """The last checkpoint (None when the run has none); an unreadable file is a TricksError."""
        path = self.checkpoint_path
        return read_checkpoint(path, map_location) if path.is_file() else None

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

    def write_error(self, text: str) -> None:
        atomic.write_text(self.path / self.ERROR, text)

    def remove(self) -> None:
        """Delete the run's files (a run started but killed before its first checkpoint)."""
        import shutil

        if self.path.exists():
            shutil.rmtree(self.path)


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """A tricks checkpoint file; one that cannot be read, or is not a checkpoint, is a TricksError."""
    import torch

    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # truncated, not a torch file, ...
        raise TricksError(f"cannot read the checkpoint {path} ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else 'unreadable'}); "
                          "remove it, or name another checkpoint") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise TricksError(f"{path} is not a tricks checkpoint (no 'model' and 'config'); remove it, or name another checkpoint")
    return checkpoint


def checkpoint_model(checkpoint: dict, source: str, device: Any = "cpu", registries: list[Path] | None = None,
                     **shape: int) -> "torch.nn.Module":
    """The model of a checkpoint, fresh weights: the object it kept after a structural change, or
    the model its recorded config builds through the run's plugins for data of the recorded shape
    (``shape`` overrides it). Load ``checkpoint["model"]`` into it to get the trained weights."""
    if "model_object" in checkpoint:
        return checkpoint["model_object"]
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
                       image_size=shape["image_size"])


def strip_prefix(state: dict) -> dict:
    """Drop a ``module.`` prefix that DistributedDataParallel leaves on every key."""
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def load_state(model: "torch.nn.Module", state: dict, source: str) -> None:
    """Load ``state`` into ``model`` strictly; a shape or key mismatch is a TricksError naming ``source``."""
    import torch

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
