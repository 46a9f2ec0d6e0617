"""The core's models (``tricks.models``): CIFAR ResNets, the CIFAR-style ImageNet ResNets, timm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tricks.errors import TricksError
from tricks.models import cifar_resnet, create_model


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# An independent count, from the architecture's description: a 3x3 stem, stages of blocks, global
# pooling and a linear head; every convolution without bias and followed by BatchNorm (2 parameters
# per channel); a 1x1 projection with BatchNorm on every shortcut whose shape changes (option B).

def conv_bn(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + 2 * c_out


def basic(c_in: int, c_out: int) -> tuple[int, int]:
    count = conv_bn(c_in, c_out, 3) + conv_bn(c_out, c_out, 3)
    return count + (conv_bn(c_in, c_out, 1) if c_in != c_out else 0), c_out


def bottleneck(c_in: int, width: int) -> tuple[int, int]:
    c_out = 4 * width
    count = conv_bn(c_in, width, 1) + conv_bn(width, width, 3) + conv_bn(width, c_out, 1)
    return count + (conv_bn(c_in, c_out, 1) if c_in != c_out else 0), c_out


def expected_params(block, depths, widths, classes=10, in_chans=3) -> int:
    total, c = conv_bn(in_chans, widths[0], 3), widths[0]
    for depth, width in zip(depths, widths):
        for _ in range(depth):
            count, c = block(c, width)
            total += count
    return total + c * classes + classes


# He et al. 2016, Table 6 (CIFAR-10, option A: parameter-free zero-padding shortcuts).
PAPER_OPTION_A = {20: 0.27e6, 32: 0.46e6, 44: 0.66e6, 56: 0.85e6, 110: 1.7e6}


@pytest.mark.parametrize("depth", [8, 20, 32, 44, 56, 110])
def test_cifar_resnet_parameter_counts(depth):
    n = (depth - 2) // 6
    model = create_model(f"resnet{depth}", 10, 3)
    assert params(model) == expected_params(basic, [n] * 3, [16, 32, 64])
    # 6n+2 weighted layers: the stem, two 3x3 convolutions per block, the head (projections not counted)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))]
    assert len(layers) == depth
    if depth in PAPER_OPTION_A:
        # option A differs only by the two projections (16->32 and 32->64); it matches the paper's table
        option_a = params(model) - conv_bn(16, 32, 1) - conv_bn(32, 64, 1)
        digits = 2 if PAPER_OPTION_A[depth] < 1e6 else 1
        assert round(option_a / 1e6, digits) == PAPER_OPTION_A[depth] / 1e6


def test_resnet18_is_the_usual_cifar_resnet18():
    model = create_model("resnet18", 10, 3)
    assert params(model) == 11_173_962
    assert params(model) == expected_params(basic, [2, 2, 2, 2], [64, 128, 256, 512])


@pytest.mark.parametrize("name,block,depths", [("resnet34", basic, [3, 4, 6, 3]), ("resnet50", bottleneck, [3, 4, 6, 3])])
def test_imagenet_style_resnets_parameter_counts(name, block, depths):
    assert params(create_model(name, 100, 3)) == expected_params(block, depths, [64, 128, 256, 512], classes=100)


def forward_with_pooled_shape(model: nn.Module, x: torch.Tensor) -> tuple[torch.Size, tuple]:
    """The output's shape and the shape of the feature map the global pooling receives."""
    seen = []
    handle = model.pool.register_forward_hook(lambda module, inputs, output: seen.append(tuple(inputs[0].shape)))
    with torch.no_grad():
        out = model(x)
    handle.remove()
    return out.shape, seen[0]


@pytest.mark.parametrize("name,features,side", [("resnet8", 64, 8), ("resnet20", 64, 8), ("resnet18", 512, 4)])
def test_output_shapes_for_cifar_and_digit_sized_inputs(name, features, side):
    torch.manual_seed(0)
    # no stride in the stem, no max-pooling: 32x32 reaches the pooling at 8x8 (3 stages) or 4x4 (4 stages)
    shape, pooled = forward_with_pooled_shape(create_model(name, 10, 3).eval(), torch.randn(2, 3, 32, 32))
    assert shape == (2, 10) and pooled == (2, features, side, side)
    small = create_model(name, 7, 1).eval()
    assert small.stem[0].in_channels == 1
    shape, pooled = forward_with_pooled_shape(small, torch.randn(2, 1, 8, 8))
    assert shape == (2, 7) and pooled == (2, features, side // 4, side // 4)


def test_timm_model_by_name_honours_classes_and_channels():
    torch.manual_seed(0)
    model = create_model("timm:resnet18", 7, 1).eval()
    assert type(model).__module__.startswith("timm.")
    assert model.conv1.in_channels == 1 and model.get_classifier().out_features == 7
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 7)


def test_unknown_timm_model_suggests_close_names():
    with pytest.raises(TricksError) as excinfo:
        create_model("timm:resnet181", 10, 3)
    message = str(excinfo.value)
    assert "resnet181" in message and "timm:resnet18," in message and "\n" not in message


def test_unknown_model_suggests_close_names():
    with pytest.raises(TricksError) as excinfo:
        create_model("resnt20", 10, 3)
    message = str(excinfo.value)
    assert "did you mean resnet20" in message and "timm:NAME" in message
    with pytest.raises(TricksError) as excinfo:  # a timm name without the prefix
        create_model("vit_tiny_patch16_224", 10, 3)
    assert "did you mean timm:vit_tiny_patch16_224" in str(excinfo.value)


@pytest.mark.parametrize("depth", [21, 9, 2])
def test_bad_cifar_depth_is_rejected(depth):
    with pytest.raises(TricksError) as excinfo:
        create_model(f"resnet{depth}", 10, 3)
    message = str(excinfo.value)
    assert f"resnet{depth}" in message and "6n+2" in message
    if depth == 21:
        assert "resnet20" in message
    with pytest.raises(TricksError) as excinfo:
        cifar_resnet(depth)
    assert "6n+2" in str(excinfo.value)
