"""The one module that calls hooks: a typed relay over pluggy's plugin manager.

Everything else in tricks goes through :class:`Hooks`. It registers plugin instances in the
resolved order, wraps every hook implementation so that an exception names its plugin and
hook, and implements the combination rules that pluggy does not have (chained ``on_batch``,
per-plugin state).
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import pluggy

from . import hookspecs
from .errors import PluginHookError, TricksError

if TYPE_CHECKING:
    import torch

    from .loop import RunContext

    Schedule = Callable[[int, int, float], float]
    Loss = Callable[[Any, Mapping[str, Any]], "torch.Tensor"]

# Hooks whose combination the relay implements itself, one implementation at a time: pluggy's
# wrappers cannot wrap them, so a wrapper there is refused when its plugin is registered.
_NO_WRAPPERS = {hook for hook, rule in hookspecs.RULES.items() if rule in ("chained", "per-plugin")}


def _guard(function: Callable, plugin: str, hook: str) -> Callable:
    """Wrap a hook implementation so that its exceptions name the plugin and the hook."""
    if inspect.isgeneratorfunction(function):

        @functools.wraps(function)
        def guarded_wrapper(*args):
            try:
                return (yield from function(*args))
            except (PluginHookError, TricksError):
                raise
            except Exception as error:
                raise PluginHookError(plugin, hook, error) from error

        return guarded_wrapper

    @functools.wraps(function)
    def guarded(*args):
        try:
            return function(*args)
        except (PluginHookError, TricksError):
            raise
        except Exception as error:
            raise PluginHookError(plugin, hook, error) from error

    return guarded


class Hooks:
    """The run's plugin manager and the only caller of ``pm.hook``.

    ``plugins`` is a list of ``(name, instance)`` in the resolved order; the core's own
    default implementations are registered under the name ``core`` and run last.
    """

    def __init__(self, plugins: list[tuple[str, Any]], core: Any | None = None):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.order = [name for name, _ in plugins]
        # pluggy calls the most recently registered implementation first: register the core
        # first and the plugins in reverse, so calls run in the resolved order.
        if core is not None:
            self._register("core", core)
        for name, plugin in reversed(plugins):
            self._register(name, plugin)
        self.pm.check_pending()
        self.trace: list[str] | None = None
        self.model_provider: str | None = None  # the plugin whose build_model built the model

    def _register(self, name: str, plugin: Any) -> None:
        self.pm.register(plugin, name=name)
        for caller in self.pm.get_hookcallers(plugin) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                if (impl.wrapper or impl.hookwrapper) and caller.name in _NO_WRAPPERS:
                    rule = hookspecs.RULES[caller.name]
                    raise TricksError(f"plugin '{name}' implements '{caller.name}' as a wrapper, but '{caller.name}' is a "
                                      f"{rule} hook where every implementation runs in turn; drop wrapper=True "
                                      f"(see tricks.hookspecs.{caller.name})")
                impl.function = _guard(impl.function, name, caller.name)
                if caller.name == "build_model" and not (impl.wrapper or impl.hookwrapper):
                    impl.function = self._recording_provider(impl.function, name)

    def _recording_provider(self, function: Callable, name: str) -> Callable:
        """A model provider that notes its name in ``model_provider`` when it builds the model."""

        @functools.wraps(function)
        def provider(*args):
            model = function(*args)
            if model is not None:
                self.model_provider = name
            return model

        return provider

    def implementers(self, hook: str) -> list[str]:
        """Names of the plugins implementing ``hook``, in call order (core excluded)."""
        impls = getattr(self.pm.hook, hook).get_hookimpls()
        return [i.plugin_name for i in reversed(impls) if i.plugin_name != "core"]

    def _impls(self, hook: str):
        """Plain (non-wrapper) implementations of ``hook`` in the resolved order."""
        impls = getattr(self.pm.hook, hook).get_hookimpls()
        return [i for i in reversed(impls) if not (i.wrapper or i.hookwrapper)]

    def _record(self, hook: str) -> None:
        if self.trace is not None:
            self.trace.append(hook)

    # --- firstresult hooks ------------------------------------------------------------
    def build_model(self, ctx: "RunContext") -> "torch.nn.Module":
        self._record("build_model")
        return self.pm.hook.build_model(ctx=ctx)

    def configure_optimizer(self, ctx: "RunContext", model: "torch.nn.Module") -> "torch.optim.Optimizer":
        self._record("configure_optimizer")
        return self.pm.hook.configure_optimizer(ctx=ctx, model=model)

    def configure_schedule(self, ctx: "RunContext", optimizer: "torch.optim.Optimizer") -> "Schedule":
        self._record("configure_schedule")
        return self.pm.hook.configure_schedule(ctx=ctx, optimizer=optimizer)

    def build_loss(self, ctx: "RunContext") -> "Loss":
        self._record("build_loss")
        return self.pm.hook.build_loss(ctx=ctx)

    def evaluate(self, ctx: "RunContext", model: "torch.nn.Module", loader: Iterable) -> dict[str, Any]:
        self._record("evaluate")
        return self.pm.hook.evaluate(ctx=ctx, model=model, loader=loader)

    def load_data(self, ctx: "RunContext") -> Any:
        self._record("load_data")
        return self.pm.hook.load_data(ctx=ctx)

    def make_loaders(self, ctx: "RunContext", data: Any) -> tuple[Iterable, Iterable]:
        self._record("make_loaders")
        return self.pm.hook.make_loaders(ctx=ctx, data=data)

    def forward_fn(self, ctx: "RunContext") -> Callable[[Any, Mapping[str, Any]], Any] | None:
        """``f(model, batch)`` calling the ``forward`` hook, or None when no plugin of the run
        implements it (the loop then calls ``model(batch["input"])`` itself, at no cost)."""
        if not self.implementers("forward"):
            return None
        hook = self.pm.hook.forward

        def forward(model, batch):
            self._record("forward")
            return hook(ctx=ctx, model=model, batch=batch)

        return forward

    # --- chained -------------------------------------------------------------------------
    def on_batch(self, ctx: "RunContext", batch: dict[str, Any]) -> dict[str, Any]:
        self._record("on_batch")
        for impl in self._on_batch:
            out = impl.function(*[{"ctx": ctx, "batch": batch}[a] for a in impl.argnames])
            if out is not None:
                batch = out
        return batch

    def prepare_data(self, ctx: "RunContext", data: Any) -> Any:
        self._record("prepare_data")
        for impl in self._impls("prepare_data"):
            out = impl.function(*[{"ctx": ctx, "data": data}[a] for a in impl.argnames])
            if out is not None:
                data = out
        return data

    @functools.cached_property
    def _on_batch(self):
        return self._impls("on_batch")

    # --- collect / broadcast ---------------------------------------------------------------
    def prune(self, ctx: "RunContext", model: "torch.nn.Module") -> list[tuple[str, Any]]:
        """``(plugin, change)`` for every plugin whose ``prune`` changed the model."""
        self._record("prune")
        changes = []
        for impl in self._impls("prune"):
            change = impl.function(*[{"ctx": ctx, "model": model}[a] for a in impl.argnames])
            if change is not None and change is not False:
                changes.append((impl.plugin_name, change))
        return changes

    def can_replay(self, plugin: str) -> bool:
        return any(i.plugin_name == plugin for i in self._impls("replay_structure"))

    def replay_structure(self, ctx: "RunContext", model: "torch.nn.Module", plugin: str, change: Any) -> None:
        """Call ``plugin``'s ``replay_structure`` (and no other's) with one recorded change."""
        self._record("replay_structure")
        for impl in self._impls("replay_structure"):
            if impl.plugin_name == plugin:
                impl.function(*[{"ctx": ctx, "model": model, "change": change}[a] for a in impl.argnames])
                return
        raise TricksError(f"plugin '{plugin}' changed the model's structure but implements no replay_structure, so "
                          "the changed model cannot be rebuilt; implement it (see tricks.hookspecs.replay_structure)")

    def on_fit_start(self, ctx: "RunContext") -> None:
        self._record("on_fit_start")
        self.pm.hook.on_fit_start(ctx=ctx)

    def on_epoch_start(self, ctx: "RunContext", epoch: int) -> None:
        self._record("on_epoch_start")
        self.pm.hook.on_epoch_start(ctx=ctx, epoch=epoch)

    def on_evaluate_end(self, ctx: "RunContext", metrics: dict[str, Any]) -> None:
        self._record("on_evaluate_end")
        self.pm.hook.on_evaluate_end(ctx=ctx, metrics=metrics)

    def on_epoch_end(self, ctx: "RunContext", epoch: int, metrics: dict[str, Any]) -> None:
        self._record("on_epoch_end")
        self.pm.hook.on_epoch_end(ctx=ctx, epoch=epoch, metrics=metrics)

    def on_fit_end(self, ctx: "RunContext", summary: dict[str, Any]) -> None:
        self._record("on_fit_end")
        self.pm.hook.on_fit_end(ctx=ctx, summary=summary)

    def on_exception(self, ctx: "RunContext", error: BaseException) -> None:
        self._record("on_exception")
        try:
            self.pm.hook.on_exception(ctx=ctx, error=error)
        except Exception:  # a failing observer must not hide the original error
            pass

    # --- per-plugin state --------------------------------------------------------------------
    def state_dict(self, ctx: "RunContext") -> dict[str, Any]:
        self._record("state_dict")
        states = {}
        for impl in self._impls("state_dict"):
            state = impl.function(*[{"ctx": ctx}[a] for a in impl.argnames])
            if state is not None:
                states[impl.plugin_name] = state
        return states

    def load_state_dict(self, ctx: "RunContext", states: dict[str, Any]) -> None:
        self._record("load_state_dict")
        for impl in self._impls("load_state_dict"):
            if impl.plugin_name in states:
                args = {"ctx": ctx, "state": states[impl.plugin_name]}
                impl.function(*[args[a] for a in impl.argnames])
