"""Tests of the memory_module plugin: the bag weights (non-negative, summing to 1, one region
weighs 1, permutation-equivariant), the discriminative and representative scores, the
self-organizing-map step and the counting, bags and the bag sampler, the regions pooled from a
feature map, the refused models; in runs: one output per bag of one label, the bag loss as the
innermost loss wrapper, a run stopped (and one killed) after epoch 1 and resumed to exactly the
uninterrupted weights and memory, a CLI run with noisy_data that writes the figure and the region
record, the refusals of bad settings, the order after noisy_data, and the plugin contract."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import tricks
from tricks.testing import check_plugin, make_ctx, tiny_run
from tricks_memory_module import (
    BagSampler,
    Memory,
    MemoryModule,
    bag_weights,
    check_backbone,
    discriminative_scores,
    grid_boxes,
    grid_distances,
    group_bags,
    representative_scores,
    roi_features,
    som_update,
)

from processes import StopAtEpoch, cli_in_process, finish_killed, one_line_error, one_torch_thread, start_script



def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- bag weights -------------------------------------------------------------------------------------


def test_bag_weights_are_non_negative_and_sum_to_one_in_every_bag():
    scores = torch.rand(40, generator=gen(0)) * (torch.rand(40, generator=gen(1)) > 0.3)
    bag = torch.randint(0, 7, (40,), generator=gen(2))
    bag[:7] = torch.arange(7)  # every bag has a region
    w = bag_weights(scores, bag, 7)
    assert (w >= 0).all()
    sums = torch.zeros(7).index_add_(0, bag, w)
    torch.testing.assert_close(sums, torch.ones(7))
    for b in range(7):  # within a bag, proportional to the scores
        s, v = scores[bag == b], w[bag == b]
        if s.sum() > 0:
            torch.testing.assert_close(v, s / s.sum())


def test_a_bag_of_one_region_weighs_it_one_and_a_bag_of_zero_scores_is_uniform():
    w = bag_weights(torch.tensor([0.3, 0.0, 0.0, 0.0, 5.0, 1.0]), torch.tensor([0, 1, 2, 2, 3, 3]), 4)
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, 0.5, 0.5, 5 / 6, 1 / 6]))


def test_permuting_the_regions_permutes_the_weights():
    scores = torch.rand(30, generator=gen(3))
    bag = torch.arange(30) // 6
    perm = torch.randperm(30, generator=gen(4))
    torch.testing.assert_close(bag_weights(scores[perm], bag[perm], 5), bag_weights(scores, bag, 5)[perm])


def test_the_weights_a_memory_gives_permute_with_the_regions():
    memory = Memory(3, 3, 4)
    feats = torch.nn.functional.normalize(torch.rand(60, 8, generator=gen(5)), dim=1)
    labels = torch.randint(0, 4, (60,), generator=gen(6))
    memory.initialize(feats, seed=0)
    memory.update(feats, labels, memory.nearest(feats), lr=0.5, sigma=1.0, decay=1.0)
    bag = torch.arange(60) // 10
    perm = torch.randperm(60, generator=gen(7))
    w = bag_weights(memory.scores(memory.nearest(feats), labels), bag, 6)
    wp = bag_weights(memory.scores(memory.nearest(feats[perm]), labels[perm]), bag[perm], 6)
    torch.testing.assert_close(wp, w[perm])
    assert not torch.allclose(w, torch.full_like(w, 0.1))  # the memory says something


# --- scores ----------------------------------------------------------------------------------------


def test_a_one_hot_slot_is_the_most_discriminative_and_a_uniform_one_the_least():
    values = torch.cat([torch.tensor([[0.0, 7.0, 0.0, 0.0], [3.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0]]),
                        torch.rand(20, 4, generator=gen(8)) * 10])
    d = discriminative_scores(values)
    assert d[0] == 1.0 and d[1] == pytest.approx(0.0, abs=1e-6) and d[2] == pytest.approx(0.0, abs=1e-6)
    assert (d[3:] > 0).all() and (d[3:] < 1).all()
    assert d.argmax() == 0 and d.min() == pytest.approx(0.0, abs=1e-6)
    assert discriminative_scores(torch.tensor([[5.0, 1.0, 0.0, 0.0]])) > discriminative_scores(torch.tensor([[3.0, 3.0, 0.0, 0.0]]))


def test_the_representative_score_is_the_share_of_a_class_in_each_slot():
    values = torch.tensor([[2.0, 0.0, 0.0], [6.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
    r = representative_scores(values)
    torch.testing.assert_close(r, torch.tensor([[0.25, 0.0, 0.0], [0.75, 0.25, 0.0], [0.0, 0.75, 0.0]]))


# --- the self-organizing map -----------------------------------------------------------------------


def test_the_som_step_moves_the_winner_toward_the_feature_and_its_neighbours_less():
    rows, cols = 4, 4
    keys = torch.rand(16, 5, generator=gen(9))
    f = torch.rand(1, 5, generator=gen(10)) + 2
    winner = torch.tensor([5])  # row 1, column 1
    dist2 = grid_distances(rows, cols)
    new = som_update(keys, f, winner, dist2, lr=0.3, sigma=1.0)
    torch.testing.assert_close(new[5], keys[5] + 0.3 * (f[0] - keys[5]))  # the winner: lr of the way
    step = ((new - keys).norm(dim=1) / (f - keys).norm(dim=1))  # the fraction of the way each key moved
    assert step[5] == pytest.approx(0.3)
    for l in range(16):
        assert step[l] == pytest.approx(0.3 * torch.exp(-dist2[l, 5] / 2).item(), rel=1e-5)
        if l != 5:
            assert step[l] < step[5]
    assert step[6] > step[7] > step[3]  # the farther on the grid, the less
    assert ((new - f).norm(dim=1) < (keys - f).norm(dim=1)).all()  # everyone closer to the feature
    only = som_update(keys, f, winner, dist2, lr=0.3, sigma=0.0)
    assert torch.equal(only[torch.arange(16) != 5], keys[torch.arange(16) != 5])


def test_the_memory_counts_the_labels_of_the_regions_each_slot_wins():
    memory = Memory(2, 2, 3)
    memory.keys = torch.eye(4, 4)
    memory.values, memory.hits = torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64)
    feats = torch.eye(4, 4)[[0, 0, 2, 3]]
    memory.update(feats, torch.tensor([1, 1, 2, 0]), memory.nearest(feats), lr=0.1, sigma=0.0, decay=0.5)
    torch.testing.assert_close(memory.values, torch.tensor([[0.0, 2, 0], [0, 0, 0], [0, 0, 1], [1, 0, 0]]))
    assert memory.hits.tolist() == [2, 0, 1, 1] and memory.updates == 1
    memory.update(feats[:1], torch.tensor([2]), torch.tensor([0]), lr=0.1, sigma=0.0, decay=0.5)
    torch.testing.assert_close(memory.values[0], torch.tensor([0.0, 1, 1]))


# --- bags and regions --------------------------------------------------------------------------------


def test_bags_hold_images_of_one_label_and_at_most_bag_size_of_them():
    labels = torch.randint(0, 5, (64,), generator=gen(11))
    bag, n = group_bags(labels, 4)
    assert n == sum(-(-int((labels == c).sum()) // 4) for c in range(5))
    assert sorted(torch.unique(bag).tolist()) == list(range(n))
    for b in range(n):
        members = labels[bag == b]
        assert 1 <= len(members) <= 4 and (members == members[0]).all()


def test_the_sampler_gives_batches_of_whole_bags_drawn_from_seed_and_epoch():
    labels = torch.randint(0, 3, (50,), generator=gen(12))
    sampler = BagSampler(labels, 4)
    order = sampler.order(0, 1)
    assert len(order) == len(sampler) == sum(-(-int((labels == c).sum()) // 4) * 4 for c in range(3))
    bags = labels[order].view(-1, 4)
    assert (bags == bags[:, :1]).all()
    assert set(order.tolist()) == set(range(50))
    assert torch.equal(order, sampler.order(0, 1)) and not torch.equal(order, sampler.order(0, 2))


def test_regions_pool_the_feature_map_and_the_whole_image_is_its_average():
    fmap = torch.zeros(2, 3, 4, 4)
    fmap[:, 0, :, :2] = 1.0  # channel 0: the left half
    fmap[:, 1] = 2.0  # channel 1: constant
    fmap[1, 2] = torch.arange(16.0).view(4, 4)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 16.0], [8.0, 0.0, 16.0, 16.0]])  # left and right halves of a 16x16 input
    roi = roi_features(fmap, boxes, (16, 16))
    assert roi.shape == (2, 3, 3)
    torch.testing.assert_close(roi[:, 0], fmap.mean(dim=(2, 3)))
    torch.testing.assert_close(roi[:, 1:, 1], torch.full((2, 2), 2.0))
    # pixel-aligned bilinear samples at x = -0.25, 0.25, 0.75, 1.25 (left) and 1.75 ... 3.25 (right) of the
    # feature map: one sample in four straddles the border and takes a quarter of the other half
    torch.testing.assert_close(roi[:, 1:, 0], torch.tensor([[15 / 16, 1 / 16], [15 / 16, 1 / 16]]))
    assert roi[1, 2, 2] > roi[1, 1, 2]  # the right half of an increasing map is larger


def test_the_grid_crops_cover_the_image_from_corner_to_corner():
    boxes = grid_boxes(10, 20, 2, 0.6)
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0, 12, 6], [8, 0, 20, 6], [0, 4, 12, 10], [8, 4, 20, 10]]))
    assert grid_boxes(8, 8, 0, 0.5).shape == (0, 4)


def test_a_model_without_a_pooled_linear_head_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(tricks.TricksError, match="memory_module") as caught:
        check_backbone(model, 1, 8, "custom")
    assert "\n" not in str(caught.value)
    from tricks.models import create_model

    check_backbone(create_model("resnet8", 10, 1), 1, 8, "resnet8")  # accepted


# --- runs ------------------------------------------------------------------------------------------


SETS = ["memory_module.figure_images=8", "memory_module.rows=4", "memory_module.cols=4"]
TINY = dict(train_limit=128, val_limit=64, curves=False)


PLUGINS = ["noisy_data", "memory_module"]
RESUME_SETS = SETS + ["noisy_data.rate=0.4", "memory_module.random_regions=2"]  # random crops: the global generator


def assert_same_run(got: tricks.RunDir, want: tricks.RunDir) -> None:
    """The same weights, memory and metrics, exactly."""
    got_check, want_check = got.load_checkpoint(), want.load_checkpoint()
    assert got_check["step"] == want_check["step"] == 8
    for key, value in want_check["model"].items():
        assert torch.equal(got_check["model"][key], value), key
    memory, want_memory = got_check["plugins"]["memory_module"], want_check["plugins"]["memory_module"]
    assert memory["updates"] == want_memory["updates"] == 8
    for key in ("keys", "values", "hits"):
        assert torch.equal(memory[key], want_memory[key]), key
    assert [r["val_loss"] for r in got.metrics()] == [r["val_loss"] for r in want.metrics()]
    assert [r["memory_discriminative"] for r in got.metrics()] == [r["memory_discriminative"] for r in want.metrics()]
    assert (got.path / "memory_regions.json").read_text() == (want.path / "memory_regions.json").read_text()


def test_a_run_stopped_after_epoch_1_and_resumed_ends_with_the_uninterrupted_weights_and_memory(tmp_path):
    want = tiny_run(plugins=PLUGINS, set=RESUME_SETS, out=tmp_path / "whole", epochs=2, **TINY)
    with pytest.raises(tricks.PluginHookError, match="stopped as epoch 1 starts"):
        tiny_run(plugins=[*PLUGINS, StopAtEpoch(1)], set=RESUME_SETS, out=tmp_path / "stopped", epochs=2, **TINY)
    stopped = tricks.RunDir(tmp_path / "stopped")
    assert len(stopped.metrics()) == 1
    tricks.run(resume=stopped.path)
    assert_same_run(stopped, want)
    assert (stopped.path / "memory_regions.png").is_file()


@pytest.mark.slow
def test_a_run_killed_after_epoch_1_and_resumed_ends_with_the_uninterrupted_weights_and_memory(tmp_path):
    killed_dir, reference = tmp_path / "killed", tmp_path / "uninterrupted"
    core = {**TINY, "model": "resnet8", "batch_size": 32, "device": "cpu"}
    killed = start_script(f"""
        import tricks
        from processes import KillAtEpoch
        tricks.run(plugins={PLUGINS!r} + [KillAtEpoch(1)], set={RESUME_SETS!r}, epochs=2, out={str(killed_dir)!r}, **{core!r})
    """)
    with one_torch_thread():
        tricks.run(plugins=PLUGINS, set=RESUME_SETS, epochs=2, out=reference, **core)
    finish_killed(killed)
    assert tricks.RunDir(killed_dir).load_checkpoint()["epoch"] == 1
    with one_torch_thread():
        tricks.run(resume=killed_dir)
    assert_same_run(tricks.RunDir(killed_dir), tricks.RunDir(reference))


def test_a_cli_run_with_noisy_data_trains_bags_and_draws_the_regions(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--dataset", "digits", "--plugins", "noisy_data,memory_module", "--set", "noisy_data.rate=0.4",
            "--set", "memory_module.figure_images=16", "--model", "resnet8", "--epochs", "1", "--train-limit", "128",
            "--val-limit", "64", "--batch-size", "32", "--device", "cpu", "--no-curves", "--out", str(out)]
    code, _, err = cli_in_process(*args)
    assert code == 0, err
    png = (out / "memory_regions.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    rows = json.loads((out / "memory_regions.json").read_text())
    assert len(rows) == 16 * 5 and {r["region"] for r in rows} == set(range(5))
    noise = json.loads((out / "noise.json").read_text())
    assert {r["image"] for r in rows if r["noisy"]} == {i for i in noise["noisy"] if i < 16}
    for image in range(16):  # an image's own regions, weighed as one bag
        assert sum(r["weight"] for r in rows if r["image"] == image) == pytest.approx(1.0, abs=1e-5)
    [row] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 1 <= row["memory_slots_used"] <= 64 and 0 <= row["memory_discriminative"] <= 1
    assert json.loads((out / "summary.json").read_text())["memory_regions_png"] == "memory_regions.png"


def test_the_forward_pass_gives_one_output_per_bag_of_one_label(tmp_path):
    seen = []

    class Watch(tricks.Plugin):
        @tricks.hookimpl(wrapper=True)
        def forward(self, ctx, model, batch):
            output = yield
            seen.append((output.logits.shape, output.weights.shape, batch["target"][output.first].tolist(),
                         batch["target"].tolist()))
            return output

    tiny_run(plugins=["memory_module", Watch()], set=SETS + ["memory_module.bag_size=8"], out=tmp_path / "r", **TINY)
    assert len(seen) == 5  # about 13 images of each digit, in 2 bags of 8: 160 an epoch
    for logits, weights, bag_labels, labels in seen:
        assert logits == (4, 10) and weights == (32, 5)  # 32 images in bags of 8, 5 regions an image
        assert all(labels[i:i + 8] == [labels[i]] * 8 for i in range(0, 32, 8))  # the sampler's whole bags
        assert sorted(bag_labels) == sorted(labels[::8])


def test_the_bag_loss_is_the_innermost_wrapper_so_other_wrappers_see_the_images(tmp_path):
    import torch.nn.functional as F

    seen = []

    class Outer(tricks.Plugin):
        @tricks.hookimpl(wrapper=True)
        def build_loss(self, ctx):
            inner = yield

            def loss(output, batch):
                value = inner(output, batch)
                seen.append((type(output).__name__, len(batch["target"]), len(batch["input"]),
                             value.detach().item(), F.cross_entropy(output.logits.detach().float(), batch["target"][output.first]).item()))
                return value

            return loss

    tiny_run(plugins=["memory_module", Outer()], set=SETS, out=tmp_path / "r", **TINY)
    assert seen
    for kind, targets, inputs, value, want in seen:
        assert kind == "BagOutput" and targets == inputs == 32
        assert value == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("args, fragment", [
    (["--batch-size", "30"], "memory_module.bag_size"),
    (["--set", "memory_module.rows=1", "--set", "memory_module.cols=1"], "at least 2 slots"),
    (["--set", "memory_module.crop_scale=0"], "memory_module.crop_scale"),
    (["--set", "memory_module.bag_size=1", "--set", "memory_module.grid=0"], "memory_module.bag_size"),
    (["--plugins", "memory_module,mixup"], "conflict"),
])
def test_bad_settings_are_one_line_errors_naming_the_problem(tmp_path, args, fragment):
    plugins = [] if "--plugins" in args else ["--plugins", "memory_module"]
    code, _, err = cli_in_process("run", "--dataset", "digits", *plugins, *args, "--epochs", "1", "--train-limit", "64",
                                  "--device", "cpu", "--out", str(tmp_path / "r"))
    one_line_error(code, err, fragment)


def test_soft_targets_are_refused_in_one_line():
    plugin = MemoryModule()
    batch = {"input": torch.zeros(4, 1, 8, 8), "target": torch.full((4, 10), 0.1)}
    with pytest.raises(tricks.TricksError, match="soft targets"):
        plugin.forward(make_ctx(plugins=["memory_module"]), nn.Identity(), batch)


def test_the_plugin_contract(tmp_path):
    check_plugin("memory_module", precisions=("fp32", "bf16"), workdir=tmp_path)


def test_the_bags_group_the_labels_noisy_data_gives():
    """memory_module's prepare_data runs after noisy_data's, whichever order the run names them in."""
    assert tricks.resolve(plugins=["memory_module", "noisy_data"]).plugins == ["noisy_data", "memory_module"]
