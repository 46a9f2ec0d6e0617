"""The mlp plugin: the model's shape, max-norm after every step, names refused with one line."""

from __future__ import annotations

import pytest
import torch

import tricks
from tricks.testing import make_ctx, tiny_run
from tricks_mlp import MLP, MLPModels, max_norm_, parse_widths


def test_names():
    assert parse_widths("mlp:1200-1200") == [1200, 1200]
    assert parse_widths("mlp:30") == [30]
    assert parse_widths("resnet20") is None
    for bad in ("mlp", "mlp:", "mlp:12-", "mlp:0-4", "mlp:a", "mlp1200"):
        with pytest.raises(tricks.TricksError, match="mlp:1200-1200"):
            parse_widths(bad)


def test_the_teacher_has_the_papers_parameter_count():
    model = MLP(784, [1200, 1200], 10)
    assert sum(p.numel() for p in model.parameters()) == 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 1200 * 10 + 10
    assert [m.out_features for m in model.hidden] == [1200, 1200] and model.fc.out_features == 10


def test_dropout_is_off_in_evaluation_and_on_in_training():
    torch.manual_seed(0)
    model = MLP(16, [64], 3, dropout=0.5, input_dropout=0.2)
    x = torch.randn(8, 1, 4, 4)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_max_norm_rescales_only_the_rows_above_the_bound():
    layer = torch.nn.Linear(5, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4, 0, 0, 0], [0.3, 0.4, 0, 0, 0], [6, 8, 0, 0, 0], [0, 0, 0, 0, 1]]))
    before = layer.weight.clone()
    max_norm_([layer], 2.0)
    norms = layer.weight.norm(dim=1)
    assert torch.allclose(norms, torch.tensor([2.0, 0.5, 2.0, 1.0]))
    assert torch.equal(layer.weight[1], before[1]) and torch.equal(layer.weight[3], before[3])
    assert torch.allclose(layer.weight[0], before[0] * 2 / 5)  # the direction is kept


def test_a_run_keeps_every_hidden_unit_within_the_bound(tmp_path):
    run = tiny_run(plugins=["mlp"], model="mlp:64-32", set=["mlp.max_norm=0.5", "mlp.dropout=0.5"], out=tmp_path / "run",
                   lr=0.5)
    state = run.load_checkpoint()["model"]
    for key in ("hidden.0.weight", "hidden.1.weight"):
        assert state[key].norm(dim=1).max() <= 0.5 + 1e-5
    assert state["fc.weight"].norm(dim=1).max() > 0.5  # the head is not constrained


def test_the_model_name_alone_brings_the_plugin_in(tmp_path):
    run = tiny_run(model="mlp:16", out=tmp_path / "run")
    assert run.config()["plugins"] == ["mlp"]


def test_max_norm_needs_an_mlp(tmp_path):
    ctx = make_ctx(plugins=["mlp"], set=["mlp.max_norm=3"])
    plugin = MLPModels(MLPModels.Settings(max_norm=3))
    ctx.model = torch.nn.Linear(3, 3)
    with pytest.raises(tricks.TricksError, match="mlp.max_norm"):
        plugin.on_fit_start(ctx)
