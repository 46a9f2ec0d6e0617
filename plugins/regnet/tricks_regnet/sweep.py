"""Sampling jobs: sample a design space, train every sampled network with one recipe, record each.

A job lives in one folder::

    SWEEP/sweep.json        what was asked: the space, n, seed, complexity window, input shape, recipe
    SWEEP/samples.jsonl     the sampled networks, in order (id, params, config, complexity)
    SWEEP/results/ID.json   one result per finished network: ok (errors, time) or failed (the message)
    SWEEP/runs/ID/          the network's run directory (config.yaml, metrics.jsonl, checkpoints)

Every file is written atomically. Running the same job again skips the networks that have a
result, resumes a network that was interrupted from its last checkpoint, and starts the others.
A network that raises is recorded as failed (its traceback in ``runs/ID/error.txt``) and the job
goes on. Networks are spread over local devices by a process pool (``gpus x per_gpu`` workers, each
on one device, each keeping the data set on its device between networks), or over a Ray cluster.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import shutil
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tricks import TricksError
from tricks import io

from . import resolve_stem
from .spaces import DesignSpace, Sample, SpaceError, Window, get_space

PLUGIN = "regnet"
BACKENDS = ("local", "ray")
# settings that may differ between the command that started a job and the one that continues it
_FREE = {("core", "device"), ("core", "workers"), ("core", "log_every"), ("core", "curves")}


class Progress:
    """What a job reports while it runs; the CLI shows it live. Every method may be left as is."""

    def start(self, job: "Job", total: int, done: int, failed: int, best: float | None) -> None: ...

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
        """The recorded results, in sample order."""
        rows = []
        for i in range(self.n):
            path = self.result_path(self.ident(i))
            if path.exists():
                rows.append(json.loads(path.read_text()))
        return rows


def _identity(recipe: dict) -> dict:
    """The recipe without the settings a continuing command may change (device, workers) or that
    only record versions."""
    out = {}
    for section, values in recipe.items():
        if section in ("versions", "adhoc_plugins"):
            continue
        if isinstance(values, dict):
            out[section] = {k: v for k, v in values.items() if (section, k) not in _FREE}
        else:
            out[section] = values
    return out


def base_recipe(plugins: list[str] | str | None = None, config: str | Path | dict | None = None,
                sets: list[str] | None = None, overrides: dict[str, Any] | None = None,
                registries: list[Path] | None = None):
    """The training recipe every sampled network shares: the given plugins plus ``regnet``, whose
    ``--model anynet`` builds each network from its ``regnet.arch``."""
    import tricks

    if isinstance(plugins, str):
        plugins = [p.strip() for p in plugins.split(",") if p.strip()]
    names = [p for p in (plugins or []) if isinstance(p, str)]
    if plugins is None and config is not None:
        from tricks.config import read_recipe

        recipe = read_recipe(config) if isinstance(config, (str, Path)) else dict(config)
        names = list(recipe.get("plugins") or [])
    if PLUGIN not in names:
        names.append(PLUGIN)
    overrides = {"curves": False, **(overrides or {}), "model": "anynet"}  # no plot per network
    cfg = tricks.resolve(plugins=names, recipe=config, overrides=overrides, sets=sets, registries=registries)
    if cfg.settings[PLUGIN].arch is not None:
        raise TricksError("a sampling job sets each network's regnet.arch itself; remove regnet.arch from the recipe and --set")
    return cfg


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
    try:
        space = space if isinstance(space, DesignSpace) else get_space(space)
    except SpaceError as error:
        raise TricksError(str(error)) from None
    window = window or Window()
    cfg = base_recipe(plugins, config, sets, overrides, registries)
    data = load_data(cfg.core)
    stem = resolve_stem(cfg.settings[PLUGIN].stem, data.image_size)
    recipe = cfg.to_dict()
    meta = {"space": space.name, "space_spec": space.to_dict(), "n": n, "seed": seed, "window": window.to_dict(),
            "resolution": data.image_size, "stem": stem, "num_classes": data.num_classes,
            "dataset": cfg.core.dataset, "recipe": recipe}
    existing = out / "sweep.json"
    if existing.exists():
        old = json.loads(existing.read_text())
        for key in ("space_spec", "seed", "window", "resolution", "stem", "num_classes"):
            if old.get(key) != json.loads(json.dumps(meta[key])):
                raise TricksError(f"{out} holds a sampling job with another {key.replace('_', ' ')}; "
                                  "continue it with the same command, or choose another --out")
        if _identity(old["recipe"]) != _identity(json.loads(json.dumps(recipe))):
            diff = _first_difference(_identity(old["recipe"]), _identity(json.loads(json.dumps(recipe))))
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
    io.write_json(existing, meta)
    rows = [{"id": Job.ident(i), "index": i, **s.to_dict()} for i, s in enumerate(samples)]
    io.write_jsonl(out / "samples.jsonl", rows)
    return Job(out, space, n, seed, window, recipe, data.image_size, stem, data.num_classes, samples[:n])


def _first_difference(a: dict, b: dict) -> str:
    for section in sorted(set(a) | set(b)):
        va, vb = a.get(section), b.get(section)
        if va == vb:
            continue
        if isinstance(va, dict) and isinstance(vb, dict):
            for key in sorted(set(va) | set(vb)):
                if va.get(key) != vb.get(key):
                    return f"{section}.{key}: {va.get(key)!r} before, {vb.get(key)!r} now"
        return f"{section}: {va!r} before, {vb!r} now"
    return "no difference"


# --- training one network (in this process, a pool worker or a Ray task) -------------------------
def train_one(task: dict) -> dict:
    """Train one sampled network; never raises: a failure comes back as a result with its message."""
    import torch

    import tricks

    run_dir = Path(task["run_dir"])
    start = time.time()
    result = {k: task[k] for k in ("id", "index", "space", "params", "config", "complexity")}
    result.update(status="ok", error=None, best_error=None, epochs=task["recipe"]["core"]["epochs"],
                  device=task["device"], run_dir=f"runs/{task['id']}")
    try:
        if task.get("threads"):
            torch.set_num_threads(task["threads"])
        extra = list(task.get("extra_plugins") or [])
        history = _history(run_dir)
        if history is None or len(history) < result["epochs"]:
            if (run_dir / "checkpoints" / "last.pt").exists():
                tricks.run(resume=run_dir, plugins=extra or None, device=task["device"], reporter=tricks.Reporter())
            else:
                if run_dir.exists():
                    shutil.rmtree(run_dir)  # started, but killed before its first checkpoint
                recipe = json.loads(json.dumps(task["recipe"]))
                recipe["core"]["device"] = task["device"]
                recipe.setdefault(PLUGIN, {})["arch"] = task["config"]
                recipe.pop("versions", None)
                recipe.pop("adhoc_plugins", None)
                tricks.run(recipe, plugins=extra or None, out=run_dir, reporter=tricks.Reporter())
            history = _history(run_dir)
        accs = [row["val_acc"] for row in history if row.get("val_acc") is not None]
        result["error"] = round(100.0 * (1.0 - accs[-1]), 4)
        result["best_error"] = round(100.0 * (1.0 - max(accs)), 4)
        result["train_seconds"] = round(sum(row.get("epoch_seconds", 0.0) for row in history), 3)
    except Exception as error:  # recorded, and the job goes on
        result.update(status="failed", message=f"{type(error).__name__}: {error}".splitlines()[0][:500])
        run_dir.mkdir(parents=True, exist_ok=True)
        io.write_text(run_dir / "error.txt", traceback.format_exc())
    result["time_s"] = round(time.time() - start, 3)
    return result


def _history(run_dir: Path) -> list[dict] | None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- backends ------------------------------------------------------------------------------------
def local_devices(device: str, gpus: str | None, per_gpu: int) -> list[str]:
    """One entry per worker: ``cuda:i`` repeated ``per_gpu`` times for each chosen GPU, or ``cpu``."""
    import torch

    if per_gpu < 1:
        raise TricksError(f"--per-gpu {per_gpu}: run at least one network per device")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        if gpus not in (None, "", "all"):
            raise TricksError("--gpus needs CUDA, and this machine (or --device cpu) has none; drop --gpus")
        return ["cpu"] * per_gpu
    if not torch.cuda.is_available():
        raise TricksError("--device cuda, but CUDA is not available here; use --device cpu or auto")
    count = torch.cuda.device_count()
    if gpus in (None, "", "all"):
        ids = list(range(count))
    else:
        try:
            ids = [int(x) for x in str(gpus).split(",") if x.strip()]
        except ValueError:
            raise TricksError(f"--gpus {gpus!r}: give 'all' or GPU indices like 0,1") from None
        bad = [i for i in ids if not 0 <= i < count]
        if bad or not ids:
            raise TricksError(f"--gpus {gpus!r}: this machine has GPUs 0..{count - 1}")
    return [f"cuda:{i}" for i in ids for _ in range(per_gpu)]


_WORKER: dict[str, Any] = {}


def _worker_init(devices, parent: int) -> None:
    """A pool worker: take a device, keep data between networks, and exit with the job."""
    from tricks.data import keep_in_memory

    _WORKER["device"] = devices.get()
    keep_in_memory(True)

    def watch():  # a job killed with SIGKILL cannot stop its workers; they notice and leave
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True).start()


def _worker_train(task: dict) -> dict:
    task = {**task, "device": _WORKER.get("device", task["device"])}
    return train_one(task)


def _run_local(tasks: list[dict], devices: list[str], on_start, on_done) -> None:
    from tricks.data import keep_in_memory

    cpu = all(d == "cpu" for d in devices)
    threads = max(1, (os.cpu_count() or 1) // len(devices)) if cpu else None
    if len(devices) == 1:  # one at a time: in this process, with its threads
        keep_in_memory(True)
        try:
            for task in tasks:
                task = {**task, "device": devices[0]}
                on_start(task)
                on_done(train_one(task))
        finally:
            keep_in_memory(False)
        return
    queue = list(tasks)
    crashes: dict[str, int] = {}
    ctx = multiprocessing.get_context("spawn")
    while queue:
        slots = ctx.Queue()
        for d in devices:
            slots.put(d)
        pool = ProcessPoolExecutor(len(devices), mp_context=ctx, initializer=_worker_init, initargs=(slots, os.getpid()))
        running: dict = {}
        try:
            while queue or running:
                while queue and len(running) < len(devices):
                    task = {**queue.pop(0), "threads": threads}
                    on_start(task)
                    running[pool.submit(_worker_train, task)] = task
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in finished:
                    result = fut.result()  # a dead worker raises here, and its network stays in `running`
                    del running[fut]
                    on_done(result)
        except BrokenProcessPool as error:
            # a worker died (out of memory, a crash): its networks go back in the queue once
            for task in running.values():
                crashes[task["id"]] = crashes.get(task["id"], 0) + 1
                if crashes[task["id"]] >= 2:
                    on_done(_failed(task, f"the worker process died twice while training it ({error})"))
                else:
                    queue.insert(0, task)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _failed(task: dict, message: str) -> dict:
    result = {k: task[k] for k in ("id", "index", "space", "params", "config", "complexity")}
    result.update(status="failed", error=None, best_error=None, epochs=task["recipe"]["core"]["epochs"],
                  device=task["device"], run_dir=f"runs/{task['id']}", message=message, time_s=0.0)
    return result


def _run_ray(tasks: list[dict], per_gpu: int, device: str, address: str | None, on_start, on_done) -> None:
    try:
        import ray
    except ImportError:
        raise TricksError("--backend ray needs Ray: pip install 'tricks-regnet[ray]' (or pip install ray)") from None
    started = not ray.is_initialized()
    if started:
        kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(**kwargs)
    try:
        gpus = ray.cluster_resources().get("GPU", 0) if device != "cpu" else 0
        remote = ray.remote(num_cpus=1 if not gpus else 0, num_gpus=(1.0 / per_gpu) if gpus else 0,
                            max_retries=0)(train_one)
        refs = {}
        for task in tasks:
            task = {**task, "device": "cuda" if gpus else "cpu", "threads": 1 if not gpus else None}
            on_start(task)
            refs[remote.remote(task)] = task
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                task = refs.pop(ref)
                try:
                    on_done(ray.get(ref))
                except Exception as error:  # the task's worker died: recorded like any failure
                    on_done(_failed(task, f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"))
    finally:
        if started:
            ray.shutdown()


# --- the job -------------------------------------------------------------------------------------
def run(job: Job, gpus: str | None = None, per_gpu: int = 1, backend: str = "local", address: str | None = None,
        progress: Progress | None = None, retry_failed: bool = False, extra_plugins: list | None = None) -> dict:
    """Train every network of ``job`` that has no result yet; returns the job's summary."""
    progress = progress or Progress()
    if backend not in BACKENDS:
        raise TricksError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    device = job.recipe["core"]["device"]
    lock = _lock(job.out)
    try:
        devices = local_devices(device, gpus, per_gpu) if backend == "local" else []
        results = {r["id"]: r for r in job.results()}
        if retry_failed:
            results = {k: r for k, r in results.items() if r["status"] == "ok"}
        tasks = []
        for i, s in enumerate(job.samples):
            ident = job.ident(i)
            if ident in results:
                continue
            tasks.append({"id": ident, "index": i, "space": job.space.name, **s.to_dict(),
                          "recipe": job.recipe, "run_dir": str(job.out / "runs" / ident),
                          "device": devices[0] if devices else device, "extra_plugins": extra_plugins})
        ok = [r for r in results.values() if r["status"] == "ok"]
        progress.start(job, job.n, len(results), len(results) - len(ok), min((r["error"] for r in ok), default=None))

        def on_done(result: dict) -> None:
            io.write_json(job.result_path(result["id"]), result)
            progress.model_end(result)

        if backend == "local":
            _run_local(tasks, devices, progress.model_start, on_done)
        else:
            _run_ray(tasks, per_gpu, device, address, progress.model_start, on_done)
        summary = summarize(job)
        io.write_json(job.out / "summary.json", summary)
        progress.finish(summary)
        return summary
    finally:
        lock.close()


def _lock(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise TricksError(f"another sampling job is running in {out}; wait for it, or choose another --out") from None
    return handle


def summarize(job: Job) -> dict:
    rows = job.results()
    ok = [r for r in rows if r["status"] == "ok"]
    errors = sorted(r["error"] for r in ok)
    best = min(ok, key=lambda r: r["error"]) if ok else None
    return {
        "space": job.space.name, "n": job.n, "finished": len(rows), "ok": len(ok), "failed": len(rows) - len(ok),
        "min_error": errors[0] if errors else None,
        "median_error": (errors[len(errors) // 2] if len(errors) % 2 else
                         (errors[len(errors) // 2 - 1] + errors[len(errors) // 2]) / 2) if errors else None,
        "best": best["id"] if best else None,
        "train_hours": round(sum(r.get("time_s", 0.0) for r in rows) / 3600, 4),
    }


def sample_job(out, space, n, seed=0, window=None, plugins=None, config=None, sets=None, overrides=None,
               gpus=None, per_gpu=1, backend="local", address=None, progress=None, retry_failed=False,
               extra_plugins=None, registries=None) -> dict:
    """Plan (or continue) and run a sampling job: the Python form of ``tricks sample``."""
    if backend not in BACKENDS:
        raise TricksError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "local":
        local_devices(str((overrides or {}).get("device") or "auto"), gpus, per_gpu)  # bad requests fail before any work
    elif per_gpu < 1:
        raise TricksError(f"--per-gpu {per_gpu}: run at least one network per device")
    job = plan(out, space, n, seed, window, plugins, config, sets, overrides, registries)
    return run(job, gpus, per_gpu, backend, address, progress, retry_failed, extra_plugins)


def load_job(out: str | Path) -> Job:
    """A job as planned in ``out`` (for analysis and tests)."""
    out = Path(out)
    if not (out / "sweep.json").exists():
        raise TricksError(f"{out} holds no sampling job (no sweep.json); start one with tricks sample --out {out}")
    meta = json.loads((out / "sweep.json").read_text())
    from .config import AnyNetConfig

    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines() if line.strip()]
    samples = [Sample(r["params"], AnyNetConfig.from_dict(r["config"]), r["complexity"]) for r in rows]
    window = Window.from_dict(meta["window"])
    return Job(out, DesignSpace(meta["space_spec"]), meta["n"], meta["seed"], window, meta["recipe"],
               meta["resolution"], meta["stem"], meta["num_classes"], samples[: meta["n"]])


__all__ = ["Job", "Progress", "plan", "run", "sample_job", "load_job", "train_one", "summarize", "local_devices",
           "base_recipe"]
