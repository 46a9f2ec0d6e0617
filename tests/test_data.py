"""The data sets and the device-resident loaders (``tricks.data``)."""

from __future__ import annotations

import os
import pickle
import urllib.error
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from conftest import read_jsonl, run_cli
from PIL import Image

from tricks.config import CoreSettings
from tricks.data import (Data, FolderLoader, Pipeline, Split, TensorLoader, load_data, make_loaders,
                         random_crop, random_flip)
from tricks.errors import TricksError


def settings(**values) -> CoreSettings:
    return CoreSettings(**values)


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


# --- digits ----------------------------------------------------------------------------------


def test_digits_is_the_default_with_a_fixed_stratified_split():
    data = load_data(settings())
    assert data.name == "digits"
    assert data.train.x.shape == (1437, 1, 8, 8) and data.val.x.shape == (360, 1, 8, 8)
    assert data.train.x.dtype == torch.uint8 and data.train.y.dtype == torch.int64
    assert (data.num_classes, data.in_chans, data.image_size) == (10, 1, 8)
    assert int(data.train.x.min()) == 0 and int(data.train.x.max()) == 255  # 0-16 scaled to 0-255
    assert (data.pad, data.flip) == (1, False)  # digits are not mirror-symmetric
    # stratified 80/20: each class's share of the validation split is 20% of it, to one image
    val_counts = torch.bincount(data.val.y, minlength=10)
    all_counts = val_counts + torch.bincount(data.train.y, minlength=10)
    assert ((val_counts.double() - 0.2 * all_counts.double()).abs() <= 1).all()
    # the two splits partition scikit-learn's 1,797 images
    from sklearn.datasets import load_digits

    digits = load_digits()
    expected = Counter((np.round(img * (255 / 16)).astype(np.uint8).tobytes(), int(t))
                       for img, t in zip(digits.images, digits.target))
    got = Counter((x.numpy().tobytes(), int(y)) for split in (data.train, data.val) for x, y in zip(split.x, split.y))
    assert got == expected


def test_digits_split_does_not_depend_on_the_run_seed():
    torch.manual_seed(1)
    np.random.seed(1)
    a = load_data(settings(seed=0))
    torch.manual_seed(2)
    np.random.seed(2)
    b = load_data(settings(seed=12345))
    for left, right in ((a.train, b.train), (a.val, b.val)):
        assert torch.equal(left.x, right.x) and torch.equal(left.y, right.y)


def test_digits_refuses_a_data_dir(tmp_path):
    with pytest.raises(TricksError) as excinfo:
        load_data(settings(data_dir=str(tmp_path)))
    assert "--dataset" in one_line_error(excinfo)


def test_augment_false_turns_off_crop_and_flip(tmp_path):
    assert load_data(settings(augment=False)).pad == 0
    write_npz_folder(tmp_path, n_train=8, n_val=4)
    augmented = load_data(settings(dataset="npz", data_dir=str(tmp_path)))
    assert (augmented.pad, augmented.flip) == (4, True)
    plain = load_data(settings(dataset="npz", data_dir=str(tmp_path), augment=False))
    assert (plain.pad, plain.flip) == (0, False)
    x = plain.train.x
    pipeline = Pipeline(plain, torch.device("cpu"), 32, False)
    assert torch.equal(pipeline(x, train=True), pipeline(x, train=False))


def test_crop_pad_sets_the_largest_shift(tmp_path):
    write_npz_folder(tmp_path, n_train=8, n_val=4)
    for pad in (0, 2):
        data = load_data(settings(dataset="npz", data_dir=str(tmp_path), crop_pad=pad))
        assert data.pad == pad and data.flip
    assert load_data(settings(crop_pad=3)).pad == 3 and load_data(settings(crop_pad=3, augment=False)).pad == 0
    torch.manual_seed(0)
    x = torch.zeros(256, 1, 9, 9, dtype=torch.uint8)
    x[:, :, 4, 4] = 255  # one bright pixel in the middle: where it lands is the shift
    where = torch.nonzero(random_crop(x, 2)[:, 0] == 255)[:, 1:] - 4
    assert where.abs().max() == 2 and len(where) == 256 and len(torch.unique(where, dim=0)) == 25


# --- the shared CIFAR-10 shards ----------------------------------------------------------------


def test_shared_cifar10_shards_match_the_readme(cifar10_dir):
    data = load_data(settings(dataset="npz", data_dir=str(cifar10_dir)))
    assert data.train.x.shape == (50000, 3, 32, 32) and data.val.x.shape == (10000, 3, 32, 32)
    assert data.train.y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert data.val.y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert torch.bincount(data.train.y).tolist() == [5000] * 10
    assert torch.bincount(data.val.y).tolist() == [1000] * 10
    assert data.mean == pytest.approx((125.31, 122.95, 113.87), abs=0.01)
    assert data.std == pytest.approx((62.99, 62.09, 66.70), abs=0.01)
    assert (data.num_classes, data.in_chans, data.image_size, data.pad, data.flip) == (10, 3, 32, 4, True)
    # the shards follow one another in the original order, NHWC turned NCHW
    with np.load(cifar10_dir / "train_4.npz") as z:
        assert torch.equal(data.train.x[-1], torch.from_numpy(z["x"][-1]).permute(2, 0, 1))
        assert data.train.y[40000:].tolist() == z["y"].tolist()


def test_shared_cifar10_limits_take_the_first_examples_and_keep_ten_classes(cifar10_dir):
    data = load_data(settings(dataset="npz", data_dir=str(cifar10_dir), train_limit=64, val_limit=5))
    assert data.train.x.shape == (64, 3, 32, 32) and data.val.x.shape == (5, 3, 32, 32)
    assert data.train.y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert data.val.y.tolist() == [3, 8, 8, 0, 6]  # class 9 is absent, the head still has 10 outputs
    assert data.num_classes == 10
    with np.load(cifar10_dir / "test.npz") as z:
        assert torch.equal(data.val.x, torch.from_numpy(z["x"][:5]).permute(0, 3, 1, 2))


# --- .npz folders ------------------------------------------------------------------------------


def write_npz_folder(root: Path, n_train=8, n_val=4, size=32, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, n in (("train_0", n_train), ("test", n_val)):
        x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        y = np.arange(n, dtype=np.int64) % 3
        np.savez(root / f"{name}.npz", x=x, y=y)
        arrays[name] = (x, y)
    return arrays


def test_npz_shards_load_in_natural_order_with_the_whole_sets_classes(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(12):  # train_10 and train_11 come after train_9, not after train_1
        np.savez(tmp_path / f"train_{i}.npz", x=rng.integers(0, 256, (1, 8, 8), dtype=np.uint8), y=np.array([i]))
    np.savez(tmp_path / "val.npz", x=rng.integers(0, 256, (3, 8, 8), dtype=np.uint8), y=np.array([0, 1, 2]))
    data = load_data(settings(dataset="npz", data_dir=str(tmp_path)))
    assert data.train.y.tolist() == list(range(12))
    assert data.train.x.shape == (12, 1, 8, 8) and data.in_chans == 1  # NHW taken as one channel
    assert data.pad == 1  # 4 pixels per 32
    limited = load_data(settings(dataset="npz", data_dir=str(tmp_path), train_limit=5, val_limit=2))
    assert limited.train.y.tolist() == [0, 1, 2, 3, 4] and limited.val.y.tolist() == [0, 1]
    assert torch.equal(limited.train.x, data.train.x[:5])
    assert limited.num_classes == data.num_classes == 12  # from every label, not just the first five


def test_npz_classes_array_sets_the_number_of_classes(tmp_path):
    x = np.zeros((4, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "train.npz", x=x, y=np.array([0, 1, 2, 3]))
    np.savez(tmp_path / "test.npz", x=x, y=np.array([3, 2, 1, 0]), classes=np.array([f"c{i}" for i in range(10)]))
    assert load_data(settings(dataset="npz", data_dir=str(tmp_path))).num_classes == 10
    np.savez(tmp_path / "test.npz", x=x, y=np.array([3, 2, 1, 0]), classes=np.array(["a", "b"]))
    with pytest.raises(TricksError) as excinfo:
        load_data(settings(dataset="npz", data_dir=str(tmp_path)))
    assert "classes" in one_line_error(excinfo)


def _shard(**arrays):
    def write(path: Path):
        np.savez(path, **arrays)
    return write


def _garbage(path: Path):
    path.write_bytes(b"this is not a zip archive")


def _npy(path: Path):
    with open(path, "wb") as f:
        np.save(f, X4)


def _truncated(path: Path):
    np.savez(path, x=np.zeros((4, 8, 8, 3), np.uint8), y=np.zeros(4, np.int64))
    path.write_bytes(path.read_bytes()[:200])


X4 = np.zeros((4, 8, 8, 3), np.uint8)
BAD_TRAIN_SHARDS = {
    "no y": (_shard(x=X4), "lacks array"),
    "float x": (_shard(x=X4.astype(np.float32), y=np.zeros(4, np.int64)), "uint8"),
    "x and y lengths differ": (_shard(x=X4, y=np.zeros(3, np.int64)), "4 images but y 3 labels"),
    "one-hot y": (_shard(x=X4, y=np.eye(4, dtype=np.int64)), "one integer class index"),
    "float y": (_shard(x=X4, y=np.zeros(4, np.float32)), "one integer class index"),
    "negative label": (_shard(x=X4, y=np.array([0, 1, -1, 2])), "negative label"),
    "other image size": (_shard(x=np.zeros((4, 9, 9, 3), np.uint8), y=np.zeros(4, np.int64)), "same image shape"),
    "not a zip": (_garbage, "not a readable .npz"),
    "truncated": (_truncated, "not a readable .npz"),
    "a .npy array": (_npy, "not a readable .npz"),
    "object array": (_shard(x=np.array([None] * 4, dtype=object), y=np.zeros(4, np.int64)), "not a readable .npz"),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN_SHARDS))
def test_bad_npz_shards_are_one_line_errors_naming_the_shard(tmp_path, case):
    write, needle = BAD_TRAIN_SHARDS[case]
    np.savez(tmp_path / "test.npz", x=X4, y=np.zeros(4, np.int64))
    write(tmp_path / "train_0.npz")
    with pytest.raises(TricksError) as excinfo:
        load_data(settings(dataset="npz", data_dir=str(tmp_path)))
    message = one_line_error(excinfo)
    assert needle in message and "train_0.npz" in message


def test_npz_folder_without_shards_or_folder(tmp_path):
    with pytest.raises(TricksError) as excinfo:
        load_data(settings(dataset="npz", data_dir=str(tmp_path)))
    assert "train*.npz" in one_line_error(excinfo)
    np.savez(tmp_path / "train.npz", x=X4, y=np.zeros(4, np.int64))  # no test/val shard
    with pytest.raises(TricksError):
        load_data(settings(dataset="npz", data_dir=str(tmp_path)))
    with pytest.raises(TricksError) as excinfo:
        load_data(settings(dataset="npz", data_dir=str(tmp_path / "absent")))
    assert "not a folder" in one_line_error(excinfo)
    with pytest.raises(TricksError) as excinfo:
        load_data(settings(dataset="npz"))
    assert "--data-dir" in one_line_error(excinfo)


@pytest.mark.slow
def test_cli_bad_npz_folder_exits_2_with_one_line(tmp_path):
    np.savez(tmp_path / "test.npz", x=X4, y=np.zeros(4, np.int64))
    BAD_TRAIN_SHARDS["x and y lengths differ"][0](tmp_path / "train_0.npz")
    result = run_cli("run", "--dataset", "npz", "--data-dir", str(tmp_path), "--epochs", "1",
                     "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    assert "train_0.npz: x holds 4 images but y 3 labels" in lines[0]
    assert not (tmp_path / "run" / "config.yaml").exists()


# --- CIFAR-10/100 in torchvision's on-disk format --------------------------------------------
#
# torchvision checks the md5 of every file against the original archive's, so synthetic trees
# never pass it: the tests that load them replace torchvision's check_integrity with a check
# that the file exists (the `no_md5` fixture). The one test without it shows the check is on.


@pytest.fixture
def downloads(monkeypatch) -> list:
    """Replace torchvision's CIFAR download with a recorder (nothing leaves the machine)."""
    calls: list = []
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", lambda *a, **k: calls.append((a, k)))
    return calls


@pytest.fixture
def no_md5(monkeypatch):
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar(root: Path, name: str, n=3, seed=0):
    """A tiny tree in torchvision's format; returns (train NHWC, train labels, test NHWC, test labels)."""
    rng = np.random.default_rng(seed)
    k = 10 if name == "cifar10" else 100
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if name == "cifar10" else ["train", "test"]
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    xs, ys = [], []
    for file in files:
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, k // 2, n)  # the top classes never occur: the head size comes from the meta file
        rows = x.transpose(0, 3, 1, 2).reshape(n, 3072)  # 1024 red, 1024 green, 1024 blue, row-major
        if name == "cifar10":
            entry = {"batch_label": file, "data": rows, "labels": y.tolist(), "filenames": [f"{i}.png" for i in range(n)]}
        else:  # the coarse labels differ from the fine ones, so reading the wrong ones shows
            entry = {"batch_label": file, "data": rows, "fine_labels": y.tolist(), "coarse_labels": (19 - y // 5).tolist(),
                     "filenames": [f"{i}.png" for i in range(n)]}
        _dump(folder / file, entry)
        xs.append(x)
        ys.append(y)
    if name == "cifar10":
        _dump(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": n, "num_vis": 3072})
    else:
        _dump(folder / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                                "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    return np.concatenate(xs[:-1]), np.concatenate(ys[:-1]), xs[-1], ys[-1]


@pytest.mark.parametrize("name,classes,train_size", [("cifar10", 10, 15), ("cifar100", 100, 3)])
def test_cifar_tree_in_torchvision_format_loads(tmp_path, no_md5, downloads, name, classes, train_size):
    xt, yt, xv, yv = write_cifar(tmp_path, name)
    data = load_data(settings(dataset=name, data_dir=str(tmp_path)))
    assert data.train.x.shape == (train_size, 3, 32, 32) and data.val.x.shape == (3, 3, 32, 32)
    assert torch.equal(data.train.x, torch.from_numpy(xt).permute(0, 3, 1, 2))
    assert torch.equal(data.val.x, torch.from_numpy(xv).permute(0, 3, 1, 2))
    assert data.train.y.tolist() == yt.tolist() and data.val.y.tolist() == yv.tolist()
    assert (data.num_classes, data.in_chans, data.image_size, data.pad, data.flip) == (classes, 3, 32, 4, True)
    flat = xt.reshape(-1, 3).astype(np.float64)
    assert data.mean == pytest.approx(tuple(flat.mean(0))) and data.std == pytest.approx(tuple(flat.std(0)))
    limited = load_data(settings(dataset=name, data_dir=str(tmp_path), train_limit=2, val_limit=1))
    assert limited.train.y.tolist() == yt[:2].tolist() and limited.val.y.tolist() == yv[:1].tolist()
    assert limited.num_classes == classes
    assert downloads == []


def test_cifar_tree_that_fails_torchvisions_md5_check_is_refused(tmp_path, downloads):
    write_cifar(tmp_path, "cifar10")
    with pytest.raises(TricksError) as excinfo:
        load_data(settings(dataset="cifar10", data_dir=str(tmp_path)))
    message = one_line_error(excinfo)
    assert "corrupted" in message and "md5" in message and "cifar-10-batches-py" in message
    assert downloads == []


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("where", ["empty folder", "no folder"])
def test_missing_cifar_tree_names_download_and_downloads_nothing(tmp_path, downloads, name, where):
    root = tmp_path if where == "empty folder" else tmp_path / "absent"
    with pytest.raises(TricksError) as excinfo:
        load_data(settings(dataset=name, data_dir=str(root)))
    assert "--download" in one_line_error(excinfo)
    assert downloads == []
    assert list(tmp_path.iterdir()) == []  # nothing written either


def test_cifar_downloads_only_with_download(tmp_path, downloads, monkeypatch):
    with pytest.raises(TricksError) as excinfo:  # the recorder fetches nothing, so the tree stays missing
        load_data(settings(dataset="cifar100", data_dir=str(tmp_path), download=True))
    assert "could not download" in one_line_error(excinfo)
    assert downloads and all(a[:2] == (tv_cifar.CIFAR100.url, str(tmp_path)) for a, _ in downloads)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(TricksError) as excinfo:
        load_data(settings(dataset="cifar10", data_dir=str(tmp_path), download=True))
    message = one_line_error(excinfo)
    assert "could not download cifar10" in message and "no network" in message


# --- ImageFolder trees -------------------------------------------------------------------------


def write_imagefolder(root: Path, classes=("ant", "bee"), n_train=6, n_val=3, seed=0) -> None:
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


@pytest.mark.slow
def test_imagefolder_trains_end_to_end_via_the_cli(tmp_path):
    tree = tmp_path / "tree"
    write_imagefolder(tree)
    run_dir = tmp_path / "run"
    result = run_cli("run", "--dataset", "imagefolder", "--data-dir", str(tree), "--set", "core.image_size=32",
                     "--set", "core.workers=0", "--model", "resnet8", "--epochs", "1", "--batch-size", "4",
                     "--out", str(run_dir), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert len(rows) == 1 and rows[0]["epoch"] == 1
    assert rows[0]["step"] == 3  # 12 training images, batches of 4
    assert np.isfinite(rows[0]["train_loss"]) and np.isfinite(rows[0]["val_loss"])
    assert rows[0]["val_acc"] * 6 == pytest.approx(round(rows[0]["val_acc"] * 6))  # a share of the 6 val images
    assert (run_dir / "summary.json").exists()


def test_imagefolder_limits_and_errors(tmp_path):
    write_imagefolder(tmp_path)
    data = load_data(settings(dataset="imagefolder", data_dir=str(tmp_path), train_limit=5, val_limit=2))
    assert (data.num_classes, data.in_chans, data.image_size, data.train_size) == (2, 3, 224, 5)
    assert len(data.folder_val) == 2
    (tmp_path / "val" / "cow").mkdir()
    (tmp_path / "val" / "cow" / "0.png").write_bytes((tmp_path / "val" / "ant" / "0.png").read_bytes())
    with pytest.raises(TricksError) as excinfo:
        load_data(settings(dataset="imagefolder", data_dir=str(tmp_path)))
    assert "different class folders" in one_line_error(excinfo)
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    with pytest.raises(TricksError) as excinfo:
        load_data(settings(dataset="imagefolder", data_dir=str(empty)))
    assert "<class>/" in one_line_error(excinfo)


class Indexed(torch.utils.data.Dataset):
    """Images whose target is their own index (FolderLoader sets ``transform``)."""

    def __init__(self, n: int):
        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)) for _ in range(n)]
        self.transform = None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), i


def folder_data(augment=True) -> Data:
    return Data("imagefolder", None, None, 5, 3, 8, (0.0,) * 3, (1.0,) * 3, 0, augment)


def test_folder_val_loader_covers_each_example_once_across_ranks():
    seen = []
    for rank in range(2):
        ds = Indexed(5)
        loader = FolderLoader(ds, Pipeline(folder_data(), torch.device("cpu"), 8, False), 2, False, 0,
                              rank, 2, 0, 8, torch.device("cpu"))
        seen += [i for batch in loader for i in batch["target"].tolist()]
    assert sorted(seen) == [0, 1, 2, 3, 4]


def test_folder_train_loader_without_augment_is_deterministic():
    ds = Indexed(4)
    pipeline = Pipeline(folder_data(augment=False), torch.device("cpu"), 8, False)
    loader = FolderLoader(ds, pipeline, 4, True, 0, 0, 1, 0, 8, torch.device("cpu"), augment=False)
    torch.manual_seed(0)
    first = next(iter(loader))
    torch.manual_seed(1)
    second = next(iter(loader))
    assert first["input"].shape == (4, 3, 8, 8)
    assert torch.equal(first["target"], second["target"]) and torch.equal(first["input"], second["input"])


# --- batch-wise augmentation ------------------------------------------------------------------


def images(b=64, c=3, h=6, w=10, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (b, c, h, w), generator=g, dtype=torch.uint8)  # no zeros: padding shows


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_crop_takes_a_window_of_the_padded_image(dtype):
    x = images().to(dtype)
    pad = 2
    torch.manual_seed(0)
    out = random_crop(x, pad)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[-2:]
    offsets = []
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if torch.equal(out[i], padded[i, :, dy:dy + h, dx:dx + w])]
        assert len(found) == 1, f"image {i} is no window of its padded original"
        offsets.append(found[0])
    assert len(set(offsets)) > 10  # offsets drawn per image (25 possible)
    assert {dy for dy, _ in offsets} == set(range(2 * pad + 1)) and {dx for _, dx in offsets} == set(range(2 * pad + 1))


def test_random_crop_with_no_padding_is_the_identity():
    x = images()
    assert torch.equal(random_crop(x, 0), x)


def test_random_flip_mirrors_a_random_subset_of_images():
    x = images().float()
    torch.manual_seed(0)
    out = random_flip(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    mirrored = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    assert all(k != m for k, m in zip(kept, mirrored))  # each image is exactly one of the two
    assert any(kept) and any(mirrored)


def test_pipeline_normalizes_and_augments_only_in_training():
    data = Data("t", None, None, 2, 3, 6, (10.0, 20.0, 30.0), (2.0, 4.0, 5.0), 1, True)
    pipeline = Pipeline(data, torch.device("cpu"), 6, False)
    x = images(b=8, h=6, w=6)
    expected = (x.float() - torch.tensor([10.0, 20.0, 30.0]).view(1, 3, 1, 1)) / torch.tensor([2.0, 4.0, 5.0]).view(1, 3, 1, 1)
    assert torch.allclose(pipeline(x, train=False), expected)
    torch.manual_seed(0)
    assert not torch.allclose(pipeline(x, train=True), expected)
    assert Pipeline(data, torch.device("cpu"), 12, False)(x, train=False).shape == (8, 3, 12, 12)


# --- TensorLoader --------------------------------------------------------------------------------


def indexed_split(n: int) -> Split:
    return Split(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n))  # target = index


def plain_pipeline() -> Pipeline:
    return Pipeline(Data("t", None, None, 2, 1, 2, (0.0,), (1.0,), 0, False), torch.device("cpu"), 2, False)


def epoch_order(loader: TensorLoader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return [i for batch in loader for i in batch["target"].tolist()]


def test_train_shards_are_disjoint_and_cover_the_epoch():
    n, batch = 101, 10
    loaders = [TensorLoader(indexed_split(n), plain_pipeline(), batch, True, seed=3, rank=r, world=2) for r in range(2)]
    for epoch in range(3):
        orders = [epoch_order(loader, epoch) for loader in loaders]
        assert len(orders[0]) == len(orders[1]) == 50 and len(loaders[0]) == 5
        assert not set(orders[0]) & set(orders[1])
        assert len(set(orders[0]) | set(orders[1])) == (n // 2) * 2
    assert epoch_order(loaders[0], 0) != epoch_order(loaders[0], 1)


def test_train_order_depends_on_seed_and_epoch_only():
    def order(seed, epoch, rng_state):
        torch.manual_seed(rng_state)
        return epoch_order(TensorLoader(indexed_split(64), plain_pipeline(), 8, True, seed=seed), epoch)

    assert order(5, 2, rng_state=0) == order(5, 2, rng_state=99)
    assert sorted(order(5, 2, 0)) == list(range(64)) and order(5, 2, 0) != list(range(64))
    assert order(5, 2, 0) != order(6, 2, 0)
    assert order(5, 2, 0) != order(5, 3, 0)
    assert sorted(order(10**15, 7, 0)) == list(range(64))  # a large seed is fine


def test_val_shards_cover_every_example_exactly_once():
    n = 23
    seen = []
    for rank in range(2):
        loader = TensorLoader(indexed_split(n), plain_pipeline(), 4, False, seed=0, rank=rank, world=2)
        seen += epoch_order(loader, 0)
    assert sorted(seen) == list(range(n))


def test_make_loaders_splits_the_global_batch():
    data = load_data(settings(train_limit=100, val_limit=30))
    core = settings(batch_size=20)
    train, val = make_loaders(data, core, torch.device("cpu"), rank=1, world=2)
    batch = next(iter(train))
    assert batch["input"].shape == (10, 1, 8, 8) and batch["input"].dtype == torch.float32
    assert len(train) == 5 and len(val) == 2  # 50 and 15 examples on this rank
    with pytest.raises(TricksError):
        make_loaders(data, settings(batch_size=21), torch.device("cpu"), rank=0, world=2)


def test_keep_in_memory_reuses_the_data_set_and_its_device_copy():
    from tricks.data import keep_in_memory

    core = CoreSettings(dataset="digits", train_limit=200, val_limit=100)
    other = CoreSettings(dataset="digits", train_limit=300, val_limit=100)
    assert load_data(core) is not load_data(core)  # off by default
    keep_in_memory(True)
    try:
        first = load_data(core)
        assert load_data(core) is first
        a, _ = make_loaders(first, core, torch.device("cpu"), 0, 1)
        b, _ = make_loaders(first, core, torch.device("cpu"), 0, 1)
        assert a.split.x is b.split.x
        changed = load_data(other)  # other settings: loaded again, the old copy dropped
        assert changed is not first and len(changed.train.y) == 300
    finally:
        keep_in_memory(False)
    assert load_data(core) is not load_data(core)
