"""The generalist + specialists procedure as one job (``tricks specialists``), in four stages
that each leave a file behind, so that the same command continues an interrupted job from where
it stopped and never trains a finished model again:

1. ``generalist``: a run of the given recipe (item ``generalist`` of the job);
2. ``subsets.json``: the generalist's predicted probabilities on the training images (no
   augmentation), the covariance matrix of their columns, and K-means on those columns
   (:func:`confusable_subsets`), written atomically once;
3. ``specialist-I``: one run per subset, starting from the generalist's weights
   (``--plugins ...,specialists``), and with ``--control`` an ensemble of equal training cost:
   ``control-I`` fine-tunes the generalist on all classes (another seed) for as many images as
   specialist I saw;
4. ``combination.json``: on the validation images, the generalist, the generalist + specialists
   (the KL combination of :func:`combine`, over the specialists whose subset meets the
   generalist's top ``top_n`` classes) and the control ensemble (the mean of the probabilities),
   overall and on the images of the specialists' classes; recomputed from the trained models
   whenever the command runs (seconds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import tricks
from tricks import atomic
from tricks.jobs import Item, Job, JobProgress, check_writable, run_job

from .combine import active_specialists, combine
from .subsets import confusable_subsets, covariance_columns, coverage

SUBSETS = "subsets.json"
COMBINATION = "combination.json"


def _predict(model: torch.nn.Module, data, split, device, batch_size: int = 512) -> torch.Tensor:
    """The logits of ``model`` on every image of ``split`` (uint8 on the host), without augmentation."""
    from tricks.data import Pipeline

    pipeline = Pipeline(data, device, data.image_size, False)
    model = model.to(device).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(split.y), batch_size):
            out.append(model(pipeline(split.x[i:i + batch_size].to(device), False)).float())
    return torch.cat(out)


def _model(job: Job, ident: str, device) -> torch.nn.Module:
    item = next(i for i in job.items if i.id == ident)
    return job.run(item).build_model(device)


def find_subsets(job: Job, cfg, data, n_subsets: int, size: int | None, overlap: bool, device) -> dict:
    """Stage 2: the subsets from the trained generalist (read from ``subsets.json`` when a
    previous command wrote it)."""
    path = job.out / SUBSETS
    if path.is_file():
        return _read(path)
    probs = F.softmax(_predict(_model(job, "generalist", device), data, data.train, device), dim=1).cpu()
    subsets = confusable_subsets(probs, n_subsets, size=size, overlap=overlap, seed=cfg.core.seed, require_cover=False)
    record = {"subsets": subsets, "num_classes": data.num_classes, "uncovered": coverage(subsets, data.num_classes),
              "n_images": len(probs), "covariance": covariance_columns(probs.double()).tolist()}
    atomic.write_json(path, record)
    return record


def _read(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except ValueError:
        raise tricks.TricksError(f"{path} is not JSON; remove it and run the command again to find the subsets again") from None


def evaluate(job: Job, data, subsets: list[list[int]], top_n: int, controls: list[str], device) -> dict:
    """Stage 4: accuracy of the generalist, of generalist + specialists and of the control
    ensemble on the validation images; also on the images whose class some subset holds, and
    each specialist against the generalist on its own classes."""
    y = data.val.y.to(device)
    g_logits = _predict(_model(job, "generalist", device), data, data.val, device)
    p_g = F.softmax(g_logits.double(), dim=1)
    spec_probs = []
    for i, subset in enumerate(subsets):
        ident = f"specialist-{i}"
        item = next(it for it in job.items if it.id == ident)
        offset = float((job.run(item).summary() or {}).get("dustbin_offset", 0.0))
        logits = _predict(_model(job, ident, device), data, data.val, device).double()
        logits[:, -1] += offset  # undo the half-and-half sampling's bias against the dustbin
        spec_probs.append(F.softmax(logits, dim=1))
    active = active_specialists(p_g, subsets, top_n)
    q = combine(p_g, spec_probs, subsets, active)
    covered = torch.isin(y, torch.tensor(sorted({c for s in subsets for c in s}), device=device))
    touched = active.any(dim=1)

    def scores(p: torch.Tensor) -> dict:
        right = p.argmax(1) == y
        nll = F.nll_loss(torch.log(p.clamp_min(1e-12)), y).item()
        return {"acc": right.double().mean().item(), "errors": int((~right).sum()), "nll": nll,
                "acc_specialist_classes": right[covered].double().mean().item() if covered.any() else None,
                "acc_where_active": right[touched].double().mean().item() if touched.any() else None}

    out = {"n_images": len(y), "top_n": top_n, "subsets": subsets, "images_with_active_specialist": int(touched.sum()),
           "generalist": scores(p_g), "generalist+specialists": scores(q)}
    if controls:
        members = [p_g] + [F.softmax(_predict(_model(job, c, device), data, data.val, device).double(), dim=1) for c in controls]
        out["control_ensemble"] = {**scores(torch.stack(members).mean(0)), "members": 1 + len(controls)}
    per = []
    for subset, p_m in zip(subsets, spec_probs):
        mask = torch.isin(y, torch.tensor(subset, device=device))
        right_g = (p_g.argmax(1) == y)[mask]
        local = torch.full_like(y, len(subset))
        for pos, c in enumerate(subset):
            local[y == c] = pos
        right_m = (p_m.argmax(1) == local)[mask]
        per.append({"subset": subset, "images": int(mask.sum()), "generalist_acc": right_g.double().mean().item(),
                    "specialist_acc": right_m.double().mean().item()})
    out["specialists"] = per
    return out


def _control_epochs(train_targets: torch.Tensor, subset: list[int], specialist_epochs: int) -> int:
    """Epochs over the whole training set that see as many images as a specialist's epochs."""
    inside = int(torch.isin(train_targets, torch.tensor(subset)).sum())
    seen = specialist_epochs * (inside + min(inside, len(train_targets) - inside))
    return max(1, round(seen / len(train_targets)))


def specialists_job(out: str | Path, *, plugins: list[str] | None = None, recipe: Any = None, sets: list[str] | None = None,
                    overrides: dict | None = None, n_specialists: int = 2, size: int | None = None, overlap: bool = False,
                    top_n: int = 1, specialist_epochs: int | None = None, specialist_lr: float | None = None,
                    soft_targets: bool = False, control: bool = False, progress: JobProgress | None = None,
                    gpus: str | None = None, per_gpu: int = 1, backend: str = "local", address: str | None = None,
                    retry_failed: bool = False, registries: list[Path] | None = None) -> dict:
    """Run (or continue) the whole procedure in ``out``; returns the combination's results."""
    from tricks.data import load_data

    out = check_writable(out, "--out")
    plugins = list(plugins or [])
    for refused in ("specialists", "kd"):
        if refused in plugins:
            raise tricks.TricksError(f"--plugins {refused}: the job adds the specialists plugin itself, and the generalist "
                                     "is trained from the labels; leave it out of --plugins")
    if n_specialists < 1:
        raise tricks.TricksError(f"--specialists {n_specialists}: train at least one specialist")
    if top_n < 1:
        raise tricks.TricksError(f"--top-n {top_n}: the generalist's top 1 class at least picks the specialists")
    cfg = tricks.resolve(plugins=plugins, recipe=recipe, overrides={k: v for k, v in (overrides or {}).items() if v is not None},
                         sets=sets or [], registries=registries)
    base = cfg.to_dict()
    data = load_data(cfg.core)  # once: the class count checks the options before anything trains
    classes = data.num_classes
    if n_specialists > classes:
        raise tricks.TricksError(f"--specialists {n_specialists}: the data set has only {classes} classes to cluster; "
                                 f"train at most {classes} specialists")
    if size is not None and not 1 <= size < classes:
        raise tricks.TricksError(f"--size {size}: a specialist takes 1 to {classes - 1} of the {classes} classes "
                                 "(the others are its dustbin)")
    if size is None and n_specialists < 2:
        raise tricks.TricksError("--specialists 1 without --size would put every class in one subset, leaving nothing for "
                                 "its dustbin; train at least 2 specialists, or give --size")
    meta = {"n_specialists": n_specialists, "size": size, "overlap": overlap, "top_n": top_n,
            "specialist_epochs": specialist_epochs, "specialist_lr": specialist_lr, "soft_targets": soft_targets,
            "control": control}
    device = cfg.core.device if cfg.core.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    generalist = Item("generalist", base, meta={"role": "generalist"})
    kwargs = dict(gpus=gpus, per_device=per_gpu, backend=backend, address=address, progress=progress,
                  retry_failed=retry_failed)
    results = run_job(Job(out, "specialists", [generalist], meta=meta), **kwargs)
    if results["generalist"]["status"] != "ok":
        raise tricks.TricksError(f"the generalist {results['generalist']['status']}: {results['generalist'].get('message', '')}; "
                                 f"see {out / generalist.run_dir}, fix the cause and run the command again with --retry-failed")
    job = Job(out, "specialists", [generalist], meta=meta)
    found = find_subsets(job, cfg, data, n_subsets=n_specialists, size=size, overlap=overlap, device=device)
    subsets = found["subsets"]
    items = [generalist]
    spec_sets = [f"specialists.soft_targets={str(soft_targets).lower()}"]
    spec_over = {"epochs": specialist_epochs or cfg.core.epochs, **({"lr": specialist_lr} if specialist_lr else {})}
    for i, subset in enumerate(subsets):
        spec = tricks.resolve(plugins=cfg.plugins + ["specialists"], recipe=base, overrides=spec_over,
                              sets=spec_sets + [f"specialists.subset={subset}"], registries=registries)
        items.append(Item(f"specialist-{i}", spec.to_dict(), inputs={"specialists.generalist": "generalist"},
                          meta={"role": "specialist", "subset": subset}))
    controls = []
    if control:
        targets = data.train.y
        for i, subset in enumerate(subsets):
            epochs = _control_epochs(targets, subset, spec_over["epochs"])
            ctl = tricks.resolve(plugins=cfg.plugins, recipe=base, overrides={**spec_over, "epochs": epochs,
                                                                              "seed": cfg.core.seed + 1 + i}, registries=registries)
            items.append(Item(f"control-{i}", ctl.to_dict(), inputs={"core.init_from": "generalist"},
                              meta={"role": "control", "matches": f"specialist-{i}"}))
            controls.append(f"control-{i}")
    job = Job(out, "specialists", items, meta=meta)
    results = run_job(job, **kwargs)
    failed = [r for r in results.values() if r["status"] != "ok"]
    if failed:
        raise tricks.TricksError(f"job item '{failed[0]['id']}' {failed[0]['status']}: {failed[0].get('message', '')}; "
                                 "fix the cause and run the same command again with --retry-failed")
    report = evaluate(job, data, subsets, top_n, controls, device)
    report["uncovered"] = found.get("uncovered", [])
    report["times_s"] = {k: r.get("train_seconds") for k, r in results.items()}
    atomic.write_json(out / COMBINATION, atomic.finite(report))
    return report
