"""Tests of the noisy_data plugin: each kind of noise corrupts exactly the requested examples
(symmetric: never to the same class; asymmetric: only along the map; background: the object
shrunk inside clutter of other classes, labels kept), from its noise seed alone; the validation
split and the given tensors are untouched; the record in the run directory; a CLI run; the
refusals of bad settings; and the plugin contract."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import tricks
from tricks.data import Data, Split
from tricks.testing import check_plugin, make_ctx
from tricks_noisy_data import (
    PAIRS,
    NoisyData,
    NoisyDataSettings,
    _resize,
    asymmetric_noise,
    background_noise,
    noisy_count,
    parse_pairs,
    read_noise,
    symmetric_noise,
)

from processes import cli_in_process, one_line_error



def labels(n: int = 1000, k: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


def images(n: int, c: int = 3, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# --- symmetric -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4, 0.45, 1.0])
def test_symmetric_noise_flips_exactly_the_fraction_and_never_to_the_same_class(rate):
    y = labels(997)
    before = y.clone()
    new, idx = symmetric_noise(y, 10, rate, seed=3)
    assert torch.equal(y, before)  # the input is left alone
    assert len(idx) == noisy_count(rate, 997) == int(rate * 997 + 0.5)
    changed = (new != y).nonzero().flatten()
    assert torch.equal(changed, idx)  # every chosen label moved, no other did
    assert len(torch.unique(idx)) == len(idx)


def test_symmetric_noise_uses_every_other_class_about_evenly():
    y = torch.zeros(9000, dtype=torch.int64)
    new, idx = symmetric_noise(y, 10, 1.0, seed=0)
    counts = torch.bincount(new, minlength=10)
    assert counts[0] == 0 and (counts[1:] > 850).all() and (counts[1:] < 1150).all()


def test_symmetric_noise_is_determined_by_its_seed():
    y = labels()
    a, ia = symmetric_noise(y, 10, 0.3, seed=5)
    b, ib = symmetric_noise(y, 10, 0.3, seed=5)
    c, ic = symmetric_noise(y, 10, 0.3, seed=6)
    assert torch.equal(a, b) and torch.equal(ia, ib)
    assert not torch.equal(ia, ic)


def test_the_count_rounds_half_up():
    assert noisy_count(0.5, 5) == 3 and noisy_count(0.25, 2) == 1 and noisy_count(0.4, 50000) == 20000


# --- asymmetric ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.2, 0.4])
def test_asymmetric_noise_flips_the_fraction_of_each_source_class_along_the_map(rate):
    y = labels(2003)
    pairs = PAIRS["cifar10"]  # truck->automobile, bird->airplane, deer->horse, cat<->dog
    new, idx = asymmetric_noise(y, pairs, rate, seed=0)
    assert torch.equal((new != y).nonzero().flatten(), idx)
    for c in range(10):
        members = y == c
        flipped = int((new[members] != c).sum())
        if c in pairs:
            assert flipped == noisy_count(rate, int(members.sum())), c
            assert (new[members & (new != y)] == pairs[c]).all()  # only along the map
        else:
            assert flipped == 0, c
    # cat <-> dog in both directions, each drawn from the clean labels
    assert ((y == 3) & (new == 5)).sum() == noisy_count(rate, int((y == 3).sum()))
    assert ((y == 5) & (new == 3)).sum() == noisy_count(rate, int((y == 5).sum()))


def test_asymmetric_noise_is_determined_by_its_seed():
    y = labels()
    a, _ = asymmetric_noise(y, PAIRS["cifar10"], 0.4, seed=1)
    b, _ = asymmetric_noise(y, PAIRS["cifar10"], 0.4, seed=1)
    c, _ = asymmetric_noise(y, PAIRS["cifar10"], 0.4, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_the_maps_by_name_and_auto():
    assert parse_pairs("auto", 10, "cifar10") == ({9: 1, 2: 0, 4: 7, 3: 5, 5: 3}, "cifar10")
    assert parse_pairs("auto", 10, "npz")[1] == "cifar10"
    assert parse_pairs("auto", 10, "digits")[1] == "mnist"
    assert parse_pairs("next", 3) == ({0: 1, 1: 2, 2: 0}, "next")
    assert parse_pairs(" 1:2, 2:1 ", 3)[0] == {1: 2, 2: 1}


@pytest.mark.parametrize("text, fragment", [("3:3", "maps class 3 to itself"), ("1:12", "10 classes"),
                                            ("1-2", "is not src:dst"), ("1:2,1:3", "maps class 1 twice")])
def test_a_bad_map_is_a_one_line_error_naming_the_setting(text, fragment):
    with pytest.raises(tricks.TricksError, match="noisy_data.pairs") as caught:
        parse_pairs(text, 10)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_auto_has_no_map_for_an_unknown_data_set():
    with pytest.raises(tricks.TricksError, match="noisy_data.pairs=auto"):
        parse_pairs("auto", 100, "cifar100")


# --- background ------------------------------------------------------------------------------------


def test_background_noise_shrinks_the_object_into_clutter_of_other_classes_and_keeps_labels():
    x, y = images(200), labels(200, 4)
    before = x.clone()
    out, idx, boxes = background_noise(x, y, 0.3, seed=0, object_scale=0.5)
    assert torch.equal(x, before)
    assert len(idx) == noisy_count(0.3, 200) == 60
    kept = torch.ones(200, dtype=torch.bool)
    kept[idx] = False
    assert torch.equal(out[kept], x[kept])
    assert all(not torch.equal(out[i], x[i]) for i in idx.tolist())
    small = _resize(x[idx], 4, 4).round().clamp(0, 255).to(torch.uint8)
    for j, i in enumerate(idx.tolist()):
        x1, y1, x2, y2 = boxes[j].tolist()
        assert (x2 - x1, y2 - y1) == (4, 4) and 0 <= x1 <= 4 and 0 <= y1 <= 4
        assert torch.equal(out[i, :, y1:y2, x1:x2], small[j])  # the object, shrunk, where the box says


def test_background_clutter_comes_from_images_of_other_classes():
    # every class has its own constant colour: a quadrant outside the object shows another colour
    y = torch.arange(40) % 4
    x = (y * 60 + 10).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).clone()
    out, idx, boxes = background_noise(x, y, 0.5, seed=2, object_scale=0.25)
    for j, i in enumerate(idx.tolist()):
        x1, y1, x2, y2 = boxes[j].tolist()
        mask = torch.ones(8, 8, dtype=torch.bool)
        mask[y1:y2, x1:x2] = False
        clutter = out[i, 0][mask]
        assert (clutter != x[i, 0, 0, 0]).all()
        assert set(clutter.unique().tolist()) <= {10, 70, 130, 190}


def test_background_noise_is_determined_by_its_seed():
    x, y = images(100), labels(100, 5)
    a = background_noise(x, y, 0.2, seed=4)
    b = background_noise(x, y, 0.2, seed=4)
    c = background_noise(x, y, 0.2, seed=5)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[1], c[1])


# --- the plugin ------------------------------------------------------------------------------------


def data(n: int = 300) -> Data:
    train = Split(images(n, 1), labels(n))
    val = Split(images(50, 1, seed=7), labels(50, seed=8))
    return Data("digits", train, val, 10, 1, 8, (100.0,), (50.0,), 1, False)


@pytest.mark.parametrize("kind", ["symmetric", "asymmetric", "background"])
def test_prepare_data_corrupts_only_the_training_split_and_records_it(kind):
    d = data()
    x, y, vx, vy = d.train.x.clone(), d.train.y.clone(), d.val.x.clone(), d.val.y.clone()
    plugin = NoisyData(NoisyDataSettings(kind=kind, rate=0.4, seed=1))
    ctx = make_ctx(plugins=["noisy_data"], dataset="digits")
    out = plugin.prepare_data(ctx, d)
    assert torch.equal(d.train.x, x) and torch.equal(d.train.y, y)  # nothing changed in place
    assert out.val is d.val and torch.equal(out.val.x, vx) and torch.equal(out.val.y, vy)
    noisy = out.train.is_noisy
    assert torch.equal(out.train.clean_y, y)
    changed = (out.train.y != y) | (out.train.x != x).flatten(1).any(1)
    assert torch.equal(changed, noisy)
    record = plugin.record
    assert record["noisy"] == noisy.nonzero().flatten().tolist() and record["kind"] == kind
    assert record["clean_labels"] == y[noisy].tolist() and record["labels"] == out.train.y[noisy].tolist()
    if kind == "background":
        assert torch.equal(out.train.y, y) and len(record["boxes"]) == len(record["noisy"]) == 120
    else:
        assert torch.equal(out.train.x, x)
    assert out.notes[-1].startswith(f"noisy_data: {kind} noise at rate 0.4")


def test_imagefolder_data_is_refused():
    d = dataclasses.replace(data(), train=None)
    with pytest.raises(tricks.TricksError, match="npz"):
        NoisyData().prepare_data(make_ctx(plugins=["noisy_data"]), d)


def test_a_cli_run_writes_the_record_the_functions_give(tmp_path):
    from tricks.data import load_digits_data

    out = tmp_path / "run"
    code, _, err = cli_in_process("run", "--dataset", "digits", "--plugins", "noisy_data", "--set", "noisy_data.kind=symmetric",
                                  "--set", "noisy_data.rate=0.4", "--set", "noisy_data.seed=7", "--model", "resnet8",
                                  "--epochs", "1", "--train-limit", "128", "--val-limit", "64", "--batch-size", "32",
                                  "--device", "cpu", "--no-curves", "--out", str(out))
    assert code == 0, err
    record = read_noise(out)
    y = torch.from_numpy(load_digits_data()[1][:128])
    want, idx = symmetric_noise(y, 10, 0.4, 7)
    assert record["noisy"] == idx.tolist() and len(idx) == 51
    assert record["labels"] == want[idx].tolist() and record["clean_labels"] == y[idx].tolist()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["noisy_examples"] == 51 and summary["noise_kind"] == "symmetric"


@pytest.mark.parametrize("sets, fragment", [(["noisy_data.rate=1.5"], "noisy_data.rate"),
                                            (["noisy_data.kind=uniform"], "noisy_data.kind"),
                                            (["noisy_data.pairs=1:2"], "noisy_data.pairs"),
                                            (["noisy_data.kind=asymmetric", "noisy_data.pairs=4:4"], "noisy_data.pairs")])
def test_bad_settings_are_one_line_errors_naming_the_setting(tmp_path, sets, fragment):
    args = [a for s in sets for a in ("--set", s)]
    code, _, err = cli_in_process("run", "--dataset", "digits", "--plugins", "noisy_data", *args, "--epochs", "1",
                                  "--train-limit", "64", "--device", "cpu", "--out", str(tmp_path / "r"))
    one_line_error(code, err, fragment)


def test_the_plugin_contract(tmp_path):
    check_plugin("noisy_data", precisions=("fp32",), workdir=tmp_path)
