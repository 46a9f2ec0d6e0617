"""``tricks ensemble``: the math (the mean of probabilities computed stably, the mean of logits,
the expected calibration error against hand-computed values), and two tiny runs evaluated alone
and together: one run alone is its own recorded validation, two runs combined equal the same
formulas applied to their models' logits computed here by hand, a logit bias moves the
predictions it should, the command line prints the same numbers, and bad input is one line with
exit status 2."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import tricks
from processes import cli_in_process, one_line_error, one_torch_thread
from tricks.config import CoreSettings
from tricks.data import load_data
from tricks.ensemble import (combine_logits, combine_probabilities, evaluate_ensemble, expected_calibration_error,
                             parse_logit_bias)

pytestmark = pytest.mark.slow  # the module trains two tiny runs

TINY = dict(epochs=1, model="resnet8", batch_size=32, train_limit=256, val_limit=128, device="cpu")
K = 10  # digits


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two resnet8 runs of one epoch on the digits, seeds 0 and 1."""
    root = tmp_path_factory.mktemp("ensemble")
    with one_torch_thread():
        for seed in (0, 1):
            tricks.run(out=root / f"seed{seed}", seed=seed, reporter=tricks.Reporter(), **TINY)
    return [root / "seed0", root / "seed1"]


@pytest.fixture(scope="module")
def by_hand(runs):
    """Each run's validation logits computed here: the model the run directory rebuilds, the
    validation images normalized with the training images' statistics, one forward pass."""
    data = load_data(CoreSettings(dataset="digits", train_limit=256, val_limit=128))
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    x = (data.val.x.float() - mean) / std
    with torch.no_grad(), one_torch_thread():
        logits = [tricks.RunDir(r).build_model().eval()(x) for r in runs]
    return logits, data.val.y


def evaluate(paths, **kwargs):
    with one_torch_thread():
        return evaluate_ensemble(paths, **kwargs)


def metrics_of(log_probs, y):
    """acc, errors, mean NLL of log-probabilities."""
    right = int((log_probs.argmax(1) == y).sum())
    return right / len(y), len(y) - right, float(-log_probs.gather(1, y[:, None]).mean())


# --- the math -------------------------------------------------------------------------------------


def test_the_mean_of_probabilities_is_the_log_of_the_mean_softmax():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(6, K, generator=g, dtype=torch.float64) * 3 for _ in range(3)]
    direct = torch.stack([F.softmax(z, 1) for z in logits]).mean(0).log()
    torch.testing.assert_close(combine_probabilities(logits), direct)
    torch.testing.assert_close(combine_logits(logits), F.log_softmax(torch.stack(logits).mean(0), 1))
    one = [logits[0]]
    torch.testing.assert_close(combine_probabilities(one), F.log_softmax(logits[0], 1))
    torch.testing.assert_close(combine_logits(one), F.log_softmax(logits[0], 1))


def test_the_mean_of_probabilities_is_finite_where_the_direct_formula_underflows():
    # A class both members are sure against: its probability underflows to 0 in float32, its log is -inf.
    a = torch.tensor([[0.0, -200.0, 5.0]])
    b = torch.tensor([[0.0, -150.0, -5.0]])
    assert torch.isinf(torch.stack([F.softmax(a, 1), F.softmax(b, 1)]).mean(0).log()).any()
    stable = combine_probabilities([a, b])
    assert torch.isfinite(stable).all()
    exact = combine_probabilities([a.double(), b.double()])
    torch.testing.assert_close(stable.double(), exact, rtol=1e-5, atol=1e-4)
    assert stable[0, 1].item() == pytest.approx(-150.0 - math.log(2) - math.log(1 + math.exp(-5)), abs=1e-3)


def test_ece_of_a_hand_computed_example():
    # Confidences 0.9 (x4, 2 right), 0.65 (x2, 1 right), 0.95 and 0.96 (one bin, 1 of 2 right).
    probs = torch.tensor([[0.9, 0.1]] * 4 + [[0.35, 0.65]] * 2 + [[0.95, 0.05], [0.04, 0.96]])
    y = torch.tensor([0, 0, 1, 1, 1, 0, 0, 0])
    # bins: (0.6, 0.667] holds 0.65 (acc 1/2), (0.867, 0.933] holds 0.9 (acc 2/4),
    # (0.933, 0.967] holds 0.95 and 0.96 (acc 1/2, mean confidence 0.955)
    expected = 4 / 8 * abs(0.5 - 0.9) + 2 / 8 * abs(0.5 - 0.65) + 2 / 8 * abs(0.5 - 0.955)
    assert expected_calibration_error(probs, y) == pytest.approx(expected, abs=1e-6)
    # with 2 bins, 0.65 to 0.96 fall together: |5/8 right - mean confidence|
    mean_conf = (4 * 0.9 + 2 * 0.65 + 0.95 + 0.96) / 8
    assert expected_calibration_error(probs, y, bins=2) == pytest.approx(abs(4 / 8 - mean_conf), abs=1e-6)


def test_ece_is_zero_when_confidence_matches_accuracy():
    # 10 predictions at 0.7 with 7 right, 5 at 0.8 with 4 right, 3 at 1.0 all right.
    probs = torch.tensor([[0.7, 0.3]] * 10 + [[0.2, 0.8]] * 5 + [[1.0, 0.0]] * 3, dtype=torch.float64)
    y = torch.tensor([0] * 7 + [1] * 3 + [1] * 4 + [0] + [0] * 3)
    assert expected_calibration_error(probs, y) == pytest.approx(0.0, abs=1e-12)
    wrong = torch.tensor([1] * 18)  # every prediction wrong at its confidence...
    assert expected_calibration_error(probs[:10], wrong[:10]) == pytest.approx(0.7)


def test_ece_equals_a_loop_over_bins_on_random_predictions():
    g = torch.Generator().manual_seed(1)
    probs = F.softmax(torch.randn(500, K, generator=g) * 2, 1)
    y = torch.randint(0, K, (500,), generator=g)
    conf, pred = probs.max(1)
    total = 0.0
    for m in range(15):
        inside = (conf > m / 15) & (conf <= (m + 1) / 15)
        if inside.any():
            total += inside.sum().item() / 500 * abs((pred[inside] == y[inside]).float().mean().item()
                                                     - conf[inside].mean().item())
    assert expected_calibration_error(probs, y) == pytest.approx(total, abs=1e-6)


def test_logit_bias_is_parsed_and_checked():
    assert parse_logit_bias(["3=3.5", " 0 = -1e-2 "]) == {3: 3.5, 0: -0.01}
    assert parse_logit_bias({2: 1}) == {2: 1.0} and parse_logit_bias(None) == {}
    for bad, words in (("3", "not CLASS=VALUE"), ("x=1", "not a class index"), ("-1=2", "not a class index"),
                       ("1.5=2", "not a class index"), ("3=big", "not a number"), ("3=inf", "not finite")):
        with pytest.raises(tricks.TricksError, match=words):
            parse_logit_bias([bad])
    with pytest.raises(tricks.TricksError, match="class 3 twice"):
        parse_logit_bias(["3=1", "3=2"])


# --- runs -----------------------------------------------------------------------------------------


def test_one_run_alone_is_its_recorded_validation(runs):
    result = evaluate([runs[0]])
    (member,) = result["members"]
    last = tricks.RunDir(runs[0]).metrics()[-1]
    assert member["n"] == 128 and member["acc"] == last["val_acc"]
    assert member["errors"] == round(128 * (1 - last["val_acc"]))
    assert member["nll"] == pytest.approx(last["val_loss"], rel=1e-5)
    assert member["model"] == "resnet8" and member["plugins"] == []
    for combined in result["ensemble"].values():  # an ensemble of one is that run
        assert combined["acc"] == member["acc"] and combined["nll"] == pytest.approx(member["nll"], rel=1e-6)
        assert combined["ece"] == pytest.approx(member["ece"], abs=1e-9)
    assert result["data"] == {"dataset": "digits", "data_dir": None, "val_limit": 128, "n": 128, "num_classes": K}


def test_two_runs_combine_as_the_formulas_say_on_their_logits(runs, by_hand):
    logits, y = by_hand
    result = evaluate(runs, batch_size=50)  # batches that do not divide the 128 images
    for member, z in zip(result["members"], logits):
        acc, errors, nll = metrics_of(F.log_softmax(z, 1), y)
        assert (member["acc"], member["errors"]) == (acc, errors) and member["nll"] == pytest.approx(nll, rel=1e-5)
        assert member["ece"] == pytest.approx(expected_calibration_error(F.softmax(z, 1), y), abs=1e-5)
    mean_probs = torch.stack([F.softmax(z, 1) for z in logits]).mean(0)
    mean_logits = F.softmax(torch.stack(logits).mean(0), 1)
    for name, probs in (("mean_probs", mean_probs), ("mean_logits", mean_logits)):
        got = result["ensemble"][name]
        acc, errors, nll = metrics_of(probs.log(), y)
        assert (got["acc"], got["errors"], got["n"]) == (acc, errors, 128), name
        assert got["nll"] == pytest.approx(nll, rel=1e-5), name
        assert got["ece"] == pytest.approx(expected_calibration_error(probs, y), abs=1e-5), name
    assert result["runs"] == [str(r) for r in runs] and result["logit_bias"] == {} and result["notes"] == []


def test_a_logit_bias_moves_the_predictions(runs, by_hand):
    logits, y = by_hand
    z = logits[0]
    margin = z.max(1).values - z[:, 3]  # how far class 3 is below the top logit
    bias = float(margin.median()) + 1e-3  # enough for about half of the images to turn to 3
    result = evaluate([runs[0]], logit_bias={3: bias})
    shifted = z.clone()
    shifted[:, 3] += bias
    predictions = shifted.argmax(1)
    assert 0 < int((predictions == 3).sum()) < 128
    acc, errors, nll = metrics_of(F.log_softmax(shifted, 1), y)
    (member,) = result["members"]
    assert (member["acc"], member["errors"]) == (acc, errors) and member["nll"] == pytest.approx(nll, rel=1e-5)
    assert result["logit_bias"] == {3: bias}
    # a bias no logit can beat: every image is called a 3
    everything = evaluate(runs, logit_bias=["3=1000"])
    threes = int((y == 3).sum())
    for row in (*everything["members"], *everything["ensemble"].values()):
        assert row["errors"] == 128 - threes


def test_the_command_prints_the_same_numbers_and_writes_them(runs, tmp_path):
    with one_torch_thread():
        code, out, err = cli_in_process("ensemble", *map(str, runs), "--device", "cpu", "--json", "--out",
                                        str(tmp_path / "out"), "--logit-bias", "3=3.5")
    assert code == 0, err
    printed = json.loads(out)
    expected = evaluate(runs, logit_bias={3: 3.5})
    assert printed == json.loads(json.dumps(expected))  # ints as JSON keys become strings
    assert json.loads((tmp_path / "out" / "ensemble.json").read_text()) == printed
    with one_torch_thread():
        code, out, err = cli_in_process("ensemble", str(runs[0]), "--device", "cpu", "--val-limit", "64")
    assert code == 0, err
    (member,) = evaluate([runs[0]], val_limit=64)["members"]
    assert "1 run on 64 digits validation images" in out and "ensemble" in out
    for cell in (f"{100 * member['acc']:.2f}", str(member["errors"]), f"{member['nll']:.4f}", f"{member['ece']:.4f}"):
        assert out.count(cell) >= 3, cell  # the run, and both of its ensembles of one


def test_bad_input_is_one_line_with_exit_status_2(runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(runs[0] / "config.yaml", untrained / "config.yaml")
    checkpoint = tricks.RunDir(runs[1]).load_checkpoint()
    other_classes = tmp_path / "five"
    (other_classes / "checkpoints").mkdir(parents=True)
    torch.save({**checkpoint, "shape": {**checkpoint["shape"], "num_classes": 5}}, other_classes / "checkpoints" / "last.pt")
    other_data = tmp_path / "cifar"
    (other_data / "checkpoints").mkdir(parents=True)
    core = {**checkpoint["config"]["core"], "dataset": "npz", "data_dir": str(tmp_path / "shards")}
    torch.save({**checkpoint, "config": {**checkpoint["config"], "core": core}}, other_data / "checkpoints" / "last.pt")
    a = str(runs[0])
    cases = [
        ((str(tmp_path / "nowhere"),), ("nowhere does not exist", "tricks run --out")),
        ((str(empty),), ("holds no run",)),
        ((str(runs[0] / "config.yaml"),), ("is not a folder",)),
        ((str(untrained),), ("has no checkpoints/last.pt", "--resume")),
        ((a, str(other_classes)), ("different class counts", ": 10", ": 5")),
        ((a, str(other_data)), ("different data", "--data-dir")),
        ((a, "--logit-bias", "3"), ("not CLASS=VALUE", "--logit-bias 3=3.5")),
        ((a, "--logit-bias", "three=1"), ("not a class index",)),
        ((a, "--logit-bias", "10=1"), ("class 10 is out of range", "10 classes")),
        ((a, "--dataset", "mnist"), ("needs --data-dir",)),
        ((a, "--out", str(runs[0] / "config.yaml")), ("is a file",)),
    ]
    for args, fragments in cases:
        code, out, err = cli_in_process("ensemble", *args, "--device", "cpu")
        one_line_error(code, err, *fragments)
        assert "Traceback" not in err and out == ""
