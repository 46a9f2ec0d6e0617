"""Tests of the sweep analysis: the EDF against its formula, the complexity normalization, the quantized
linear fit on true RegNets, the summary table against numpy, and the report on synthetic sweep folders
(both formats, several sweeps, failures, degenerate inputs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tricks import TricksError
from tricks_regnet.analysis import (
    FIGURES, edf, edf_at, fit_quantized_linear, load_sweep, load_sweeps, normalization, normalized_weights,
    report, summarize,
)
from tricks_regnet.complexity import complexity
from tricks_regnet.config import anynet_config, regnet_config, regnet_widths

PNG = b"\x89PNG\r\n\x1a\n"

# (d, w0, wa, wm) of the paper's RegNetX and RegNetY models (200MF to 3.2GF)
ZOO = [(13, 24, 36.44, 2.49), (22, 24, 24.48, 2.54), (16, 48, 36.97, 2.24), (16, 56, 35.73, 2.28),
       (18, 80, 34.01, 2.25), (25, 88, 26.31, 2.25), (16, 48, 27.89, 2.09), (15, 48, 32.54, 2.32),
       (14, 56, 38.84, 2.40), (27, 48, 20.71, 2.65)]


def write_sweep(root: Path, name: str, space: str = "anynetx_a", n: int = 12, failed: int = 0, seed: int = 0,
                shift: float = 0.0, wide: float = 1.0, regnet: bool = False, spec: bool = True) -> Path:
    """A sweep folder like the sampling job's, with ``n`` finished and ``failed`` failed models."""
    rng = np.random.default_rng(seed)
    path = root / name
    (path / "results").mkdir(parents=True)
    if spec:
        (path / "sweep.json").write_text(json.dumps({
            "space": space, "n": n + failed, "seed": seed, "window": {"flops": [1e6, 5e8]}, "resolution": 32,
            "stem": "cifar", "num_classes": 10, "recipe": {"epochs": 1}}))
    for i in range(n + failed):
        if regnet:
            params = {"depth": int(rng.integers(6, 16)), "w0": int(rng.integers(2, 8)) * 8,
                      "wa": float(np.round(rng.uniform(8, 48), 2)), "wm": float(np.round(rng.uniform(1.5, 3), 2)),
                      "group_width": 8, "bottleneck": 1.0}
            cfg = regnet_config(params["depth"], params["w0"], params["wa"], params["wm"], 8)
        else:
            d = rng.integers(1, 4, 4)
            w = np.round(rng.uniform(16, 160 * wide, 4) / 8) * 8
            b = rng.choice([1, 2], 4)
            g = rng.choice([1, 2, 4, 8], 4)
            params = {**{f"d{s + 1}": int(d[s]) for s in range(4)}, **{f"w{s + 1}": int(w[s]) for s in range(4)},
                      **{f"b{s + 1}": int(b[s]) for s in range(4)}, **{f"g{s + 1}": int(g[s]) for s in range(4)}}
            cfg = anynet_config(d, w, b, g)
        cx = complexity(cfg, 32, "cifar", 10).as_dict()
        result = {"id": f"{i:04d}", "index": i, "space": space, "params": params, "config": cfg.to_dict(),
                  "complexity": cx, "epochs": 1, "time_s": 1.0, "device": "cpu"}
        if i < n:
            error = float(40 + shift - 2 * np.log(cx["flops"] / 1e6) + rng.normal(0, 2))
            result.update(status="ok", error=error, best_error=error - 0.1)
        else:
            result.update(status="failed", error=None, best_error=None, message=f"CUDA out of memory | model {i}")
        (path / "results" / f"{i:04d}.json").write_text(json.dumps(result))
    return path


def test_edf_equals_its_formula():
    rng = np.random.default_rng(0)
    errors = np.round(rng.normal(40, 5, 57), 1)  # rounded: ties
    points = np.concatenate([errors[:10], rng.uniform(20, 60, 40), [errors.min(), errors.max(), 0, 100]])
    formula = np.array([np.mean(errors < p) for p in points])
    np.testing.assert_allclose(edf_at(errors, points), formula)
    x, y = edf(errors)
    assert y[0] == 0 and y[-1] == pytest.approx(1.0) and np.all(np.diff(x) >= 0) and np.all(np.diff(y) >= 0)
    index = np.searchsorted(x, points, side="left") - 1
    np.testing.assert_allclose(np.where(index >= 0, y[np.maximum(index, 0)], 0.0), formula)
    # weighted: sum_i w_i 1[e_i < p] / sum_i w_i
    w = rng.uniform(0, 1, errors.size) * (rng.uniform(size=errors.size) > 0.3)
    formula = np.array([np.sum(w * (errors < p)) / w.sum() for p in points])
    np.testing.assert_allclose(edf_at(errors, points, w), formula)
    x, y = edf(errors, w)
    index = np.searchsorted(x, points, side="left") - 1
    np.testing.assert_allclose(np.where(index >= 0, y[np.maximum(index, 0)], 0.0), formula, atol=1e-12)
    x, y = edf([31.5])
    assert list(x) == [31.5, 31.5] and list(y) == [0.0, 1.0]


def test_normalized_weights_equalize_the_bins():
    rng = np.random.default_rng(1)
    flops = [np.exp(rng.normal(np.log(4e8), 0.3, 200)), np.exp(rng.normal(np.log(3e8), 0.5, 150)),
             np.exp(rng.uniform(np.log(2e8), np.log(6e8), 80))]
    norm = normalization(flops, 10)
    weights = norm["weights"]
    assert [len(w) for w in weights] == [200, 150, 80]
    common, edges = norm["common"], norm["edges"]
    assert 0 < len(common) < 10 and edges[0] == pytest.approx(min(f.min() for f in flops))
    index = [np.clip(np.floor((np.log(f) - np.log(edges[0])) / np.log(edges[-1] / edges[0]) * 10), 0, 9) for f in flops]
    for w, i in zip(weights, index):
        assert w.sum() == pytest.approx(1.0) and np.all(w >= 0)
        for b in range(10):
            mass = w[i == b].sum()
            assert mass == pytest.approx(1 / len(common) if b in common else 0.0)
        # models of one bin share its mass equally
        for b in common:
            assert np.ptp(w[i == b]) == pytest.approx(0.0)
    assert norm["dropped"] == [int((w == 0).sum()) for w in weights]
    assert all(np.allclose(a, b) for a, b in zip(normalized_weights(flops, 10), weights))
    # given edges; a model outside them gets no weight
    w = normalized_weights([[1, 2, 3, 50], [2.5, 2.6, 1.5]], bins=[1, 2, 4])
    assert list(w[0]) == pytest.approx([0.5, 0.25, 0.25, 0.0]) and list(w[1]) == pytest.approx([0.25, 0.25, 0.5])
    # one model, or all of equal flops
    assert list(normalized_weights([[3e8]])[0]) == [1.0]
    assert list(normalized_weights([[3e8, 3e8], [3e8]])[0]) == [0.5, 0.5]
    with pytest.raises(TricksError, match="do not overlap"):
        normalized_weights([[1e6, 2e6], [1e9, 2e9]])
    with pytest.raises(TricksError, match="flop count"):
        normalized_weights([[np.nan], [1e6]])


@pytest.mark.parametrize("params", ZOO)
def test_fit_reproduces_zoo_regnets(params):
    widths = regnet_widths(*params)
    fit = fit_quantized_linear(widths)
    assert fit["fit_error"] == 0.0 and fit["w0"] % 8 == 0
    assert fit["widths"] == list(widths)
    assert list(regnet_widths(params[0], fit["w0"], fit["wa"], fit["wm"])) == list(widths)
    assert fit["u"] == pytest.approx([fit["w0"] + fit["wa"] * j for j in range(params[0])])


def test_fit_reproduces_random_regnets_and_not_others():
    assert list(regnet_widths(13, 24, 36.44, 2.49)) == [24, 56] + [152] * 4 + [368] * 7
    rng = np.random.default_rng(2)
    for _ in range(12):
        d, w0 = int(rng.integers(4, 40)), int(rng.integers(1, 33)) * 8
        wa, wm = float(rng.uniform(1, 256)), float(rng.uniform(1.5, 3.0))
        widths = regnet_widths(d, w0, wa, wm)
        fit = fit_quantized_linear(widths)
        assert fit["fit_error"] == 0.0, (d, w0, wa, wm)
        assert list(regnet_widths(d, fit["w0"], fit["wa"], fit["wm"])) == list(widths)
    for widths in ([64, 64, 32, 32, 256, 256], [24, 24, 100, 100, 100] + [400] * 5, [16, 40, 48, 56, 1024]):
        fit = fit_quantized_linear(widths)
        assert fit["fit_error"] > 0
        assert fit["fit_error"] == pytest.approx(np.mean((np.log(fit["widths"]) - np.log(widths)) ** 2))
    assert fit_quantized_linear([64] * 9)["fit_error"] == 0.0  # wa = 0: constant widths
    assert fit_quantized_linear([32])["fit_error"] == 0.0
    with pytest.raises(ValueError):
        fit_quantized_linear([])


def test_table_matches_numpy(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, "s", n=23, failed=3))
    row = summarize(sweep)
    errors = np.array([json.loads(p.read_text())["error"] for p in sorted((tmp_path / "s" / "results").glob("*.json"))])
    errors = errors[errors != np.array(None)].astype(float)
    assert row["n_ok"] == 23 and row["n_failed"] == 3
    for key, q in (("p5", 5), ("p10", 10), ("p25", 25), ("median", 50)):
        assert row[key] == pytest.approx(np.percentile(errors, q))
    assert row["min"] == errors.min() and row["mean"] == pytest.approx(errors.mean())
    best = min(sweep.ok, key=lambda r: r["error"])
    assert row["best_id"] == best["id"] and row["best_flops"] == best["complexity"]["flops"]
    flops = [r["complexity"]["flops"] for r in sweep.ok]
    assert (row["flops_min"], row["flops_max"]) == (min(flops), max(flops))


@pytest.mark.parametrize("fmt", ["md", "html"])
def test_report_writes_text_and_figures(tmp_path, fmt):
    a = write_sweep(tmp_path, "a", "anynetx_a", n=14, failed=2, seed=3)
    e = write_sweep(tmp_path, "e", "anynetx_e", n=10, seed=4, shift=-3.0)
    r = write_sweep(tmp_path, "r", "regnetx", n=8, seed=5, regnet=True)
    out = tmp_path / "report"
    path = report([a, e, r], out, fmt=fmt, top=3)
    assert path == out / f"report.{fmt}"
    text = path.read_text()
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 2000
        assert ("![" in text and f"]({name})" in text) if fmt == "md" else f'<img src="{name}"' in text
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    for label in ("anynetx_a", "anynetx_e", "regnetx"):
        assert label in text
    assert "has the lowest median error" in text and "Failed models (2)" in text
    assert "CUDA out of memory" in text and "0014" in text and "0015" in text
    assert "CUDA out of memory | model 14" in text and (fmt == "md" or "<table>" in text)
    summary = json.loads((out / "summary.json").read_text())
    assert [s["n_failed"] for s in summary["sweeps"]] == [2, 0, 0]
    assert len(summary["best"]) == 9
    # the best models of the RegNet sweep are RegNets: exact fits
    assert all(b["fit"]["fit_error"] == 0.0 for b in summary["best"] if b["sweep"] == "regnetx")


def test_single_sweep_defaults_and_labels(tmp_path):
    one = write_sweep(tmp_path, "one", n=1)
    path = report([one])  # one finished model, default folder
    assert path == one / "analysis" / "report.md"
    assert all((one / "analysis" / name).stat().st_size > 0 for name in FIGURES)
    assert "coarse" in path.read_text()
    # two models, a constant parameter, no sweep.json: labelled by folder name
    two = write_sweep(tmp_path, "two", n=2, spec=False)
    for p in (two / "results").glob("*.json"):
        result = json.loads(p.read_text())
        result["params"]["d1"] = 2
        p.write_text(json.dumps(result))
    assert report([two], tmp_path / "out2", fmt="html", top=5).exists()
    # same space twice: labelled by folder name
    x = write_sweep(tmp_path / "p", "x", n=3)
    y = write_sweep(tmp_path / "q", "x", n=3)
    assert [s.name for s in load_sweeps([one, x])] == ["one", "x"]
    assert [s.name for s in load_sweeps([x, y])] == ["p/x", "q/x"]
    assert [s.name for s in load_sweeps([one, x, one])] == ["one #1", "x", "one #2"]


def test_degenerate_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(TricksError, match="does not exist"):
        load_sweep(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TricksError, match="no sweep.json and no results"):
        load_sweep(tmp_path / "empty")
    started = tmp_path / "started"
    (started / "results").mkdir(parents=True)
    (started / "sweep.json").write_text(json.dumps({"space": "anynetx_a"}))
    with pytest.raises(TricksError, match="no finished model"):
        load_sweep(started)
    dead = write_sweep(tmp_path, "dead", n=0, failed=3)
    with pytest.raises(TricksError, match="all failed.*CUDA out of memory"):
        report([dead], tmp_path / "out")
    ok = write_sweep(tmp_path, "ok", n=3)
    with pytest.raises(TricksError, match="format"):
        report([ok], fmt="pdf")
    with pytest.raises(TricksError, match="top"):
        report([ok], top=0)
    with pytest.raises(TricksError, match="at least one"):
        report([])
    (ok / "results" / "0001.json").write_text("{not json")
    with pytest.raises(TricksError, match="0001.json"):
        load_sweep(ok)
    for error in (TricksError,):
        try:
            load_sweep(dead)
        except error as caught:
            assert "\n" not in str(caught)


def test_normalization_bins_grow_with_the_sweeps():
    from tricks_regnet.analysis import normalization_bins

    assert [normalization_bins(n) for n in (1, 4, 24, 50, 500)] == [2, 2, 5, 7, 10]
