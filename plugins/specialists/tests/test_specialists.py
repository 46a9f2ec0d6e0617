"""The specialists plugin and job: a specialist's data, its start from the generalist, its soft
targets, the refusals, and the whole job (end to end through the CLI, and killed and resumed)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tricks
from tricks.data import load_digits_data
from tricks.testing import call_wrapper, make_ctx, one_torch_thread, tiny_run
from tricks_specialists import HalfAndHalf, Specialist, generalist_start
from tricks_specialists.combine import collapse
from tricks_specialists.job import COMBINATION, SUBSETS, specialists_job
from tricks_specialists.subsets import dustbin_offset

from processes import cli_in_process

SUBSET = [3, 5, 8]
FAST = dict(model="resnet8", epochs=1, train_limit=256, val_limit=128, batch_size=32, curves=False)


@pytest.fixture(scope="module")
def generalist(tmp_path_factory):
    out = tmp_path_factory.mktemp("generalist") / "run"
    tiny_run(out=out, model="resnet8", epochs=1, train_limit=256, val_limit=128)
    return out


def test_a_specialist_learns_its_classes_and_a_dustbin_from_half_and_half_epochs(tmp_path, generalist):
    run = tiny_run(plugins=["specialists"], set=[f"specialists.subset={SUBSET}", f"specialists.generalist={generalist}"],
                   out=tmp_path / "run", model="resnet8", train_limit=256, val_limit=128)
    checkpoint = run.load_checkpoint()
    assert checkpoint["shape"]["num_classes"] == len(SUBSET) + 1
    assert checkpoint["model"]["fc.weight"].shape[0] == len(SUBSET) + 1
    targets = torch.from_numpy(load_digits_data()[1][:256])
    inside = int(torch.isin(targets, torch.tensor(SUBSET)).sum())
    [row] = run.metrics()
    assert row["step"] == (2 * inside) // 32  # an epoch: the subset's images and as many others
    summary = run.summary()
    assert summary["subset"] == SUBSET
    assert summary["dustbin_offset"] == pytest.approx(dustbin_offset(targets, SUBSET))
    assert summary["dustbin_offset"] == pytest.approx(torch.log(torch.tensor((256 - inside) / inside)).item(), rel=1e-6)


def test_the_sampler_draws_each_epoch_from_the_seed_and_epoch_alone():
    targets = torch.arange(100) % 10
    sampler = HalfAndHalf(targets, [1, 2])
    assert len(sampler) == 40
    a, b = sampler.order(0, 3), sampler.order(0, 3)
    assert torch.equal(a, b) and not torch.equal(a, sampler.order(0, 4))
    assert torch.isin(targets[a], torch.tensor([1, 2])).sum() == 20


def test_a_specialist_starts_from_the_generalists_weights(generalist):
    state = tricks.RunDir(generalist).load_checkpoint()["model"]
    model = tricks.models.create_model("resnet8", len(SUBSET) + 1, 1)
    generalist_start(model, state, SUBSET, str(generalist))
    own = model.state_dict()
    for key, value in own.items():
        if not key.startswith("fc."):
            assert torch.equal(value, state[key]), key
    rest = [c for c in range(10) if c not in SUBSET]
    assert torch.equal(own["fc.weight"][:3], state["fc.weight"][SUBSET])
    assert torch.allclose(own["fc.weight"][3], state["fc.weight"][rest].mean(0))
    assert own["fc.bias"][3].item() == pytest.approx(state["fc.bias"][rest].mean().item() + torch.log(torch.tensor(7.0)).item(), rel=1e-6)
    # equal logits on the other classes: the dustbin starts at the log of their summed probability
    with torch.no_grad():
        w = torch.zeros(10, 4)
        b = torch.zeros(10)
        b[rest] = 0.3
        model_state = {"weight": w, "bias": b}
    from tricks_specialists import _head_rows

    assert _head_rows(model_state["bias"], SUBSET)[3].item() == pytest.approx(torch.logsumexp(b[rest], 0).item())


def test_soft_targets_are_the_generalists_collapsed_onto_subset_and_dustbin(generalist):
    ctx = make_ctx(plugins=["specialists"], set=[f"specialists.subset={SUBSET}", f"specialists.generalist={generalist}",
                                                 "specialists.soft_targets=true", "specialists.temperature=3",
                                                 "specialists.soft_weight=0.25"], num_classes=4, in_chans=1, image_size=8)
    plugin = Specialist(ctx.settings("specialists"))
    plugin.classes = 10
    hard = lambda output, batch: F.cross_entropy(output, batch["target"])  # noqa: E731
    loss = call_wrapper(plugin.build_loss(ctx), hard)
    torch.manual_seed(0)
    batch = {"input": torch.randn(6, 1, 8, 8), "target": torch.tensor([0, 1, 2, 3, 3, 0])}
    output = torch.randn(6, 4)
    teacher = tricks.RunDir(generalist).build_model()
    with torch.no_grad():
        p = collapse(F.softmax(teacher.eval()(batch["input"]) / 3, dim=1), SUBSET)
    want = 0.75 * hard(output, batch) + 0.25 * 9 * F.kl_div(F.log_softmax(output / 3, 1), p, reduction="batchmean")
    assert loss(output, batch).item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("subset, match", [("[]", "specialists.subset"), ("[3,12]", "class 12"), ("[3,3]", "twice"),
                                            ("[0,1,2,3,4,5,6,7,8,9]", "dustbin")])
def test_a_bad_subset_is_one_line(tmp_path, subset, match):
    code, out, err = cli_in_process("run", "--plugins", "specialists", "--set", f"specialists.subset={subset}",
                                    "--out", str(tmp_path / "run"), "--epochs", "1")
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err


def test_kd_and_a_missing_generalist_are_refused(tmp_path):
    code, _, err = cli_in_process("run", "--plugins", "specialists,kd", "--out", str(tmp_path / "a"))
    assert code == 2 and "conflict" in err and "soft_targets" in err
    code, _, err = cli_in_process("run", "--plugins", "specialists", "--set", "specialists.subset=[1]",
                                  "--set", f"specialists.generalist={tmp_path}", "--out", str(tmp_path / "b"))
    assert code == 2 and "no trained run" in err and len(err.strip().splitlines()) == 1


def _job(out: Path, **extra) -> dict:
    return specialists_job(out, overrides=FAST, n_specialists=2, size=3, overlap=True, specialist_epochs=2, **extra)


@pytest.mark.slow
def test_the_job_from_the_cli(tmp_path):
    code, out, err = cli_in_process("specialists", "--out", str(tmp_path / "job"), "--model", "resnet8", "--epochs", "1",
                                    "--train-limit", "256", "--val-limit", "128", "--batch-size", "32", "--no-curves",
                                    "--specialists", "3", "--specialist-epochs", "1", "--json")
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    subsets = json.loads((tmp_path / "job" / SUBSETS).read_text())["subsets"]
    assert report["subsets"] == subsets and len(subsets) == 3
    assert sorted(c for s in subsets for c in s) == list(range(10))  # the clusters as found: every class once
    assert json.loads((tmp_path / "job" / COMBINATION).read_text())["generalist"] == report["generalist"]
    for name in ("generalist", "generalist+specialists"):
        assert 0 <= report[name]["acc"] <= 1 and report[name]["errors"] == round((1 - report[name]["acc"]) * 128)


def _killed(out: Path) -> None:
    import tricks.jobs

    torch.set_num_threads(1)
    real = tricks.jobs.train_item

    class Kill(tricks.Plugin):
        name = "kill"

        @tricks.hookimpl
        def on_epoch_start(self, ctx, epoch):
            if "specialist-1" in str(ctx.run_dir) and epoch == 1:
                os.kill(os.getpid(), signal.SIGKILL)

    def train_item(task):
        return real({**task, "extra_plugins": [Kill()]})

    tricks.jobs.train_item = train_item
    _job(out)


def _snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_an_interrupted_job_resumes_without_training_a_finished_model_again(tmp_path):
    with one_torch_thread():
        want = _job(tmp_path / "whole")
    out = tmp_path / "killed"
    child = multiprocessing.get_context("fork").Process(target=_killed, args=(out,))
    child.start()
    child.join(300)
    assert child.exitcode == -signal.SIGKILL, child.exitcode
    assert sorted(p.stem for p in (out / "results").glob("*.json")) == ["generalist", "specialist-0"]
    assert (out / SUBSETS).is_file() and not (out / COMBINATION).exists()
    assert tricks.RunDir(out / "runs" / "specialist-1").status() == "interrupted"
    finished = {name: _snapshot(out / "runs" / name) for name in ("generalist", "specialist-0")}
    subsets = (out / SUBSETS).read_bytes()
    with one_torch_thread():
        got = _job(out)
    for name, before in finished.items():
        assert _snapshot(out / "runs" / name) == before, name  # read, not trained again
    assert (out / SUBSETS).read_bytes() == subsets
    assert [r["epoch"] for r in tricks.RunDir(out / "runs" / "specialist-1").metrics()] == [1, 2]
    for name in ("generalist", "generalist+specialists"):
        assert got[name]["acc"] == pytest.approx(want[name]["acc"]) and got[name]["nll"] == pytest.approx(want[name]["nll"], rel=1e-5)
    assert got["subsets"] == want["subsets"]


@pytest.mark.parametrize("args, match", [(["--specialists", "0"], "at least one"), (["--specialists", "11"], "only 10 classes"),
                                         (["--specialists", "1"], "dustbin"), (["--size", "10"], "1 to 9"),
                                         (["--top-n", "0"], "--top-n"), (["--plugins", "kd"], "leave it out")])
def test_the_job_refuses_bad_options_before_training(tmp_path, args, match):
    code, _, err = cli_in_process("specialists", "--out", str(tmp_path / "job"), *args)
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "job").exists()
