"""Tests of the no_bias_decay plugin: exactly the conv and linear weights are decayed, the optimizer
keeps its class and hyperparameters, and a step decays only those weights."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from tricks.models import create_model
from tricks.testing import tiny_run
from tricks_no_bias_decay import split_decay, without_bias_decay


def models():
    yield "resnet20", create_model("resnet20", 10, 3)
    yield "resnet50", create_model("resnet50", 10, 3)
    yield "timm resnet18", timm.create_model("resnet18", pretrained=False, num_classes=10)
    yield "timm vit_tiny", timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8)


@pytest.mark.parametrize("name, model", list(models()), ids=lambda v: v if isinstance(v, str) else "")
def test_the_decay_group_is_exactly_the_conv_and_linear_weights(name, model):
    decay, no_decay = split_decay(model)
    expected = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert {id(p) for p in decay} == expected
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    norm_params = {id(p) for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) for p in m.parameters()}
    biases = {id(m.bias) for m in model.modules() if getattr(m, "bias", None) is not None}
    assert norm_params | biases <= {id(p) for p in no_decay}


def test_the_optimizer_keeps_its_class_and_hyperparameters():
    model = create_model("resnet8", 10, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, nesterov=True, weight_decay=5e-4)
    new = without_bias_decay(opt, model)
    assert type(new) is torch.optim.SGD
    assert [g["weight_decay"] for g in new.param_groups] == [5e-4, 0.0]
    for g in new.param_groups:
        assert (g["lr"], g["momentum"], g["nesterov"]) == (0.3, 0.9, True)
    adamw = without_bias_decay(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05), model)
    assert type(adamw) is torch.optim.AdamW and [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]


def test_a_step_with_zero_gradients_decays_only_the_weights():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    opt = without_bias_decay(torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.1), model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.all(model[0].weight == 1 - 0.5 * 0.1) and torch.all(model[3].weight == 1 - 0.5 * 0.1)
    for p in (model[0].bias, model[1].weight, model[1].bias, model[3].bias):
        assert torch.all(p == 1.0)


def test_in_a_run_the_optimizer_has_the_two_groups(tmp_path):
    run = tiny_run(plugins=["no_bias_decay"], out=tmp_path / "run")
    groups = run.load_checkpoint()["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    model = create_model("resnet8", 10, 1)
    decay, no_decay = split_decay(model)
    assert [len(g["params"]) for g in groups] == [len(decay), len(no_decay)]
