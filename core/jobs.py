"""Jobs: a plan of runs, some depending on others, executed by one engine.

A job lives in one folder::

    OUT/job.json            the plan: its kind, the planner's description, one entry per item
    OUT/results/ID.json     one result per finished item: ok (its metrics), diverged (where its loss
                            became non-finite, and the message) or failed (the message)
    OUT/<item's run_dir>/   the item's run directory (runs/ID/ unless the planner names another)
    OUT/.lock               held while the job runs: a second command on the same folder is refused

An item is one run: a recipe (what ``tricks.run`` takes), items it waits for (``after``), and
settings that name an earlier item's run directory (``inputs``: ``{"core.init_from": "train"}``
starts from that item's last weights, ``{"kd.teacher": "teacher"}`` distils from it).

One resume policy, whatever planned the job (``tricks ablate``, ``tricks sample``, a plugin's
procedure): running the same job again skips items with a result; an item whose run directory
finished but whose result was never written gets its result without training; an interrupted item
resumes from its last checkpoint; an item killed before its first checkpoint starts again (nothing
of it was trained); a failed item stays failed unless ``retry_failed``; a diverged item stays
diverged, ``retry_failed`` or not (the same seed and settings diverge again: change the settings,
which is another job); an item whose dependency failed or diverged is recorded as failed.
Settings that do not change what is trained (the device, loader workers, logging, plots) may
differ between the command that started a job and the one that continues it; any other
difference is refused.

Items run in this process one at a time, in a local process pool (devices x K per device, each
worker keeping the data on its device between runs), or as Ray tasks. Before any item trains, the
job's folder is checked (:func:`check_writable`): a file, a folder that cannot be written or a full
disk is a one-line error, not a traceback after the first run.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import atomic
from .errors import Diverged, TricksError
from .rundir import RunDir

BACKENDS = ("local", "ray")
# Settings that may differ between the command that started a job and the one that continues it.
FREE_SETTINGS = {("core", "device"), ("core", "workers"), ("core", "log_every"), ("core", "curves")}
# Sections of a recipe that record the run rather than decide it.
_RECORDS = ("versions", "adhoc_plugins")
# What an item's result says of it; "diverged" items are kept, like "ok" ones, by ``retry_failed``.
STATUSES = ("ok", "diverged", "failed")
KEPT = ("ok", "diverged")
# The least free space a job's folder needs before anything is trained (a checkpoint is megabytes).
MIN_FREE_BYTES = 16 << 20


@dataclass
class Item:
    """One run of a job."""

    id: str
    recipe: dict[str, Any]
    run_dir: str = ""
    after: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.id or "/" in self.id or self.id.startswith("."):
            raise TricksError(f"job item id {self.id!r}: use a non-empty name without '/' that does not start with '.'")
        self.run_dir = self.run_dir or f"runs/{self.id}"
        self.after = sorted(set(self.after) | set(self.inputs.values()))


@dataclass
class Job:
    """A planned job: ``items`` in the order they start; ``meta`` is the planner's description,
    which a continuing command must repeat. ``describe(result)`` adds the planner's own figures
    to an item's result before it is written."""

    out: Path
    kind: str
    items: list[Item]
    meta: dict[str, Any] = field(default_factory=dict)
    describe: Callable[[dict], dict] | None = field(default=None, repr=False)

    def __post_init__(self):
        self.out = Path(self.out)
        seen: set[str] = set()
        for item in self.items:
            if item.id in seen:
                raise TricksError(f"job item id '{item.id}' is used twice; give every item its own id")
            unknown = [d for d in item.after if d not in seen]
            if unknown:
                raise TricksError(f"job item '{item.id}' depends on '{unknown[0]}', which is not an earlier item of the job")
            seen.add(item.id)

    def result_path(self, ident: str) -> Path:
        return self.out / "results" / f"{ident}.json"

    def run(self, item: Item) -> RunDir:
        return RunDir(self.out / item.run_dir)

    def results(self) -> dict[str, dict]:
        """The recorded results by item id, in plan order; a result file that is not one is a
        TricksError naming it."""
        found = {}
        for item in self.items:
            path = self.result_path(item.id)
            if _exists(path):
                found[item.id] = read_result(path)
        return found


def read_result(path: Path) -> dict:
    """One ``results/ID.json``: a JSON object with a known ``status``."""
    fix = "remove it and run the job again (a finished run is read again, not retrained)"
    if not path.is_file():
        raise TricksError(f"{path} is not a job result (not a file); {fix}")
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise TricksError(f"{path} is not a job result ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else 'unreadable'}); {fix}") from None
    if not isinstance(result, dict) or result.get("status") not in STATUSES:
        raise TricksError(f"{path} is not a job result (no status {', '.join(STATUSES)}); {fix}")
    return result


class JobProgress:
    """What the engine reports while a job runs; every method may be left as is."""

    def start(self, job: Job, total: int, done: int, failed: int, diverged: int = 0) -> None:
        """``done`` items of ``total`` have a result already: ``failed`` of them failed and
        ``diverged`` diverged."""

    def item_start(self, item: Item, resuming: bool) -> Any:
        """Called before an item trains; returns the :class:`tricks.Reporter` of a run trained in
        this process (None: silent)."""
        return None

    def item_end(self, item: Item, result: dict) -> None: ...

    def finish(self, job: Job, results: dict[str, dict]) -> None: ...


# --- the plan file ------------------------------------------------------------------------------
def identity(recipe: dict) -> dict:
    """A recipe without what may change between commands (free settings, recorded versions)."""
    out = {}
    for section, values in recipe.items():
        if section in _RECORDS:
            continue
        out[section] = ({k: v for k, v in values.items() if (section, k) not in FREE_SETTINGS}
                        if isinstance(values, dict) else values)
    return json.loads(json.dumps(out))


def first_difference(a: Any, b: Any, where: str = "") -> str:
    """Where two JSON-like values first differ, as ``key.path: old before, new now``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key) != b.get(key):
                return first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
    return f"{where or 'value'}: {a!r} before, {b!r} now"


def _item_plan(item: Item) -> dict:
    return {"id": item.id, "run_dir": item.run_dir, "after": item.after, "inputs": item.inputs,
            "recipe": identity(item.recipe), "meta": json.loads(json.dumps(item.meta))}


def write_plan(job: Job) -> None:
    """Write ``job.json``, or check that a job already in the folder is this one (it may have
    fewer items: a job extended by a larger plan keeps its first items)."""
    path = job.out / "job.json"
    plan = {"kind": job.kind, "meta": json.loads(json.dumps(job.meta)), "items": [_item_plan(i) for i in job.items]}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise TricksError(f"{path} is not a job plan (not JSON); remove it, or choose another --out") from None
        if (not isinstance(old, dict) or not isinstance(old.get("kind"), str) or not isinstance(old.get("meta", {}), dict)
                or not isinstance(old.get("items"), list) or not all(isinstance(i, dict) for i in old["items"])):
            raise TricksError(f"{path} is not a job plan (it needs a kind, a meta object and a list of items); "
                              "restore it by hand, or choose another --out")
        what = {"ablation": "an ablation", "sample": "a sampling job"}.get(old.get("kind"), f"a '{old.get('kind')}' job")
        fix = "repeat its command to continue it, or choose another --out"
        if old.get("kind") != job.kind:
            raise TricksError(f"{job.out} holds {what}, not {'an' if job.kind[0] in 'aeiou' else 'a'} {job.kind}; choose another --out")
        if identity(old.get("meta") or {}) != identity(plan["meta"]):
            raise TricksError(f"{job.out} holds {what} with other settings "
                              f"({first_difference(identity(old['meta']), identity(plan['meta']))}); {fix}")
        for before, now in zip(old.get("items") or [], plan["items"]):
            if before != now:
                raise TricksError(f"{job.out} holds {what} whose item '{before.get('id')}' differs "
                                  f"({first_difference(before, now)}); {fix}")
        if len(plan["items"]) < len(old.get("items") or []):
            plan["items"] += old["items"][len(plan["items"]):]
    job.out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, plan)


def _exists(path: Path) -> bool:
    try:
        return path.exists() or path.is_symlink()
    except OSError:  # e.g. a folder above it that cannot be searched
        return True


def check_writable(path: str | Path, what: str = "--out", min_free: int = MIN_FREE_BYTES) -> Path:
    """Check, before any work, that a folder can be made (or used) at ``path`` and written to;
    ``what`` names it in the one-line :class:`TricksError` (``--out``). Refused: a file (or a
    broken link) at ``path`` or above it, a folder that cannot be written (permissions, a
    read-only filesystem), and a filesystem with less than ``min_free`` bytes free. Writes and
    removes one empty probe file in the nearest existing folder; creates nothing else."""
    path = Path(path)
    fix = f"choose another {what}"
    if path.is_symlink() and not path.exists():
        raise TricksError(f"{what} {path} is a broken link; remove it, or {fix}")
    if _exists(path) and not path.is_dir():
        raise TricksError(f"{what} {path} is a file, not a folder; {fix}")
    folder = path
    while not _exists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise TricksError(f"{what} {path}: {folder} is a file, so no folder can be made under it; {fix}")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".tricks-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        reason = {errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied", errno.ENOSPC: "no space left on the device",
                  errno.ENOENT: "it accepts no new files",
                  errno.EDQUOT: "disk quota exceeded"}.get(error.errno, error.strerror or type(error).__name__)
        raise TricksError(f"{what} {path}: cannot write in {folder} ({reason}); {fix}") from None
    free = shutil.disk_usage(folder).free
    if free < min_free:
        raise TricksError(f"{what} {path}: only {free / 2**20:.1f} MiB free on its filesystem, and at least "
                          f"{min_free / 2**20:.0f} MiB are needed; free some space, or {fix}")
    return path


def lock(out: Path):
    """Hold ``OUT/.lock`` while the job runs, with this process's PID in it (the operating system
    releases it however the process ends); another job on the same folder is refused, naming
    the process that holds it. ``out`` is checked first (:func:`check_writable`)."""
    check_writable(out, "--out")
    return atomic.hold_lock(out, "the job folder", "another job is running in it: wait for it, or choose another --out")


# --- one item (in this process, a pool worker or a Ray task) -------------------------------------
def run_result(run: RunDir, rows: list[dict] | None = None) -> dict:
    """The figures of a finished run that every job records (``rows``: its metrics, when they
    are not to be read from ``metrics.jsonl``)."""
    rows = run.metrics() if rows is None else rows
    summary = run.summary() or {}
    accs = [r["val_acc"] for r in rows if r.get("val_acc") is not None]
    result = {"epochs": len(rows),
              "final_val_acc": accs[-1] if accs else None,
              "best_val_acc": max(accs) if accs else None,
              "final_val_loss": rows[-1].get("val_loss") if rows else None,
              "train_seconds": round(sum(r.get("epoch_seconds") or 0.0 for r in rows), 3),
              "params": summary.get("params")}
    metric = summary.get("metric")
    if metric and metric != "val_acc":  # a task's own metric (detection: val_map), final and best
        values = [r[metric] for r in rows if r.get(metric) is not None]
        result.update({"metric": metric, f"final_{metric}": values[-1] if values else None,
                       f"best_{metric}": max(values) if values else None})
    return result


def diverged_result(run: RunDir, error: Diverged | None = None) -> dict:
    """The result of a run whose training loss became non-finite: where (``diverged_at``: epoch,
    counted from 1, and step, as in its summary) and why (``message``), the epochs it finished
    before, and no accuracy (its last good figures stay in its ``metrics.jsonl``)."""
    try:
        summary = run.summary() or {}
    except ValueError:  # a summary torn by hand: the exception still says where
        summary = {}
    at = summary.get("diverged_at") if isinstance(summary.get("diverged_at"), dict) else {}
    if error is not None and not at:
        at = {"epoch": error.epoch + 1, "step": error.step}  # counted from 1, as in the summary
    message = str(error) if error is not None else str(summary.get("message") or "the training loss became non-finite")
    rows = run.metrics()
    return {"status": "diverged", "diverged_at": {"epoch": at.get("epoch"), "step": at.get("step")},
            "message": message.splitlines()[0][:500] if message else "", "epochs": len(rows),
            "final_val_acc": None, "best_val_acc": None, "final_val_loss": None,
            "train_seconds": round(sum(r.get("epoch_seconds") or 0.0 for r in rows), 3),
            "params": summary.get("params")}


def _trained_through(run: RunDir) -> list[dict] | None:
    """The metrics of every epoch of a run killed after its last checkpoint but before its summary
    (from the checkpoint, which holds them all); None when it has epochs left to train."""
    checkpoint = run.load_checkpoint()
    epochs = run.epochs()
    if checkpoint is None or epochs is None or int(checkpoint.get("epoch", 0)) < epochs:
        return None
    history = checkpoint.get("history")
    return list(history) if isinstance(history, list) and len(history) >= epochs else None


def train_item(task: dict) -> dict:
    """Train (or resume, or just read) one item; never raises: a failure or a divergence comes
    back as a result."""
    import tricks

    run = RunDir(task["run_path"])
    start = time.time()
    result = {"id": task["id"], "status": "ok", "device": task["device"], "run_dir": task["run_dir"]}
    try:
        if task.get("threads"):
            import torch

            torch.set_num_threads(task["threads"])
        extra = list(task.get("extra_plugins") or []) or None
        reporter = task.get("reporter") or tricks.Reporter()
        state = run.status()
        rows = None
        if state == "diverged":  # trained before and diverged: the same settings would diverge again
            result.update(diverged_result(run))
        elif state == "interrupted":
            try:
                tricks.run(resume=run.path, plugins=extra, device=task["device"], reporter=reporter)
            except TricksError:
                # killed after its last checkpoint but before its summary: every epoch is trained,
                # and the checkpoint holds their metrics; nothing is lost, nothing failed
                try:
                    rows = _trained_through(run)
                except TricksError:
                    rows = None
                if rows is None:
                    raise
        elif state != "finished":
            if state == "started":
                run.remove()  # killed before its first checkpoint: nothing of it was trained
            recipe = json.loads(json.dumps(task["recipe"]))
            for section in _RECORDS:
                recipe.pop(section, None)
            for setting, path in task["inputs"].items():
                section, _, key = setting.rpartition(".")
                recipe.setdefault(section or "core", {})[key] = path
            recipe.setdefault("core", {})["device"] = task["device"]
            tricks.run(recipe, plugins=extra, out=run.path, reporter=reporter)
        if result["status"] == "ok":
            result.update(run_result(run) if rows is None else run_result(run, rows))
    except Diverged as error:  # recorded, and the job goes on; the run kept its last good epoch
        result.update(diverged_result(run, error))
    except Exception as error:  # recorded, and the job goes on
        result.update(status="failed", message=f"{type(error).__name__}: {error}".splitlines()[0][:500])
        try:
            run.path.mkdir(parents=True, exist_ok=True)
            run.write_error(traceback.format_exc())
        except OSError:
            pass
    result["time_s"] = round(time.time() - start, 3)
    return atomic.finite(result)


# --- backends -------------------------------------------------------------------------------------
def local_devices(device: str, gpus: str | None, per_device: int) -> list[str]:
    """One entry per worker: ``cuda:i`` repeated ``per_device`` times for each chosen GPU, or ``cpu``."""
    import torch

    if per_device < 1:
        raise TricksError(f"--per-gpu {per_device}: run at least one item per device")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        if gpus not in (None, "", "all"):
            raise TricksError("--gpus needs CUDA, and this machine (or --device cpu) has none; drop --gpus")
        return ["cpu"] * per_device
    if not torch.cuda.is_available():
        raise TricksError(f"--device {device}, but CUDA is not available here; use --device cpu or auto")
    count = torch.cuda.device_count()
    if device.startswith("cuda:") and gpus in (None, "", "all"):
        gpus = device[5:]
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
    return [f"cuda:{i}" for i in ids for _ in range(per_device)]


_WORKER: dict[str, Any] = {}


def _worker_init(devices, parent: int) -> None:
    """A pool worker: take a device, keep data between runs, and exit with the job."""
    from .data import keep_in_memory

    _WORKER["device"] = devices.get()
    keep_in_memory(True)

    def watch():  # a job killed with SIGKILL cannot stop its workers; they notice and leave
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True).start()


def _worker_train(task: dict) -> dict:
    return train_item({**task, "device": _WORKER.get("device", task["device"])})


def _failed(task: dict, message: str) -> dict:
    return {"id": task["id"], "status": "failed", "device": task["device"], "run_dir": task["run_dir"],
            "message": message, "time_s": 0.0}


def _run_here(tasks: list[dict], device: str, on_start, on_done) -> None:
    from .data import keep_in_memory

    keep_in_memory(True)
    try:
        for task in tasks:
            task = {**task, "device": device}
            on_done(task, train_item({**task, "reporter": on_start(task)}))
    finally:
        keep_in_memory(False)


def _run_pool(tasks: list[dict], devices: list[str], on_start, on_done) -> None:
    cpu = all(d == "cpu" for d in devices)
    threads = max(1, (os.cpu_count() or 1) // len(devices)) if cpu else None
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
                    result = fut.result()  # a dead worker raises here, and its item stays in `running`
                    on_done(running.pop(fut), result)
        except BrokenProcessPool as error:
            # a worker died (out of memory, a crash): its items go back in the queue once
            for task in running.values():
                crashes[task["id"]] = crashes.get(task["id"], 0) + 1
                if crashes[task["id"]] >= 2:
                    on_done(task, _failed(task, f"the worker process died twice while training it ({error})"))
                else:
                    queue.insert(0, task)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _run_ray(tasks: list[dict], per_device: int, device: str, address: str | None, on_start, on_done) -> None:
    try:
        import ray
    except ImportError:
        raise TricksError("--backend ray needs Ray: pip install ray") from None
    started = not ray.is_initialized()
    if started:
        kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.init(address=address, **kwargs) if address else ray.init(**kwargs)
    try:
        gpus = ray.cluster_resources().get("GPU", 0) if device != "cpu" else 0
        remote = ray.remote(num_cpus=1 if not gpus else 0, num_gpus=(1.0 / per_device) if gpus else 0,
                            max_retries=0)(train_item)
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
                    result = ray.get(ref)
                except Exception as error:  # the task's worker died: recorded like any failure
                    result = _failed(task, f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
                on_done(task, result)
    finally:
        if started:
            ray.shutdown()


def check_backend(backend: str, device: str, gpus: str | None, per_device: int) -> None:
    """Refuse a bad backend or device request before anything is planned or trained."""
    if backend not in BACKENDS:
        raise TricksError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "local":
        local_devices(device, gpus, per_device)
    elif per_device < 1:
        raise TricksError(f"--per-gpu {per_device}: run at least one item per device")


# --- the engine -----------------------------------------------------------------------------------
def run_job(job: Job, *, device: str | None = None, gpus: str | None = None, per_device: int = 1,
            backend: str = "local", address: str | None = None, progress: JobProgress | None = None,
            retry_failed: bool = False, extra_plugins: list | None = None) -> dict[str, dict]:
    """Run every item of ``job`` that has no result yet, in dependency order; returns every
    item's result by id. ``device`` defaults to the first item's ``core.device``.
    ``retry_failed`` trains the failed items again (not the diverged ones: with the same seed
    and settings they diverge again)."""
    progress = progress or JobProgress()
    device = device or ((job.items[0].recipe.get("core") or {}).get("device") if job.items else None) or "auto"
    check_backend(backend, device, gpus, per_device)
    handle = lock(job.out)
    try:
        _check_folders(job)
        write_plan(job)
        results = job.results()
        if retry_failed:
            results = {k: r for k, r in results.items() if r["status"] in KEPT}
        items = {i.id: i for i in job.items}

        def record(item: Item, result: dict, report: bool = True) -> None:
            result = {**result, **item.meta}
            if job.describe is not None:
                result = job.describe(result)
            result = atomic.finite(result)
            atomic.write_json(job.result_path(item.id), result)
            results[item.id] = result
            if report:
                progress.item_end(item, result)

        # a run that finished (or diverged) but was killed before its result was written is only read
        for item in job.items:
            if item.id in results:
                continue
            run = job.run(item)
            state = run.status()
            if state == "finished":
                record(item, {"id": item.id, "status": "ok", "device": None, "run_dir": item.run_dir,
                              **run_result(run), "time_s": 0.0}, report=False)
            elif state == "diverged":
                record(item, {"id": item.id, "device": None, "run_dir": item.run_dir, **diverged_result(run),
                              "time_s": 0.0}, report=False)
        failed = sum(1 for r in results.values() if r["status"] == "failed")
        diverged = sum(1 for r in results.values() if r["status"] == "diverged")
        progress.start(job, len(job.items), len(results), failed, diverged=diverged)

        devices = local_devices(device, gpus, per_device) if backend == "local" else [device]
        waiting = [i for i in job.items if i.id not in results]
        while waiting:
            ready, blocked = [], []
            for item in waiting:
                bad = [d for d in item.after if d in results and results[d]["status"] != "ok"]
                if bad:
                    how = "diverged" if results[bad[0]]["status"] == "diverged" else "failed"
                    record(item, _failed(_task(job, item, devices[0], extra_plugins),
                                         f"it depends on '{bad[0]}', which {how}"))
                elif all(d in results for d in item.after):
                    ready.append(item)
                else:
                    blocked.append(item)
            if not ready:
                break
            tasks = [_task(job, item, devices[0], extra_plugins) for item in ready]

            def on_start(task: dict):
                item = items[task["id"]]
                return progress.item_start(item, job.run(item).status() == "interrupted")

            def on_done(task: dict, result: dict) -> None:
                record(items[task["id"]], result)

            if backend == "ray":
                _run_ray(tasks, per_device, device, address, on_start, on_done)
            elif len(devices) == 1:
                _run_here(tasks, devices[0], on_start, on_done)
            else:
                _run_pool(tasks, devices, on_start, on_done)
            waiting = [i for i in blocked if i.id not in results]
        ordered = {i.id: results[i.id] for i in job.items if i.id in results}
        progress.finish(job, ordered)
        return ordered
    finally:
        handle.close()


def _check_folders(job: Job) -> None:
    """The folders a job writes under ``OUT`` (``results/``, and the first folder of each item's
    run directory) must be folders where they exist, and its plan a file: anything else there is
    refused before any item trains."""
    tops = ["results"] + sorted({Path(i.run_dir).parts[0] for i in job.items if Path(i.run_dir).parts})
    for top in tops:
        path = job.out / top
        if _exists(path) and not path.is_dir():
            raise TricksError(f"{path} is a file, but the job keeps its {'results' if top == 'results' else 'runs'} "
                              "there; move the file away, or choose another --out")
    plan = job.out / "job.json"
    if _exists(plan) and not plan.is_file():
        raise TricksError(f"{plan} is not a file, but the job keeps its plan there; move it away, or choose another --out")


def _task(job: Job, item: Item, device: str, extra_plugins: list | None) -> dict:
    run_dirs = {i.id: i.run_dir for i in job.items}
    inputs = {setting: str((job.out / run_dirs[source]).resolve()) for setting, source in item.inputs.items()}
    return {"id": item.id, "recipe": item.recipe, "run_dir": item.run_dir, "run_path": str(job.out / item.run_dir),
            "inputs": inputs, "device": device, "extra_plugins": extra_plugins}


__all__ = ["Item", "Job", "JobProgress", "run_job", "write_plan", "train_item", "run_result", "diverged_result",
           "read_result", "check_writable", "local_devices", "check_backend", "identity", "first_difference",
           "BACKENDS", "FREE_SETTINGS", "STATUSES"]
