"""A noisy-data benchmark: corrupt a fraction of the training split, the validation split clean.

Three kinds of noise, each drawn from its own noise seed (not the run's seed), so that runs with
different training seeds see the same corrupted examples:

* ``symmetric``: exactly ``round(rate * N)`` training labels, chosen uniformly, each replaced by
  one of the *other* ``K - 1`` classes, uniformly (never by its own class);
* ``asymmetric``: labels flipped between similar classes along a map ``src -> dst`` (CIFAR-10's
  usual map: truck -> automobile, bird -> airplane, deer -> horse, cat <-> dog); exactly
  ``round(rate * n_src)`` of the ``n_src`` images of every source class are flipped, and no other
  label changes;
* ``background``: the object is made small inside clutter taken from other images. Exactly
  ``round(rate * N)`` training images are replaced by a 2x2 mosaic of four other training images
  of other classes (each shrunk to a quarter of the area), with the original image shrunk to
  ``object_scale`` of its side pasted at a random position; the label is kept. This is the
  paper's "background noise" (clutter dominates the image), made from the data we have.

``round`` is round-half-up (``floor(x + 0.5)``). The functions below are the math, usable without
the framework; :class:`NoisyData` applies one of them in ``prepare_data`` and records which
training examples it corrupted (``noise.json`` in the run directory, and ``is_noisy`` /
``clean_y`` on the training split it hands on).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

import tricks
from tricks.data import Split

__version__ = "0.1.0"

KINDS = ("symmetric", "asymmetric", "background")
NOISE_FILE = "noise.json"

# Asymmetric maps, src -> dst. CIFAR-10's classes: 0 airplane, 1 automobile, 2 bird, 3 cat, 4 deer,
# 5 dog, 6 frog, 7 horse, 8 ship, 9 truck.
PAIRS = {
    "cifar10": {9: 1, 2: 0, 4: 7, 3: 5, 5: 3},
    # handwritten digits: 7 -> 1, 2 -> 7, 5 <-> 6, 3 -> 8 (the map usual for MNIST)
    "mnist": {7: 1, 2: 7, 5: 6, 6: 5, 3: 8},
}


def noisy_count(rate: float, n: int) -> int:
    """How many of ``n`` examples a ``rate`` corrupts: ``floor(rate * n + 0.5)``."""
    return int(math.floor(rate * n + 0.5))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def symmetric_noise(y: torch.Tensor, num_classes: int, rate: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(new labels, flipped indices)``: ``noisy_count(rate, N)`` labels chosen uniformly without
    replacement, each moved to one of the other ``num_classes - 1`` classes uniformly. ``y`` is
    not changed; the indices are sorted."""
    if num_classes < 2:
        raise ValueError(f"symmetric noise needs at least 2 classes, got {num_classes}")
    g = _generator(seed)
    n = len(y)
    idx = torch.randperm(n, generator=g)[: noisy_count(rate, n)].sort().values
    offset = torch.randint(1, num_classes, (len(idx),), generator=g)
    new = y.clone()
    new[idx] = (y[idx] + offset) % num_classes
    return new, idx


def asymmetric_noise(y: torch.Tensor, pairs: dict[int, int], rate: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(new labels, flipped indices)``: for every source class ``s`` of ``pairs``, exactly
    ``noisy_count(rate, n_s)`` of its examples (chosen uniformly among the ``n_s`` labelled ``s``
    in ``y``) get label ``pairs[s]``; a swap (cat <-> dog) is drawn from the clean labels in both
    directions. ``y`` is not changed; the indices are sorted."""
    g = _generator(seed)
    new = y.clone()
    chosen = []
    for src in sorted(pairs):
        members = (y == src).nonzero().flatten()
        pick = members[torch.randperm(len(members), generator=g)[: noisy_count(rate, len(members))]]
        new[pick] = pairs[src]
        chosen.append(pick)
    idx = torch.cat(chosen).sort().values if chosen else torch.zeros(0, dtype=torch.int64)
    return new, idx


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` images resized to ``h x w`` (bilinear, antialiased), as float."""
    return F.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)


def background_noise(x: torch.Tensor, y: torch.Tensor, rate: float, seed: int, object_scale: float = 0.5,
                     chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(new images, corrupted indices, object boxes)``.

    ``noisy_count(rate, N)`` images, chosen uniformly, become a 2x2 mosaic of four images of
    other classes (drawn uniformly among the examples whose label differs, from the clean images),
    each shrunk to its quadrant, with the original image shrunk to ``object_scale`` of its height
    and width pasted at a uniformly random position. ``boxes[i] = (x1, y1, x2, y2)`` in pixels
    (``x2``, ``y2`` exclusive) is where the object of ``idx[i]`` lies. Labels are kept; ``x``
    (uint8 ``[N, C, H, W]``) is not changed."""
    if not 0 < object_scale < 1:
        raise ValueError(f"object_scale must be in (0, 1), got {object_scale}")
    g = _generator(seed)
    n, _, h, w = x.shape
    idx = torch.randperm(n, generator=g)[: noisy_count(rate, n)].sort().values
    oh, ow = max(1, round(object_scale * h)), max(1, round(object_scale * w))
    tops = torch.randint(0, h - oh + 1, (len(idx),), generator=g)
    lefts = torch.randint(0, w - ow + 1, (len(idx),), generator=g)
    sources = torch.empty(len(idx), 4, dtype=torch.int64)
    for c in torch.unique(y[idx]).tolist():  # clutter from the other classes
        rows = (y[idx] == c).nonzero().flatten()
        pool = (y != c).nonzero().flatten()
        if len(pool) == 0:
            raise ValueError("background noise needs examples of at least two classes")
        sources[rows] = pool[torch.randint(0, len(pool), (len(rows), 4), generator=g)]
    h1, w1 = h // 2, w // 2
    quadrants = [(0, h1, 0, w1), (0, h1, w1, w), (h1, h, 0, w1), (h1, h, w1, w)]
    out = x.clone()
    for start in range(0, len(idx), chunk):
        part = idx[start:start + chunk]
        canvas = torch.empty(len(part), x.shape[1], h, w)
        for q, (r0, r1, c0, c1) in enumerate(quadrants):
            if r1 > r0 and c1 > c0:
                canvas[:, :, r0:r1, c0:c1] = _resize(x[sources[start:start + chunk, q]], r1 - r0, c1 - c0)
        small = _resize(x[part], oh, ow)
        for j in range(len(part)):
            t, l = int(tops[start + j]), int(lefts[start + j])
            canvas[j, :, t:t + oh, l:l + ow] = small[j]
        out[part] = canvas.round().clamp(0, 255).to(torch.uint8)
    boxes = torch.stack([lefts, tops, lefts + ow, tops + oh], dim=1)
    return out, idx, boxes


def parse_pairs(text: str, num_classes: int, dataset: str = "") -> tuple[dict[int, int], str]:
    """``(map, name)`` of the asymmetric map a ``pairs`` setting names: ``auto`` (CIFAR-10's map for
    cifar10 and for 10-class npz data, the digits' map for digits and mnist), ``cifar10``,
    ``mnist``, ``next`` (every class to the next one, the last to the first) or explicit
    ``src:dst`` pairs (``"9:1,2:0"``). A bad value is a :class:`tricks.TricksError`."""
    text = text.strip()
    if text == "auto":
        if dataset == "cifar10" or (dataset == "npz" and num_classes == 10):
            text = "cifar10"
        elif dataset in ("digits", "mnist"):
            text = "mnist"
        else:
            raise tricks.TricksError(f"noisy_data.pairs=auto has no map for the {dataset or 'this'} data set; "
                                     "set noisy_data.pairs to src:dst pairs (e.g. 1:2,2:1) or to next")
    if text in PAIRS:
        pairs = dict(PAIRS[text])
    elif text == "next":
        pairs = {c: (c + 1) % num_classes for c in range(num_classes)}
    else:
        pairs = {}
        for item in text.split(","):
            parts = item.split(":")
            if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                raise tricks.TricksError(f"noisy_data.pairs={text!r}: {item.strip()!r} is not src:dst; write class "
                                         "indices as src:dst pairs separated by commas (e.g. 9:1,2:0), or auto, cifar10, mnist, next")
            src, dst = int(parts[0]), int(parts[1])
            if src in pairs:
                raise tricks.TricksError(f"noisy_data.pairs={text!r} maps class {src} twice; give each source class once")
            pairs[src] = dst
    for src, dst in pairs.items():
        if not (0 <= src < num_classes and 0 <= dst < num_classes):
            raise tricks.TricksError(f"noisy_data.pairs={text!r} names class {max(src, dst)}, but the data has "
                                     f"{num_classes} classes (0-{num_classes - 1}); use class indices below {num_classes}")
        if src == dst:
            raise tricks.TricksError(f"noisy_data.pairs={text!r} maps class {src} to itself; map each source to another class")
    return pairs, text


@dataclass
class NoisySplit(Split):
    """A training split with noise: ``is_noisy`` (bool ``[N]``) marks the corrupted examples,
    ``clean_y`` holds the labels before the noise."""

    is_noisy: torch.Tensor | None = None
    clean_y: torch.Tensor | None = None


class NoisyDataSettings(tricks.Settings):
    kind: Literal["symmetric", "asymmetric", "background"] = tricks.Field(
        "symmetric", description="symmetric: labels flipped to any other class; asymmetric: flipped along pairs; "
                                 "background: the object shrunk inside clutter from other images, label kept")
    rate: float = tricks.Field(0.2, ge=0, le=1, description="fraction of the training examples corrupted (of each source class for asymmetric)")
    seed: int = tricks.Field(0, ge=0, description="the noise seed: which examples are corrupted, independent of core.seed")
    pairs: str = tricks.Field("auto", description="asymmetric map: auto, cifar10, mnist, next, or src:dst pairs such as 9:1,2:0")
    object_scale: float = tricks.Field(0.5, gt=0, lt=1, description="background: the object's side as a fraction of the image's")


class NoisyData(tricks.Plugin):
    """Corrupt the training split (label or background noise) from a noise seed; the validation
    split stays clean; which examples were corrupted goes to noise.json in the run directory."""

    Settings = NoisyDataSettings

    def __init__(self, settings: NoisyDataSettings | None = None):
        super().__init__(settings)
        self.record: dict | None = None

    def _check(self) -> None:
        s = self.settings
        if s.kind != "asymmetric" and s.pairs.strip() != "auto":
            raise tricks.TricksError(f"noisy_data.pairs={s.pairs!r} is only used with noisy_data.kind=asymmetric (kind is {s.kind}); "
                                     "drop noisy_data.pairs or set noisy_data.kind=asymmetric")

    @tricks.hookimpl
    def prepare_data(self, ctx, data):
        s = self.settings
        self._check()
        if data.train is None:
            raise tricks.TricksError("noisy_data corrupts an in-memory training split, and imagefolder data is read from files; "
                                     "store it as npz shards (--dataset npz) to add noise to it")
        x, y, k = data.train.x, data.train.y, data.num_classes
        record = {"kind": s.kind, "rate": s.rate, "seed": s.seed, "train_size": len(y)}
        if s.kind == "symmetric":
            new_y, idx = symmetric_noise(y, k, s.rate, s.seed)
            new_x = x
            what = f"{len(idx)} of {len(y)} training labels flipped to another class"
        elif s.kind == "asymmetric":
            pairs, name = parse_pairs(s.pairs, k, ctx.core.dataset)
            new_y, idx = asymmetric_noise(y, pairs, s.rate, s.seed)
            new_x = x
            record["pairs"] = {str(a): b for a, b in pairs.items()}
            record["pairs_name"] = name
            what = f"{len(idx)} training labels flipped along {name} ({', '.join(f'{a}->{b}' for a, b in sorted(pairs.items()))})"
        else:
            new_x, idx, boxes = background_noise(x, y, s.rate, s.seed, s.object_scale)
            new_y = y.clone()
            record["object_scale"] = s.object_scale
            record["boxes"] = boxes.tolist()
            what = (f"{len(idx)} of {len(y)} training images made {s.object_scale:g} of their size inside clutter "
                    "from other classes, labels kept")
        is_noisy = torch.zeros(len(y), dtype=torch.bool)
        is_noisy[idx] = True
        record.update(noisy=idx.tolist(), clean_labels=y[idx].tolist(), labels=new_y[idx].tolist())
        self.record = record
        note = f"noisy_data: {s.kind} noise at rate {s.rate:g} (noise seed {s.seed}): {what}; the validation split is clean"
        train = NoisySplit(new_x, new_y, is_noisy=is_noisy, clean_y=y.clone())
        return dataclasses.replace(data, train=train, notes=[*data.notes, note])

    @tricks.hookimpl
    def on_fit_start(self, ctx):
        if self.record is not None and ctx.is_main and ctx.run_dir is not None:
            from tricks import atomic

            atomic.write_text(Path(ctx.run_dir) / NOISE_FILE, json.dumps(self.record))

    @tricks.hookimpl
    def on_fit_end(self, ctx, summary):
        if self.record is not None:
            summary["noise_kind"] = self.record["kind"]
            summary["noise_rate"] = self.record["rate"]
            summary["noisy_examples"] = len(self.record["noisy"])


def read_noise(run_dir) -> dict:
    """The record of a run's noise (``noise.json``): ``kind``, ``rate``, ``seed``, ``train_size``,
    ``noisy`` (sorted indices into the training split), ``clean_labels`` and ``labels`` (before
    and after, for those indices), and ``pairs`` or ``boxes`` by kind."""
    return json.loads((Path(run_dir) / NOISE_FILE).read_text())
