"""``tricks.jobs``: one engine for a plan of runs. Items that depend on earlier ones, failures
recorded and passed on, the plan checked when a job is continued, one lock per job folder, and
one resume policy that ``tricks ablate`` and ``tricks sample`` share, driven through real kills."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch

import tricks
from tricks.errors import TricksError
from tricks.jobs import Item, Job, lock, run_job

from conftest import TINY_API
from processes import one_torch_thread, snapshot

FAST = dict(TINY_API, train_limit=128, val_limit=64, epochs=2, device="cpu")


def recipe(**core) -> dict:
    return tricks.resolve(plugins=[], overrides={**FAST, **core}).to_dict()


class SeesItsStart(tricks.Plugin):
    """Records, for a run that starts from another's weights, whether the model it trains holds
    exactly that run's last weights when training starts."""

    name = "sees_its_start"

    def __init__(self):
        super().__init__()
        self.seen: dict[str, bool] = {}

    @tricks.hookimpl
    def on_fit_start(self, ctx):
        if ctx.core.init_from:
            want = tricks.RunDir(ctx.core.init_from).load_checkpoint()["model"]
            got = ctx.model.state_dict()
            self.seen[ctx.run_dir.name] = all(torch.equal(got[k], want[k]) for k in want)


class FailsIn(tricks.Plugin):
    name = "fails_in"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    @tricks.hookimpl
    def on_fit_start(self, ctx):
        if ctx.run_dir.name == self.folder:
            raise RuntimeError("this run cannot be trained")


def test_an_item_starts_from_the_weights_of_the_item_it_depends_on(tmp_path):
    job = Job(tmp_path / "job", "test", [
        Item("pretrain", recipe()),
        Item("finetune", recipe(lr=0.01), inputs={"core.init_from": "pretrain"}),
    ])
    watcher = SeesItsStart()
    with one_torch_thread():
        results = run_job(job, extra_plugins=[watcher])
    assert [r["status"] for r in results.values()] == ["ok", "ok"]
    assert watcher.seen == {"finetune": True}
    finetune = tricks.RunDir(tmp_path / "job" / "runs" / "finetune")
    assert Path(finetune.config()["core"]["init_from"]) == (tmp_path / "job" / "runs" / "pretrain").resolve()
    assert job.items[1].after == ["pretrain"]


@pytest.mark.slow
def test_a_failure_is_recorded_its_dependants_fail_and_the_others_go_on(tmp_path):
    job = Job(tmp_path / "job", "test", [
        Item("a", recipe()),
        Item("b", recipe(), after=["a"]),
        Item("c", recipe(seed=1)),
    ])
    with one_torch_thread():
        results = run_job(job, extra_plugins=[FailsIn("a")])
    assert {k: r["status"] for k, r in results.items()} == {"a": "failed", "b": "failed", "c": "ok"}
    assert "this run cannot be trained" in results["a"]["message"]
    assert "depends on 'a'" in results["b"]["message"]
    assert "RuntimeError" in (tmp_path / "job" / "runs" / "a" / "error.txt").read_text()
    assert results["c"]["final_val_acc"] == tricks.RunDir(tmp_path / "job" / "runs" / "c").metrics()[-1]["val_acc"]
    # continuing keeps the failures; retry_failed trains them again, and then their dependants
    with one_torch_thread():
        assert run_job(job)["a"]["status"] == "failed"
        again = run_job(job, retry_failed=True)
    assert {k: r["status"] for k, r in again.items()} == {"a": "ok", "b": "ok", "c": "ok"}


def test_a_continued_job_must_be_the_same_plan_and_one_job_holds_a_folder(tmp_path):
    out = tmp_path / "job"
    with one_torch_thread():
        run_job(Job(out, "test", [Item("a", recipe())]))
        # the device may change between the command that started a job and the one continuing it
        run_job(Job(out, "test", [Item("a", recipe(device="auto"))]))
    with pytest.raises(TricksError, match=r"item 'a' differs \(recipe\.core\.lr: 0\.1 before, 0\.2 now\)"):
        run_job(Job(out, "test", [Item("a", recipe(lr=0.2))]))
    with pytest.raises(TricksError, match="holds a 'test' job, not an other"):
        run_job(Job(out, "other", [Item("a", recipe())]))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(TricksError, match="is a file, not a folder"):
        run_job(Job(tmp_path / "a_file", "test", [Item("a", recipe())]))
    held = lock(out)
    try:
        with pytest.raises(TricksError, match="in use by process .*another job is running in it"):
            run_job(Job(out, "test", [Item("a", recipe())]))
    finally:
        held.close()


@pytest.mark.parametrize("ids, after, message", [
    (["a", "a"], [[], []], "used twice"),
    (["a", "b"], [["b"], []], "depends on 'b', which is not an earlier item"),
    (["a/b"], [[]], "without '/'"),
])
def test_bad_plans_are_refused_before_anything_runs(tmp_path, ids, after, message):
    with pytest.raises(TricksError, match=message):
        Job(tmp_path, "test", [Item(i, {}, after=a) for i, a in zip(ids, after)])
    assert list(tmp_path.iterdir()) == []


# --- ablate and sample share one resume policy ------------------------------------------------------
# Each job is killed in its second item: before the first checkpoint ("started"), in the middle
# ("interrupted", after epoch 1's checkpoint), or after the run finished but before the job wrote
# its result ("finished"). The killed job runs in a forked child of this process (SIGKILL: no
# clean-up, as after a power cut); the same job is then run again here, and must end with the
# results of a job that was never interrupted.
SPACE = {"name": "tiny", "kind": "anynet", "stages": 2,
         "params": {"depth": {"values": [1, 2]}, "width": {"low": 8, "high": 24, "step": 8},
                    "bottleneck": {"values": [1]}, "group_width": {"values": [8]}}}
TARGETS = {"ablate": "only-cosine", "sample": "0001"}


def _run(kind: str, out: Path, extra: list | None = None) -> None:
    if kind == "ablate":
        from tricks.ablate import ablate

        ablate(["cosine"], overrides=FAST, out=out, extra_plugins=extra)
    else:
        from tricks_regnet.sweep import sample_job

        sample_job(out, SPACE, 2, overrides=FAST, extra_plugins=extra)


class Kill(tricks.Plugin):
    name = "kill"

    def __init__(self, target: str, epoch: int):
        super().__init__()
        self.target, self.epoch = target, epoch

    @tricks.hookimpl
    def on_epoch_start(self, ctx, epoch):
        if self.target in str(ctx.run_dir) and epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


def _killed_job(kind: str, mode: str, out: Path) -> None:
    import tricks.jobs

    torch.set_num_threads(1)
    target = TARGETS[kind]
    if mode == "finished":
        read = tricks.jobs.run_result

        def run_result(run):
            if target in str(run.path):
                os.kill(os.getpid(), signal.SIGKILL)
            return read(run)

        tricks.jobs.run_result = run_result
    if mode == "committed":  # the last epoch's checkpoint renamed into place, its metrics and summary not
        real, renamed = os.replace, []

        def replace(src, dst, *args, **kwargs):
            real(src, dst, *args, **kwargs)
            if target in str(dst) and Path(dst).name == tricks.RunDir.CHECKPOINT.name:
                renamed.append(dst)
                if len(renamed) == FAST["epochs"]:
                    os.kill(os.getpid(), signal.SIGKILL)

        os.replace = replace
    _run(kind, out, [Kill(target, {"started": 0, "interrupted": 1}.get(mode, -1))])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    with one_torch_thread():
        for kind in TARGETS:
            _run(kind, root / kind)
    return {kind: root / kind for kind in TARGETS}


def _results(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["started", "interrupted", "committed", "finished"])
@pytest.mark.parametrize("kind", ["ablate", "sample"])
def test_ablate_and_sample_resume_the_same_way(tmp_path, uninterrupted, kind, mode):
    out = tmp_path / kind
    child = multiprocessing.get_context("fork").Process(target=_killed_job, args=(kind, mode, out))
    child.start()
    child.join(300)
    assert child.exitcode == -signal.SIGKILL, child.exitcode
    killed = next(p for p in (out / "runs").rglob("config.yaml") if TARGETS[kind] in str(p)).parent
    assert len(_results(out)) == 1  # the first item finished, the second was killed
    run = tricks.RunDir(killed)
    assert run.status() == {"committed": "interrupted"}.get(mode, mode)
    before = snapshot(killed)

    with one_torch_thread():
        _run(kind, out)
    got, want = _results(out), _results(uninterrupted[kind])
    assert sorted(got) == sorted(want)
    for ident in want:
        assert (got[ident]["status"], got[ident]["epochs"]) == ("ok", 2), ident
        for key in ("final_val_acc", "best_val_acc", "final_val_loss"):
            assert got[ident][key] == pytest.approx(want[ident][key], rel=1e-6), (ident, key)
    rows = run.metrics()
    assert [r["epoch"] for r in rows] == [1, 2]
    if mode == "finished":
        assert snapshot(killed) == before  # read, not trained again
    if mode == "committed":  # completed from its checkpoint, not trained again
        assert snapshot(killed)[str(tricks.RunDir.CHECKPOINT)] == before[str(tricks.RunDir.CHECKPOINT)]
    if mode == "interrupted":
        assert rows[0] == json.loads(before["metrics.jsonl"].decode().splitlines()[0])  # epoch 1 kept
