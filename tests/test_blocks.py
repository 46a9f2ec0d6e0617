"""Tests of the residual-block protocol (``tricks.blocks``): it finds the blocks and stages of the
core's ResNets and of the regnet plugin's and timm's RegNets, both surgeries (zero_gamma, dropblock)
take a block family registered in one place, and it names library classes without importing them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from tricks.blocks import (BlockFamily, BlockSites, block_families, block_sites, find_blocks, find_stages,
                           last_norms, register_block_family, unregister_block_family)
from tricks.models import create_model


def test_the_blocks_and_stages_of_a_core_resnet20():
    model = create_model("resnet20", 10, 3)
    blocks = find_blocks(model)
    assert [b.name for b in blocks] == [f"stages.{s}.{i}" for s in range(3) for i in range(3)]
    assert {b.family.name for b in blocks} == {"resnet basic"}
    assert all(b.answer == [b.module.bn2] for b in blocks)
    sites = find_blocks(model, "sites")
    assert [b.module for b in sites] == [b.module for b in blocks]
    for b in sites:
        assert b.answer.branch_end is b.module.bn2 and b.answer.inner == [b.module.bn1]
        assert b.answer.shortcut_attr == "shortcut"
    assert find_stages(model) == list(model.stages)
    assert last_norms(model) is None and block_sites(model) is None  # the model is no block itself


def test_the_blocks_and_stages_of_a_regnet_plugin_model():
    from tricks_regnet import create_regnet

    model = create_regnet("regnety_200mf", num_classes=10, stem="cifar")
    stages = find_stages(model)
    assert stages == list(model.stages) and len(stages) == 4
    blocks = find_blocks(model)
    assert len(blocks) == sum(len(stage) for stage in stages) == 1 + 1 + 4 + 7
    # found by what their zero_init_last() zeroes; DropBlock's sites by the ResNet structure
    assert {b.family.name for b in blocks} == {"zero_init_last"}
    assert all(b.answer == [b.module.bn3] for b in blocks)
    sites = find_blocks(model, "sites")
    assert [b.module for b in sites] == [b.module for b in blocks]
    assert all(s.answer.branch_end is s.module.bn3 and s.answer.inner == [s.module.bn1, s.module.bn2] for s in sites)


@pytest.mark.slow
def test_a_timm_regnet_is_named_not_imported():
    code = ("import sys, tricks.blocks; assert 'timm' not in sys.modules, 'tricks.blocks imported timm'; "
            "import timm; m = timm.create_model('regnetx_002', pretrained=False); "
            "from tricks.blocks import find_blocks, find_stages; b = find_blocks(m); "
            "assert len(find_stages(m)) == 4 and len(b) == 13, (len(b),); "
            "assert {x.family.name for x in b} == {'timm regnet'}; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


class _Unit(nn.Module):
    """A residual block of names no built-in family knows."""

    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.skip = None

    def forward(self, x):
        return torch.relu(self.body(x) + (x if self.skip is None else self.skip(x)))


def _unit_model():
    model = nn.Module()
    model.stages = nn.Sequential(nn.Sequential(_Unit(4), _Unit(4)), nn.Sequential(_Unit(4)))
    return model


@pytest.fixture
def unit_family():
    family = register_block_family(BlockFamily("test unit", (_Unit,), last_norms=lambda b: [b.body[1]],
                                               sites=lambda b: BlockSites(b.body, "skip", [])))
    yield family
    unregister_block_family("test unit")


def test_a_family_registered_once_is_handled_by_zero_gamma_and_dropblock(unit_family):
    import tricks
    from tricks_dropblock import dropblock_layers, insert_dropblock
    from tricks_zero_gamma import zero_gamma

    torch.manual_seed(0)
    model = _unit_model()
    x = torch.relu(torch.randn(2, 4, 5, 5))
    assert [b.name for b in find_blocks(model)] == ["stages.0.0", "stages.0.1", "stages.1.0"]
    assert not torch.equal(model.eval().stages(x), x)
    assert len(zero_gamma(model)) == 3
    assert torch.equal(model.stages(x), x)  # every unit starts as its identity shortcut
    done = insert_dropblock(model, block_size=9)
    assert done.stages == [(1, 2, 0.25), (2, 1, 1.0)] and len(done.layers) == 6 == len(dropblock_layers(model))
    assert all(isinstance(m.skip, type(done.layers[0])) for m in model.modules() if isinstance(m, _Unit))
    for layer in done.layers:
        layer.keep_prob = 0.0  # the block covers the map: everything dropped, branch and shortcut
    assert torch.equal(model.train().stages(x), torch.zeros_like(x))
    unregister_block_family("test unit")
    with pytest.raises(tricks.TricksError, match="no residual block"):
        zero_gamma(_unit_model())


def test_newest_registration_wins_and_a_family_must_answer_something():
    first = register_block_family(BlockFamily("test a", (_Unit,), last_norms=lambda b: [b.body[1]]))
    try:
        register_block_family(BlockFamily("test b", (_Unit,), last_norms=lambda b: None))
        assert last_norms(_Unit(2)) is None  # the newer claim of the class is final
        unregister_block_family("test b")
        unit = _Unit(2)
        assert last_norms(unit) == [unit.body[1]] and block_sites(unit) is None  # "test a" has no sites
        assert block_families()[-1] is first
    finally:
        unregister_block_family("test a")
        unregister_block_family("test b")
    with pytest.raises(ValueError, match="answers nothing"):
        register_block_family(BlockFamily("test c", (_Unit,)))
