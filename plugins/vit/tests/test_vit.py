"""Tests of the vit plugin: attention equals the paper's formula, the standard shapes are timm's
(parameter counts, state dicts, outputs), rollout is row-stochastic, position embeddings follow the
image size, and runs of the plugin train, draw their attention and refuse what does not apply."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from processes import cli_in_process, one_line_error

from tricks.models import complexity, create_model
from tricks.testing import tiny_run
from tricks_vit import (SHAPES, Attention, VisionTransformer, class_token_map, reference_attention, rollout, shape_of,
                        vit)
from timm.layers import resample_abs_pos_embed

TINY_VIT = dict(model="vit_cifar", batch_size=32, train_limit=128, val_limit=64, lr=1e-3)


def qkv(b=2, h=3, n=17, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) for _ in range(3)]


def test_sdpa_equals_the_reference_formula_without_a_mask():
    q, k, v = qkv()
    out, weights = reference_attention(q, k, v)
    expected = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), out, rtol=0, atol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["bool", "float", "causal"])
def test_sdpa_equals_the_reference_formula_with_a_mask(kind):
    q, k, v = qkv(seed=1)
    n = q.shape[-2]
    g = torch.Generator().manual_seed(2)
    if kind == "bool":
        mask = torch.rand(n, n, generator=g) > 0.3
        mask |= torch.eye(n, dtype=torch.bool)  # every query attends somewhere
    elif kind == "float":
        mask = torch.randn(2, 1, n, n, generator=g)
    else:
        mask = torch.ones(n, n, dtype=torch.bool).tril()
    out, weights = reference_attention(q, k, v, mask)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), out, rtol=0, atol=1e-5)
    if mask.dtype == torch.bool:
        assert torch.all(weights[..., ~mask] == 0)  # masked keys get no weight
    if kind == "causal":
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, is_causal=True), out, rtol=0, atol=1e-5)


def test_the_layer_gives_the_same_output_fused_and_by_the_formula():
    torch.manual_seed(0)
    layer = Attention(48, 4).eval()
    x = torch.randn(3, 10, 48)
    fused = layer(x)
    out, weights = layer(x, need_weights=True)
    torch.testing.assert_close(fused, out, rtol=0, atol=1e-5)
    assert weights.shape == (3, 4, 10, 10)
    layer.fused = False
    torch.testing.assert_close(layer(x), out, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"])
def test_the_standard_shapes_have_timms_parameter_counts(name):
    ours = vit(name)
    theirs = timm.create_model(name, pretrained=False)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in theirs.state_dict().items()]


def test_with_timms_weights_the_output_is_timms():
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=4).eval()
    ours = vit("vit_tiny_patch16_224", num_classes=10, image_size=32, patch=4).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-5)
        logits, maps = ours.forward_attention(x)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert len(maps) == 12 and maps[0].shape == (2, 3, 65, 65)


def test_the_cifar_shape_and_its_complexity_counts_attention():
    model = vit("vit_cifar", num_classes=10)
    s = SHAPES["vit_cifar"]
    assert (s.patch, s.dim, s.depth, s.heads, s.mlp_ratio, model.grid) == (4, 192, 6, 3, 2.0, (8, 8))
    n, d, h = 65, s.dim, int(s.dim * s.mlp_ratio)
    per_block = n * (3 * d * d + d * d + 2 * d * h) + 2 * n * n * d  # qkv, proj, MLP; QK^T and AV
    expected = 64 * 3 * 16 * d + s.depth * per_block + d * 10  # patch embedding, blocks, head
    assert complexity(model, 3, 32)["macs"] == expected
    # a ResNet of about the same cost: resnet56 (He et al.'s CIFAR ResNet)
    assert abs(complexity(create_model("resnet56", 10, 3), 3, 32)["macs"] / expected - 1) < 0.01


def test_rollout_rows_sum_to_one_and_follow_the_formula():
    g = torch.Generator().manual_seed(0)
    maps = [torch.softmax(torch.randn(2, 3, 5, 5, generator=g), -1) for _ in range(4)]
    r = rollout(maps)
    torch.testing.assert_close(r.sum(-1), torch.ones(2, 5), rtol=0, atol=1e-6)
    assert torch.all(r >= 0)
    eye = torch.eye(5)
    expected = eye.expand(2, 5, 5)
    for a in maps:
        a = (a.mean(1) + eye) / 2  # rows of a head-mean sum to 1, so (A + I) / 2 is already normalized
        expected = a @ expected
    torch.testing.assert_close(r, expected, rtol=0, atol=1e-6)
    for fusion in ("max", "min"):
        torch.testing.assert_close(rollout(maps, fusion).sum(-1), torch.ones(2, 5), rtol=0, atol=1e-6)
    m = class_token_map(r, (2, 2))
    assert m.shape == (2, 2, 2) and torch.allclose(m.amax(dim=(1, 2)), torch.ones(2))
    assert torch.allclose(m.amin(dim=(1, 2)), torch.zeros(2))
    assert torch.equal(m.flatten(1).argmax(1), r[:, 0, 1:].argmax(1))  # the most-attended patch is the brightest


def test_position_embeddings_follow_the_image_size():
    torch.manual_seed(0)
    model = vit("vit_cifar", num_classes=10).eval()
    assert model.pos_embed_for((8, 8)) is model.pos_embed
    resized = model.pos_embed_for((12, 12))
    assert resized.shape == (1, 145, 192)
    torch.testing.assert_close(resized, resample_abs_pos_embed(model.pos_embed, [12, 12], [8, 8], num_prefix_tokens=1))
    torch.testing.assert_close(resized[:, :1], model.pos_embed[:, :1])  # the class token's is kept
    with torch.no_grad():
        assert model(torch.randn(2, 3, 48, 48)).shape == (2, 10)
    bigger = vit("vit_cifar", num_classes=10, image_size=48)
    bigger.load_state_dict(model.state_dict())  # weights saved at 32x32, resampled to 12x12 patches
    torch.testing.assert_close(bigger.pos_embed.data, resized.data)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(bigger.eval()(x), model(x))
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        model(torch.randn(1, 3, 30, 30))


def test_shape_overrides_and_unknown_names():
    assert shape_of("resnet20") is None
    assert shape_of("vit_tiny", depth=4, image_size=64) == SHAPES["vit_tiny_patch16_224"].__class__(16, 192, 4, 3, 4.0, 64)
    assert isinstance(vit("vit_small", num_classes=3, image_size=32, patch=8), VisionTransformer)


def test_a_run_trains_and_draws_the_attention_rollout(tmp_path):
    run = tiny_run(["vit"], out=tmp_path / "run", epochs=2, **TINY_VIT)
    rows = run.metrics()
    assert len(rows) == 2 and all(math.isfinite(r["val_loss"]) for r in rows)
    assert run.summary()["attention_png"] == "attention.png"
    assert (run.path / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = run.build_model()
    assert isinstance(model, VisionTransformer) and model.grid == (2, 2)  # the 8x8 digits in 4x4 patches


def test_a_model_name_brings_the_plugin_in(tmp_path):
    run = tiny_run([], out=tmp_path / "run", **{**TINY_VIT, "model": "vit_cifar"}, set=["vit.depth=2", "vit.attention_map=false"])
    assert run.config()["plugins"] == ["vit"]
    assert not (run.path / "attention.png").exists()
    assert len(run.build_model().blocks) == 2


def test_the_attention_command(tmp_path):
    run = tiny_run(["vit"], out=tmp_path / "run", **TINY_VIT, set=["vit.attention_map=false"])
    code, out, err = cli_in_process("attention", str(run.path), "--images", "4", "--out", str(tmp_path / "maps.png"))
    assert code == 0, err
    assert out.strip() == str(tmp_path / "maps.png")
    assert (tmp_path / "maps.png").read_bytes()[:4] == b"\x89PNG"
    resnet = tiny_run([], out=tmp_path / "resnet", model="resnet8", train_limit=64, val_limit=32)
    one_line_error(*cli_in_process("attention", str(resnet.path))[::2], "not a ViT")
    one_line_error(*cli_in_process("attention", str(tmp_path / "nowhere"))[::2], "holds no run")


@pytest.mark.parametrize("args, message", [
    (["--plugins", "zero_gamma"], "plugins 'zero_gamma' and 'vit' conflict: a ViT's pre-norm blocks end"),
    (["--plugins", "dropblock"], "plugins 'dropblock' and 'vit' conflict: a ViT's blocks carry tokens"),
    (["--image-size", "10"], "vit: images of 10x10 do not split into 4x4 patches; use --image-size 12"),
    (["--set", "vit.heads=5"], "vit: width 192 does not split into 5 heads"),
    (["--set", "vit.fusion=sum"], "vit.fusion"),
], ids=["zero_gamma", "dropblock", "image size", "heads", "fusion"])
def test_what_does_not_apply_to_a_vit_is_refused_in_one_line(args, message, tmp_path):
    code, _, stderr = cli_in_process("run", "--model", "vit_cifar", "--epochs", "1", "--set", "core.train_limit=64",
                                     "--out", str(tmp_path / "run"), *args)
    one_line_error(code, stderr, message)


def test_channel_pruning_keeps_the_heads_and_prunes_the_mlps(tmp_path):
    run = tiny_run(["vit", "prune"], out=tmp_path / "run", epochs=2, **TINY_VIT,
                   set=["vit.attention_map=false", "prune.ratio=0.5"])
    model = run.build_model()
    assert all(b.attn.qkv.out_features == 576 and b.attn.proj.out_features == 192 for b in model.blocks)
    hidden = [b.mlp.fc1.out_features for b in model.blocks]
    assert all(h < 384 for h in hidden) and sum(hidden) == pytest.approx(0.5 * 6 * 384, abs=6), hidden
    assert model.patch_embed.proj.out_channels == 192  # the residual stream is kept (prune.streams=false)
    assert math.isfinite(run.metrics()[-1]["val_loss"])


RECIPE_PARTS = {"adamw", "linear_scaling", "no_bias_decay", "warmup", "cosine", "label_smoothing", "cutmix", "drop_path",
                "ema", "grad_clip"}


@pytest.mark.parametrize("name, model", [("vit.yaml", "vit_small_patch16_224"), ("cifar_vit.yaml", "vit_cifar")])
def test_the_vit_recipes_resolve_to_every_recipe_part(name, model):
    import tricks
    from conftest import ROOT

    cfg = tricks.resolve(recipe=ROOT / "recipes" / name)
    assert set(cfg.plugins) == RECIPE_PARTS | {"vit"} and cfg.core.model == model
    assert cfg.core.weight_decay == 0.05 and cfg.settings["label_smoothing"].epsilon == 0.1
    assert cfg.settings["drop_path"].rate == 0.1 and cfg.settings["grad_clip"].max_norm == 1.0
    assert cfg.settings["cutmix"].switch_prob == 0.5  # CutMix or mixup, one per batch


def test_the_cifar_vit_recipe_trains_shrunk_to_the_bundled_data(tmp_path):
    import tricks
    from conftest import ROOT

    summary = tricks.run(ROOT / "recipes" / "cifar_vit.yaml", dataset="digits", epochs=2, train_limit=64, val_limit=32,
                         batch_size=32, set=["warmup.epochs=0.5", "vit.depth=2"], out=tmp_path / "run")
    rows = tricks.RunDir(tmp_path / "run").metrics()
    assert len(rows) == 2 and all(math.isfinite(r["val_ema_loss"]) and 0 <= r["grad_clipped"] <= 1 for r in rows)
    assert "final_val_ema_acc" in summary and summary["attention_png"] == "attention.png"
