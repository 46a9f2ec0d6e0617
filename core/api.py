"""The Python API: the same runs as the CLI, from a notebook or a script.

    import tricks
    summary = tricks.run(plugins="mixup,cosine", epochs=5, set=["mixup.alpha=0.4"])
    cfg = tricks.resolve(plugins=["mixup"], overrides={"epochs": 3})
    summary = tricks.run(cfg, out="runs/mixup")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import CoreSettings, RunConfig, check_recipe, read_recipe, resolve
from .errors import TricksError
from .loop import Reporter, train
from .plugin import Plugin
from .rundir import RunDir


def run(
    config: RunConfig | str | Path | dict | None = None,
    *,
    plugins: list[str | Plugin] | str | None = None,
    set: list[str] | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    registries: list[Path] | None = None,
    reporter: Reporter | None = None,
    trace: list[str] | None = None,
    **overrides: Any,
) -> dict:
    """Train once and return the summary (what ``summary.json`` holds).

    ``config``: a resolved :class:`RunConfig`, or a recipe (YAML path, run directory, or dict).
    ``plugins``: names and/or ad-hoc :class:`Plugin` instances (replace the recipe's list).
    ``set``: ``section.key=value`` strings. ``overrides``: core settings (``epochs=3``, ...).
    ``resume``: a run directory to continue (its config is the recipe; ``out`` is ignored).
    """
    unknown = [k for k in overrides if k not in CoreSettings.model_fields]
    if unknown:
        raise TricksError(f"unknown core setting '{unknown[0]}'; core accepts: {', '.join(CoreSettings.model_fields)}")
    if resume is not None:
        if not RunDir(resume).has_run():
            raise TricksError(f"{resume} holds no run (no {RunDir.CONFIG}); start one with out={resume}")
        config = read_recipe(resume) if config is None else config
        out = resume
    if not isinstance(config, RunConfig):
        recipe = read_recipe(config) if isinstance(config, (str, Path)) else dict(config or {})
        if isinstance(plugins, list) and plugins and all(isinstance(p, Plugin) for p in plugins):
            # ad-hoc instances join the recipe's plugins (its list as the recipe means it: a
            # comma-separated string is a list of names)
            plugins = list(check_recipe(recipe).get("plugins") or []) + plugins
        config = resolve(plugins=plugins, recipe=recipe, overrides=overrides, sets=set, registries=registries)
    elif overrides or set or plugins is not None:
        raise TricksError("a resolved RunConfig is final; pass plugins, set and overrides to tricks.resolve instead")
    return train(config, out=out, resume=resume is not None, reporter=reporter, trace=trace)
