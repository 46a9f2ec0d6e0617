"""Every pair of registered plugins that the registry does not mark as conflicting trains together
for a few steps; the pairs it marks are refused with a one-line error naming the conflict; and the
largest conflict-free bag trains at once, in fp32 and in each low precision.

A plugin joins these tests by being registered. Each plugin runs with its ``example_settings``
(the defaults for most; a teacher for kd).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import tricks
from tricks.registry import EXCLUSIVE, Catalog, default_registry_file, load_registry_file
from tricks.testing import tiny_run

pytestmark = pytest.mark.slow  # every test here trains end to end

ENTRIES = {name: entry for name, (entry, _) in load_registry_file(default_registry_file()).items()}
NAMES = sorted(ENTRIES)
# tiny_run with two steps of 32 digits, a small validation set; no curves.png (tested elsewhere; a plot
# per run would be a third of the cost of these hundreds of runs)
FEW_STEPS = dict(train_limit=64, val_limit=32, curves=False)


def few_steps(names: list[str]) -> dict:
    """FEW_STEPS, with the example model of a plugin of the run that provides one (``regnet``: ``anynet``)
    and the example core settings of a task plugin (``detection``: its task and data set)."""
    catalog, steps = Catalog(), dict(FEW_STEPS)
    for name in names:
        cls = catalog.plugins[name].load()
        steps.update(cls.example_core or {})
        if cls.example_model and "model" not in steps:
            steps["model"] = cls.example_model
    return steps


def task_of(names: list[str]) -> str:
    """The task of a run of these plugins: the one a task plugin among them brings, else classification."""
    return next((ENTRIES[n].task for n in names if ENTRIES[n].task), "classification")


def legal(names: list[str]) -> bool:
    """Whether every plugin works in the run's task (the registry's ``tasks``)."""
    task = task_of(names)
    return all(task in ENTRIES[n].tasks for n in names)


def assert_trained(run: tricks.RunDir, names: list[str]) -> None:
    """The run trained its one epoch with exactly the plugins ``names``, to finite losses."""
    assert sorted(run.config()["plugins"]) == sorted(names)
    [row] = run.metrics()
    judged = "val_loss" if "val_loss" in row else (run.summary() or {}).get("metric", "val_acc")  # detection: val_map
    assert math.isfinite(row["train_loss"]) and math.isfinite(row[judged]), row


def conflicting(a: str, b: str) -> bool:
    """What the registry declares: a listed conflict, or the same exclusive capability."""
    ea, eb = ENTRIES[a], ENTRIES[b]
    return b in ea.conflicts or a in eb.conflicts or bool(set(ea.provides) & set(eb.provides) & set(EXCLUSIVE))


def bag(task: str = "classification") -> list[str]:
    """The registered plugins of ``task`` (for a task a plugin brings, that plugin first), mixup first
    (the paper's recipe has it) and then in name order, skipping each that conflicts with one already in."""
    chosen: list[str] = []
    for name in sorted(NAMES, key=lambda n: (ENTRIES[n].task != task, n != "mixup", n)):
        if task in ENTRIES[name].tasks and not any(conflicting(name, other) for other in chosen):
            chosen.append(name)
    return chosen


TASKS = sorted({e.task for e in ENTRIES.values() if e.task})  # the tasks plugins bring (detection)


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """Each plugin's example settings as ``--set`` strings, made once for the module."""
    catalog, cache = Catalog(), {}

    def sets(name: str) -> list[str]:
        if name not in cache:
            cls = catalog.plugins[name].load()
            example = cls.example_settings(tmp_path_factory.mktemp(f"example-{name}"))
            cache[name] = [f"{name}.{k}={v}" for k, v in example.items()]
        return cache[name]

    return sets


PAIRS = list(itertools.combinations(NAMES, 2))


@pytest.mark.parametrize("a, b", PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_every_pair_trains_together_unless_the_registry_says_they_conflict(a, b, examples, tmp_path):
    if conflicting(a, b):
        with pytest.raises(tricks.TricksError, match="conflict"):
            tricks.resolve(plugins=[a, b])
        return
    if not legal([a, b]):  # mixup with detection: refused
        with pytest.raises(tricks.TricksError, match="does not apply to the"):
            tricks.resolve(plugins=[a, b], overrides={"task": task_of([a, b])})
        return
    run = tiny_run(plugins=[a, b], set=examples(a) + examples(b), out=tmp_path / "run", **few_steps([a, b]))
    assert_trained(run, [a, b])


def test_the_registry_declares_why_the_bag_of_tricks_cannot_all_run_together():
    # two schedules; cutmix with mixup (cutmix offers its own switch to mixup instead)
    assert conflicting("cosine", "step")
    assert conflicting("cutmix", "mixup")
    assert not conflicting("warmup", "cosine") and not conflicting("warmup", "step")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_the_whole_bag_trains_at_once(precision, examples, tmp_path):
    names = bag()
    assert {"mixup", "kd", "dropblock", "label_smoothing", "warmup", "zero_gamma"} <= set(names)
    sets = [s for n in names for s in examples(n)]
    run = tiny_run(plugins=names, set=sets, out=tmp_path / "run", precision=precision, **few_steps(names))
    assert_trained(run, names)
    checkpoint = run.load_checkpoint()
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_the_bag_of_each_task_trains_at_once(task, precision, examples, tmp_path):
    names = bag(task)
    assert names[0] == ENTRIES[names[0]].task == task and len(names) > 3, names
    sets = [s for n in names for s in examples(n)]
    run = tiny_run(plugins=names, set=sets, out=tmp_path / "run", precision=precision, **few_steps(names))
    assert_trained(run, names)


def test_the_tasks_legal_pairs_are_the_registrys():
    """What the pairs above cover for detection: the schedules, optimizers and model surgery that
    make sense for a detector, and none of the batch-mixing or classification-head tricks."""
    legal_with_detection = {n for n in NAMES if legal(["detection", n]) and n != "detection"}
    assert {"cosine", "warmup", "linear_scaling", "no_bias_decay", "zero_gamma"} <= legal_with_detection
    assert not {"mixup", "cutmix", "cutout", "gridmask"} & legal_with_detection


@pytest.mark.parametrize("name", sorted(set(NAMES) - set(bag()) - {n for t in TASKS for n in bag(t)}))
def test_the_plugins_left_out_of_the_bag_train_in_fp16(name, examples, tmp_path):
    run = tiny_run(plugins=[name], set=examples(name), out=tmp_path / "run", precision="fp16", **few_steps([name]))
    assert_trained(run, [name])
