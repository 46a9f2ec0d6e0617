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
from .data import Data
from .errors import Diverged, TricksError
from .hooks import Hooks
from .plots import plot_curves
from .rundir import RunDir, load_state, plain_data


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
    # the run's hooks (tricks.hooks.Hooks): a plugin that must call a hook again, on another
    # model, goes through it (ema evaluates its averaged weights with the run's ``evaluate``)
    hooks: Any = field(default=None, repr=False)
    # the validation metric the run is judged by (higher is better): the data set's ``metric``
    metric: str = "val_acc"

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
        self.structure: list[dict] = []  # the structural changes made so far, as data (see hookspecs.prune)
        self.lock = None

    # --- setup ----------------------------------------------------------------------------
    def _prepare_dir(self) -> dict | None:
        """Lock the run directory, check it can hold this run, and read the checkpoint to resume."""
        run = self.run
        if self.rank == 0:
            self.created = not run.path.exists()
            self.lock = run.lock()  # also refuses an --out that is a file or cannot be written
            run.clean_stale()  # temporary files of writes a killed run never renamed: no one else writes here
        checkpoint = None
        if self.resume:
            if not run.has_run():
                raise TricksError(f"{run.path} holds no run (no config.yaml); start one with --out {run.path}")
            if run.status() == "diverged":
                raise TricksError(f"the run in {run.path} diverged ({(run.summary() or {}).get('message', '')}); it "
                                  f"cannot go on from there: start a new run with --config {run.path / RunDir.CONFIG} "
                                  "and a lower --lr (or warmup), and another --out")
            self._refuse_changes(run.config())
            checkpoint = run.load_checkpoint()
            if checkpoint is not None:
                done, epochs = checkpoint["epoch"], self.cfg.core.epochs
                if done >= epochs:
                    self.finished = checkpoint
                    return checkpoint
        elif run.has_run() or run.has_checkpoint():
            if run.has_checkpoint() or run.summary_or_none() is not None:
                raise TricksError(f"run directory {run.path} already holds a run; continue it with --resume {run.path} "
                                  "or choose another --out")
            # A run that never finished an epoch (it failed, or was killed, in its first): nothing
            # of it was trained, and the lock says no process is writing it.
            self.reporter.log(f"{run.path} held a run that never finished an epoch; starting it again")
            run.remove_files()
        return checkpoint

    def _take_data(self, data) -> None:
        """Make ``data`` the run's data set: the context's shape of the data follows it."""
        ctx = self.ctx
        ctx.data = data
        ctx.num_classes, ctx.in_chans, ctx.image_size = data.num_classes, data.in_chans, data.image_size
        ctx.train_size, ctx.metric = data.train_size, getattr(data, "metric", "val_acc")

    # Core settings a resumed run may change: how long it trains and where, and what it prints.
    RESUMABLE = {"epochs", "device", "workers", "log_every", "curves"}

    def _refuse_changes(self, recorded: dict) -> None:
        """Resuming continues the run as it was configured: the plugins, the model, the data and
        every setting but the ones in RESUMABLE must be those the earlier epochs used."""
        import yaml

        now = yaml.safe_load(self.cfg.to_yaml())
        path = self.run.path
        new_run = (f"to train with the change, start a new run: tricks run --config {path / RunDir.CONFIG} "
                   f"(plus the change) --out NEW, with --set core.init_from={path} to start from its weights")
        if list(recorded.get("plugins") or []) != list(now.get("plugins") or []):
            raise TricksError(f"--resume cannot change the plugins ({','.join(recorded.get('plugins') or []) or 'none'} -> "
                              f"{','.join(now.get('plugins') or []) or 'none'}): the earlier epochs trained without that; "
                              + new_run)
        sections = ["core"] + [n for n in now.get("plugins") or []]
        for section in sections:
            old, new = recorded.get(section) or {}, now.get(section) or {}
            if not isinstance(old, dict):
                continue
            for key, value in old.items():
                if section == "core" and key in self.RESUMABLE:
                    continue
                if key in new and new[key] != value:
                    raise TricksError(f"--resume cannot change {section}.{key} ({value!r} -> {new[key]!r}): the earlier "
                                      f"epochs used {value!r}; " + new_run)

    def _write_config(self) -> None:
        """The resolved config, written once the run has been set up without error."""
        if self.rank == 0:
            self.run.path.mkdir(parents=True, exist_ok=True)
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

    def _commit(self, history: list[dict], summary: dict | None) -> None:
        """Commit the epoch just finished: one checkpoint holding everything, then the files
        written from it (see RunDir.commit_epoch)."""
        ctx = self.ctx
        states = self.hooks.state_dict(ctx)
        if self.rank != 0:
            return
        for name, state in states.items():
            plain_data(state, f"plugin '{name}' state_dict")
        payload = {
            "epoch": ctx.epoch + 1,
            "step": ctx.step,
            "model": ctx.model.state_dict(),
            "optimizer": ctx.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "plugins": states,
            "history": history,
            "summary": summary,
            "structure": self.structure,
            "start_size": self.start_size,
            "config": self.cfg.to_dict(),
            "shape": {"num_classes": ctx.num_classes, "in_chans": ctx.in_chans, "image_size": ctx.image_size},
        }
        self.run.commit_epoch(payload, self._curves())

    def _curves(self):
        """What draws curves.png at the end of the run (None when the run asks for none)."""
        if not self.cfg.core.curves:
            return None
        title = " + ".join(self.cfg.plugins) or "baseline"
        return lambda path, history=None: plot_curves(self._history, path, title=title)

    def _record_structure(self, changes: list[tuple[str, Any]]) -> None:
        """Record each structural change as data, and check that replaying every record on a
        freshly built model gives exactly the shapes of the model the plugins changed."""
        ctx = self.ctx
        for name, change in changes:
            plain_data(change, f"plugin '{name}' prune")
            if not self.hooks.can_replay(name):
                raise TricksError(f"plugin '{name}' changed the model's structure but implements no replay_structure, "
                                  "so the changed model could not be rebuilt on resume; implement it "
                                  "(see tricks.hookspecs.replay_structure)")
            settings = self.cfg.settings.get(name)
            self.structure.append({"plugin": name, "epoch": ctx.epoch, "change": change,
                                   "settings": settings.model_dump(mode="json") if settings is not None else {}})
        fresh = build_model(self.cfg, "cpu", num_classes=ctx.num_classes, in_chans=ctx.in_chans,
                            image_size=ctx.image_size, structure=self.structure, hooks=self.hooks)
        want = {k: tuple(v.shape) for k, v in ctx.model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
        if want != got:
            key = next(k for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k))
            names = ", ".join(sorted({n for n, _ in changes}))
            raise TricksError(f"replaying the structural changes of {names} on a fresh model does not give the model "
                              f"they made ({key}: {got.get(key)} instead of {want.get(key)}); make replay_structure "
                              "repeat exactly what prune did")

    # --- the run ----------------------------------------------------------------------------
    def fit(self) -> dict:
        self.created = False
        self.restore_mkldnn = False
        try:
            return self._fit()
        finally:
            if self.restore_mkldnn:
                torch.backends.mkldnn.enabled = True
            if self.lock is not None:
                if self.created and not self.run.has_run():
                    self.run.remove()  # a run that failed before it began leaves no folder behind
                self.lock.close()
                self.lock = None

    def _fit(self) -> dict:
        cfg, core = self.cfg, self.cfg.core
        self.finished = None
        checkpoint = self._prepare_dir()
        if self.finished is not None:
            return self._finished(self.finished)
        device = pick_device(core.device, self.local_rank)
        seed_everything(core.seed, -1, 0)
        ctx = self.ctx = RunContext(
            core=core, run_config=cfg, device=device, rank=self.rank, world_size=self.world, run_dir=self.run_dir,
            num_classes=0, in_chans=0, image_size=0, train_size=0, steps_per_epoch=0, epochs=core.epochs,
            reporter=self.reporter, hooks=self.hooks,
        )
        hooks = self.hooks
        data = hooks.load_data(ctx)
        if data is None:
            raise TricksError(f"no plugin of the run loads data for the task '{core.task}'; add the plugin that brings "
                              "it (tricks plugins list), or use --task classification")
        self._take_data(data)
        if hooks.implementers("prepare_data"):
            self._take_data(hooks.prepare_data(ctx, data))
        data = ctx.data
        train_loader, val_loader = hooks.make_loaders(ctx, data)
        ctx.steps_per_epoch = len(train_loader)
        self._history: list[dict] = []
        try:
            model = self._build_model()
            if checkpoint is None and core.init_from and core.structure_from:
                raise TricksError("core.init_from already gives the model that run's structure (and its weights); "
                                  "drop core.structure_from, or drop core.init_from to train the structure from scratch")
            if checkpoint is None and core.init_from:
                model, self.structure = self._init_from(model, core.init_from)
            elif checkpoint is None and core.structure_from:
                self.structure = self._structure_from(model, core.structure_from)
            if checkpoint is not None:
                self.structure = list(checkpoint.get("structure") or [])
                replay(self.hooks, ctx, model, self.structure, source=str(self.run.checkpoint_path))
            ctx.model = self._place(model)
            self._cpu_guard()
            self._build_optimization()
            ctx.loss_fn = hooks.build_loss(ctx)
            self.scaler = torch.amp.GradScaler(device.type) if core.precision == "fp16" else None
            history = self._history
            if checkpoint is not None:
                load_state(ctx.model, checkpoint["model"], str(self.run.checkpoint_path))
                ctx.optimizer.load_state_dict(checkpoint["optimizer"])
                if self.scaler is not None and checkpoint.get("scaler"):
                    self.scaler.load_state_dict(checkpoint["scaler"])
                hooks.load_state_dict(ctx, checkpoint.get("plugins", {}))
                history.extend(checkpoint["history"])
                ctx.start_epoch, ctx.step = checkpoint["epoch"], checkpoint["step"]
            ctx.epoch = ctx.start_epoch
            if self.rank == 0:
                check_free_space(self.run.path, ctx.model, ctx.optimizer)
            # The model's size as the run starts (after any restored or inherited structural change).
            self.start_size = checkpoint.get("start_size") if checkpoint is not None else None
            self.start_size = self.start_size or self._complexity()
            self._write_config()
            self.reporter.start(ctx)
            for note in getattr(data, "notes", None) or []:
                ctx.log(note)
            hooks.on_fit_start(ctx)
            self.watch = FiniteLoss(ctx)
            summary = None
            for epoch in range(ctx.start_epoch, core.epochs):
                ctx.epoch = epoch
                row = self._epoch(epoch, train_loader, val_loader)
                changes = hooks.prune(ctx, ctx.model)
                if changes:
                    self._record_structure(changes)
                    ctx.model = self._place(ctx.model)  # new layers may have been built on the host
                    self._cpu_guard()
                    self._build_optimization()
                    row.update(self._complexity())  # the epoch that changed the model reports its new size
                hooks.on_epoch_end(ctx, epoch, row)
                history.append(row)
                if epoch == core.epochs - 1:
                    summary = self._summary(history)
                    hooks.on_fit_end(ctx, summary)
                self._commit(history, summary)
                self.reporter.epoch_end(row)
            self.reporter.finish(summary)
            return summary
        except BaseException as error:
            if isinstance(error, Diverged) and self.rank == 0:
                self._diverged(error)
            hooks.on_exception(ctx, error)
            raise

    def _init_from(self, model: torch.nn.Module, source: str) -> tuple[torch.nn.Module, list[dict]]:
        """``core.init_from``: the model starts from the last weights of another run (fine-tuning, a
        job item that depends on an earlier one), with that run's structural changes replayed;
        they stay part of this run's structure."""
        run = RunDir(source)
        checkpoint = run.load_checkpoint()
        if checkpoint is None:
            raise TricksError(f"core.init_from={source}: no checkpoint there ({RunDir.CHECKPOINT}); "
                              "name a run directory that has trained at least one epoch")
        structure = list(checkpoint.get("structure") or [])
        replay(self.hooks, self.ctx, model, structure, source=str(run.checkpoint_path))
        load_state(model, checkpoint["model"], str(run.checkpoint_path))
        return model, structure

    def _cpu_guard(self) -> None:
        """Train a model whose structure changed without oneDNN on the CPU. With torch 2.14.1,
        oneDNN's convolution backward corrupts the heap (an abort or a segfault, a few steps
        after pruning) for some pruned ResNets with narrow, odd channel counts; torch's own CPU
        kernels do not. Slower, but a run that crashes loses its epoch. Restored at the end."""
        if self.structure and self.ctx.device.type == "cpu" and torch.backends.mkldnn.enabled:
            torch.backends.mkldnn.enabled = False
            self.restore_mkldnn = True
            self.reporter.log("the model's structure was changed: training it on the CPU without oneDNN "
                              "(its convolution backward is unreliable for pruned channel counts)")

    def _complexity(self) -> dict[str, int]:
        """``{"params", "macs"}`` of the model now (MACs of one image of the run's data)."""
        from .models import complexity

        return complexity(self.ctx.model, self.ctx.in_chans, self.ctx.image_size)

    def _structure_from(self, model: torch.nn.Module, source: str) -> list[dict]:
        """``core.structure_from``: the freshly built model takes another run's structural changes
        (the architecture a pruning run ended with), keeping its own fresh weights: the "from
        scratch" control of pruning. The changes become part of this run's structure."""
        checkpoint = RunDir(source).load_checkpoint()
        if checkpoint is None:
            raise TricksError(f"core.structure_from={source}: no checkpoint there ({RunDir.CHECKPOINT}); "
                              "name a run directory that has trained at least one epoch")
        structure = list(checkpoint.get("structure") or [])
        if not structure:
            self.reporter.log(f"core.structure_from={source}: that run's model was never changed; training it as built")
        replay(self.hooks, self.ctx, model, structure, source=str(RunDir(source).checkpoint_path))
        return structure

    def _finished(self, checkpoint: dict) -> dict:
        """``--resume`` of a run whose last epoch is committed: write what a kill after that
        commit left unwritten (metrics, summary, curves) from its checkpoint; a run with nothing
        missing is finished, and resuming it is an error that says how to train it longer."""
        run, summary = self.run, checkpoint.get("summary")
        self._history = list(checkpoint["history"])
        if summary is not None and run.complete(checkpoint, self._curves()):
            self.reporter.log(f"the run in {run.path} had finished; its metrics and summary were written from its checkpoint")
            self.reporter.finish(summary)
            return summary
        done = checkpoint["epoch"]
        raise TricksError(f"the run in {run.path} is finished ({done} of {self.cfg.core.epochs} epochs); "
                          f"to train it longer, resume with more epochs: --resume {run.path} --epochs N (N > {done})")

    def _diverged(self, error: Diverged) -> None:
        """Record a diverged run: its summary says so; its checkpoint and metrics stay those of
        the last finished epoch."""
        summary = self._summary(self._history) if getattr(self, "ctx", None) is not None else {}
        summary.update(status="diverged", diverged_at={"epoch": error.epoch + 1, "step": error.step},
                       message=str(error))
        self.run.write_summary(summary)

    def _epoch(self, epoch: int, train_loader, val_loader) -> dict:
        ctx, hooks, core = self.ctx, self.hooks, self.cfg.core
        seed_everything(core.seed, epoch, self.rank)
        train_loader.set_epoch(epoch)
        hooks.on_epoch_start(ctx, epoch)
        self.reporter.epoch_start(epoch, len(train_loader))
        model, optimizer, loss_fn, scaler = self.wrapped, ctx.optimizer, ctx.loss_fn, self.scaler
        forward = hooks.forward_fn(ctx)
        model.train()
        loss_sum = torch.zeros((), device=ctx.device, dtype=torch.float64)
        seen, lr = 0, 0.0
        dist.synchronize(ctx.device)
        start = time.perf_counter()
        for index, batch in enumerate(train_loader):
            batch = hooks.on_batch(ctx, batch)
            lr = self.schedule.apply(ctx.step)
            with ctx.autocast():
                loss = loss_fn(model(batch["input"]) if forward is None else forward(model, batch), batch)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            self.watch.step(loss, epoch, ctx.step, batch)
            n = len(batch["input"])
            loss_sum += loss.detach() * n
            seen += n
            ctx.step += 1
            self.reporter.step(index, loss)
        dist.synchronize(ctx.device)
        self.watch.check(epoch)
        train_seconds = time.perf_counter() - start
        loss_sum, seen_all = dist.reduce_sum([loss_sum, float(seen)], ctx.device)
        model = ctx.model
        dist.broadcast_buffers(model)
        model.eval()
        with torch.no_grad():
            stats = hooks.evaluate(ctx, model, val_loader)
        n = stats.pop("n")
        whole = stats.pop("reduced", None) or {}  # figures over the whole validation set already
        keys = list(stats)
        reduced = dist.reduce_sum([stats[k] for k in keys] + [float(n)], ctx.device)
        metrics = {f"val_{k}": v / reduced[-1] for k, v in zip(keys, reduced[:-1])}
        metrics.update({f"val_{k}": float(v) for k, v in whole.items()})
        hooks.on_evaluate_end(ctx, metrics)
        for key in ("val_loss",):
            if key in metrics and not np.isfinite(metrics[key]):
                raise Diverged(epoch, ctx.step, metrics[key], f"the validation loss is {metrics[key]}; "
                               + likely_cause(ctx.core))
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
        metric = ctx.metric
        best = max(history, key=lambda r: r.get(metric, 0.0)) if history else {}
        judged = {} if metric == "val_acc" else {"metric": metric, f"final_{metric}": history[-1].get(metric) if history else None,
                                                 f"best_{metric}": best.get(metric)}
        return {
            "status": "complete",
            "final_val_acc": history[-1].get("val_acc") if history else None,
            "final_val_loss": history[-1].get("val_loss") if history else None,
            "best_val_acc": best.get("val_acc"),
            **judged,
            "best_epoch": best.get("epoch"),
            "epochs": ctx.epochs,
            "plugins": list(self.cfg.plugins),
            "versions": self.cfg.versions,
            "model": ctx.core.model,
            "dataset": ctx.core.dataset,
            **self._complexity(),
            "params_start": self.start_size["params"],
            "macs_start": self.start_size["macs"],
            "seed": ctx.core.seed,
            "device": str(ctx.device),
            "precision": ctx.core.precision,
            "world_size": self.world,
            "train_seconds": sum(r["epoch_seconds"] for r in history),
            "run_dir": str(self.run_dir),
        }


def replay(hooks: Hooks, ctx: "RunContext", model: torch.nn.Module, structure: list[dict],
           registries: list[Path] | None = None, source: str = "the checkpoint") -> None:
    """Make again, on the freshly built ``model``, the structural changes recorded in a
    checkpoint, each by the plugin that made it: the run's own instance when the run has that
    plugin, otherwise a fresh instance of the installed plugin with the settings it had."""
    for record in structure:
        name = record["plugin"]
        if hooks.can_replay(name):
            hooks.replay_structure(ctx, model, name, record["change"])
            continue
        from .config import resolve

        try:
            # in the run's task: a plugin of another task than classification is refused outside it
            cfg = resolve(recipe={"plugins": [name], name: record.get("settings") or {}, "core": {"task": ctx.core.task}},
                          registries=registries)
        except TricksError as error:
            raise TricksError(f"the model of {source} was changed by plugin '{name}' (epoch {record.get('epoch', 0) + 1}), "
                              f"which cannot be re-created here ({error}); install it, or pass the plugin to tricks.run") from None
        Hooks([(n, p) for n, p in cfg.instantiate() if n == name]).replay_structure(ctx, model, name, record["change"])


def build_model(cfg: RunConfig, device: str | torch.device = "cpu", *, num_classes: int, in_chans: int,
                image_size: int, reporter: Reporter | None = None, structure: list[dict] | None = None,
                registries: list[Path] | None = None, hooks: Hooks | None = None,
                source: str = "the checkpoint") -> torch.nn.Module:
    """The model a run with config ``cfg`` builds for data of this shape, through its plugins'
    ``build_model`` hooks and the core's provider, with fresh weights (no data is loaded), and
    with the recorded structural changes ``structure`` replayed (see :func:`replay`)."""
    builder = Hooks(cfg.instantiate(), core=CoreDefaults())
    ctx = RunContext(core=cfg.core, run_config=cfg, device=torch.device(device), rank=0, world_size=1, run_dir=None,
                     num_classes=num_classes, in_chans=in_chans, image_size=image_size, train_size=0,
                     steps_per_epoch=1, epochs=cfg.core.epochs, reporter=reporter or Reporter())
    with torch.random.fork_rng(devices=[]):
        model = builder.build_model(ctx)
        if model is None:
            raise TricksError(f"no plugin of the run built the model '{cfg.core.model}'")
        if structure:
            replay(hooks or builder, ctx, model, structure, registries, source)
    return model


class FiniteLoss:
    """Stops a run whose training loss becomes NaN or infinite, at the step it happens.

    On the CPU each step's loss is checked directly. On a GPU the check is queued on the device
    (the first bad step is kept in a device tensor) and its result copied to pinned host memory
    without waiting; the host reads it once the copy has landed, a step or two later, so there
    is no host synchronisation per step. ``check`` (at the end of an epoch, already a sync
    point) sees anything still in flight."""

    def __init__(self, ctx: "RunContext", lazy: bool | None = None, event: Any = None):
        self.ctx = ctx
        self.lazy = ctx.device.type == "cuda" if lazy is None else lazy
        if self.lazy:
            cuda = ctx.device.type == "cuda"
            self.first = torch.full((), -1, dtype=torch.int64, device=ctx.device)
            self.host = torch.full((), -1, dtype=torch.int64)
            self.host = self.host.pin_memory() if cuda else self.host
            self.event = event if event is not None else torch.cuda.Event()
            self.pending = False

    def step(self, loss: torch.Tensor, epoch: int, step: int, batch: dict | None = None) -> None:
        if not self.lazy:
            value = loss.detach()
            if not torch.isfinite(value).all():
                raise Diverged(epoch, step + 1, float(value.float().sum()), likely_cause(self.ctx.core, batch))
            return
        bad = ~torch.isfinite(loss.detach()).all()
        self.first = torch.where(bad & (self.first < 0), torch.full_like(self.first, step + 1), self.first)
        if self.pending and self.event.query():
            self.pending = False
            self._raise_if_bad(epoch)
        if not self.pending:
            self.host.copy_(self.first, non_blocking=True)
            self.event.record()
            self.pending = True

    def check(self, epoch: int) -> None:
        if self.lazy:
            self.event.synchronize()
            self.host.copy_(self.first)
            self.pending = False
            self._raise_if_bad(epoch)

    def _raise_if_bad(self, epoch: int) -> None:
        step = int(self.host)
        if step >= 0:
            raise Diverged(epoch, step, None, likely_cause(self.ctx.core))


def likely_cause(core: CoreSettings, batch: dict | None = None) -> str:
    """What most often makes a loss non-finite, for the run's settings (and the batch, when it
    is at hand: inputs that are already non-finite point at the data or a plugin's on_batch)."""
    inputs = (batch or {}).get("input")
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point() and not torch.isfinite(inputs).all():
        return "the batch's inputs were already non-finite: check the data, and the plugins that change batches"
    cause = f"the learning rate (core.lr={core.lr:g}) is likely too high for this model and batch size: lower --lr or add warmup"
    if core.precision == "fp16":
        cause += ", or train in bf16 or fp32 (fp16 overflows more easily)"
    return cause


def check_free_space(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Refuse to start when the run directory's disk cannot hold two checkpoints (the new one is
    written beside the old one before it replaces it). A checkpoint holds the model and the
    optimizer's state: counted here as three copies of the model's tensors (SGD momentum or
    Adam's two moments), plus room for the metrics and curves."""
    import shutil

    size = sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))
    need = 2 * 3 * size + (4 << 20)
    free = shutil.disk_usage(path).free
    if free < need:
        raise TricksError(f"{path} has {free / 2**20:.0f} MiB free, and this run's checkpoints need about "
                          f"{need / 2**20:.0f} MiB; free space there or choose another --out")


def train(cfg: RunConfig, out: str | Path | None = None, resume: bool = False,
          reporter: Reporter | None = None, trace: list[str] | None = None) -> dict:
    """Run one training job and return its summary (see :class:`Trainer`)."""
    return Trainer(cfg, out, resume, reporter, trace).fit()
