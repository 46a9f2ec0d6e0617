"""The design spaces and the sampler: constraints, the complexity window, uniformity, no repeats,
reproducibility, YAML spaces and their errors."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from tricks_regnet.complexity import complexity
from tricks_regnet.config import regnet_config
from tricks_regnet.spaces import SPACES, DesignSpace, SpaceError, Window, get_space, parse_range

WINDOW = Window.parse(flops="360M:400M")


def sample(name, n=200, seed=0, window=WINDOW, **kw):
    return get_space(name).sample(n, seed=seed, window=window, **kw)


@pytest.mark.parametrize("name", list(SPACES))
def test_every_sample_is_in_the_window_and_its_counts_are_exact(name):
    for s in sample(name, 100):
        assert 360e6 <= s.complexity["flops"] <= 400e6
        assert complexity(s.config, 224, "imagenet", 1000).as_dict() == s.complexity
        assert len(s.config.depths) == 4


@pytest.mark.parametrize("name", list(SPACES))
def test_no_network_is_sampled_twice_and_the_sequence_is_reproducible(name):
    first = sample(name, 150, seed=3)
    assert len({s.key() for s in first}) == len(first) == 150
    again = sample(name, 60, seed=3)
    assert [s.key() for s in again] == [s.key() for s in first[:60]]  # a smaller n is a prefix
    other = sample(name, 60, seed=4)
    assert [s.key() for s in other] != [s.key() for s in first[:60]]


def _stage_values(samples, field):
    return np.array([getattr(s.config, field) for s in samples])


def test_anynetx_refinements_hold_their_constraints():
    a, b, c, d, e = (sample(f"anynetx_{x}", 300) for x in "abcde")
    # A is unconstrained: some samples break each later constraint
    assert any(len(set(s.config.bottlenecks)) > 1 for s in a)
    assert any(np.any(np.diff(s.config.widths) < 0) for s in a)
    assert any(np.any(np.diff(s.config.depths) < 0) for s in a)
    # B: one bottleneck ratio; C: one group width too (before the clamp to the inner width)
    assert all(len(set(s.config.bottlenecks)) == 1 for s in b)
    assert any(len({s.params[f"g{i}"] for i in range(1, 5)}) > 1 for s in b)
    for s in c + d + e:
        assert len(set(s.config.bottlenecks)) == 1
        inner = s.config.inner_widths
        shared = {g for g, w in zip(s.config.groups, inner) if g < w}  # unclamped stages share g
        assert len(shared) <= 1
    # D: non-decreasing widths; E: non-decreasing widths and depths
    for s in d + e:
        assert np.all(np.diff(s.config.widths) >= 0), s.config
    assert any(np.any(np.diff(s.config.depths) < 0) for s in d)
    for s in e:
        assert np.all(np.diff(s.config.depths) >= 0), s.config


def test_anynet_ranges_and_buildability():
    for s in sample("anynetx_a", 300):
        cfg = s.config
        assert all(1 <= d <= 16 for d in cfg.depths)
        assert all(8 <= w <= 1024 + 96 for w in cfg.widths)
        assert set(cfg.bottlenecks) <= {1.0, 2.0, 4.0}
        for w, b, g in zip(cfg.widths, cfg.bottlenecks, cfg.groups):
            assert (w / b) % g == 0 and g <= w / b


@pytest.mark.parametrize("name,se", [("regnetx", 0.0), ("regnety", 0.25), ("regnet", 0.0)])
def test_regnet_samples_are_the_networks_of_their_parameters(name, se):
    samples = sample(name, 150)
    for s in samples:
        p = s.params
        assert s.config == regnet_config(p["depth"], p["w0"], p["wa"], p["wm"], p["group_width"], p["bottleneck"], se)
        assert np.all(np.diff(s.config.widths) >= 0)
        assert sum(s.config.depths) == p["depth"]
    if name != "regnet":
        for s in samples:
            p = s.params
            assert 12 <= p["depth"] <= 28 and 2.0 <= p["wm"] <= 3.0 and 8 <= p["w0"] <= 256 and 8 <= p["wa"] <= 256
            assert p["w0"] % 8 == 0 and p["bottleneck"] == 1
    else:
        assert {s.params["bottleneck"] for s in samples} == {1, 2, 4}
        assert min(s.params["wm"] for s in samples) < 2.0


@pytest.mark.parametrize("name", ["regnetx", "regnet"])
def test_regnet_samples_pass_pycls_stage_check(name):
    # pycls's sweeps keep a RegNet only when its number of distinct widths equals the last level + 1
    # (no level merged by rounding to 8, none skipped), and here that number must be the 4 stages
    rejected = 0
    for s in sample(name, 300, window=Window()):
        p = s.params
        j = np.arange(p["depth"])
        levels = np.round(np.log((p["w0"] + p["wa"] * j) / p["w0"]) / np.log(p["wm"]))
        widths = np.round(p["w0"] * np.power(p["wm"], levels) / 8) * 8
        assert len(np.unique(widths)) == levels.max() + 1 == 4
    # and the check does reject draws: among raw parameter draws, some merge or skip a level
    rng = np.random.default_rng(0)
    for _ in range(2000):
        w0, wa, wm, d = 8 * rng.integers(1, 33), rng.uniform(8, 256), rng.uniform(2, 3), int(rng.integers(12, 29))
        levels = np.round(np.log((w0 + wa * np.arange(d)) / w0) / np.log(wm))
        widths = np.round(w0 * np.power(wm, levels) / 8) * 8
        rejected += len(np.unique(widths)) != levels.max() + 1
    assert rejected > 0


def test_params_and_acts_windows():
    w = Window.parse(params="1M:2M", acts=":3M")
    for s in sample("anynetx_c", 100, window=w):
        assert 1e6 <= s.complexity["params"] <= 2e6 and s.complexity["acts"] <= 3e6


def test_the_32x32_adaptation_changes_the_counts_it_samples_under():
    for s in sample("regnetx", 30, window=Window.parse(flops="20M:40M"), resolution=32, stem="cifar", num_classes=10):
        assert complexity(s.config, 32, "cifar", 10).as_dict() == s.complexity
        assert 20e6 <= s.complexity["flops"] <= 40e6


TINY = {"name": "tiny", "kind": "anynet", "stages": 2,
        "params": {"depth": {"values": [1, 2, 3]}, "width": {"values": [8]}, "bottleneck": {"values": [1]},
                   "group_width": {"values": [8]}},
        "increasing": ["depth"]}


def test_sampling_is_uniform_over_the_constrained_set():
    # 2 stages, depths in {1,2,3} non-decreasing: 6 networks. Sampling all 6 (without repeats)
    # many times from different seeds, each network comes first equally often.
    space = DesignSpace(TINY)
    firsts = Counter(space.sample(1, seed=s)[0].config.depths for s in range(600))
    assert sorted(firsts) == [(1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (3, 3)]
    assert all(abs(c - 100) < 32 for c in firsts.values()), firsts  # binomial sd ~9.1
    assert len({s.key() for s in space.sample(6)}) == 6


def test_the_sampler_says_when_the_space_is_exhausted():
    with pytest.raises(SpaceError, match="only 6 of 7 distinct networks"):
        DesignSpace(TINY).sample(7, max_draws=50_000)
    with pytest.raises(SpaceError, match="widen the window"):
        get_space("anynetx_a").sample(1, window=Window.parse(flops="1:2"), max_draws=20_000)


def test_yaml_space(tmp_path):
    path = tmp_path / "wide_y.yaml"
    path.write_text(
        "kind: anynet\nstages: 3\nse: 0.25\n"
        "params:\n"
        "  depth: {low: 1, high: 4}\n"
        "  width: {low: 16, high: 256, step: 16}\n"
        "  bottleneck: {values: [1, 2]}\n"
        "  group_width: {low: 4, high: 32, step: 4, dist: log_uniform}\n"
        "shared: [bottleneck]\n"
        "increasing: [width]\n")
    space = get_space(path)
    assert space.name == "wide_y"
    samples = space.sample(100, window=Window.parse(flops="50M:150M"))
    for s in samples:
        assert len(s.config.depths) == 3 and s.config.se == 0.25
        assert np.all(np.diff(s.config.widths) >= 0)
        assert len(set(s.config.bottlenecks)) == 1
        assert all(4 <= s.params[f"g{i}"] <= 32 for i in (1, 2, 3))
    regnet = tmp_path / "r.yml"
    regnet.write_text("kind: regnet\nstages: 3\nparams:\n  depth: {low: 6, high: 10}\n  w0: {values: [16, 32]}\n"
                      "  wa: {low: 8, high: 64, step: 0.5, dist: log_uniform}\n  wm: {low: 2, high: 3, step: 0.01}\n"
                      "  group_width: {values: [8]}\n")
    for s in get_space(regnet).sample(40):
        assert len(s.config.depths) == 3 and s.params["w0"] in (16, 32)


@pytest.mark.parametrize("spec,message", [
    ({"kind": "convnet"}, "kind must be anynet or regnet"),
    ({"params": {**TINY["params"], "height": {"values": [1]}}}, "unknown parameter 'height'"),
    ({"params": {k: v for k, v in TINY["params"].items() if k != "width"}}, "parameter 'width' has no range"),
    ({"params": {**TINY["params"], "depth": {"low": 1, "high": 4, "dist": "log_uniform"}}, "increasing": ["depth"]},
     "give it a finite range"),
    ({"params": {**TINY["params"], "depth": {"low": 4, "high": 1}}}, "low <= high"),
    ({"shared": ["w0"]}, "not a per-stage parameter"),
    ({"params": {**TINY["params"], "depth": [1, 2]}}, "must be a mapping"),
])
def test_bad_spaces_say_what_to_fix(spec, message):
    with pytest.raises(SpaceError, match=message):
        DesignSpace({**TINY, **spec})


def test_names_and_ranges_errors(tmp_path):
    with pytest.raises(SpaceError, match="did you mean anynetx_a"):
        get_space("anynetx_aa")
    with pytest.raises(SpaceError, match="does not exist"):
        get_space(tmp_path / "missing.yaml")
    assert parse_range("360M:400M") == (360e6, 400e6)
    assert parse_range(":1.5G") == (0.0, 1.5e9)
    assert parse_range("2e6:") == (2e6, math.inf)
    for bad in ("400M", "a:b", "5M:1M"):
        with pytest.raises(SpaceError):
            parse_range(bad)
    assert Window.from_dict(Window.parse(flops="1M:").to_dict()).bounds == {"flops": (1e6, math.inf)}
