"""Pruning a trained detector's backbone as a job of dependent runs (``tricks lcp``).

The method's stages (Xie et al., after Zhuang et al.): one run per backbone stage ``p`` (item
``stage-p``), which starts from the previous run's weights and structure (the first from the
trained detector, ``--from RUN``, whose recipe every run of the job takes unless others are
given), trains for ``stage_epochs`` epochs and then prunes the layers inside stage ``p``; then
``finetune``: the pruned detector trained ``finetune_epochs`` epochs with the detector's losses
alone. ``lcp`` and ``dcp`` train the auxiliary network after stage ``p`` beside the detector
(``L_f = L_a + L_c + L_r``) and select channels with it (the lcp plugin); ``l1`` (filter
magnitude, Li et al.) and ``random`` prune the same layers by the same fraction in the same runs
(the prune plugin, ``scope=layer``): every method has the same schedule and ends with the same
architecture, only the selection differs. Every run is a run directory under ``OUT/runs``; the same command continues an
interrupted job without training a finished run again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tricks
from tricks.jobs import Item, Job, JobProgress, check_writable, run_job

METHODS = ("lcp", "dcp", "l1", "random")
# the settings of the pruning runs that the job's options set, so that every method prunes the same
# layers by the same fraction: refused in --set
JOB_SETTINGS = {"lcp.stages": "from --stages", "lcp.ratio": "from --ratio", "lcp.aux": "from --method",
                "prune.criterion": "from --method", "prune.ratio": "from --ratio", "prune.scope": "layer",
                "prune.at": "the end of the pruning run", "prune.exclude": "the stages left out of --stages"}


def backbone_stages(cfg) -> int:
    """How many stages the backbone of the run's detector has."""
    from tricks.loop import build_model

    model = build_model(cfg, "cpu", num_classes=2, in_chans=1, image_size=32)
    root = getattr(model, "prune_root", None)
    if not root:
        raise tricks.TricksError(f"--model {cfg.core.model} is not a detector whose backbone can be pruned; use "
                                 "--task detection --model fcos:resnet8 (or another DETECTOR:BACKBONE)")
    return len(model.get_submodule(root).stages)


def plan(cfg, method: str, ratio: float, stage_epochs: int, finetune_epochs: int, start: str | None,
         stages: list[int] | None = None, registries: list[Path] | None = None,
         pruning: list[str] | None = None) -> list[Item]:
    """The items of the job, in order, each starting from the one before (the first from ``start``);
    ``pruning``: ``lcp.KEY=VALUE`` / ``prune.KEY=VALUE`` settings of the runs that prune."""
    if method not in METHODS:
        raise tricks.TricksError(f"--method {method}: choose one of {', '.join(METHODS)}")
    taken = [x for x in pruning or [] if x.split("=", 1)[0] in JOB_SETTINGS]
    if taken:
        key = taken[0].split("=", 1)[0]
        raise tricks.TricksError(f"--set {taken[0]}: the job sets {key} itself ({JOB_SETTINGS[key]}); leave it out")
    base = cfg.to_dict()
    own = [p for p in cfg.plugins if p not in ("lcp", "prune", "detection")]
    count = backbone_stages(cfg)
    stages = list(range(count)) if stages is None else list(stages)
    if not stages or any(not 0 <= p < count for p in stages):
        raise tricks.TricksError(f"--stages {stages}: the backbone has stages 0 to {count - 1}")
    items: list[Item] = []

    def item(ident: str, plugins: list[str], overrides: dict, sets: list[str], previous: str | None) -> Item:
        over = {**overrides}
        if previous is None and start is not None:
            over["init_from"] = str(start)
        resolved = tricks.resolve(plugins=plugins, recipe=base, overrides=over, sets=sets, registries=registries)
        return Item(ident, resolved.to_dict(), inputs={"core.init_from": previous} if previous else {},
                    meta={"method": method, "ratio": ratio})

    previous = None
    for p in stages:  # every method: the same runs, one stage pruned at the end of each; only the selection differs
        if method in ("lcp", "dcp"):
            sets = [f"lcp.stages=[{p}]", f"lcp.ratio={ratio}", f"lcp.aux={method}",
                    *[x for x in pruning or [] if x.startswith("lcp.")]]
            items.append(item(f"stage-{p}", [*own, "lcp"], {"epochs": stage_epochs}, sets, previous))
        else:
            exclude = [f"stages.{q}.*" for q in range(count) if q != p]  # names inside the backbone
            sets = [f"prune.criterion={method}", f"prune.ratio={ratio}", "prune.scope=layer", f"prune.at={stage_epochs}",
                    f"prune.exclude={exclude}", *[x for x in pruning or [] if x.startswith("prune.")]]
            items.append(item(f"stage-{p}", [*own, "prune"], {"epochs": stage_epochs}, sets, previous))
        previous = items[-1].id
    items.append(item("finetune", own, {"epochs": finetune_epochs}, [], previous))
    return items


def lcp_job(out: str | Path, *, method: str = "lcp", ratio: float = 0.5, stage_epochs: int = 2, finetune_epochs: int = 4,
            start: str | Path | None = None, stages: list[int] | None = None, plugins: list[str] | None = None,
            recipe: Any = None, sets: list[str] | None = None, overrides: dict | None = None,
            progress: JobProgress | None = None, retry_failed: bool = False,
            registries: list[Path] | None = None) -> dict:
    """Run (or continue) the pruning job in ``out``; returns the results of its items, in order,
    and the final run's figures under ``final``."""
    out = check_writable(out, "--out")
    if not 0 < ratio < 1:
        raise tricks.TricksError(f"--ratio {ratio}: the fraction of channels removed is above 0 and below 1")
    if start is not None and not tricks.RunDir(start).has_checkpoint():
        raise tricks.TricksError(f"--from {start}: no trained run there (no checkpoint); train the detector first "
                                 "(tricks run --task detection ... --out RUN)")
    if start is not None:
        start = Path(start).expanduser().resolve()  # the job is continued from anywhere with the same baseline
    overrides = {"task": "detection", **{k: v for k, v in (overrides or {}).items() if v is not None}}
    if recipe is None and start is not None:
        recipe = tricks.RunDir(start).path / tricks.RunDir.CONFIG  # the trained detector's own recipe
    named = [p for p in (plugins or []) if p not in ("lcp", "prune")] if plugins else None
    own = [x for x in sets or [] if not x.startswith(("lcp.", "prune."))]  # the pruning runs' settings go to them
    pruning = [x for x in sets or [] if x.startswith(("lcp.", "prune."))]
    cfg = tricks.resolve(plugins=named, recipe=recipe, overrides=overrides, sets=own, registries=registries)
    items = plan(cfg, method, ratio, stage_epochs, finetune_epochs, str(start) if start is not None else None, stages,
                 registries, pruning)
    meta = {"method": method, "ratio": ratio, "stage_epochs": stage_epochs, "finetune_epochs": finetune_epochs,
            "start": str(start) if start is not None else None, "stages": stages}
    job = Job(out, "lcp", items, meta=meta)
    results = run_job(job, progress=progress, retry_failed=retry_failed)
    report = {"method": method, "ratio": ratio, "items": {i.id: results[i.id] for i in items}}
    final = results["finetune"]
    if final.get("status") == "ok":
        run = job.run(items[-1])
        row = run.metrics()[-1]
        report["final"] = {k: row.get(k) for k in ("val_map", "val_map_50", "val_map_75")}
        report["final"]["backbone_params"] = (run.summary() or {}).get("backbone_params") or _backbone_params(run)
    return report


def _backbone_params(run) -> int:
    model = run.build_model()
    return sum(p.numel() for p in model.get_submodule(model.prune_root).parameters())
