"""The recipes in recipes/: each resolves, names the paper's final recipe, and the CIFAR-10 one
trains when shrunk to the bundled data set."""

from __future__ import annotations

import math

import pytest
import yaml

import tricks

from conftest import ROOT

RECIPES = sorted((ROOT / "recipes").glob("*bag_of_tricks.yaml"))  # sampling.yaml: the regnet plugin's tests
FINAL = {"resnet_tweaks", "warmup", "cosine", "label_smoothing", "mixup", "zero_gamma", "no_bias_decay", "linear_scaling"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_each_recipe_resolves_to_the_papers_final_recipe(path):
    cfg = tricks.resolve(recipe=path)
    assert set(cfg.plugins) == FINAL
    assert cfg.settings["resnet_tweaks"].variant == "D"
    assert cfg.settings["label_smoothing"].epsilon == 0.1
    assert cfg.core.nesterov


def test_the_imagenet_recipe_is_the_efficient_setting_of_the_paper():
    cfg = tricks.resolve(recipe=ROOT / "recipes" / "bag_of_tricks.yaml")
    assert (cfg.core.model, cfg.core.image_size, cfg.core.batch_size, cfg.core.precision) == ("resnet50", 224, 1024, "fp16")
    assert cfg.core.lr * cfg.core.batch_size / cfg.settings["linear_scaling"].reference_batch == pytest.approx(0.4)
    assert cfg.settings["mixup"].alpha == 0.2 and cfg.settings["warmup"].epochs == 5


def test_the_cifar_recipe_trains_shrunk_to_the_bundled_data(tmp_path):
    assert yaml.safe_load((ROOT / "recipes" / "cifar_bag_of_tricks.yaml").read_text())["core"]["dataset"] == "cifar10"
    summary = tricks.run(ROOT / "recipes" / "cifar_bag_of_tricks.yaml", dataset="digits", model="resnet8", epochs=2,
                         train_limit=64, val_limit=32, batch_size=32, set=["warmup.epochs=0.5"], out=tmp_path / "run")
    assert summary["plugins"] == tricks.resolve(recipe=ROOT / "recipes" / "cifar_bag_of_tricks.yaml").plugins
    rows = tricks.RunDir(tmp_path / "run").metrics()
    assert [row["epoch"] for row in rows] == [1, 2]
    assert all(math.isfinite(row["train_loss"]) for row in rows) and math.isfinite(summary["final_val_loss"])
