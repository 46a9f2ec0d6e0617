"""Sampling jobs: sample a design space, train every sampled network with one recipe, record each.

A job lives in one folder::

    SWEEP/sweep.json        what was asked: the space, n, seed, complexity window, input shape, recipe
    SWEEP/samples.jsonl     the sampled networks, in order (id, params, config, complexity)
    SWEEP/results/ID.json   one result per finished network: ok (errors, time), diverged (its training
                            loss became non-finite: where, and no error; or its validation error
                            stayed at chance: its errors kept, ``reason: "chance"``) or failed
    SWEEP/runs/ID/          the network's run directory (config.yaml, metrics.jsonl, checkpoints)

A sampling job is a job of the core's engine (:mod:`tricks.jobs`), one item per network, which
adds ``job.json`` and ``.lock`` to the folder. Every file is written atomically. The engine's
resume policy applies: running the same job again skips the networks that have a result, resumes
a network that was interrupted from its last checkpoint, and starts the others; a network that
raises is recorded as failed (its traceback in ``runs/ID/error.txt``) and the job goes on; a
network whose loss became non-finite is recorded as diverged, is never trained again (the same
seed and settings diverge again), and is left out of the job's error statistics and of
``tricks analyze``'s EDFs, which count it. ``summary.json`` counts ok, diverged and failed networks.
The job's folder is checked for writing before the data are loaded.
Networks are spread over local devices by a process pool (``gpus x per_gpu`` workers, each on one
device, each keeping the data set on its device between networks), or over a Ray cluster.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tricks import TricksError, atomic
from tricks import jobs
from tricks.jobs import BACKENDS, check_writable, local_devices

from . import resolve_stem
from .spaces import DesignSpace, Sample, SpaceError, Window, get_space

PLUGIN = "regnet"


class Progress:
    """What a job reports while it runs; the CLI shows it live. Every method may be left as is."""

    def start(self, job: "Job", total: int, done: int, failed: int, best: float | None, diverged: int = 0) -> None: ...

    def model_start(self, task: dict) -> None: ...

    def model_end(self, result: dict) -> None: ...

    def finish(self, summary: dict) -> None: ...


@dataclass
class Job:
    """A planned sampling job (see :func:`plan`)."""

    out: Path
    space: DesignSpace
    n: int
    seed: int
    window: Window
    recipe: dict[str, Any]
    resolution: int
    stem: str
    num_classes: int
    samples: list[Sample] = field(default_factory=list)

    @staticmethod
    def ident(sample_index: int) -> str:
        return f"{sample_index:04d}"

    def result_path(self, ident: str) -> Path:
        return self.out / "results" / f"{ident}.json"

    def results(self) -> list[dict]:
        """The recorded results, in sample order (a file that is not a result is a TricksError)."""
        rows = []
        for i in range(self.n):
            path = self.result_path(self.ident(i))
            if path.is_file():
                rows.append(jobs.read_result(path))
        return rows


def _read_plan(path: Path) -> dict:
    """``sweep.json``: the job's plan, a JSON object."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TricksError(f"{path} is not a sampling job's plan ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else 'unreadable'}); "
                          "restore it, or choose another --out") from None
    if not isinstance(meta, dict):
        raise TricksError(f"{path} is not a sampling job's plan (not a JSON object); restore it, or choose another --out")
    return meta


DEFAULT_RECIPE = Path(__file__).with_name("sampling.yaml")  # also recipes/sampling.yaml in the repository
EMBEDDED_SIZE = 32  # the side the embedded 8x8 digits are upsampled to in a sampling job (see plan)


def base_recipe(plugins: list[str] | str | None = None, config: str | Path | dict | None = None,
                sets: list[str] | None = None, overrides: dict[str, Any] | None = None,
                registries: list[Path] | None = None):
    """The training recipe every sampled network shares, plus ``regnet``, whose ``--model anynet``
    builds each network from its ``regnet.arch``. Without ``config`` it is :data:`DEFAULT_RECIPE`
    with ``plugins`` added to its own; with ``config``, that recipe alone (``plugins``, when given,
    replace its list, as in ``tricks run``)."""
    import tricks
    from tricks.config import read_recipe

    if isinstance(plugins, str):
        plugins = [p.strip() for p in plugins.split(",") if p.strip()]
    names = [p for p in (plugins or []) if isinstance(p, str)]
    if config is None:
        config = read_recipe(DEFAULT_RECIPE)
        names = [*config.get("plugins", []), *(n for n in names if n not in config.get("plugins", []))]
    elif plugins is None:
        recipe = read_recipe(config) if isinstance(config, (str, Path)) else dict(config)
        names = list(recipe.get("plugins") or [])
    if PLUGIN not in names:
        names.append(PLUGIN)
    overrides = {"curves": False, **(overrides or {}), "model": "anynet"}  # no plot per network
    cfg = tricks.resolve(plugins=names, recipe=config, overrides=overrides, sets=sets, registries=registries)
    if cfg.settings[PLUGIN].arch is not None:
        raise TricksError("a sampling job sets each network's regnet.arch itself; remove regnet.arch from the recipe and --set")
    return cfg


def device_defaults(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """On CUDA, sampled networks train in bf16 and channels_last unless the job says otherwise
    (the same for ``tricks sample`` and :func:`sample_job`)."""
    device = str((overrides or {}).get("device") or "auto")
    if device.startswith("cuda") or device == "auto":
        import torch

        if torch.cuda.is_available():
            return {"precision": "bf16", "channels_last": True}
    return {}


def plan(out: str | Path, space: str | Path | dict | DesignSpace, n: int, seed: int = 0,
         window: Window | None = None, plugins: list[str] | str | None = None, config=None,
         sets: list[str] | None = None, overrides: dict[str, Any] | None = None,
         registries: list[Path] | None = None, write: bool = True) -> Job:
    """Resolve the recipe, sample the space and write (or check, when continuing) the job's plan;
    ``write=False`` only samples (``tricks sample --dry-run``)."""
    from tricks.data import load_data

    if n < 1:
        raise TricksError(f"--n {n}: ask for at least one network")
    out = Path(out)
    if write:
        check_writable(out, "--out")
    try:
        space = space if isinstance(space, DesignSpace) else get_space(space)
    except SpaceError as error:
        raise TricksError(str(error)) from None
    window = window or Window()
    job_overrides = {**device_defaults(overrides), **(overrides or {})}
    cfg = base_recipe(plugins, config, sets, job_overrides, registries)
    if cfg.core.dataset == "digits" and cfg.core.image_size is None:
        # 8x8 digits leave a 4-stage network 1x1 maps after its third stage: sample and train at the
        # CIFAR side instead, so that a --flops window means the same networks as on CIFAR-10; and,
        # unless the job asks for it, without the digits' crop augmentation, which at this side and
        # a few epochs held RegNetX networks near 70% error (about 45% without it)
        extra = {"image_size": EMBEDDED_SIZE}
        if config is None and "augment" not in (overrides or {}):
            extra["augment"] = False
        cfg = base_recipe(plugins, config, sets, {**job_overrides, **extra}, registries)
    data = load_data(cfg.core)
    stem = resolve_stem(cfg.settings[PLUGIN].stem, data.image_size)
    recipe = cfg.to_dict()
    meta = {"space": space.name, "space_spec": space.to_dict(), "n": n, "seed": seed, "window": window.to_dict(),
            "resolution": data.image_size, "stem": stem, "num_classes": data.num_classes,
            "dataset": cfg.core.dataset, "recipe": recipe}
    existing = out / "sweep.json"
    if existing.exists():
        old = _read_plan(existing)
        for key in ("space_spec", "seed", "window", "resolution", "stem", "num_classes"):
            if old.get(key) != json.loads(json.dumps(meta[key])):
                raise TricksError(f"{out} holds a sampling job with another {key.replace('_', ' ')}; "
                                  "continue it with the same command, or choose another --out")
        if not isinstance(old.get("recipe"), dict) or not isinstance(old.get("n", n), int):
            raise TricksError(f"{existing} is not a sampling job's plan (no recipe, or an n that is not a number); "
                              "restore it, or choose another --out")
        if jobs.identity(old["recipe"]) != jobs.identity(recipe):
            diff = jobs.first_difference(jobs.identity(old["recipe"]), jobs.identity(recipe))
            raise TricksError(f"{out} holds a sampling job with another training recipe ({diff}); "
                              "continue it with the same plugins and settings, or choose another --out")
        meta["n"] = max(n, int(old.get("n", n)))
    try:
        samples = space.sample(meta["n"], seed, window, data.image_size, stem, data.num_classes)
    except SpaceError as error:
        raise TricksError(str(error)) from None
    if not write:
        return Job(out, space, n, seed, window, recipe, data.image_size, stem, data.num_classes, samples[:n])
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(existing, meta)
    rows = [{"id": Job.ident(i), "index": i, **s.to_dict()} for i, s in enumerate(samples)]
    atomic.write_jsonl(out / "samples.jsonl", rows)
    return Job(out, space, n, seed, window, recipe, data.image_size, stem, data.num_classes, samples[:n])


# --- the job -------------------------------------------------------------------------------------
CHANCE_MARGIN = 2.0  # percentage points: a best error within this of chance is "stayed at chance"


def chance_error(num_classes: int) -> float:
    """The top-1 error in per cent of a classifier that guesses: ``100 (1 - 1/C)``."""
    return 100.0 * (1.0 - 1.0 / max(1, num_classes))


def at_chance(best_error: float, num_classes: int) -> bool:
    """Whether a best top-1 error (%) is within :data:`CHANCE_MARGIN` points of chance."""
    return best_error >= chance_error(num_classes) - CHANCE_MARGIN


def error_of(result: dict, num_classes: int | None = None) -> dict:
    """A network's result with its final and best top-1 error in per cent (None when it failed or
    its loss became non-finite). With ``num_classes``, a network whose best error of any epoch stayed
    within :data:`CHANCE_MARGIN` points of chance is recorded as diverged (``reason: "chance"``,
    ``diverged_at`` its last epoch), its errors kept, so that analyses can leave it out or keep it."""
    ok = result["status"] == "ok" and result.get("final_val_acc") is not None
    out = {**result,
           "error": round(100.0 * (1.0 - result["final_val_acc"]), 4) if ok else None,
           "best_error": round(100.0 * (1.0 - result["best_val_acc"]), 4) if ok and result.get("best_val_acc")
           is not None else None}
    if ok and num_classes and out["best_error"] is not None:
        chance = chance_error(num_classes)
        if at_chance(out["best_error"], num_classes):
            epochs = result.get("epochs")
            out.update(status="diverged", reason="chance", diverged_at={"epoch": epochs, "step": None},
                       message=f"its validation error stayed at chance ({out['best_error']:.1f}% at best, chance "
                               f"{chance:.1f}% for {num_classes} classes) through epoch {epochs}")
    elif result["status"] == "diverged":
        out.setdefault("reason", "non-finite")
    return out


def engine_job(job: Job) -> jobs.Job:
    """The job's networks as items of the core's engine: each network's recipe is the shared one
    with ``regnet.arch`` set to the sampled architecture."""
    items = []
    for i, s in enumerate(job.samples):
        recipe = json.loads(json.dumps(job.recipe))
        recipe.setdefault(PLUGIN, {})["arch"] = s.config.to_dict()
        ident = job.ident(i)
        items.append(jobs.Item(ident, recipe, meta={"index": i, "space": job.space.name, **s.to_dict()}))
    return jobs.Job(job.out, "sample", items, meta={"space": job.space.name},
                    describe=functools.partial(error_of, num_classes=job.num_classes))


class _EngineProgress(jobs.JobProgress):
    """The engine's reports, told as a sampling job's :class:`Progress`."""

    def __init__(self, job: Job, progress: Progress):
        self.job, self.progress = job, progress

    def start(self, engine, total, done, failed, diverged=0):
        ok = [r for r in engine.results().values() if r["status"] == "ok" and r.get("error") is not None]
        self.progress.start(self.job, total, done, failed, min((r["error"] for r in ok), default=None), diverged)

    def item_start(self, item, resuming):
        self.progress.model_start({"id": item.id, **item.meta})

    def item_end(self, item, result):
        self.progress.model_end(result)


def run(job: Job, gpus: str | None = None, per_gpu: int = 1, backend: str = "local", address: str | None = None,
        progress: Progress | None = None, retry_failed: bool = False, extra_plugins: list | None = None) -> dict:
    """Train every network of ``job`` that has no result yet; returns the job's summary."""
    progress = progress or Progress()
    jobs.run_job(engine_job(job), device=job.recipe["core"]["device"], gpus=gpus, per_device=per_gpu,
                 backend=backend, address=address, progress=_EngineProgress(job, progress),
                 retry_failed=retry_failed, extra_plugins=extra_plugins)
    summary = summarize(job)
    atomic.write_json(job.out / "summary.json", summary)
    progress.finish(summary)
    return summary


def summarize(job: Job) -> dict:
    """The job's counts (ok, diverged, failed: ``finished`` is their sum) and the error statistics of
    its ok networks (a diverged network has no error)."""
    rows = job.results()
    ok = [r for r in rows if r["status"] == "ok" and r.get("error") is not None]
    diverged = [r for r in rows if r["status"] == "diverged"]
    errors = sorted(r["error"] for r in ok)
    best = min(ok, key=lambda r: r["error"]) if ok else None
    return {
        "space": job.space.name, "n": job.n, "finished": len(rows), "ok": len(ok), "diverged": len(diverged),
        "failed": len(rows) - len(ok) - len(diverged), "diverged_ids": [r["id"] for r in diverged],
        "min_error": errors[0] if errors else None,
        "median_error": (errors[len(errors) // 2] if len(errors) % 2 else
                         (errors[len(errors) // 2 - 1] + errors[len(errors) // 2]) / 2) if errors else None,
        "best": best["id"] if best else None,
        "train_hours": round(sum(r.get("time_s") or 0.0 for r in rows) / 3600, 4),
    }


def sample_job(out, space, n, seed=0, window=None, plugins=None, config=None, sets=None, overrides=None,
               gpus=None, per_gpu=1, backend="local", address=None, progress=None, retry_failed=False,
               extra_plugins=None, registries=None) -> dict:
    """Plan (or continue) and run a sampling job: the Python form of ``tricks sample``."""
    jobs.check_backend(backend, str((overrides or {}).get("device") or "auto"), gpus, per_gpu)  # before any work
    job = plan(out, space, n, seed, window, plugins, config, sets, overrides, registries)
    return run(job, gpus, per_gpu, backend, address, progress, retry_failed, extra_plugins)


def load_job(out: str | Path) -> Job:
    """A job as planned in ``out`` (for analysis and tests)."""
    out = Path(out)
    if not (out / "sweep.json").exists():
        raise TricksError(f"{out} holds no sampling job (no sweep.json); start one with tricks sample --out {out}")
    meta = _read_plan(out / "sweep.json")
    from .config import AnyNetConfig

    try:
        rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines() if line.strip()]
        samples = [Sample(r["params"], AnyNetConfig.from_dict(r["config"]), r["complexity"]) for r in rows]
        window = Window.from_dict(meta["window"])
        return Job(out, DesignSpace(meta["space_spec"]), meta["n"], meta["seed"], window, meta["recipe"],
                   meta["resolution"], meta["stem"], meta["num_classes"], samples[: meta["n"]])
    except (OSError, ValueError, KeyError, TypeError, SpaceError) as error:
        raise TricksError(f"{out} holds a sampling job that cannot be read ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else 'incomplete'}); run its tricks sample "
                          "command again to rewrite its plan") from None


__all__ = ["Job", "Progress", "plan", "run", "sample_job", "load_job", "summarize", "local_devices", "base_recipe",
           "error_of", "chance_error", "at_chance", "CHANCE_MARGIN", "engine_job", "BACKENDS", "DEFAULT_RECIPE"]
