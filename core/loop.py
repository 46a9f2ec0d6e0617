"""The training loop, in the order things happen.

``train(run_config)`` builds the plugins, the data, the model, optimizer, schedule and loss
through the hooks; restores a checkpoint when resuming; then runs epochs of
``on_batch -> forward -> loss -> backward -> step``, evaluates, lets pruning plugins act,
writes the metrics and an atomic checkpoint, and finally the summary and the curves.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import distributed as dist
from .builtin import CoreDefaults
from .config import CoreSettings, RunConfig
from .data import Data, load_data, make_loaders
from .errors import TricksError
from .hooks import Hooks
from .plots import plot_curves
from .rundir import RunDir, load_state


class Reporter:
    """Where the loop reports progress; the CLI's shows a live bar, this one is silent."""

    def start(self, ctx: "RunContext") -> None: ...
    def epoch_start(self, epoch: int, steps: int) -> None: ...
    def step(self, index: int, loss: torch.Tensor) -> None: ...
    def epoch_end(self, row: dict) -> None: ...
    def finish(self, summary: dict) -> None: ...
    def log(self, message: str) -> None: ...


@dataclass
class RunContext:
    """What every hook receives as ``ctx``: the settings, the data's shape, the live objects."""

    core: CoreSettings
    run_config: RunConfig
    device: torch.device
    rank: int
    world_size: int
    run_dir: Path | None
    num_classes: int
    in_chans: int
    image_size: int
    train_size: int
    steps_per_epoch: int
    epochs: int
    epoch: int = 0
    step: int = 0
    start_epoch: int = 0
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    schedule: Callable[[int, int, float], float] | None = None
    loss_fn: Callable | None = None
    data: Data | None = field(default=None, repr=False)
    reporter: Reporter = field(default_factory=Reporter, repr=False)
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def precision_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.core.precision)

    def settings(self, plugin: str):
        """The resolved settings of a plugin of this run."""
        return self.run_config.settings[plugin]

    def autocast(self):
        """Autocast to the run's precision on its device (a no-op for fp32)."""
        if self.precision_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision_dtype)

    def log(self, message: str) -> None:
        if self.is_main:
            self.reporter.log(message)


def seed_everything(seed: int, epoch: int, rank: int) -> None:
    """Seed torch, numpy and random from (seed, epoch, rank) alone, so that an epoch started
    from a checkpoint draws the same random numbers as it would have uninterrupted."""
    s = (seed * 1_000_003 + (epoch + 1) * 1009 + rank) % (2**63 - 1)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TricksError(f"--device {name} asked for, but torch sees no CUDA device; use --device cpu")
        if name == "cuda":
            name = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(name))
    return torch.device(name)


class Schedule:
    """Sets every parameter group's learning rate to ``f(step, total, base_lr)`` before a step."""

    def __init__(self, optimizer: torch.optim.Optimizer, fn: Callable[[int, int, float], float], total: int):
        self.optimizer, self.fn, self.total = optimizer, fn, total
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def apply(self, step: int) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.fn(step, self.total, group["initial_lr"]))
        return self.optimizer.param_groups[0]["lr"]


def _new_run_dir(cfg: RunConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{stamp}-{'-'.join(cfg.plugins) or 'baseline'}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


def _count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Trainer:
    """One run. ``fit()`` returns the summary dict."""

    def __init__(self, cfg: RunConfig, out: str | Path | None = None, resume: bool = False,
                 reporter: Reporter | None = None, trace: list[str] | None = None):
        self.cfg, self.resume, self.reporter = cfg, resume, reporter or Reporter()
        self.rank, self.world, self.local_rank = dist.setup()
        self.run_dir = Path(out) if out is not None else None
        if self.run_dir is None:
            self.run_dir = dist.broadcast_object(_new_run_dir(cfg) if self.rank == 0 else None)
        self.run = RunDir(self.run_dir)
        self.hooks = Hooks(cfg.instantiate(), core=CoreDefaults())
        self.hooks.trace = trace

    # --- setup ----------------------------------------------------------------------------
    def _prepare_dir(self) -> dict | None:
        run = self.run
        checkpoint = None
        if self.resume:
            if not run.has_run():
                raise TricksError(f"{run.path} holds no run (no config.yaml); start one with --out {run.path}")
            checkpoint = run.load_checkpoint()
            if checkpoint is not None:
                done, epochs = checkpoint["epoch"], self.cfg.core.epochs
                if done >= epochs:
                    raise TricksError(f"the run in {run.path} is finished ({done} of {epochs} epochs); "
                                      f"to train it longer, resume with more epochs: --resume {run.path} --epochs N (N > {done})")
        elif run.has_run() or run.has_checkpoint():
            raise TricksError(f"run directory {run.path} already holds a run; continue it with --resume {run.path} or choose another --out")
        return checkpoint

    def _write_config(self) -> None:
        """The resolved config, written once the run has been set up without error. A resumed
        run first removes the temporary files of writes that a killed run never renamed."""
        if self.rank == 0:
            self.run.path.mkdir(parents=True, exist_ok=True)
            if self.resume:
                self.run.clean_stale()
            self.run.write_config(self.cfg)

    def _build_model(self) -> torch.nn.Module:
        """The model from the ``build_model`` hook; a plugin of the run that provides the model
        but returned None for ``--model`` (it builds other names) is an error, not a silent no-op."""
        model = self.hooks.build_model(self.ctx)
        for name in self.cfg.plugins:
            info = self.cfg.infos.get(name)
            if (info is not None and "model" in (info.meta("provides") or []) and "build_model" in info.hooks
                    and self.hooks.model_provider != name):
                raise TricksError(f"plugin '{name}' cannot build model '{self.cfg.core.model}' (it provides models of its "
                                  f"own: tricks plugins show {name}); choose one of them with --model, or leave {name} out")
        return model

    def _place(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on the run's device, in channels_last when asked."""
        model = model.to(self.ctx.device)
        if self.cfg.core.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The core's model wrappers, re-applied after any structural change."""
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        return model

    def _build_optimization(self) -> None:
        ctx = self.ctx
        ctx.optimizer = self.hooks.configure_optimizer(ctx, ctx.model)
        ctx.schedule = self.hooks.configure_schedule(ctx, ctx.optimizer)
        self.schedule = Schedule(ctx.optimizer, ctx.schedule, ctx.total_steps)
        self.wrapped = self._wrap(ctx.model)

    def _checkpoint(self, history: list[dict], structure_changed: bool) -> None:
        ctx = self.ctx
        states = self.hooks.state_dict(ctx)
        if self.rank != 0:
            return
        payload = {
            "epoch": ctx.epoch + 1,
            "step": ctx.step,
            "model": ctx.model.state_dict(),
            "optimizer": ctx.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "plugins": states,
            "history": history,
            "config": self.cfg.to_dict(),
            "shape": {"num_classes": ctx.num_classes, "in_chans": ctx.in_chans, "image_size": ctx.image_size},
        }
        if structure_changed:
            payload["model_object"] = ctx.model  # the new shapes, since the config alone cannot rebuild them
        self.run.save_checkpoint(payload)

    # --- the run ----------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, core = self.cfg, self.cfg.core
        checkpoint = self._prepare_dir()
        device = pick_device(core.device, self.local_rank)
        seed_everything(core.seed, -1, 0)
        data = load_data(core)
        train_loader, val_loader = make_loaders(data, core, device, self.rank, self.world)
        ctx = self.ctx = RunContext(
            core=core, run_config=cfg, device=device, rank=self.rank, world_size=self.world, run_dir=self.run_dir,
            num_classes=data.num_classes, in_chans=data.in_chans, image_size=data.image_size,
            train_size=data.train_size, steps_per_epoch=len(train_loader), epochs=core.epochs,
            data=data, reporter=self.reporter,
        )
        hooks = self.hooks
        try:
            model = self._build_model()
            structure_changed = False
            if checkpoint is None and core.init_from:
                model, structure_changed = _init_from(model, core.init_from)
            if checkpoint is not None and "model_object" in checkpoint:
                model, structure_changed = checkpoint["model_object"], True
            ctx.model = self._place(model)
            self._build_optimization()
            ctx.loss_fn = hooks.build_loss(ctx)
            self.scaler = torch.amp.GradScaler(device.type) if core.precision == "fp16" else None
            history: list[dict] = []
            if checkpoint is not None:
                ctx.model.load_state_dict(checkpoint["model"])
                ctx.optimizer.load_state_dict(checkpoint["optimizer"])
                if self.scaler is not None and checkpoint.get("scaler"):
                    self.scaler.load_state_dict(checkpoint["scaler"])
                hooks.load_state_dict(ctx, checkpoint.get("plugins", {}))
                history = list(checkpoint["history"])
                ctx.start_epoch, ctx.step = checkpoint["epoch"], checkpoint["step"]
            ctx.epoch = ctx.start_epoch
            self._write_config()
            self.reporter.start(ctx)
            hooks.on_fit_start(ctx)
            for epoch in range(ctx.start_epoch, core.epochs):
                ctx.epoch = epoch
                row = self._epoch(epoch, train_loader, val_loader)
                changes = hooks.prune(ctx, ctx.model)
                if changes:
                    ctx.model = self._place(ctx.model)  # new layers may have been built on the host
                    self._build_optimization()
                    structure_changed = True
                    row["params"] = _count_params(ctx.model)
                hooks.on_epoch_end(ctx, epoch, row)
                history.append(row)
                self._checkpoint(history, structure_changed)
                if self.rank == 0:
                    self.run.write_metrics(history)
                self.reporter.epoch_end(row)
            summary = self._summary(history)
            hooks.on_fit_end(ctx, summary)
            if self.rank == 0:
                self.run.write_summary(summary)
                if history and core.curves:
                    plot_curves(history, self.run.file(RunDir.CURVES), title=" + ".join(cfg.plugins) or "baseline")
            self.reporter.finish(summary)
            return summary
        except BaseException as error:
            hooks.on_exception(ctx, error)
            raise

    def _epoch(self, epoch: int, train_loader, val_loader) -> dict:
        ctx, hooks, core = self.ctx, self.hooks, self.cfg.core
        seed_everything(core.seed, epoch, self.rank)
        train_loader.set_epoch(epoch)
        hooks.on_epoch_start(ctx, epoch)
        self.reporter.epoch_start(epoch, len(train_loader))
        model, optimizer, loss_fn, scaler = self.wrapped, ctx.optimizer, ctx.loss_fn, self.scaler
        model.train()
        loss_sum = torch.zeros((), device=ctx.device, dtype=torch.float64)
        seen, lr = 0, 0.0
        dist.synchronize(ctx.device)
        start = time.perf_counter()
        for index, batch in enumerate(train_loader):
            batch = hooks.on_batch(ctx, batch)
            lr = self.schedule.apply(ctx.step)
            with ctx.autocast():
                loss = loss_fn(model(batch["input"]), batch)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            n = len(batch["input"])
            loss_sum += loss.detach() * n
            seen += n
            ctx.step += 1
            self.reporter.step(index, loss)
        dist.synchronize(ctx.device)
        train_seconds = time.perf_counter() - start
        loss_sum, seen_all = dist.reduce_sum([loss_sum, float(seen)], ctx.device)
        model = ctx.model
        dist.broadcast_buffers(model)
        model.eval()
        with torch.no_grad():
            stats = hooks.evaluate(ctx, model, val_loader)
        n = stats.pop("n")
        keys = list(stats)
        reduced = dist.reduce_sum([stats[k] for k in keys] + [float(n)], ctx.device)
        metrics = {f"val_{k}": v / reduced[-1] for k, v in zip(keys, reduced[:-1])}
        hooks.on_evaluate_end(ctx, metrics)
        elapsed = time.perf_counter() - start
        return {
            "epoch": epoch + 1,
            "step": ctx.step,
            "train_loss": loss_sum / seen_all,
            **metrics,
            "lr": lr,
            "epoch_seconds": elapsed,
            "images_per_second": seen_all / train_seconds,
        }

    def _summary(self, history: list[dict]) -> dict:
        ctx = self.ctx
        best = max(history, key=lambda r: r.get("val_acc", 0.0)) if history else {}
        return {
            "status": "complete",
            "final_val_acc": history[-1].get("val_acc") if history else None,
            "final_val_loss": history[-1].get("val_loss") if history else None,
            "best_val_acc": best.get("val_acc"),
            "best_epoch": best.get("epoch"),
            "epochs": ctx.epochs,
            "plugins": list(self.cfg.plugins),
            "versions": self.cfg.versions,
            "model": ctx.core.model,
            "dataset": ctx.core.dataset,
            "params": _count_params(ctx.model),
            "seed": ctx.core.seed,
            "device": str(ctx.device),
            "precision": ctx.core.precision,
            "world_size": self.world,
            "train_seconds": sum(r["epoch_seconds"] for r in history),
            "run_dir": str(self.run_dir),
        }


def _init_from(model: torch.nn.Module, source: str) -> tuple[torch.nn.Module, bool]:
    """``core.init_from``: the model starts from the last weights of another run (fine-tuning, a
    job item that depends on an earlier one). A run whose structure changed hands on its model."""
    run = RunDir(source)
    checkpoint = run.load_checkpoint()
    if checkpoint is None:
        raise TricksError(f"core.init_from={source}: no checkpoint there ({RunDir.CHECKPOINT}); "
                          "name a run directory that has trained at least one epoch")
    changed = "model_object" in checkpoint
    if changed:
        model = checkpoint["model_object"]
    load_state(model, checkpoint["model"], str(run.checkpoint_path))
    return model, changed


def build_model(cfg: RunConfig, device: str | torch.device = "cpu", *, num_classes: int, in_chans: int,
                image_size: int, reporter: Reporter | None = None) -> torch.nn.Module:
    """The model a run with config ``cfg`` builds for data of this shape, through its plugins'
    ``build_model`` hooks and the core's provider, with fresh weights (no data is loaded)."""
    hooks = Hooks(cfg.instantiate(), core=CoreDefaults())
    ctx = RunContext(core=cfg.core, run_config=cfg, device=torch.device(device), rank=0, world_size=1, run_dir=None,
                     num_classes=num_classes, in_chans=in_chans, image_size=image_size, train_size=0,
                     steps_per_epoch=1, epochs=cfg.core.epochs, reporter=reporter or Reporter())
    with torch.random.fork_rng(devices=[]):
        model = hooks.build_model(ctx)
    if model is None:
        raise TricksError(f"no plugin of the run built the model '{cfg.core.model}'")
    return model


def train(cfg: RunConfig, out: str | Path | None = None, resume: bool = False,
          reporter: Reporter | None = None, trace: list[str] | None = None) -> dict:
    """Run one training job and return its summary (see :class:`Trainer`)."""
    return Trainer(cfg, out, resume, reporter, trace).fit()
