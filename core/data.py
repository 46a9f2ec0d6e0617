"""Data sets and loaders.

Small data sets (digits, CIFAR, ``.npz`` shards) are held as ``uint8`` tensors on the training
device; batches are cut, augmented (random crop with padding, horizontal flip) and normalized
there, batch-wise, with no per-image Python. An ImageFolder tree streams through a torch
``DataLoader`` (decode and random-resized crop in worker processes), then takes the same
on-device flip and normalization.
"""

from __future__ import annotations

import glob
import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import TricksError

DATASETS = ("digits", "cifar10", "cifar100", "npz", "imagefolder")


@dataclass
class Split:
    x: torch.Tensor  # uint8 [N, C, H, W]
    y: torch.Tensor  # int64 [N]


@dataclass
class Data:
    """A data set ready for training: the two splits and how to augment and normalize them."""

    name: str
    train: Split | None
    val: Split | None
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]  # per channel, 0-255 scale
    std: tuple[float, ...]
    pad: int  # random-crop padding (0: no crop)
    flip: bool  # random horizontal flip
    folder: Path | None = None  # imagefolder: the tree
    folder_train: object = None  # imagefolder: the torchvision ImageFolder of each split
    folder_val: object = None

    @property
    def train_size(self) -> int:
        return len(self.train.y) if self.train is not None else len(self.folder_train)


def _stats(x: np.ndarray, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 NHWC images, exact, from a 256-bin histogram per channel
    (built a chunk at a time: no float copy of the whole set)."""
    c = x.shape[-1]
    hist = np.zeros((c, 256), dtype=np.int64)
    for i in range(0, len(x), chunk):
        flat = x[i:i + chunk].reshape(-1, c)
        for k in range(c):
            hist[k] += np.bincount(flat[:, k], minlength=256)
    values = np.arange(256, dtype=np.float64)
    n = np.maximum(hist.sum(1), 1)
    mean = (hist * values).sum(1) / n
    std = np.sqrt((hist * (values - mean[:, None]) ** 2).sum(1) / n)
    return tuple(mean.tolist()), tuple(std.tolist())


def _from_nhwc(x: np.ndarray, y: np.ndarray) -> Split:
    return Split(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(np.asarray(y, dtype=np.int64)))


def load_digits_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 handwritten digits, as uint8 NHWC, with a fixed stratified
    80/20 split (1,437 train / 360 validation) that does not depend on the run's seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = digits.target.astype(np.int64)
    xt, xv, yt, yv = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return xt, yt, xv, yv


def _cifar(name: str, root: str, download: bool):
    """CIFAR-10/100 in torchvision's on-disk format (``cifar-10-batches-py/`` or
    ``cifar-100-python/`` under ``root``), read by torchvision, which checks every file's md5."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder = os.path.join(root, cls.base_folder)
    try:
        train = cls(root=root, train=True, download=download)
        val = cls(root=root, train=False, download=download)
    except (RuntimeError, OSError) as error:  # a missing or corrupted tree; a failed download (URLError)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if download:
            raise TricksError(f"could not download {name} into {root} ({reason}); check the network, "
                              f"or fetch {cls.url} by hand and extract it in {root}")
        if os.path.isdir(folder):
            raise TricksError(f"{name} in {folder} is incomplete or corrupted (torchvision checks each file's md5: {reason}); "
                              f"restore the original files, or remove the folder and add --download")
        raise TricksError(f"{name} not found: {root} holds no {cls.base_folder}/ (torchvision's CIFAR format); "
                          f"point --data-dir at the folder that holds it, or add --download to fetch it there")
    return train.data, np.array(train.targets, dtype=np.int64), val.data, np.array(val.targets, dtype=np.int64), len(train.classes)


def _natural(path: str) -> list:
    """Sort key that puts train_2 before train_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(path))]


def _npz(root: str, train_limit: int | None = None, val_limit: int | None = None):
    """The ``.npz`` shards of ``root`` (``train*`` and ``test*``/``val*``, each in natural order:
    train_2 before train_10). Every shard's labels are read and checked; images only as far as
    a limit needs them."""
    files = sorted(glob.glob(os.path.join(root, "*.npz")), key=_natural)
    train = [f for f in files if os.path.basename(f).startswith("train")]
    val = [f for f in files if os.path.basename(f).startswith(("test", "val"))]
    if not train or not val:
        raise TricksError(
            f"no .npz shards in {root}: expected train*.npz and test*.npz (or val*.npz) with arrays x (NHWC uint8) and y"
        )
    shape: list = []  # the image shape (H, W, C) every shard must share, and the shard that set it
    classes: list = []  # the lengths of any `classes` arrays

    def read_shard(p, need_x):
        try:
            z = np.load(p, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("a single .npy array, not an .npz archive")
            with z:
                if "x" not in z or "y" not in z:
                    raise TricksError(f"{p} lacks array 'x' or 'y'; each shard needs x (NHWC uint8) and y (labels)")
                x, y = (z["x"] if need_x else None), z["y"]
                if "classes" in z:
                    classes.append(len(z["classes"]))
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise TricksError(f"{p} is not a readable .npz archive of plain arrays ({type(error).__name__}: {reason}); "
                              "write shards with numpy.savez(path, x=..., y=...)")
        if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
            raise TricksError(f"{p}: y must be one integer class index per image (shape [N]), got {y.dtype} with shape {y.shape}")
        if len(y) and y.min() < 0:
            raise TricksError(f"{p}: y holds a negative label ({y.min()}); labels are class indices 0, 1, ...")
        if x is None:
            return None, y.astype(np.int64)
        if x.ndim == 3:
            x = x[..., None]
        if x.dtype != np.uint8 or x.ndim != 4:
            raise TricksError(f"{p}: x must be uint8 NHWC, got {x.dtype} with shape {x.shape}")
        if len(y) != len(x):
            raise TricksError(f"{p}: x holds {len(x)} images but y {len(y)} labels; they must match")
        if not shape:
            shape.extend((x.shape[1:], p))
        elif x.shape[1:] != shape[0]:
            raise TricksError(f"{p}: images are {x.shape[1:]} (HWC) but {shape[1]} has {shape[0]}; every shard needs the same image shape")
        return x, y.astype(np.int64)

    def read(paths, limit):
        xs, ys, have = [], [], 0
        for p in paths:
            x, y = read_shard(p, need_x=not limit or have < limit)
            ys.append(y)
            if x is not None:
                xs.append(x)
                have += len(x)
        y = np.concatenate(ys)
        if not len(y):
            raise TricksError(f"{', '.join(paths)} hold no examples")
        x = np.concatenate(xs)
        return x, y[: len(x)], y  # images, their labels, every label of the split

    xt, yt, all_t = read(train, train_limit)
    xv, yv, all_v = read(val, val_limit)
    num_classes = int(max(all_t.max(), all_v.max())) + 1
    if classes:
        if num_classes > max(classes):
            raise TricksError(f"labels in {root} go up to {num_classes - 1}, but its 'classes' array names only {max(classes)} classes")
        num_classes = max(classes)
    return xt, yt, xv, yv, num_classes


IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


_KEEP: dict = {}  # see keep_in_memory()


def keep_in_memory(enabled: bool = True) -> None:
    """Keep the last data set loaded (and its copy on the last device) for the next run in this
    process with the same data settings: a sampling job's worker trains many models on one data set
    and then reads it, and moves it to the GPU, once. Off by default."""
    _KEEP.clear()
    if enabled:
        _KEEP["on"] = True


def _data_key(core) -> tuple:
    return (core.dataset, core.data_dir, core.train_limit, core.val_limit, core.image_size, core.augment)


def load_data(core) -> Data:
    """Load the data set named by the core settings (never downloads unless ``download``)."""
    if _KEEP.get("on"):
        key = _data_key(core)
        if _KEEP.get("key") != key:
            _KEEP.pop("device", None)
            _KEEP["data"], _KEEP["key"] = _load_data(core), key
        return _KEEP["data"]
    return _load_data(core)


def _on_device(split: Split, device: torch.device) -> Split:
    """The split on ``device``; kept with the data set when :func:`keep_in_memory` is on."""
    if not _KEEP.get("on"):
        return Split(split.x.to(device), split.y.to(device))
    cache = _KEEP.setdefault("device", {})
    key = (id(split), str(device))
    if key not in cache:
        if any(k[1] != str(device) for k in cache):
            cache.clear()
        cache[key] = Split(split.x.to(device), split.y.to(device))
    return cache[key]


def _load_data(core) -> Data:
    name = core.dataset
    if name not in DATASETS:
        raise TricksError(f"unknown data set '{name}'; choose one of: {', '.join(DATASETS)}")
    if name == "digits":
        if core.data_dir:
            raise TricksError("--data-dir is not used by the digits data set; name the data set with --dataset npz|cifar10|cifar100|imagefolder")
        xt, yt, xv, yv = load_digits_data()
        num_classes, pad, flip = 10, 1, False  # digits are not mirror-symmetric
    else:
        if not core.data_dir:
            raise TricksError(f"the {name} data set needs --data-dir (the folder that holds it)")
        if not os.path.isdir(core.data_dir):
            if name.startswith("cifar") and not core.download:
                raise TricksError(f"--data-dir {core.data_dir} is not a folder; point it at the folder that holds "
                                  f"the {name} data, or add --download to fetch it there")
            if not name.startswith("cifar"):
                raise TricksError(f"--data-dir {core.data_dir} is not a folder; point it at the {name} data")
        if name == "imagefolder":
            return _imagefolder(core)
        xt, yt, xv, yv, num_classes = (_cifar(name, core.data_dir, core.download) if name.startswith("cifar")
                                         else _npz(core.data_dir, core.train_limit, core.val_limit))
        pad, flip = 4 * xt.shape[1] // 32, True
    if core.train_limit:
        xt, yt = xt[: core.train_limit], yt[: core.train_limit]
    if core.val_limit:
        xv, yv = xv[: core.val_limit], yv[: core.val_limit]
    mean, std = _stats(xt)
    # num_classes comes from the whole data set (not the limited subsets), so a limited run has
    # the same head as a full one; augment=False turns off the crop as well as the flip.
    return Data(name, _from_nhwc(xt, yt), _from_nhwc(xv, yv), num_classes, xt.shape[-1],
                core.image_size or xt.shape[1], mean, tuple(max(s, 1e-3) for s in std),
                pad if core.augment else 0, flip and core.augment)


def _imagefolder(core) -> Data:
    from torchvision.datasets import ImageFolder

    root = Path(core.data_dir)
    val_dir = next((root / d for d in ("val", "validation", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or val_dir is None:
        raise TricksError(f"imagefolder data needs {root}/train/<class>/ and {root}/val/<class>/ folders of images")
    size = core.image_size or 224
    try:
        train, val = ImageFolder(str(root / "train")), ImageFolder(str(val_dir))
    except FileNotFoundError as error:  # no class folders, or a class folder without images
        raise TricksError(f"imagefolder data in {root}: {error}; each split needs <class>/ folders of images")
    if train.classes != val.classes:
        raise TricksError(f"{root}/train and {val_dir} hold different class folders; make them match")
    for split, limit in ((train, core.train_limit), (val, core.val_limit)):
        if limit:
            split.samples = split.imgs = split.samples[:limit]
            split.targets = [t for _, t in split.samples]
    return Data("imagefolder", None, None, len(train.classes), 3, size, IMAGENET_MEAN, IMAGENET_STD, 0, core.augment,
                folder=root, folder_train=train, folder_val=val)


# --- batch-wise augmentation on the device -------------------------------------------------


def random_crop(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Random crop with zero padding, one offset per image, batch-wise: ``[B,C,H,W] -> same``."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b, 1, 1), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (b, 1, 1), device=x.device)
    rows = dy + torch.arange(h, device=x.device).view(1, h, 1)
    cols = dx + torch.arange(w, device=x.device).view(1, 1, w)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def random_flip(x: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of a random half of the batch."""
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(3), x)


class Pipeline:
    """uint8 batch -> augmented, normalized float batch, on the device."""

    def __init__(self, data: Data, device: torch.device, image_size: int, channels_last: bool):
        self.mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(data.std, device=device).view(1, -1, 1, 1)
        self.pad, self.flip, self.size = data.pad, data.flip, image_size
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.pad:
            x = random_crop(x, self.pad)
        x = (x.float() - self.mean) * self.inv_std
        if train and self.flip:
            x = random_flip(x)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


class TensorLoader:
    """Batches of a split held on the device; each process takes its shard of every epoch.

    The epoch's order is a permutation drawn from ``(seed, epoch)`` alone, so every process
    draws the same one and takes every ``world``-th example from ``rank``.
    """

    def __init__(self, split: Split, pipeline: Pipeline, batch_size: int, train: bool, seed: int,
                 rank: int = 0, world: int = 1):
        self.split, self.pipeline, self.train = split, pipeline, train
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.epoch = 0
        n = len(split.y)
        self.shard = n // world if train else len(range(rank, n, world))
        self.batches = self.shard // batch_size if train else -(-self.shard // batch_size)
        if train and self.batches == 0:
            raise TricksError(f"batch size {batch_size * world} is larger than the training set ({n} examples); lower --batch-size")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        n = len(self.split.y)
        device = self.split.y.device
        if self.train:
            g = torch.Generator().manual_seed((self.seed * 100003 + self.epoch) % (2**63 - 1))
            order = torch.randperm(n, generator=g)[: self.shard * self.world][self.rank:: self.world].to(device)
        else:
            order = torch.arange(self.rank, n, self.world, device=device)
        for i in range(self.batches):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield {"input": self.pipeline(self.split.x[idx], self.train), "target": self.split.y[idx]}


class FolderLoader:
    """Batches of an ImageFolder split: decoded and cropped in worker processes, then moved to
    the device, flipped and normalized there."""

    def __init__(self, dataset, pipeline: Pipeline, batch_size: int, train: bool, seed: int,
                 rank: int, world: int, workers: int, size: int, device: torch.device, augment: bool = True):
        import torchvision.transforms.v2 as T
        from torch.utils.data import DataLoader, DistributedSampler

        if train and augment:
            tf = T.Compose([T.RandomResizedCrop(size, antialias=True), T.PILToTensor()])
        else:
            tf = T.Compose([T.Resize(int(size / 0.875), antialias=True), T.CenterCrop(size), T.PILToTensor()])
        dataset.transform = tf
        if train:
            self.sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed, drop_last=True)
        else:  # every example exactly once across processes (DistributedSampler would pad with repeats)
            self.sampler = range(rank, len(dataset), world)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 drop_last=train, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
        self.pipeline, self.train, self.device = pipeline, train, device

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            yield {"input": self.pipeline(x, self.train), "target": y.to(self.device, non_blocking=True)}


def make_loaders(data: Data, core, device: torch.device, rank: int, world: int):
    if core.batch_size % world:
        raise TricksError(f"--batch-size {core.batch_size} does not split over {world} processes; use a multiple of {world}")
    per_rank = core.batch_size // world
    pipeline = Pipeline(data, device, data.image_size, core.channels_last)
    if data.folder is not None:
        args = dict(pipeline=pipeline, batch_size=per_rank, seed=core.seed, rank=rank, world=world,
                    workers=core.workers, size=data.image_size, device=device, augment=core.augment)
        return (FolderLoader(data.folder_train, train=True, **args), FolderLoader(data.folder_val, train=False, **args))
    train, val = _on_device(data.train, device), _on_device(data.val, device)
    return (TensorLoader(train, pipeline, per_rank, True, core.seed, rank, world),
            TensorLoader(val, pipeline, per_rank, False, core.seed, rank, world))
