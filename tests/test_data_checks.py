"""Data sets are checked for the layout they claim before any training starts: each problem is one
line that names the file and the fix, raised before a model is built or a run directory written."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
import tricks
from conftest import ROOT, TINY_API
from PIL import Image
from processes import cli_in_process, one_line_error
from test_data import write_cifar
from tricks.config import CoreSettings
from tricks.data import load_data, make_loaders
from tricks.errors import TricksError

SHARED_MNIST = Path(os.environ.get("TRICKS_MNIST", ROOT.parent / "shared" / "data" / "mnist"))


def settings(**values) -> CoreSettings:
    return CoreSettings(**values)


def refused(core: CoreSettings, *fragments: str) -> str:
    """load_data refuses the data with one line holding every fragment."""
    with pytest.raises(TricksError) as excinfo:
        load_data(core)
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def run_refused(tmp_path: Path, dataset: str, data_dir: Path, *fragments: str, **settings_) -> str:
    """tricks.run refuses the data with one line, and leaves no run directory behind."""
    out = tmp_path / "run"
    with pytest.raises(TricksError) as excinfo:
        tricks.run(dataset=dataset, data_dir=str(data_dir), out=out, epochs=1, **{**TINY_API, **settings_})
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert not out.exists()
    return message


def cli_refused(tmp_path: Path, dataset: str, data_dir: Path, *fragments: str) -> str:
    """``tricks run`` exits 2 with one line and no traceback, and leaves no run directory behind."""
    out = tmp_path / "run"
    code, _, err = cli_in_process("run", "--dataset", dataset, "--data-dir", str(data_dir), "--epochs", "1",
                                  "--model", "resnet8", "--out", str(out))
    line = one_line_error(code, err, *fragments)
    assert "Traceback" not in err
    assert not out.exists()
    return line


# --- ImageFolder trees ------------------------------------------------------------------------


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, "PNG")
    return buffer.getvalue()


def write_tree(root: Path, classes=("ant", "bee"), n=3, seed=0) -> Path:
    """train/ and val/ with ``n`` 8x8 RGB PNGs per class."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                (root / split / c / f"{i}.png").write_bytes(png_bytes(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
    return root


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with(width: int, height: int, idat: bytes) -> bytes:
    """A PNG whose every chunk has a valid checksum, with any IDAT payload."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_a_whole_tree_loads_and_every_image_is_checked(tmp_path):
    tree = write_tree(tmp_path / "tree")
    data = load_data(settings(dataset="imagefolder", data_dir=str(tree)))
    assert (data.num_classes, data.in_chans, data.train_size, len(data.folder_val)) == (2, 3, 6, 6)
    assert data.folder_train.classes == ["ant", "bee"] and data.notes == []


def test_a_truncated_png_is_refused_before_the_run_starts(tmp_path):
    tree = write_tree(tmp_path / "tree")
    bad = tree / "train" / "bee" / "1.png"
    bad.write_bytes(bad.read_bytes()[:70])
    run_refused(tmp_path, "imagefolder", tree, str(bad), "not a whole image", "remove or replace the file")


def test_every_broken_image_is_counted_in_the_one_line(tmp_path):
    tree = write_tree(tmp_path / "tree")
    broken = [tree / "train" / "ant" / "0.png", tree / "val" / "bee" / "2.png", tree / "val" / "bee" / "1.png"]
    for path in broken:
        path.write_bytes(path.read_bytes()[:-12])  # no IEND chunk
    message = refused(settings(dataset="imagefolder", data_dir=str(tree)), str(broken[0]), "2 more file(s)")
    assert str(broken[2]) in message and str(broken[1]) in message


def test_truncated_jpeg_is_refused_but_bytes_after_a_whole_jpeg_are_not(tmp_path):
    tree = write_tree(tmp_path / "tree")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    jpeg = tree / "train" / "ant" / "photo.jpg"
    jpeg.write_bytes(buffer.getvalue() + b"\0" * 64)  # a trailer after the end marker: decodes whole
    assert load_data(settings(dataset="imagefolder", data_dir=str(tree))).train_size == 7
    jpeg.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 3 // 4])
    refused(settings(dataset="imagefolder", data_dir=str(tree)), str(jpeg), "truncated")


@pytest.mark.parametrize("content,fragment", [
    (b"", "not an image"),
    (b"<html>404 not found</html>", "not an image"),
    (png_with(8, 8, zlib.compress(b"\0" * 10))[:40], "not an image"),
    (png_with(20000, 20000, zlib.compress(b"\0" * 10)), "too large"),
])
def test_files_that_are_no_whole_image_are_refused(tmp_path, content, fragment):
    tree = write_tree(tmp_path / "tree")
    (tree / "val" / "ant" / "odd.png").write_bytes(content)
    refused(settings(dataset="imagefolder", data_dir=str(tree)), str(tree / "val" / "ant" / "odd.png"), fragment)


def test_sixteen_bit_and_float_images_are_refused_rather_than_clipped(tmp_path):
    tree = write_tree(tmp_path / "tree")
    deep = tree / "train" / "ant" / "deep.png"
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(deep)
    refused(settings(dataset="imagefolder", data_dir=str(tree)), str(deep), "I;16", "8-bit")
    deep.unlink()
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tree / "train" / "ant" / "float.tif")
    refused(settings(dataset="imagefolder", data_dir=str(tree)), "float.tif", "mode F")


def test_gray_and_gray_alpha_images_join_rgb_ones_with_a_note(tmp_path):
    tree = write_tree(tmp_path / "tree")
    (tree / "train" / "ant" / "gray.png").write_bytes(png_bytes(np.full((8, 8), 7, np.uint8)))
    (tree / "train" / "bee" / "la.png").write_bytes(png_bytes(np.full((8, 8, 2), 9, np.uint8), "LA"))
    core = settings(dataset="imagefolder", data_dir=str(tree), image_size=8, batch_size=8, workers=0, augment=False)
    data = load_data(core)
    assert data.train_size == 8 and len(data.notes) == 1
    assert "2 of 14 images are not RGB" in data.notes[0] and "converted to RGB" in data.notes[0]
    train, _ = make_loaders(data, core, torch.device("cpu"), 0, 1)
    assert next(iter(train))["input"].shape == (8, 3, 8, 8)


def test_one_class_is_refused(tmp_path):
    tree = write_tree(tmp_path / "tree", classes=("ant",))
    run_refused(tmp_path, "imagefolder", tree, "at least two classes", "'ant'")


def test_a_limit_takes_the_classes_in_turn_and_one_class_is_refused(tmp_path):
    tree = write_tree(tmp_path / "tree", classes=("ant", "bee", "cow"))
    data = load_data(settings(dataset="imagefolder", data_dir=str(tree), train_limit=4, val_limit=3))
    assert data.folder_train.targets == [0, 1, 2, 0] and data.folder_val.targets == [0, 1, 2]
    assert data.num_classes == 3
    refused(settings(dataset="imagefolder", data_dir=str(tree), train_limit=1), "train_limit=1", "'ant'", "two classes")


def test_validation_classes_that_differ_are_named(tmp_path):
    tree = write_tree(tmp_path / "tree")
    (tree / "val" / "bee").rename(tree / "val" / "wasp")
    refused(settings(dataset="imagefolder", data_dir=str(tree)), "only val has wasp", "only train has bee", "make them match")


def test_an_empty_class_folder_is_named(tmp_path):
    tree = write_tree(tmp_path / "tree")
    for split in ("train", "val"):
        (tree / split / "cow").mkdir()
    (tree / "train" / "cow" / "notes.txt").write_text("no images here")
    refused(settings(dataset="imagefolder", data_dir=str(tree)), str(tree / "train" / "cow"), "holds no images")


def test_hidden_folders_and_files_are_not_classes_or_images(tmp_path):
    tree = write_tree(tmp_path / "tree")
    (tree / "train" / ".ipynb_checkpoints").mkdir()
    (tree / "train" / "ant" / "._0.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    data = load_data(settings(dataset="imagefolder", data_dir=str(tree)))
    assert data.folder_train.classes == ["ant", "bee"] and data.train_size == 6


def test_symbolic_link_loops_and_links_into_another_class_are_refused(tmp_path):
    tree = write_tree(tmp_path / "tree")
    os.symlink("..", tree / "train" / "ant" / "up")
    refused(settings(dataset="imagefolder", data_dir=str(tree)), "symbolic link", "remove the link")
    (tree / "train" / "ant" / "up").unlink()
    os.symlink(tree / "train" / "bee", tree / "train" / "ant" / "bees")
    refused(settings(dataset="imagefolder", data_dir=str(tree)), "bee", "one class")
    (tree / "train" / "ant" / "bees").unlink()
    os.symlink("self.png", tree / "train" / "ant" / "self.png")
    refused(settings(dataset="imagefolder", data_dir=str(tree)), "self.png", "cannot be read")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_image_is_named(tmp_path):
    tree = write_tree(tmp_path / "tree")
    os.chmod(tree / "train" / "ant" / "0.png", 0)
    refused(settings(dataset="imagefolder", data_dir=str(tree)), "0.png", "cannot be read")


@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_that_fails_only_when_decoded_is_one_line_from_a_worker(tmp_path, workers):
    tree = write_tree(tmp_path / "tree")
    bad = tree / "train" / "ant" / "z.png"
    bad.write_bytes(png_with(8, 8, b"checksums fine, not a zlib stream"))  # passes verify(), fails to decode
    core = settings(dataset="imagefolder", data_dir=str(tree), image_size=8, batch_size=7, workers=workers)
    data = load_data(core)
    train, _ = make_loaders(data, core, torch.device("cpu"), 0, 1)
    with pytest.raises(TricksError) as excinfo:
        next(iter(train))  # 7 of 7 training images: z.png is in the batch
    message = str(excinfo.value)
    assert "\n" not in message and "Traceback" not in message and "worker" not in message
    assert message.startswith(f"{bad} cannot be decoded") and "remove or replace the file" in message


def test_cli_truncated_png_exits_2_in_one_line_and_leaves_no_run(tmp_path):
    tree = write_tree(tmp_path / "tree")
    bad = tree / "val" / "ant" / "2.png"
    bad.write_bytes(bad.read_bytes()[:50])
    cli_refused(tmp_path, "imagefolder", tree, str(bad))


def test_the_folder_named_must_be_the_tree(tmp_path):
    tree = write_tree(tmp_path / "tree")
    refused(settings(dataset="imagefolder", data_dir=str(tree / "train")), f"point --data-dir at {tree}")
    refused(settings(dataset="imagefolder", data_dir=str(tree / "train" / "ant" / "0.png")), "is a file, not a folder")
    (tmp_path / "empty").mkdir()
    refused(settings(dataset="imagefolder", data_dir=str(tmp_path / "empty")), "train/<class>/")


# --- .npz shards -------------------------------------------------------------------------------


def write_shards(root: Path, x_train: np.ndarray, y_train, x_val=None, y_val=None, **extra) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "train_0.npz", x=x_train, y=np.asarray(y_train))
    np.savez(root / "test.npz", x=x_train if x_val is None else x_val, y=np.asarray(y_train if y_val is None else y_val), **extra)
    return root


def images(n=6, shape=(8, 8, 3), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


LABELS = [0, 1, 2, 0, 1, 2]


def test_nchw_uint8_shards_are_read_as_the_same_images_with_a_note(tmp_path):
    x = images(shape=(32, 32, 3))
    nhwc = load_data(settings(dataset="npz", data_dir=str(write_shards(tmp_path / "nhwc", x, LABELS))))
    nchw = load_data(settings(dataset="npz", data_dir=str(write_shards(tmp_path / "nchw", x.transpose(0, 3, 1, 2), LABELS))))
    assert nchw.in_chans == 3 and nchw.image_size == 32 and nchw.train.x.shape == (6, 3, 32, 32)
    assert torch.equal(nchw.train.x, nhwc.train.x) and torch.equal(nchw.val.x, nhwc.val.x)
    assert nchw.mean == nhwc.mean and nhwc.notes == []
    assert len(nchw.notes) == 1 and "NCHW" in nchw.notes[0] and "train_0.npz" in nchw.notes[0]


@pytest.mark.parametrize("x,fragment", [
    (np.zeros((6, 32, 32, 32), np.uint8), "neither its last axis"),
    (images().transpose(0, 3, 1, 2).reshape(6, -1), "x.reshape(-1, 3, 8, 8)"),
    (images()[..., 0].reshape(6, -1), "x.reshape(-1, 8, 8)"),
    (images() / 255.0, "(x * 255).round().astype(numpy.uint8)"),
    (images().astype(np.float32), "x.round().clip(0, 255)"),
    (np.where(np.arange(6)[:, None, None, None] == 4, np.nan, images() / 255.0), "NaN (1 image(s), the first: image 4)"),
    (images().astype(np.uint16) * 16, "values 0 to 4080"),
    (images()[None], "got shape (1, 6, 8, 8, 3)"),
])
def test_images_stored_in_another_layout_are_refused_with_the_fix(tmp_path, x, fragment):
    write_shards(tmp_path, images(), LABELS)
    np.savez(tmp_path / "train_0.npz", x=x, y=np.array(LABELS))
    run_refused(tmp_path, "npz", tmp_path, "train_0.npz", fragment)


def test_integer_images_within_0_to_255_are_accepted_as_uint8(tmp_path):
    x = images()
    data = load_data(settings(dataset="npz", data_dir=str(write_shards(tmp_path, x.astype(np.int64), LABELS))))
    assert data.train.x.dtype == torch.uint8 and torch.equal(data.train.x, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert any("uint8" in note for note in data.notes)


@pytest.mark.parametrize("y,fragment", [
    (np.array([0, 1, 2, 0, 1, 5_000_000]), "holds label 5000000, but only 4 distinct labels"),
    (np.array(LABELS, np.float64), "store y.astype(numpy.int64)"),
    (np.array(["a", "b", "c", "a", "b", "c"]), "class names"),
    (np.eye(3, dtype=np.int64)[LABELS], "y.argmax(1)"),
    (np.array(LABELS[:5]), "x holds 6 images but y 5 labels"),
    (np.zeros(6, np.int64), "at least two classes"),
])
def test_labels_that_are_no_class_indices_are_refused(tmp_path, y, fragment):
    write_shards(tmp_path, images(), LABELS)
    np.savez(tmp_path / "train_0.npz", x=images(), y=y)
    message = refused(settings(dataset="npz", data_dir=str(tmp_path)), fragment)
    assert str(tmp_path) in message


def test_a_column_of_labels_is_accepted(tmp_path):
    data = load_data(settings(dataset="npz", data_dir=str(write_shards(tmp_path, images(), np.array(LABELS)[:, None]))))
    assert data.train.y.tolist() == LABELS


def test_labels_beyond_the_classes_array_name_both_shards(tmp_path):
    write_shards(tmp_path, images(), LABELS, classes=np.array(["ant", "bee"]))
    refused(settings(dataset="npz", data_dir=str(tmp_path)), "train_0.npz holds label 2", "test.npz names only 2 classes")


def test_a_limit_that_keeps_one_class_is_refused(tmp_path):
    write_shards(tmp_path, images(), [0, 0, 0, 1, 1, 2])  # sorted by class
    assert load_data(settings(dataset="npz", data_dir=str(tmp_path), train_limit=4)).num_classes == 3
    refused(settings(dataset="npz", data_dir=str(tmp_path), train_limit=3), "train_limit=3", "label 0", "shuffle")


def test_missing_and_empty_arrays_are_named(tmp_path):
    write_shards(tmp_path, images(), LABELS)
    np.savez(tmp_path / "test.npz", images=images(), labels=np.array(LABELS))
    refused(settings(dataset="npz", data_dir=str(tmp_path)), "test.npz lacks array 'x'", "it holds: images, labels")
    np.savez(tmp_path / "test.npz", x=images()[:0], y=np.zeros(0, np.int64))
    refused(settings(dataset="npz", data_dir=str(tmp_path)), "test.npz holds no examples")


class Payload:
    """Pickles into a call that creates a file: proof of code run on loading."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_payloads_in_shards_are_never_run(tmp_path):
    marker = tmp_path / "ran"
    write_shards(tmp_path / "data", images(), LABELS)
    with open(tmp_path / "data" / "train_0.npz", "wb") as f:  # a bare pickle under the shard's name
        pickle.dump({"x": Payload(marker), "y": LABELS}, f)
    refused(settings(dataset="npz", data_dir=str(tmp_path / "data")), "train_0.npz", "pickled")
    np.savez(tmp_path / "data" / "train_0.npz", x=np.array([Payload(marker)] * 6, dtype=object), y=np.array(LABELS))
    refused(settings(dataset="npz", data_dir=str(tmp_path / "data")), "train_0.npz", "allow_pickle=False")
    np.savez(tmp_path / "data" / "train_0.npz", x=images(), y=np.array(LABELS))
    np.savez(tmp_path / "data" / "test.npz", x=images(), y=np.array(LABELS), classes=np.array([Payload(marker)], dtype=object))
    refused(settings(dataset="npz", data_dir=str(tmp_path / "data")), "test.npz", "allow_pickle=False")
    assert not marker.exists()


def test_cli_nan_images_exit_2_in_one_line_and_leave_no_run(tmp_path):
    x = (images() / 255.0).astype(np.float32)
    x[3, 1, 1, 1] = np.nan
    write_shards(tmp_path / "data", x, LABELS)
    cli_refused(tmp_path, "npz", tmp_path / "data", "train_0.npz", "NaN")


def test_a_folder_of_another_kind_is_named_for_what_it_holds(tmp_path):
    write_shards(tmp_path / "data", images(), LABELS)
    refused(settings(dataset="cifar10", data_dir=str(tmp_path / "data")), "use --dataset npz")
    refused(settings(dataset="imagefolder", data_dir=str(tmp_path / "data")), "use --dataset npz")
    refused(settings(dataset="npz", data_dir=str(tmp_path / "data" / "test.npz")), "is a file", str(tmp_path / "data"))
    tree = write_tree(tmp_path / "tree")
    refused(settings(dataset="npz", data_dir=str(tree)), "use --dataset imagefolder")


# --- MNIST in torchvision's layout ---------------------------------------------------------------


def idx(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, n_train=20, n_test=10, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(idx(rng.integers(0, 256, (n, 28, 28)), 2051))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(idx(np.arange(n) % 10, 2049))
    return raw


def test_a_small_mnist_tree_loads(tmp_path):
    raw = write_mnist(tmp_path)
    data = load_data(settings(dataset="mnist", data_dir=str(tmp_path)))
    assert data.train.x.shape == (20, 1, 28, 28) and data.val.x.shape == (10, 1, 28, 28)
    assert (data.num_classes, data.in_chans, data.image_size, data.flip) == (10, 1, 28, False)
    assert data.train.y.tolist() == [i % 10 for i in range(20)]
    expected = np.frombuffer((raw / "train-images-idx3-ubyte").read_bytes()[16:], np.uint8).reshape(20, 1, 28, 28)
    assert torch.equal(data.train.x, torch.from_numpy(expected.copy()))
    gz = raw / "t10k-images-idx3-ubyte"
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(gz.read_bytes()))
    gz.unlink()  # only the .gz, as torchvision downloads it
    assert torch.equal(load_data(settings(dataset="mnist", data_dir=str(tmp_path))).val.x, data.val.x)


def test_torchvisions_layout_is_read_by_torchvision_without_download(tmp_path, monkeypatch):
    import torchvision

    write_mnist(tmp_path)
    calls, real = [], torchvision.datasets.MNIST

    def spy(root, train, download):
        calls.append((root, train, download))
        return real(root, train=train, download=download)

    monkeypatch.setattr(torchvision.datasets, "MNIST", spy)
    data = load_data(settings(dataset="mnist", data_dir=str(tmp_path)))
    assert calls == [(str(tmp_path), True, False), (str(tmp_path), False, False)]
    assert data.train.y.tolist() == [i % 10 for i in range(20)]


@pytest.mark.parametrize("damage,file,fragment", [
    (lambda p: p.unlink(), "t10k-labels-idx1-ubyte", "is missing"),
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "train-images-idx3-ubyte", "the file is truncated"),
    (lambda p: p.write_bytes(p.read_bytes() + b"\0"), "train-labels-idx1-ubyte", "longer than that"),
    (lambda p: p.write_bytes(b""), "t10k-images-idx3-ubyte", "not an IDX file"),
    (lambda p: p.write_bytes(gzip.compress(p.read_bytes())), "t10k-images-idx3-ubyte", "gzip-compressed"),
    (lambda p: p.write_bytes(idx(np.full(10, 12), 2049)), "t10k-labels-idx1-ubyte", "label 12"),
    (lambda p: p.write_bytes(idx(np.zeros(9), 2049)), "t10k-labels-idx1-ubyte", "9 labels"),
])
def test_a_damaged_mnist_file_is_named(tmp_path, damage, file, fragment):
    raw = write_mnist(tmp_path)
    damage(raw / file)
    refused(settings(dataset="mnist", data_dir=str(tmp_path)), file, fragment)


def test_missing_mnist_names_download_and_downloads_nothing(tmp_path):
    run_refused(tmp_path, "mnist", tmp_path, "mnist not found", "--download")
    assert list(tmp_path.iterdir()) == []


def test_the_shared_mnist_matches_its_readme():
    if not (SHARED_MNIST / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        pytest.skip(f"the shared MNIST is not at {SHARED_MNIST}")
    data = load_data(settings(dataset="mnist", data_dir=str(SHARED_MNIST)))
    assert data.train.x.shape == (60000, 1, 28, 28) and data.val.x.shape == (10000, 1, 28, 28)
    assert data.train.y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert data.val.y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert torch.bincount(data.train.y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert data.mean[0] / 255 == pytest.approx(0.1307, abs=1e-4) and data.std[0] / 255 == pytest.approx(0.3081, abs=1e-4)
    import torchvision  # the arrays are exactly torchvision's reading of the same files

    for train, split in ((True, data.train), (False, data.val)):
        theirs = torchvision.datasets.MNIST(str(SHARED_MNIST), train=train, download=False)
        assert torch.equal(split.x[:, 0], theirs.data) and torch.equal(split.y, theirs.targets)


# --- CIFAR in torchvision's layout ---------------------------------------------------------------


def test_a_cifar_tree_with_a_missing_or_altered_file_names_it(tmp_path, monkeypatch):
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", lambda *a, **k: pytest.fail("downloaded"))
    write_cifar(tmp_path, "cifar10")  # synthetic: every file fails the md5 check, the first is named
    folder = tmp_path / "cifar-10-batches-py"
    refused(settings(dataset="cifar10", data_dir=str(tmp_path)), f"{folder / 'data_batch_1'} fails torchvision's md5 check")
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    (folder / "data_batch_3").unlink()
    refused(settings(dataset="cifar10", data_dir=str(tmp_path)), f"{folder / 'data_batch_3'} is missing", "--download")
