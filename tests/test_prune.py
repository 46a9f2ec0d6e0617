"""The ``prune`` hook: a plugin removes channels, the core rebuilds optimizer and schedule for the
new shapes, training goes on, and a checkpoint taken after pruning resumes to the same result."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tricks
from tricks.models import create_model

from conftest import TINY_API, read_jsonl
from processes import finish_killed, one_torch_thread, start_script

SEED = 5
EPOCHS = 4
LAYER = "stages.0.0.conv1"


def keep_conv(conv: nn.Conv2d, out: torch.Tensor | None = None, into: torch.Tensor | None = None) -> nn.Conv2d:
    """A new convolution with the kept output channels ``out`` and input channels ``into``."""
    weight = conv.weight.detach()
    weight = weight[out] if out is not None else weight
    weight = weight[:, into] if into is not None else weight
    new = nn.Conv2d(weight.shape[1], weight.shape[0], conv.kernel_size, conv.stride, conv.padding,
                    bias=conv.bias is not None).to(weight.device)
    new.weight.data.copy_(weight)
    if conv.bias is not None:
        new.bias.data.copy_(conv.bias.detach()[out] if out is not None else conv.bias.detach())
    return new


def keep_bn(bn: nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(keep), bn.eps, bn.momentum).to(bn.weight.device)
    new.weight.data.copy_(bn.weight.detach()[keep])
    new.bias.data.copy_(bn.bias.detach()[keep])
    new.running_mean.copy_(bn.running_mean[keep])
    new.running_var.copy_(bn.running_var[keep])
    new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


def slice_block(block: nn.Module, keep: torch.Tensor) -> None:
    """Keep the output channels ``keep`` of ``block.conv1``: slice conv1, its BatchNorm and
    conv2's input channels."""
    block.conv1 = keep_conv(block.conv1, out=keep)
    block.bn1 = keep_bn(block.bn1, keep)
    block.conv2 = keep_conv(block.conv2, into=keep)


class HalveFirstBlock(tricks.Plugin):
    """At the end of epoch 0, keep the half of ``stages[0][0].conv1``'s output channels with the
    largest L1 norm. The change is recorded as data (the kept indices) and replayed on a fresh
    model at resume."""

    def __init__(self, settings=None):
        super().__init__(settings)
        self.done = False

    @tricks.hookimpl
    def prune(self, ctx, model):
        if self.done or ctx.epoch != 0:
            return None
        block = model.stages[0][0]
        norms = block.conv1.weight.detach().abs().sum((1, 2, 3))
        keep = norms.argsort(descending=True)[: len(norms) // 2].sort().values
        slice_block(block, keep)
        self.done = True
        return {"layer": LAYER, "keep": keep.tolist()}

    @tricks.hookimpl
    def replay_structure(self, ctx, model, change):
        slice_block(model.get_submodule(change["layer"].rpartition(".")[0]), torch.tensor(change["keep"]))

    @tricks.hookimpl
    def state_dict(self, ctx):
        return {"done": self.done}

    @tricks.hookimpl
    def load_state_dict(self, ctx, state):
        self.done = state["done"]


class Inspect(tricks.Plugin):
    """Records, at the end of every epoch (after pruning and the rebuild), what the core trains."""

    def __init__(self):
        super().__init__()
        self.seen: dict[int, dict] = {}

    @tricks.hookimpl
    def on_epoch_end(self, ctx, epoch, metrics):
        optimizer, model = ctx.optimizer, ctx.model
        params = [p for group in optimizer.param_groups for p in group["params"]]
        buffers = [optimizer.state[p]["momentum_buffer"] for p in params if "momentum_buffer" in optimizer.state.get(p, {})]
        self.seen[epoch] = {
            "optimizer_is_model": [id(p) for p in params] == [id(p) for p in model.parameters()],
            "buffer_shapes_match": all(b.shape == p.shape for b, p in zip(buffers, params)),
            "optimizer_lr": optimizer.param_groups[0]["lr"],
            "row_lr": metrics["lr"],
            "conv1": model.get_submodule(LAYER).weight.detach().clone(),
        }


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_pruning_rebuilds_the_optimizer_and_training_goes_on(tmp_path):
    inspect = Inspect()
    with one_torch_thread():
        summary = tricks.run(plugins=["cosine", HalveFirstBlock(), inspect], epochs=EPOCHS, seed=SEED, device="cpu",
                             out=tmp_path / "run", **TINY_API)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in rows)

    full = create_model("resnet8", 10, 1)  # the digits: 10 classes, 1 channel
    c_in, c_mid = full.stages[0][0].conv1.in_channels, full.stages[0][0].conv1.out_channels
    c_out = full.stages[0][0].conv2.out_channels
    removed = (c_mid // 2) * c_in * 9 + 2 * (c_mid // 2) + c_out * (c_mid // 2) * 9  # conv1 rows, BN, conv2 columns
    assert summary["params"] == count(full) - removed
    assert rows[0]["params"] == summary["params"]  # the epoch that pruned reports the new size
    assert all("params" not in r for r in rows[1:])

    for epoch, seen in inspect.seen.items():
        assert seen["optimizer_is_model"], epoch  # the optimizer holds exactly the model's parameters
        assert seen["buffer_shapes_match"], epoch
        assert seen["conv1"].shape[0] == c_mid // 2, epoch
    for epoch in range(1, EPOCHS):
        # The schedule drives the new optimizer; the new parameters are trained.
        assert inspect.seen[epoch]["optimizer_lr"] == pytest.approx(inspect.seen[epoch]["row_lr"])
        assert not torch.equal(inspect.seen[epoch]["conv1"], inspect.seen[epoch - 1]["conv1"])
    assert rows[-1]["lr"] < rows[1]["lr"]  # the cosine schedule went on after the rebuild


@pytest.mark.slow
def test_a_checkpoint_taken_after_pruning_resumes(tmp_path):
    reference, run = tmp_path / "uninterrupted", tmp_path / "killed"
    killed = start_script(f"""
        import tricks
        from processes import KillAtEpoch
        from test_prune import HalveFirstBlock
        tricks.run(plugins=["cosine", HalveFirstBlock(), KillAtEpoch(2)], epochs={EPOCHS}, seed={SEED}, device="cpu",
                   out={str(run)!r}, **{TINY_API!r})
    """)
    with one_torch_thread():
        want = tricks.run(plugins=["cosine", HalveFirstBlock()], epochs=EPOCHS, seed=SEED, device="cpu",
                          out=reference, **TINY_API)
    finish_killed(killed)

    checkpoint = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)  # data only
    assert checkpoint["epoch"] == 2
    assert checkpoint["plugins"]["HalveFirstBlock"] == {"done": True}
    [record] = checkpoint["structure"]
    assert record["plugin"] == "HalveFirstBlock" and record["epoch"] == 0 and len(record["change"]["keep"]) == 8
    assert checkpoint["model"][LAYER + ".weight"].shape[0] == 8

    pruner = HalveFirstBlock()
    with one_torch_thread():
        got = tricks.run(plugins=[pruner], resume=run)
    assert pruner.done  # restored from the checkpoint: it did not prune a second time
    assert got["params"] == want["params"]
    assert got["final_val_acc"] == want["final_val_acc"]
    assert got["final_val_loss"] == pytest.approx(want["final_val_loss"], rel=1e-6)
    got_rows, want_rows = read_jsonl(run / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    assert [r["epoch"] for r in got_rows] == [r["epoch"] for r in want_rows] == list(range(1, EPOCHS + 1))
    for a, b in zip(got_rows, want_rows):
        assert a["val_acc"] == b["val_acc"] and a["step"] == b["step"] and a.get("params") == b.get("params")
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)


class NoReplay(HalveFirstBlock):
    """Prunes, but cannot replay what it did."""

    replay_structure = None


class WrongReplay(HalveFirstBlock):
    """Replays a different change from the one it made."""

    @tricks.hookimpl
    def replay_structure(self, ctx, model, change):
        slice_block(model.get_submodule(change["layer"].rpartition(".")[0]), torch.tensor(change["keep"][:-1]))


class ReturnsAModule(HalveFirstBlock):
    """Returns an object where data is asked for."""

    @tricks.hookimpl
    def prune(self, ctx, model):
        change = super().prune(ctx, model)
        return None if change is None else {"module": model.stages[0][0].conv1}


@pytest.mark.parametrize("plugin, fragment", [
    (NoReplay, "implements no replay_structure"),
    (WrongReplay, "does not give the model they made"),
    (ReturnsAModule, "returned what a checkpoint cannot hold (it['module'] is a torch.nn.modules.conv.Conv2d)"),
])
def test_a_structural_change_that_cannot_be_replayed_stops_the_run_at_once(tmp_path, plugin, fragment):
    with one_torch_thread(), pytest.raises(tricks.TricksError, match="^[^\n]*$") as caught:
        tricks.run(plugins=[plugin()], epochs=2, seed=SEED, device="cpu", out=tmp_path / "run", **TINY_API)
    assert fragment in str(caught.value) and plugin.__name__ in str(caught.value)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()  # no checkpoint that cannot be resumed


def test_a_pruned_run_is_rebuilt_from_data_by_the_plugin_that_pruned_it(tmp_path):
    source = tmp_path / "pruned"
    with one_torch_thread():
        tricks.run(plugins=[HalveFirstBlock()], epochs=1, seed=SEED, device="cpu", out=source, **TINY_API)
    run = tricks.RunDir(source)
    # Outside the run, an ad-hoc plugin cannot be re-created: one line that names it.
    with pytest.raises(tricks.TricksError, match="changed by plugin 'HalveFirstBlock'.*cannot be re-created"):
        run.build_model()
    # A run that starts from it, with the plugin, gets the pruned model and its weights.
    done = HalveFirstBlock()
    done.done = True

    class Capture(tricks.Plugin):
        @tricks.hookimpl
        def on_fit_start(self, ctx):
            self.model = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}

    capture = Capture()
    with one_torch_thread():
        tricks.run(plugins=[done, capture], epochs=1, seed=SEED, device="cpu", out=tmp_path / "fine-tuned",
                   init_from=str(source), **TINY_API)
    weights = run.load_checkpoint()["model"]
    assert capture.model.keys() == weights.keys()
    for key, value in weights.items():
        torch.testing.assert_close(capture.model[key], value)
    # The fine-tuned run carries the structure on: its own checkpoint replays it too.
    assert tricks.RunDir(tmp_path / "fine-tuned").load_checkpoint()["structure"] == run.load_checkpoint()["structure"]


def test_a_pruned_architecture_trains_from_scratch(tmp_path):
    """core.structure_from: the pruned run's architecture with fresh weights (the control of
    "Rethinking the Value of Network Pruning"); its checkpoint carries the structure on."""
    source = tmp_path / "pruned"
    with one_torch_thread():
        tricks.run(plugins=[HalveFirstBlock()], epochs=1, seed=SEED, device="cpu", out=source, **TINY_API)
    done = HalveFirstBlock()
    done.done = True
    with one_torch_thread():
        summary = tricks.run(plugins=[done], epochs=1, seed=SEED + 1, device="cpu", out=tmp_path / "scratch",
                             structure_from=str(source), **TINY_API)
    pruned, scratch = tricks.RunDir(source).load_checkpoint(), tricks.RunDir(tmp_path / "scratch").load_checkpoint()
    assert summary["params"] == summary["params_start"] == tricks.RunDir(source).summary()["params"]
    assert scratch["structure"] == pruned["structure"]
    assert scratch["model"][LAYER + ".weight"].shape == pruned["model"][LAYER + ".weight"].shape
    assert not torch.equal(scratch["model"][LAYER + ".weight"], pruned["model"][LAYER + ".weight"])  # not its weights
    with pytest.raises(tricks.TricksError, match="drop core.structure_from"):
        tricks.run(plugins=[done], epochs=1, device="cpu", out=tmp_path / "both", init_from=str(source),
                   structure_from=str(source), **TINY_API)


def test_metrics_and_summary_carry_params_and_macs_before_and_after(tmp_path):
    from tricks.models import complexity, create_model

    with one_torch_thread():
        summary = tricks.run(plugins=[HalveFirstBlock()], epochs=2, seed=SEED, device="cpu", out=tmp_path / "run",
                             **TINY_API)
    full = complexity(create_model("resnet8", 10, 1), 1, 8)
    assert (summary["params_start"], summary["macs_start"]) == (full["params"], full["macs"])
    assert summary["params"] < full["params"] and summary["macs"] < full["macs"]
    row = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert (row["params"], row["macs"]) == (summary["params"], summary["macs"])
