"""Data sets and loaders.

Small data sets (digits, CIFAR, ``.npz`` shards) are held as ``uint8`` tensors on the training
device; batches are cut, augmented (random crop with padding, horizontal flip) and normalized
there, batch-wise, with no per-image Python. An ImageFolder tree streams through a torch
``DataLoader`` (decode and random-resized crop in worker processes), then takes the same
on-device flip and normalization.

Every data set is checked for the layout it claims when it is loaded, before a model is built or
a run directory written: the shape, dtype and labels of arrays, the files of CIFAR and MNIST, and
every image of an ImageFolder tree (see :func:`check_images`). Each problem is one
:class:`TricksError` that names the file and the fix.
"""

from __future__ import annotations

import glob
import gzip
import math
import os
import pickle
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import TricksError

DATASETS = ("digits", "cifar10", "cifar100", "mnist", "npz", "imagefolder")


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
    folder_train: object = None  # imagefolder: the ImageFiles of each split
    folder_val: object = None
    notes: list[str] = field(default_factory=list)  # what the loader did that the user should know, for the log
    # the examples of each training epoch (a plugin's resampling, see hookspecs.prepare_data):
    # None takes every training example once per epoch, in a random order
    train_sampler: "Sampler | None" = None
    metric: str = "val_acc"  # the validation metric a run on this data is judged by (higher is better)

    @property
    def train_size(self) -> int:
        if self.train_sampler is not None:
            return len(self.train_sampler)
        return len(self.train.y) if self.train is not None else len(self.folder_train)


class Sampler:
    """Which training examples an epoch visits, and in what order: ``order(seed, epoch)`` returns
    ``len(self)`` indices into the training split (repeats allowed), drawn from ``(seed, epoch)``
    alone so that every process, and a resumed run, draws the same ones. A plugin that resamples
    the training data (``prepare_data``) sets one as ``Data.train_sampler``; the data held on the
    device is the split itself, never a resampled copy."""

    def __len__(self) -> int:
        raise NotImplementedError

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        raise NotImplementedError


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of an epoch's order, seeded from ``(seed, epoch)`` alone."""
    return torch.Generator().manual_seed((seed * 100003 + epoch) % (2**63 - 1))


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


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _looks_like(root: str) -> str | None:
    """The data set a folder appears to hold, for a hint when it is named with the wrong --dataset."""
    try:
        names = set(os.listdir(root))
    except OSError:
        return None
    if "cifar-10-batches-py" in names:
        return "cifar10"
    if "cifar-100-python" in names:
        return "cifar100"
    if "MNIST" in names or "train-images-idx3-ubyte" in names or "train-images-idx3-ubyte.gz" in names:
        return "mnist"
    if any(n.endswith(".npz") and n.startswith(("train", "test", "val")) for n in names):
        return "npz"
    if "train" in names and names & {"val", "validation", "test"}:
        return "imagefolder"
    return None


def _hint(root: str, name: str) -> str:
    kind = _looks_like(root)
    return f" (it looks like {kind} data: use --dataset {kind})" if kind and kind != name else ""


def _cifar(name: str, root: str, download: bool):
    """CIFAR-10/100 in torchvision's on-disk format (``cifar-10-batches-py/`` or
    ``cifar-100-python/`` under ``root``), read by torchvision, which checks every file's md5;
    when that check fails, each file is looked at again to name the one that is missing or altered."""
    import torchvision
    import torchvision.datasets.cifar as tv_cifar

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder = os.path.join(root, cls.base_folder)
    try:
        train = cls(root=root, train=True, download=download)
        val = cls(root=root, train=False, download=download)
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as error:
        # a missing or corrupted tree; a failed download (URLError)
        reason = _first_line(error)
        if download:
            raise TricksError(f"could not download {name} into {root} ({reason}); check the network, "
                              f"or fetch {cls.url} by hand and extract it in {root}")
        if os.path.isdir(folder):
            for file, md5 in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]:
                path = os.path.join(folder, file)
                if not os.path.isfile(path):
                    reason = f"{path} is missing"
                    break
                if not tv_cifar.check_integrity(path, md5):
                    reason = f"{path} fails torchvision's md5 check (truncated or altered)"
                    break
            raise TricksError(f"{name} in {folder} is incomplete or corrupted ({reason}; torchvision checks each file's md5); "
                              f"restore the original files, or remove the folder and add --download")
        raise TricksError(f"{name} not found: {root} holds no {cls.base_folder}/ (torchvision's CIFAR format){_hint(root, name)}; "
                          f"point --data-dir at the folder that holds it, or add --download to fetch it there")
    return train.data, np.array(train.targets, dtype=np.int64), val.data, np.array(val.targets, dtype=np.int64), len(train.classes)


MNIST_FILES = {  # torchvision's MNIST layout: <root>/MNIST/raw/<file>
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _mnist_folder(root: str) -> Path | None:
    """The folder of MNIST's IDX files: ``root/MNIST/raw`` (torchvision's layout), or ``root``
    itself when it is that folder or ``MNIST/``; None when none holds any of them."""
    names = [n for pair in MNIST_FILES.values() for n in pair]
    for folder in (Path(root) / "MNIST" / "raw", Path(root) / "raw", Path(root)):
        if any((folder / n).is_file() or (folder / f"{n}.gz").is_file() for n in names):
            return folder
    return None


def _idx(folder: Path, name: str, dims: int, header_only: bool = False) -> np.ndarray | tuple[int, ...]:
    """One IDX file of unsigned bytes (``name`` or ``name.gz``), its size checked against its
    header; with ``header_only`` (a plain file), only its header and size are read and the shape
    is returned."""
    path = folder / name
    if not path.is_file() and (folder / f"{name}.gz").is_file():
        path = folder / f"{name}.gz"
    if not path.is_file():
        raise TricksError(f"{folder / name} is missing (mnist needs {', '.join(n for p in MNIST_FILES.values() for n in p)} "
                          f"in {folder}); restore it, or point --data-dir at a complete copy")
    head = 4 + 4 * dims
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = bytearray(f.read(head) if header_only else f.read())  # writable, for torch.from_numpy
        size = path.stat().st_size if header_only else len(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise TricksError(f"{path} cannot be read ({_first_line(error)}); restore the original file")
    magic = 0x800 + dims  # unsigned bytes, `dims` dimensions
    if raw[:2] == b"\x1f\x8b":
        raise TricksError(f"{path} is gzip-compressed; decompress it (gunzip) or name it {path.name}.gz")
    if len(raw) < head or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise TricksError(f"{path} is not an IDX file of {dims}-dimensional unsigned bytes (magic number {found}, expected {magic}); "
                          "restore the original file")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    expected = head + math.prod(shape)
    if size != expected:
        what = "truncated" if size < expected else "longer than that"
        raise TricksError(f"{path} holds {size} bytes, but its header promises {'x'.join(map(str, shape))} values "
                          f"({expected} bytes): the file is {what}; restore the original file")
    if header_only:
        return shape
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape)


def _mnist(root: str, download: bool):
    """MNIST as torchvision lays it out (the four decompressed IDX files, or their ``.gz``): every
    file's magic number, size and labels are checked, each error naming the file; torchvision's
    own layout is then read by ``torchvision.datasets.MNIST`` (never downloading), the others here."""
    folder = _mnist_folder(root)
    if folder is None:
        if not download:
            raise TricksError(f"mnist not found: {root} holds no MNIST/raw/ with the IDX files (torchvision's layout){_hint(root, 'mnist')}; "
                              "point --data-dir at the folder that holds MNIST/, or add --download to fetch it there")
        import torchvision

        try:
            for train in (True, False):
                torchvision.datasets.MNIST(root, train=train, download=True)
        except (RuntimeError, OSError) as error:
            raise TricksError(f"could not download mnist into {root} ({_first_line(error)}); check the network, "
                              f"or fetch the four IDX files by hand into {root}/MNIST/raw")
        folder = Path(root) / "MNIST" / "raw"
    # torchvision's own layout (root/MNIST/raw, the four files decompressed): every file's header and
    # size checked here, then read by torchvision.datasets.MNIST; any other layout (the .gz files,
    # the folder itself) is read here
    names = [n for pair in MNIST_FILES.values() for n in pair]
    by_torchvision = folder == Path(root) / "MNIST" / "raw" and all((folder / n).is_file() for n in names)
    splits = []
    for (images_name, labels_name), train in zip(MNIST_FILES.values(), (True, False)):
        if by_torchvision:
            _idx(folder, images_name, 3, header_only=True)
            _idx(folder, labels_name, 1, header_only=True)
            import torchvision

            try:
                split = torchvision.datasets.MNIST(root, train=train, download=False)
            except (RuntimeError, OSError, ValueError) as error:
                raise TricksError(f"torchvision cannot read mnist in {folder} ({_first_line(error)}); restore the original files")
            x, y = split.data.numpy(), split.targets.numpy()
        else:
            x, y = _idx(folder, images_name, 3), _idx(folder, labels_name, 1)
        if len(x) != len(y):
            raise TricksError(f"{folder / images_name} holds {len(x)} images but {folder / labels_name} {len(y)} labels; "
                              "restore the original files")
        if len(y) and y.max() > 9:
            raise TricksError(f"{folder / labels_name} holds label {y.max()}; MNIST labels are 0-9: restore the original file")
        splits += [x[..., None], y.astype(np.int64)]
    return (*splits, 10)


def _natural(path: str) -> list:
    """Sort key that puts train_2 before train_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(path))]


MAX_CHANNELS = 4  # gray, gray + alpha, RGB, RGBA
MANY_CLASSES = 100_000  # past this, labels with gaps are taken for ids rather than class indices


def _npz_images(x: np.ndarray, p: str, notes: dict) -> np.ndarray:
    """One shard's images as uint8 NHWC. NHW gets a channel axis; NCHW (1-4 channels on axis 1,
    more on the last) is transposed; integer images within 0-255 are cast. Anything else is an
    error that names the shard and how to store it."""
    if x.dtype.kind == "f":
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(1) if x.ndim >= 2 else ~np.isfinite(x)
        if bad.any():
            what = "NaN" if np.isnan(x).any() else "infinite values"
            raise TricksError(f"{p}: x holds {what} ({int(bad.sum())} image(s), the first: image {int(np.argmax(bad))}); "
                              "images are uint8 0-255: repair or drop those images and store x as uint8")
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        fix = "(x * 255).round().astype(numpy.uint8)" if hi <= 1 else "x.round().clip(0, 255).astype(numpy.uint8)"
        raise TricksError(f"{p}: x must be uint8 (0-255), got {x.dtype} with values {lo:g} to {hi:g}; store {fix}")
    if x.dtype.kind in "iu" and x.dtype != np.uint8:
        lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
        if lo < 0 or hi > 255:
            raise TricksError(f"{p}: x must be uint8 (0-255), got {x.dtype} with values {lo} to {hi}; "
                              "rescale the images to 0-255 and store x.astype(numpy.uint8)")
        x = x.astype(np.uint8)
        notes.setdefault("cast", []).append(p)
    if x.dtype != np.uint8:
        raise TricksError(f"{p}: x must be uint8 NHWC images (0-255), got {x.dtype} with shape {x.shape}; store x.astype(numpy.uint8)")
    if x.ndim == 2:
        gray, rgb = round(x.shape[1] ** 0.5), round((x.shape[1] / 3) ** 0.5)
        hint = ""
        if gray * gray == x.shape[1]:
            hint = f", e.g. x.reshape(-1, {gray}, {gray})"
        elif 3 * rgb * rgb == x.shape[1]:
            hint = f", e.g. x.reshape(-1, 3, {rgb}, {rgb}) for rows of planar RGB"
        raise TricksError(f"{p}: x has shape {x.shape}, one flat row per image; store images as (N, H, W) or (N, H, W, C){hint}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise TricksError(f"{p}: x must be uint8 NHWC images (N, H, W, C) or (N, H, W), got shape {x.shape}")
    if x.shape[3] > MAX_CHANNELS:
        if x.shape[1] > MAX_CHANNELS:
            raise TricksError(f"{p}: x has shape {x.shape}: neither its last axis (NHWC) nor its second (NCHW) holds 1 to "
                              f"{MAX_CHANNELS} channels; store images as NHWC (N, H, W, C) with C = 1 (gray) or 3 (RGB)")
        x = x.transpose(0, 2, 3, 1)  # NCHW, read as NHWC
        notes.setdefault("nchw", []).append(p)
    return x


def _npz_labels(y: np.ndarray, p: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:  # a column of labels
        y = y[:, 0]
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        hint = ""
        if y.ndim == 2:
            hint = " (one-hot or score rows? store y.argmax(1))"
        elif y.dtype.kind == "f":
            hint = " (whole numbers? store y.astype(numpy.int64))"
        elif y.dtype.kind in "US":
            hint = " (class names? store their indices as y and the names as classes)"
        raise TricksError(f"{p}: y must be one integer class index per image (shape [N]), got {y.dtype} with shape {y.shape}{hint}")
    if len(y) and y.min() < 0:
        raise TricksError(f"{p}: y holds a negative label ({y.min()}); labels are class indices 0, 1, ...")
    return y.astype(np.int64)


def _npz(root: str, train_limit: int | None = None, val_limit: int | None = None, notes: list | None = None):
    """The ``.npz`` shards of ``root`` (``train*`` and ``test*``/``val*``, each in natural order:
    train_2 before train_10). Every shard's labels are read and checked; images only as far as
    a limit needs them. Images are uint8 NHWC (NHW: one channel); NCHW is recognised from the
    shape (1-4 channels on axis 1, more on the last) and transposed, with a note for the log."""
    files = sorted(glob.glob(os.path.join(glob.escape(root), "*.npz")), key=_natural)
    train = [f for f in files if os.path.basename(f).startswith("train")]
    val = [f for f in files if os.path.basename(f).startswith(("test", "val"))]
    if not train or not val:
        missing = "train*.npz" if not train else "test*.npz (or val*.npz)"
        raise TricksError(f"no {missing} shards in {root}{_hint(root, 'npz')}: expected train*.npz and test*.npz (or val*.npz) "
                          "with arrays x (NHWC uint8) and y")
    shape: list = []  # the image shape (H, W, C) every shard must share, and the shard that set it
    classes: list = []  # the lengths of any `classes` arrays, and their shards
    layout: dict = {}  # shards transposed from NCHW or cast to uint8

    def read_shard(p, need_x):
        try:
            z = np.load(p, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("a single .npy array, not an .npz archive")
            with z:
                missing = [k for k in ("x", "y") if k not in z.files]
                if missing:
                    raise TricksError(f"{p} lacks array '{missing[0]}' (it holds: {', '.join(z.files) or 'nothing'}); "
                                      "each shard needs x (NHWC uint8 images) and y (labels): numpy.savez(path, x=..., y=...)")
                x, y = (z["x"] if need_x else None), z["y"]
                if "classes" in z.files:
                    names = z["classes"]
                    if names.ndim != 1:
                        raise TricksError(f"{p}: classes must be the class names, one per class (shape [K]), got shape {names.shape}")
                    classes.append((len(names), p))
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            raise TricksError(f"{p} is not a readable .npz archive of plain arrays ({type(error).__name__}: {_first_line(error)}); "
                              "write shards with numpy.savez(path, x=..., y=...)")
        y = _npz_labels(y, p)
        if x is None:
            return None, y
        x = _npz_images(x, p, layout)
        if len(y) != len(x):
            raise TricksError(f"{p}: x holds {len(x)} images but y {len(y)} labels; they must match")
        if not shape:
            shape.extend((x.shape[1:], p))
        elif x.shape[1:] != shape[0]:
            raise TricksError(f"{p}: images are {x.shape[1:]} (HWC) but {shape[1]} has {shape[0]}; every shard needs the same image shape")
        return x, y

    def read(paths, limit):
        xs, ys, have, top = [], [], 0, (-1, None)
        for p in paths:
            x, y = read_shard(p, need_x=not limit or have < limit)
            ys.append(y)
            if len(y) and y.max() > top[0]:
                top = (int(y.max()), p)
            if x is not None:
                xs.append(x)
                have += len(x)
        y = np.concatenate(ys)
        if not len(y):
            raise TricksError(f"{', '.join(paths)} hold{'s' * (len(paths) == 1)} no examples (x and y are empty); "
                              "each split needs at least one image and its label")
        x = np.concatenate(xs)
        return x, y[: len(x)], y, top  # images, their labels, every label of the split, the largest label and its shard

    xt, yt, all_t, top_t = read(train, train_limit)
    xv, yv, all_v, top_v = read(val, val_limit)
    top, where = max(top_t, top_v)
    num_classes = top + 1
    if classes:
        named, named_in = max(classes)
        if num_classes > named:
            raise TricksError(f"{where} holds label {top}, but the 'classes' array of {named_in} names only {named} classes; "
                              "labels are indices into classes")
        num_classes = named
    elif num_classes > MANY_CLASSES and num_classes > 2 * len(np.unique(np.concatenate([all_t, all_v]))):
        raise TricksError(f"{where} holds label {top}, but only {len(np.unique(np.concatenate([all_t, all_v])))} distinct labels "
                          f"occur; labels are class indices 0..K-1 (the model gets one output per index): renumber them, "
                          "e.g. numpy.unique(y, return_inverse=True)[1]")
    if notes is not None:
        if layout.get("nchw"):
            shards = layout["nchw"]
            notes.append(f"npz: x is stored NCHW in {len(shards)} shard(s) ({', '.join(os.path.basename(f) for f in shards[:3])}"
                         f"{', ...' if len(shards) > 3 else ''}); read as {xt.shape[1]}x{xt.shape[2]} images with {xt.shape[3]} channel(s)")
        if layout.get("cast"):
            notes.append(f"npz: x is stored as a wider integer type in {len(layout['cast'])} shard(s); its values (0-255) are read as uint8")
    return xt, yt, xv, yv, num_classes, all_t


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
    notes: list[str] = []
    if name == "digits":
        if core.data_dir:
            raise TricksError("--data-dir is not used by the digits data set; name the data set with "
                              f"--dataset {'|'.join(d for d in DATASETS if d != 'digits')}{_hint(core.data_dir, name)}")
        xt, yt, xv, yv = load_digits_data()
        num_classes, pad, flip, all_t = 10, 1, False, yt  # digits are not mirror-symmetric
    else:
        if not core.data_dir:
            raise TricksError(f"the {name} data set needs --data-dir (the folder that holds it)")
        root = os.path.expanduser(core.data_dir)
        fetch = " or add --download to fetch it there" if name in ("cifar10", "cifar100", "mnist") else ""
        if os.path.exists(root) and not os.path.isdir(root):
            parent = f" ({os.path.dirname(os.path.abspath(root))})" if name == "npz" and root.endswith(".npz") else ""
            raise TricksError(f"--data-dir {core.data_dir} is a file, not a folder; point it at the folder that holds the {name} data{parent}")
        if not os.path.isdir(root) and not (fetch and core.download):
            raise TricksError(f"--data-dir {core.data_dir} is not a folder; point it at the folder that holds the {name} data"
                              f"{',' + fetch if fetch else ''}")
        if os.path.isdir(root) and not os.access(root, os.R_OK | os.X_OK):
            raise TricksError(f"--data-dir {core.data_dir} cannot be read (permission denied); make it readable or copy the data")
        if name == "imagefolder":
            return _imagefolder(core, Path(root))
        if name == "npz":
            xt, yt, xv, yv, num_classes, all_t = _npz(root, core.train_limit, core.val_limit, notes)
        else:
            xt, yt, xv, yv, num_classes = _mnist(root, core.download) if name == "mnist" else _cifar(name, root, core.download)
            all_t = yt
        pad, flip = 4 * xt.shape[1] // 32, name != "mnist"  # handwriting is not mirror-symmetric
    if core.crop_pad is not None:
        pad = core.crop_pad
    if core.train_limit:
        xt, yt = xt[: core.train_limit], yt[: core.train_limit]
    if core.val_limit:
        xv, yv = xv[: core.val_limit], yv[: core.val_limit]
    _two_classes(core, np.unique(all_t), np.unique(yt), core.data_dir)
    mean, std = _stats(xt)
    # num_classes comes from the whole data set (not the limited subsets), so a limited run has
    # the same head as a full one; augment=False turns off the crop as well as the flip.
    return Data(name, _from_nhwc(xt, yt), _from_nhwc(xv, yv), num_classes, xt.shape[-1],
                core.image_size or xt.shape[1], mean, tuple(max(s, 1e-3) for s in std),
                pad if core.augment else 0, flip and core.augment, notes=notes)


def _two_classes(core, whole: list, used: list, where) -> None:
    """Classification needs examples of at least two classes, in the data set and in the part of
    it that a ``train_limit`` keeps (a single class trains to 100% and learns nothing)."""
    if len(whole) < 2:
        only = f"class folder '{whole[0]}'" if isinstance(whole[0], str) else f"label {whole[0]}"
        raise TricksError(f"classification needs at least two classes, but the training split of {where} holds only {only}; "
                          "add examples of the other classes")
    if len(used) < 2:
        only = f"class '{used[0]}'" if isinstance(used[0], str) else f"label {used[0]}"
        raise TricksError(f"core.train_limit={core.train_limit} keeps only training examples of {only} from {where}; "
                          "classification needs at least two classes: raise the limit, or shuffle the training examples")


# --- ImageFolder trees: scanned, and every image checked, before any training -----------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
WIDE_MODES = {"I", "F", "I;16", "I;16B", "I;16L", "I;16N"}  # 16/32-bit and float images, clipped by an 8-bit RGB conversion


def _scan_split(split: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """The classes (sub-folders, sorted) of an ImageFolder split and its images as (path, class
    index), class by class, in path order. Hidden files and folders (``.ipynb_checkpoints``,
    macOS's ``._*``) are skipped; a folder reached twice through symbolic links is an error."""
    try:
        classes = sorted(e.name for e in os.scandir(split) if not e.name.startswith(".") and e.is_dir())
    except OSError as error:
        raise TricksError(f"cannot read the folder {split} ({error.strerror}); make it readable")
    if not classes:
        raise TricksError(f"{split} holds no class folders; put the images of each class in {split}/<class>/")
    seen: dict = {}  # (device, inode) of every folder walked -> its path
    samples = []
    for index, name in enumerate(classes):
        found = []  # (folder, its image files)
        stack = [split / name]
        while stack:
            folder = stack.pop()
            try:
                info = os.stat(folder)
                entries = list(os.scandir(folder))
            except OSError as error:
                raise TricksError(f"cannot read the folder {folder} ({error.strerror}); make it readable or remove it")
            key = (info.st_dev, info.st_ino)
            if key in seen:
                raise TricksError(f"{folder} is {seen[key]} again (a symbolic link to a folder already read, or a loop); "
                                  "each image must belong to one class: remove the link")
            seen[key] = folder
            files = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    is_dir = entry.is_dir()  # follows links; a broken link is not a folder
                except OSError:  # a link loop: the image check names it
                    is_dir = False
                if is_dir:
                    stack.append(Path(entry.path))
                elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(entry.path)
            found.append((str(folder), sorted(files)))
        images = [f for _, fs in sorted(found) for f in fs]
        if not images:
            raise TricksError(f"the class folder {split / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                              "add images or remove the folder")
        samples += [(f, index) for f in images]
    return classes, samples


def _interleave(samples: list[tuple[str, int]], limit: int | None) -> list[tuple[str, int]]:
    """The first ``limit`` images taking the classes in turn (the first image of each class, then
    the second, ...), so that a limited run sees every class; all of them without a limit."""
    if not limit or limit >= len(samples):
        return samples
    by_class: dict = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    out = []
    for i in range(max(len(v) for v in by_class.values())):
        out += [v[i] for v in by_class.values() if i < len(v)]
        if len(out) >= limit:
            break
    return out[:limit]


def _check_image(path: str) -> tuple[str, tuple[int, int]]:
    """Open one image file as the loader will and check that it is whole: a PNG's chunks and
    checksums (``verify``), a JPEG's end marker (decoded only when it is missing: trailing bytes
    after a whole image are fine), WebP's container (read on opening); other formats are decoded.
    Returns the mode and size; raises TricksError naming the file."""
    from PIL import Image

    try:
        with open(path, "rb") as f, Image.open(f) as image:
            mode, size, fmt = image.mode, image.size, image.format
            if fmt == "PNG":
                image.verify()
            elif fmt == "JPEG":
                f.seek(-2, os.SEEK_END)
                if f.read(2) != b"\xff\xd9":
                    f.seek(0)
                    with Image.open(f) as again:
                        again.load()
            elif fmt != "WEBP":
                image.load()
    except Image.DecompressionBombError as error:
        raise TricksError(f"{path} is too large to decode safely ({_first_line(error)}); shrink the image or remove it")
    except OSError as error:
        if error.strerror and not isinstance(error, Image.UnidentifiedImageError):
            raise TricksError(f"{path} cannot be read ({error.strerror}); fix its permissions or the link, or remove the file")
        raise TricksError(f"{path} is not a whole image ({_reason(error)}); remove or replace the file")
    except Exception as error:  # noqa: BLE001 (Pillow raises SyntaxError, ValueError, struct.error, ... on broken files)
        raise TricksError(f"{path} is not a whole image ({_reason(error)}); remove or replace the file")
    if mode in WIDE_MODES:
        raise TricksError(f"{path} is a {'float' if mode == 'F' else '16/32-bit'} image (mode {mode}), which the 8-bit RGB "
                          "conversion would clip; convert it to 8-bit RGB or grayscale")
    return mode, size


def _reason(error: BaseException) -> str:
    from PIL import Image

    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image Pillow can identify"
    return f"{type(error).__name__}: {_first_line(error)}"


def check_images(samples: list[tuple[str, int]]) -> dict:
    """Check every image of ``samples`` (see :func:`_check_image`) and return how many there are
    of each mode. The first broken file is the error, with a count of the others and their names."""
    from PIL import Image

    modes: dict = {}
    errors = []
    large = []
    with warnings.catch_warnings():  # a large image is counted here, not warned about once per file
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for path, _ in samples:
            try:
                mode, (w, h) = _check_image(path)
            except TricksError as error:
                errors.append((path, error))
                continue
            modes[mode] = modes.get(mode, 0) + 1
            if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
                large.append((path, w, h))
    if errors:
        message = str(errors[0][1])
        if len(errors) > 1:
            others = ", ".join(p for p, _ in errors[1:4])
            message += f" ({len(errors) - 1} more file(s) fail this check: {others}{', ...' if len(errors) > 4 else ''})"
        raise TricksError(message)
    return {"modes": modes, "large": large, "limit": Image.MAX_IMAGE_PIXELS}


class ImageFiles(torch.utils.data.Dataset):
    """The images of one ImageFolder split, decoded to RGB. A file that fails to decode in a
    loader worker comes back as :class:`Unreadable` (never as a worker's traceback), which
    :class:`FolderLoader` turns into a one-line error naming the file."""

    def __init__(self, root: Path, classes: list[str], samples: list[tuple[str, int]]):
        self.root, self.classes, self.samples = root, classes, samples
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.targets = [t for _, t in samples]
        self.transform = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, target = self.samples[index]
        try:
            with open(path, "rb") as f, Image.open(f) as image:
                rgb = image.convert("RGB")
            return (self.transform(rgb) if self.transform is not None else rgb), target
        except Exception as error:  # noqa: BLE001 (whatever broke, it broke on this file)
            return Unreadable(path, error.strerror if isinstance(error, OSError) and error.strerror else _reason(error))


class Unreadable:
    """An image that failed to decode in a loader worker: its path and why."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason

    def error(self) -> TricksError:
        return TricksError(f"{self.path} cannot be decoded ({self.reason}); remove or replace the file")


def _collate(batch):
    """torch's default collation, except that a batch holding an :class:`Unreadable` image is that image."""
    from torch.utils.data import default_collate

    for item in batch:
        if isinstance(item, Unreadable):
            return item
    return default_collate(batch)


def _imagefolder(core, root: Path) -> Data:
    val_dir = next((root / d for d in ("val", "validation", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or val_dir is None:
        hint = ""
        if root.name in ("train", "val", "validation", "test"):
            hint = f" ({root} looks like one split: point --data-dir at {root.parent})"
        else:
            hint = _hint(str(root), "imagefolder")
        raise TricksError(f"imagefolder data needs {root}/train/<class>/ and {root}/val/<class>/ folders of images{hint}")
    size = core.image_size or 224
    classes, train = _scan_split(root / "train")
    val_classes, val = _scan_split(val_dir)
    _two_classes(core, classes, classes, root / "train")
    if classes != val_classes:
        extra, lacking = sorted(set(val_classes) - set(classes)), sorted(set(classes) - set(val_classes))
        what = []
        if extra:
            what.append(f"only {val_dir.name} has {', '.join(extra)}")
        if lacking:
            what.append(f"only train has {', '.join(lacking)}")
        raise TricksError(f"{root / 'train'} and {val_dir} hold different class folders ({'; '.join(what)}); make them match")
    train, val = _interleave(train, core.train_limit), _interleave(val, core.val_limit)
    _two_classes(core, classes, sorted({classes[t] for _, t in train}), root / "train")
    found = check_images(train + val)
    notes = []
    other = {m: n for m, n in found["modes"].items() if m != "RGB"}
    if other:
        notes.append(f"imagefolder: {sum(other.values())} of {len(train) + len(val)} images are not RGB "
                     f"({', '.join(f'{n} {m}' for m, n in sorted(other.items()))}); they are converted to RGB")
    if found["large"]:
        path, w, h = max(found["large"], key=lambda t: t[1] * t[2])
        notes.append(f"imagefolder: {len(found['large'])} image(s) are over {found['limit'] / 1e6:.0f} M pixels (the largest: {path}, "
                     f"{w}x{h}); they decode slowly: consider shrinking them")
    return Data("imagefolder", None, None, len(classes), 3, size, IMAGENET_MEAN, IMAGENET_STD, 0, core.augment,
                folder=root, folder_train=ImageFiles(root / "train", classes, train),
                folder_val=ImageFiles(val_dir, classes, val), notes=notes)


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


class ShardedBatches:
    """The index batches one process takes from a split of ``n`` examples held on ``device``.

    Training: each epoch's order is a permutation drawn from ``(seed, epoch)`` alone (or the
    ``sampler``'s), so every process draws the same one and takes every ``world``-th example from
    ``rank``; the last partial batch is dropped. Validation: every example of the shard once, in
    order. A loader of any task subclasses it and turns each index batch into a batch.
    """

    def __init__(self, n: int, batch_size: int, train: bool, seed: int, rank: int = 0, world: int = 1,
                 sampler: Sampler | None = None, device: torch.device | str = "cpu", what: str = "examples"):
        self.n, self.train, self.device = n, train, device
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.sampler = sampler if train else None
        self.epoch = 0
        count = len(self.sampler) if self.sampler is not None else n
        self.shard = count // world if train else len(range(rank, count, world))
        self.batches = self.shard // batch_size if train else -(-self.shard // batch_size)
        if train and self.batches == 0:
            raise TricksError(f"batch size {batch_size * world} is larger than the training set ({count} {what}); lower --batch-size")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def index_batches(self):
        """This epoch's batches of indices into the split, on its device."""
        if self.train:
            if self.sampler is not None:
                order = self.sampler.order(self.seed, self.epoch)
            else:
                order = torch.randperm(self.n, generator=epoch_generator(self.seed, self.epoch))
            order = order[: self.shard * self.world][self.rank:: self.world].to(self.device)
        else:
            order = torch.arange(self.rank, self.n, self.world, device=self.device)
        for i in range(self.batches):
            yield order[i * self.batch_size:(i + 1) * self.batch_size]


class TensorLoader(ShardedBatches):
    """Batches of a split held on the device; each process takes its shard of every epoch
    (:class:`ShardedBatches`), augmented and normalized batch-wise by the pipeline."""

    def __init__(self, split: Split, pipeline: Pipeline, batch_size: int, train: bool, seed: int,
                 rank: int = 0, world: int = 1, sampler: Sampler | None = None):
        super().__init__(len(split.y), batch_size, train, seed, rank, world, sampler, split.y.device)
        self.split, self.pipeline = split, pipeline

    def __iter__(self):
        for idx in self.index_batches():
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
                                 collate_fn=_collate, drop_last=train, pin_memory=device.type == "cuda",
                                 persistent_workers=workers > 0)
        self.pipeline, self.train, self.device = pipeline, train, device

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if isinstance(batch, Unreadable):  # decoded in a worker: the file, not the worker's traceback
                raise batch.error()
            x, y = batch
            x = x.to(self.device, non_blocking=True)
            yield {"input": self.pipeline(x, self.train), "target": y.to(self.device, non_blocking=True)}


def make_loaders(data: Data, core, device: torch.device, rank: int, world: int):
    if core.batch_size % world:
        raise TricksError(f"--batch-size {core.batch_size} does not split over {world} processes; use a multiple of {world}")
    per_rank = core.batch_size // world
    pipeline = Pipeline(data, device, data.image_size, core.channels_last)
    if data.folder is not None:
        if data.train_sampler is not None:
            raise TricksError("a plugin resamples the training data (prepare_data), which an imagefolder data set does not support; "
                              "use an in-memory data set (npz, cifar10, mnist, ...) or leave that plugin out")
        args = dict(pipeline=pipeline, batch_size=per_rank, seed=core.seed, rank=rank, world=world,
                    workers=core.workers, size=data.image_size, device=device, augment=core.augment)
        return (FolderLoader(data.folder_train, train=True, **args), FolderLoader(data.folder_val, train=False, **args))
    train, val = _on_device(data.train, device), _on_device(data.val, device)
    return (TensorLoader(train, pipeline, per_rank, True, core.seed, rank, world, sampler=data.train_sampler),
            TensorLoader(val, pipeline, per_rank, False, core.seed, rank, world))
