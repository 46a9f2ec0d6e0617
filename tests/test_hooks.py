"""The hook specifications: documented where declared, called in an exact order, errors named."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

import tricks
from tricks import hookspecs
from tricks.errors import PluginHookError

from conftest import ROOT, TINY, TINY_API, run_cli

SPECS = sorted(n for n, f in vars(hookspecs).items()
               if inspect.isfunction(f) and hasattr(f, hookspecs.PROJECT + "_spec"))


def test_every_hook_has_a_rule():
    assert set(SPECS) == set(hookspecs.RULES)
    for name in ("on_batch", "build_loss", "build_model", "configure_optimizer", "prune"):
        assert name in SPECS


@pytest.mark.parametrize("name", SPECS)
def test_hook_is_documented_where_declared(name):
    func = getattr(hookspecs, name)
    doc = inspect.getdoc(func) or ""
    assert doc.splitlines() and doc.splitlines()[0].strip(), f"{name} has no one-line summary"
    for part in ("Fires:", "Parameters:", "Combines:"):
        assert part in doc, f"{name}'s docstring lacks '{part}'"
    for param in inspect.signature(func).parameters:
        assert re.search(rf"^\s+{param}:", doc, re.M), f"{name}'s docstring does not document '{param}'"


@pytest.mark.parametrize("name", SPECS)
def test_hook_is_in_the_architecture_doc(name):
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    assert re.search(rf"`{name}[`(]", text), f"docs/ARCHITECTURE.md does not describe hook {name}"


class Recorder(tricks.Plugin):
    """Implements every hook and records each call."""

    name = "recorder"

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def _rec(self, name, result=None):
        self.calls.append(name)
        return result

    @tricks.hookimpl
    def load_data(self, ctx):
        return self._rec("load_data")

    @tricks.hookimpl
    def prepare_data(self, ctx, data):
        return self._rec("prepare_data")

    @tricks.hookimpl
    def make_loaders(self, ctx, data):
        return self._rec("make_loaders")

    @tricks.hookimpl
    def forward(self, ctx, model, batch):
        return self._rec("forward")

    @tricks.hookimpl
    def build_model(self, ctx):
        return self._rec("build_model")

    @tricks.hookimpl
    def configure_optimizer(self, ctx, model):
        return self._rec("configure_optimizer")

    @tricks.hookimpl
    def configure_schedule(self, ctx, optimizer):
        return self._rec("configure_schedule")

    @tricks.hookimpl
    def build_loss(self, ctx):
        return self._rec("build_loss")

    @tricks.hookimpl
    def evaluate(self, ctx, model, loader):
        return self._rec("evaluate")

    @tricks.hookimpl
    def on_batch(self, ctx, batch):
        return self._rec("on_batch")

    @tricks.hookimpl
    def prune(self, ctx, model):
        return self._rec("prune")

    @tricks.hookimpl
    def replay_structure(self, ctx, model, change):
        return self._rec("replay_structure")

    @tricks.hookimpl
    def on_fit_start(self, ctx):
        self._rec("on_fit_start")

    @tricks.hookimpl
    def on_epoch_start(self, ctx, epoch):
        self._rec("on_epoch_start")

    @tricks.hookimpl
    def on_evaluate_end(self, ctx, metrics):
        self._rec("on_evaluate_end")

    @tricks.hookimpl
    def on_epoch_end(self, ctx, epoch, metrics):
        self._rec("on_epoch_end")

    @tricks.hookimpl
    def on_fit_end(self, ctx, summary):
        self._rec("on_fit_end")

    @tricks.hookimpl
    def on_exception(self, ctx, error):
        self._rec("on_exception")

    @tricks.hookimpl
    def state_dict(self, ctx):
        return self._rec("state_dict", {"calls": len(self.calls)})

    @tricks.hookimpl
    def load_state_dict(self, ctx, state):
        self._rec("load_state_dict")


def expected_order(epochs: int, steps: int, first_epoch: int = 0, resumed: bool = False) -> list[str]:
    order = ["load_data", "prepare_data", "make_loaders", "build_model", "configure_optimizer", "configure_schedule", "build_loss"]
    if resumed:
        order.append("load_state_dict")
    order.append("on_fit_start")
    for epoch in range(first_epoch, epochs):
        order += ["on_epoch_start"] + ["on_batch", "forward"] * steps
        order += ["evaluate", "on_evaluate_end", "prune", "on_epoch_end"]
        # The last epoch's checkpoint holds the summary, which on_fit_end may add to.
        order += ["on_fit_end", "state_dict"] if epoch == epochs - 1 else ["state_dict"]
    return order


def test_exact_call_order_of_every_hook(tmp_path):
    recorder, trace = Recorder(), []
    args = dict(TINY_API, train_limit=64)  # 64 examples / batch 32 = 2 steps per epoch
    tricks.run(plugins=[recorder], epochs=2, out=tmp_path / "run", trace=trace, **args)
    assert recorder.calls == expected_order(epochs=2, steps=2)
    assert trace == recorder.calls  # the core called each hook exactly once where the plugin saw it
    assert set(recorder.calls) | {"load_state_dict", "on_exception", "replay_structure"} == set(SPECS)

    resumed = Recorder()
    tricks.run(plugins=[resumed], resume=tmp_path / "run", epochs=3)
    assert resumed.calls == expected_order(epochs=3, steps=2, first_epoch=2, resumed=True)


class Exploding(tricks.Plugin):
    name = "exploding"
    seen: list = []

    @tricks.hookimpl
    def on_batch(self, ctx, batch):
        raise ZeroDivisionError("boom")

    @tricks.hookimpl
    def on_exception(self, ctx, error):
        Exploding.seen.append(error)


def test_plugin_exception_names_plugin_and_hook(tmp_path):
    with pytest.raises(PluginHookError) as info:
        tricks.run(plugins=[Exploding()], epochs=1, out=tmp_path / "run", **TINY_API)
    assert info.value.plugin == "exploding" and info.value.hook == "on_batch"
    assert "exploding" in str(info.value) and "on_batch" in str(info.value) and "boom" in str(info.value)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert len(Exploding.seen) == 1 and Exploding.seen[0] is info.value


class WrapsModel(tricks.Plugin):
    """A wrapper and a chained hook: wrappers see the built model; on_batch results chain."""

    name = "wraps"

    @tricks.hookimpl(wrapper=True)
    def build_model(self, ctx):
        model = yield
        model.tagged_by_wrapper = True
        return model

    @tricks.hookimpl(wrapper=True)
    def build_loss(self, ctx):
        base = yield

        def doubled(output, batch):
            return 2 * base(output, batch)

        return doubled


class AddOne(tricks.Plugin):
    name = "add_one"

    @tricks.hookimpl
    def on_batch(self, ctx, batch):
        return {**batch, "input": batch["input"] + 1}


class TimesTwo(tricks.Plugin):
    name = "times_two"

    @tricks.hookimpl
    def on_batch(self, ctx, batch):
        batch["input"] = batch["input"] * 2  # in place, returns None


def test_wrappers_and_chained_on_batch():
    import torch

    from tricks.builtin import CoreDefaults
    from tricks.hooks import Hooks

    hooks = Hooks([("add_one", AddOne()), ("times_two", TimesTwo())], core=CoreDefaults())
    out = hooks.on_batch(None, {"input": torch.zeros(2), "target": torch.zeros(2)})
    assert out["input"].tolist() == [2.0, 2.0]  # (0 + 1) * 2: the resolved order, each on the previous output
    hooks = Hooks([("times_two", TimesTwo()), ("add_one", AddOne())], core=CoreDefaults())
    out = hooks.on_batch(None, {"input": torch.zeros(2), "target": torch.zeros(2)})
    assert out["input"].tolist() == [1.0, 1.0]
    assert hooks.implementers("on_batch") == ["times_two", "add_one"]


def test_model_and_loss_wrappers_apply(tmp_path):
    plugin = WrapsModel()
    seen = {}

    class Spy(tricks.Plugin):
        name = "spy"

        @tricks.hookimpl
        def on_fit_start(self, ctx):
            seen["tagged"] = getattr(ctx.model, "tagged_by_wrapper", False)
            seen["loss"] = ctx.loss_fn

    tricks.run(plugins=[plugin, Spy()], epochs=1, out=tmp_path / "run", **TINY_API)
    assert seen["tagged"] is True
    import torch

    out, batch = torch.zeros(3, 10), {"target": torch.tensor([0, 1, 2])}
    assert torch.allclose(seen["loss"](out, batch), 2 * torch.log(torch.tensor(10.0)))


@pytest.mark.slow
def test_cli_plugin_error_is_one_line(tmp_path):
    """An exception in a plugin's hook is reported by the CLI as one line naming both."""
    plugin_dir = tmp_path / "pkg"
    plugin_dir.mkdir()
    (plugin_dir / "boom_plugin.py").write_text(
        "import tricks\n"
        "class Boom(tricks.Plugin):\n"
        "    @tricks.hookimpl\n"
        "    def on_epoch_start(self, ctx, epoch):\n"
        "        raise RuntimeError('kaboom')\n")
    dist = plugin_dir / "boom_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: boom-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[tricks.plugins]\nboom = boom_plugin:Boom\n")
    import os

    env = {"PYTHONPATH": os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")])}
    result = run_cli("run", "--plugins", "boom", "--epochs", "1", "--out", str(tmp_path / "run"), *TINY, env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "boom" in lines[0] and "on_epoch_start" in lines[0] and "kaboom" in lines[0]
    assert "Traceback" not in result.stderr


class LinearWarmup(tricks.Plugin):
    """The seam a warmup plugin uses: a wrapper around whatever schedule is in force."""

    name = "warmup_probe"

    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps

    @tricks.hookimpl(wrapper=True)
    def configure_schedule(self, ctx, optimizer):
        inner = yield
        m = self.steps

        def schedule(step, total, base_lr):
            return base_lr * step / m if step < m else inner(step - m, total - m, base_lr)

        return schedule


def test_a_schedule_wrapper_wraps_the_schedule_in_force(tmp_path):
    from tricks_cosine import cosine_lr

    from conftest import read_jsonl

    args = dict(TINY_API, train_limit=64)  # 2 steps per epoch
    tricks.run(plugins=["cosine", LinearWarmup(steps=3)], epochs=4, out=tmp_path / "run", **args)
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    # the lr of each epoch's last step (steps 1, 3, 5, 7 of 8): warmup, then cosine over the other 5
    expected = [0.1 * 1 / 3] + [cosine_lr(s - 3, 8 - 3, 0.1) for s in (3, 5, 7)]
    assert lrs == pytest.approx(expected)


class WrapsOnBatch(tricks.Plugin):
    name = "wraps_on_batch"

    @tricks.hookimpl(wrapper=True)
    def on_batch(self, ctx, batch):
        return (yield)


class WrapsState(tricks.Plugin):
    name = "wraps_state"

    @tricks.hookimpl(hookwrapper=True)
    def state_dict(self, ctx):
        yield


@pytest.mark.parametrize("plugin, hook", [(WrapsOnBatch(), "on_batch"), (WrapsState(), "state_dict")])
def test_a_wrapper_on_a_chained_or_per_plugin_hook_is_refused_at_registration(plugin, hook):
    from tricks.hooks import Hooks

    with pytest.raises(tricks.TricksError) as error:
        Hooks([(plugin.name, plugin)])
    message = str(error.value)
    assert f"plugin '{plugin.name}'" in message and f"'{hook}' as a wrapper" in message and "drop wrapper=True" in message


class BuildsOnlyItsOwn(tricks.Plugin):
    """A model provider following the rule: its own name, else None."""

    name = "builds_only_its_own"

    @tricks.hookimpl
    def build_model(self, ctx):
        if ctx.core.model != "tiny_linear":
            return None
        import torch

        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(ctx.in_chans * ctx.image_size ** 2, ctx.num_classes))


def test_a_provider_returns_none_for_other_names_and_the_run_says_who_built(tmp_path):
    from tricks.hooks import Hooks
    from tricks.testing import make_ctx

    provider = BuildsOnlyItsOwn()
    hooks = Hooks([(provider.name, provider)])
    assert hooks.build_model(make_ctx(model="resnet8")) is None and hooks.model_provider is None
    assert hooks.build_model(make_ctx(model="tiny_linear")) is not None
    assert hooks.model_provider == "builds_only_its_own"


@pytest.mark.parametrize("plugin, model", [("resnet_tweaks", "timm:resnet18"), ("regnet", "resnet8")])
def test_a_named_model_plugin_that_builds_nothing_is_refused(tmp_path, plugin, model):
    with pytest.raises(tricks.TricksError, match=f"plugin '{plugin}' cannot build model '{model}'.*--model"):
        tricks.run(plugins=[plugin], epochs=1, out=tmp_path / "run", **{**TINY_API, "model": model})
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_every_bundled_model_provider_returns_none_for_a_name_it_does_not_build():
    from tricks.registry import Catalog
    from tricks.testing import make_ctx

    catalog = Catalog()
    providers = [n for n, i in catalog.plugins.items() if i.installed and "model" in (i.meta("provides") or [])]
    assert providers, "no model provider is installed"
    for name in providers:
        cls = catalog.plugins[name].load()
        assert cls().build_model(make_ctx(model="no_such_model")) is None, name


class EvenOnly(tricks.Plugin):
    """prepare_data: the training split keeps its even digits, halved labels (5 classes), and a
    sampler that visits 64 of them per epoch, drawn from (seed, epoch)."""

    name = "even_only"

    @tricks.hookimpl
    def prepare_data(self, ctx, data):
        import dataclasses

        from tricks.data import Sampler, Split, epoch_generator

        keep = data.train.y % 2 == 0
        split = lambda s, k: Split(s.x[k], s.y[k] // 2)  # noqa: E731

        class Some(Sampler):
            def __len__(self):
                return 64

            def order(self, seed, epoch):
                return torch.randperm(int(keep.sum()), generator=epoch_generator(seed, epoch))[:64]

        return dataclasses.replace(data, train=split(data.train, keep), val=split(data.val, data.val.y % 2 == 0),
                                   num_classes=5, train_sampler=Some())


def test_prepare_data_changes_the_classes_and_what_an_epoch_draws(tmp_path):
    tricks.run(plugins=[EvenOnly()], epochs=2, out=tmp_path / "run", **TINY_API)
    run = tricks.RunDir(tmp_path / "run")
    checkpoint = run.load_checkpoint()
    assert checkpoint["shape"]["num_classes"] == 5 and checkpoint["model"]["fc.weight"].shape[0] == 5
    assert [row["step"] for row in run.metrics()] == [2, 4]  # 64 examples an epoch, batch 32
