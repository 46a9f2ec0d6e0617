"""Evaluating runs together: ``tricks ensemble RUN...``.

Each run's model is rebuilt with its last weights through the run's own plugins and settings
(:func:`tricks.rundir.checkpoint_model`, as kd rebuilds a teacher) and evaluated on the validation
split of the data it was trained on, alone and combined with the others two ways:

    mean of probabilities   log p = log (1/K) sum_k softmax(z_k)
                                  = logsumexp_k log_softmax(z_k) - log K   (computed this way: stable)
    mean of logits          log p = log_softmax((1/K) sum_k z_k)

For every member and both combinations: accuracy, the number of errors, the negative
log-likelihood of the labels under the (combined) distribution, and the expected calibration error
over 15 equal-width confidence bins. ``logit_bias`` adds a constant to one class's logit of every
member before anything is computed (Hinton, Vinyals and Dean, arXiv 1503.02531, section 3: raising
the bias of the digit 3, left out of the transfer set, by 3.5).

The data come from the first run's recorded core settings (data set, folder, ``val_limit``);
``dataset``, ``data_dir`` and ``val_limit`` override them for every run (the data moved). Each
member normalizes its inputs with the statistics of its own training set, as it did in training
(runs with different ``train_limit`` normalize differently). Models run in float32, in eval mode,
under ``torch.no_grad``, batch by batch on the device; the statistics are accumulated there and
read once at the end.

The functions :func:`combine_probabilities`, :func:`combine_logits` and
:func:`expected_calibration_error` are the math, usable without the framework.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .config import CoreSettings, make_settings
from .errors import TricksError
from .rundir import RunDir, checkpoint_model, load_state, read_checkpoint

ECE_BINS = 15  # Guo et al., "On Calibration of Modern Neural Networks" (arXiv 1706.04599)
COMBINATIONS = {"mean_probs": "mean probabilities", "mean_logits": "mean logits"}
BIAS_USAGE = "give --logit-bias CLASS=VALUE, e.g. --logit-bias 3=3.5"


# --- the math ------------------------------------------------------------------------------------


def _stack(logits_list: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(logits_list) == 0:
        raise ValueError("no logits to combine")
    dtype = torch.promote_types(logits_list[0].dtype, torch.float32)
    return torch.stack([z.to(dtype) for z in logits_list])  # [K, B, C]


def combine_probabilities(logits_list: Sequence[torch.Tensor]) -> torch.Tensor:
    """The log of the mean of the members' softmax probabilities, ``[B, C]``:
    ``logsumexp_k log_softmax(z_k) - log K``, which never takes the log of an underflowed
    probability. In float32 at least (float64 when given)."""
    log_probs = F.log_softmax(_stack(logits_list), dim=2)
    return torch.logsumexp(log_probs, dim=0) - math.log(len(logits_list))


def combine_logits(logits_list: Sequence[torch.Tensor]) -> torch.Tensor:
    """The log-softmax of the mean of the members' logits, ``[B, C]`` (float32 at least)."""
    return F.log_softmax(_stack(logits_list).mean(0), dim=1)


def calibration_bins(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """Per confidence bin: ``[bins, 3]`` float64 rows of (count, summed confidence, correct
    predictions). Bin ``m`` (from 0) holds the examples whose confidence ``max_c p_c`` lies in
    ``(m / bins, (m + 1) / bins]``. Bins of several batches add up."""
    conf, pred = probs.detach().to(torch.float64).max(dim=1)
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64, device=conf.device)[1:-1]
    index = torch.bucketize(conf, edges, right=False)  # edges[m-1] < conf <= edges[m]
    rows = torch.stack([torch.ones_like(conf), conf, (pred == targets).to(torch.float64)], dim=1)
    return torch.zeros(bins, 3, dtype=torch.float64, device=conf.device).index_add_(0, index, rows)


def ece_from_bins(table: torch.Tensor) -> float:
    """The expected calibration error of a :func:`calibration_bins` table."""
    count, conf, correct = table.double().cpu().unbind(1)
    n = count.sum()
    if n == 0:
        return float("nan")
    return float(((correct - conf).abs() / n).sum())  # sum_m |B_m|/n * |acc_m - conf_m|


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> float:
    """The expected calibration error (Naeini et al. 2015; Guo et al. 2017) of predictions
    ``probs`` (``[N, C]`` probabilities) for labels ``targets`` (``[N]``):

        ECE = sum_{m=1..M} |B_m| / N * | acc(B_m) - conf(B_m) |

    with ``M = bins`` equal-width bins ``B_m = {i : conf_i in ((m-1)/M, m/M]}``, ``conf_i =
    max_c p_ic`` the confidence of example ``i``, ``acc(B_m)`` the fraction of ``B_m`` whose
    prediction ``argmax_c p_ic`` is the label, and ``conf(B_m)`` the mean confidence in ``B_m``.
    Empty bins count nothing. 0 for a perfectly calibrated model (in every bin, as many right as
    its confidence says); at most 1. NaN for no examples.
    """
    if probs.ndim != 2 or targets.shape != probs.shape[:1]:
        raise ValueError(f"probs must be [N, C] and targets [N], got {tuple(probs.shape)} and {tuple(targets.shape)}")
    return ece_from_bins(calibration_bins(probs, targets, bins))


# --- --logit-bias ---------------------------------------------------------------------------------


def parse_logit_bias(items: Iterable[str] | Mapping[int, float] | None) -> dict[int, float]:
    """``{class: value}`` from ``CLASS=VALUE`` strings (or a mapping, checked the same way): a
    class index is a whole number >= 0 given once, a value a finite number. Anything else is a
    TricksError naming the item."""
    if not items:
        return {}
    pairs = list(items.items()) if isinstance(items, Mapping) else None
    if pairs is None:
        if isinstance(items, str):
            items = [items]
        pairs = []
        for item in items:
            cls, sep, value = str(item).partition("=")
            if not sep:
                raise TricksError(f"--logit-bias {item!r} is not CLASS=VALUE; {BIAS_USAGE}")
            pairs.append((cls.strip(), value.strip()))
    bias: dict[int, float] = {}
    for cls, value in pairs:
        try:
            index = int(cls)
        except (TypeError, ValueError):
            raise TricksError(f"--logit-bias class {cls!r} is not a class index (a whole number from 0); {BIAS_USAGE}") from None
        if isinstance(cls, bool) or (isinstance(cls, float) and cls != index) or index < 0:
            raise TricksError(f"--logit-bias class {cls!r} is not a class index (a whole number from 0); {BIAS_USAGE}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TricksError(f"--logit-bias value {value!r} for class {index} is not a number; {BIAS_USAGE}") from None
        if not math.isfinite(number):
            raise TricksError(f"--logit-bias value {value!r} for class {index} is not finite; {BIAS_USAGE}")
        if index in bias:
            raise TricksError(f"--logit-bias gives class {index} twice; give each class once")
        bias[index] = number
    return bias


# --- the members ----------------------------------------------------------------------------------


@dataclass
class Member:
    """One run of the ensemble: where it is, its checkpoint, its data settings, its model."""

    path: Path
    checkpoint: dict
    core: CoreSettings  # the run's core settings with the data overrides applied
    shape: dict | None  # the data shape its checkpoint records (None for an old checkpoint)
    model: torch.nn.Module | None = None
    pipeline: Any = None


def _read_member(path: str | Path) -> tuple[Path, dict]:
    path = Path(path).expanduser()
    run = RunDir(path)
    if not path.is_dir() or not (run.has_run() or run.has_checkpoint()):
        what = "does not exist" if not path.exists() else "is not a folder" if not path.is_dir() else \
            f"holds no run (no {RunDir.CONFIG})"
        raise TricksError(f"{path} {what}; give run directories that tricks run --out wrote")
    if not run.has_checkpoint():
        raise TricksError(f"the run {path} has no {RunDir.CHECKPOINT} (nothing trained yet); finish it first "
                          f"(tricks run --resume {path})")
    return path, read_checkpoint(run.checkpoint_path)


def _data_settings(path: Path, checkpoint: dict, dataset: str | None, data_dir: str | None,
                   val_limit: int | None) -> CoreSettings:
    recorded = dict(checkpoint["config"].get("core") or {})
    updates: dict[str, Any] = {"download": False, "channels_last": False}
    if dataset is not None:
        updates["dataset"] = dataset
        if data_dir is None and dataset != recorded.get("dataset"):
            updates["data_dir"] = None  # another data set: not the run's folder
    if data_dir is not None:
        updates["data_dir"] = data_dir
    if val_limit is not None:
        updates["val_limit"] = val_limit
    try:
        return make_settings("core", CoreSettings, {**recorded, **updates})
    except TricksError as error:
        raise TricksError(f"the run {path} records core settings this version refuses ({error}); "
                          "evaluate it with the tricks version that trained it") from None


def _shape_text(shape: dict) -> str:
    return f"{shape['num_classes']} classes of {shape['in_chans']}x{shape['image_size']}x{shape['image_size']} images"


def _data_place(core: CoreSettings) -> tuple:
    """The data set and where it lies (a folder named two ways is one place)."""
    return core.dataset, str(Path(core.data_dir).expanduser().resolve()) if core.data_dir else None


def _data_text(core: CoreSettings) -> str:
    return core.dataset + (f" in {core.data_dir}" if core.data_dir else "")


def _check_same(members: list[Member], overridden: bool) -> None:
    """Refuse runs of different class counts or input shapes, and (unless the data are given)
    runs trained on different data sets."""
    first = members[0]
    for m in members[1:]:
        if first.shape and m.shape:
            if m.shape["num_classes"] != first.shape["num_classes"]:
                raise TricksError(f"the runs have different class counts ({first.path}: {first.shape['num_classes']}, "
                                  f"{m.path}: {m.shape['num_classes']}); ensemble runs trained on the same classes")
            if m.shape != first.shape:
                raise TricksError(f"the runs take different inputs ({first.path}: {_shape_text(first.shape)}, "
                                  f"{m.path}: {_shape_text(m.shape)}); ensemble runs trained on the same data")
        if not overridden and _data_place(m.core) != _data_place(first.core):
            raise TricksError(f"the runs were trained on different data ({first.path}: {_data_text(first.core)}, "
                              f"{m.path}: {_data_text(m.core)}); ensemble runs of one data set, or give --dataset and "
                              "--data-dir to evaluate them all on those data")


def _load_members(run_dirs: Sequence[str | Path], dataset, data_dir, val_limit) -> list[Member]:
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise TricksError("no runs to evaluate; give one or more run directories")
    members = []
    for given in run_dirs:
        path, checkpoint = _read_member(given)
        members.append(Member(path, checkpoint, core=None, shape=checkpoint.get("shape") or None))  # type: ignore[arg-type]
    # the validation split of the first run's data, for every run
    first_core = dict(members[0].checkpoint["config"].get("core") or {})
    val_limit = val_limit if val_limit is not None else first_core.get("val_limit")
    for m in members:
        m.core = _data_settings(m.path, m.checkpoint, dataset, data_dir, val_limit)
    _check_same(members, overridden=dataset is not None or data_dir is not None)
    if dataset is None and data_dir is None:  # one data set, maybe named two ways: read where the first run did
        for m in members[1:]:
            m.core = m.core.model_copy(update={"data_dir": members[0].core.data_dir})
    return members


def _raw(x: torch.Tensor, train: bool) -> torch.Tensor:
    """A pipeline that leaves the batch as it is: each member normalizes it its own way."""
    return x


def _load_data(members: list[Member], device: torch.device, batch_size: int, notes: list[str]):
    """The validation batches (uint8 images, labels) and each member's pipeline; the data are read
    once per distinct data setting."""
    from .data import FolderLoader, Pipeline, Split, TensorLoader, load_data

    loaded: dict[tuple, Any] = {}
    for m in members:
        c = m.core
        key = (c.dataset, c.data_dir, c.train_limit, c.val_limit, c.image_size)
        if key not in loaded:
            loaded[key] = load_data(c)
        data = loaded[key]
        have = {"num_classes": data.num_classes, "in_chans": data.in_chans, "image_size": data.image_size}
        if m.shape and {k: m.shape.get(k) for k in have} != have:
            raise TricksError(f"the run {m.path} was trained on {_shape_text(m.shape)}, the data to evaluate it on "
                              f"({c.dataset}) has {_shape_text(have)}; evaluate it on the data it was trained on "
                              "(--dataset, --data-dir)")
        m.shape = have
        m.pipeline = Pipeline(data, device, data.image_size, channels_last=False)
    if len(loaded) > 1:
        notes.append("the runs were trained on different subsets of the training data (train_limit); each member "
                     "normalizes with its own training set's statistics")
    data = loaded[next(iter(loaded))]
    c = members[0].core
    if data.folder is not None:
        return FolderLoader(data.folder_val, pipeline=_raw, batch_size=batch_size, train=False, seed=0, rank=0,
                            world=1, workers=c.workers, size=data.image_size, device=device), data
    val = Split(data.val.x.to(device), data.val.y.to(device))
    return TensorLoader(val, _raw, batch_size, False, 0), data


def _build_model(m: Member, device: torch.device) -> torch.nn.Module:
    source = f"the run {m.path}"
    with torch.random.fork_rng(devices=[]):
        try:
            model = checkpoint_model(m.checkpoint, source, num_classes=m.shape["num_classes"],
                                     in_chans=m.shape["in_chans"], image_size=m.shape["image_size"])
        except TricksError as error:
            if str(m.path) in str(error):
                raise
            raise TricksError(f"cannot rebuild the model of {source}: {error}") from None
    load_state(model, m.checkpoint["model"], str(m.path / RunDir.CHECKPOINT))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()


# --- the statistics -------------------------------------------------------------------------------


class Score:
    """Summed statistics of one predictor over the batches, kept on the device."""

    def __init__(self, device: torch.device, bins: int = ECE_BINS):
        self.nll = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.float64, device=device)
        self.bins = torch.zeros(bins, 3, dtype=torch.float64, device=device)
        self.n = 0

    def update(self, log_probs: torch.Tensor, targets: torch.Tensor) -> None:
        self.nll -= log_probs.gather(1, targets[:, None]).sum().double()
        self.correct += (log_probs.argmax(1) == targets).sum()
        self.bins += calibration_bins(log_probs.exp(), targets, self.bins.shape[0])
        self.n += len(targets)

    def result(self) -> dict:
        n = self.n
        correct = round(self.correct.item())
        return {"acc": correct / n if n else float("nan"), "errors": n - correct,
                "nll": self.nll.item() / n if n else float("nan"), "ece": ece_from_bins(self.bins), "n": n}


def _logits(m: Member, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = m.model(m.pipeline(x, False))
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != m.shape["num_classes"]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TricksError(f"the model of the run {m.path} returns {got}, not [batch, {m.shape['num_classes']}] logits; "
                          "ensemble classifiers")
    out = out.float()
    return out + bias if bias is not None else out


def evaluate_ensemble(run_dirs: Sequence[str | Path], *, device: str | torch.device = "cpu", dataset: str | None = None,
                      data_dir: str | None = None, val_limit: int | None = None,
                      logit_bias: Mapping[int, float] | Iterable[str] | None = None, batch_size: int = 256) -> dict:
    """Evaluate runs alone and together on the validation split of their data.

    ``run_dirs``: run directories, each with its last checkpoint. ``device``: ``cpu``, ``cuda``,
    ``cuda:N`` or ``auto``. ``dataset``, ``data_dir``, ``val_limit``: the data, when not the
    first run's. ``logit_bias``: ``{class: value}`` (or ``CLASS=VALUE`` strings) added to every
    member's logits first. Returns ``{"runs", "data", "logit_bias", "ece_bins", "members": [...],
    "ensemble": {"mean_probs": ..., "mean_logits": ...}, "notes"}``, each member and combination
    with ``acc`` (a fraction), ``errors``, ``nll`` (mean), ``ece`` and ``n``; each member also
    with its ``run``, ``model`` and ``plugins``. Bad input is a TricksError.
    """
    from .loop import pick_device

    if not isinstance(batch_size, int) or batch_size < 1:
        raise TricksError(f"batch size {batch_size!r} must be a whole number >= 1")
    if val_limit is not None and (not isinstance(val_limit, int) or val_limit < 1):
        raise TricksError(f"--val-limit {val_limit!r} must be a whole number >= 1")
    if str(device) not in ("auto", "cpu", "cuda") and not (str(device).startswith("cuda:") and str(device)[5:].isdigit()):
        raise TricksError(f"--device {device}: must be auto, cpu, cuda or cuda:N")
    bias_map = parse_logit_bias(logit_bias)
    members = _load_members(run_dirs, dataset, data_dir, val_limit)
    num_classes = members[0].shape["num_classes"] if members[0].shape else None
    if num_classes is not None:
        _check_bias(bias_map, num_classes)
    device = pick_device(str(device), 0)
    notes: list[str] = []
    loader, data = _load_data(members, device, batch_size, notes)
    num_classes = data.num_classes
    _check_bias(bias_map, num_classes)
    for m in members:
        adhoc = m.checkpoint["config"].get("adhoc_plugins")
        if adhoc:
            notes.append(f"the run {m.path} also used ad-hoc plugins ({', '.join(adhoc)}), which cannot be re-created; "
                         "its model is rebuilt without them")
        if (m.checkpoint["config"].get("core") or {}).get("precision", "fp32") != "fp32":
            notes.append(f"the run {m.path} evaluated in {m.checkpoint['config']['core']['precision']}; here every "
                         "model runs in float32")
        m.model = _build_model(m, device)
    bias = None
    if bias_map:
        bias = torch.zeros(num_classes, device=device)
        for cls, value in bias_map.items():
            bias[cls] = value
    scores = [Score(device) for _ in members]
    combined = {name: Score(device) for name in COMBINATIONS}
    with torch.no_grad():
        for batch in loader:
            x, y = batch["input"], batch["target"]
            logits = [_logits(m, x, bias) for m in members]
            for score, z in zip(scores, logits):
                score.update(F.log_softmax(z, dim=1), y)
            combined["mean_probs"].update(combine_probabilities(logits), y)
            combined["mean_logits"].update(combine_logits(logits), y)
    result_members = []
    for m, score in zip(members, scores):
        config = m.checkpoint["config"]
        result_members.append({"run": str(m.path), "model": (config.get("core") or {}).get("model"),
                               "plugins": list(config.get("plugins") or []), **score.result()})
    core = members[0].core
    return {
        "runs": [str(m.path) for m in members],
        "data": {"dataset": core.dataset, "data_dir": core.data_dir, "val_limit": core.val_limit,
                 "n": scores[0].n, "num_classes": num_classes},
        "logit_bias": dict(sorted(bias_map.items())),
        "ece_bins": ECE_BINS,
        "members": result_members,
        "ensemble": {name: score.result() for name, score in combined.items()},
        "notes": notes,
    }


def _check_bias(bias: dict[int, float], num_classes: int) -> None:
    bad = next((c for c in bias if c >= num_classes), None)
    if bad is not None:
        raise TricksError(f"--logit-bias class {bad} is out of range: the runs have {num_classes} classes "
                          f"(0 to {num_classes - 1})")


def table_rows(result: dict) -> list[dict]:
    """The rows of the printed table: each member, then each combination (with ``label``)."""
    rows = [{"label": m["run"], "model": m["model"] or "", **m} for m in result["members"]]
    for name, label in COMBINATIONS.items():
        rows.append({"label": f"ensemble ({label})", "model": "", **result["ensemble"][name]})
    return rows
