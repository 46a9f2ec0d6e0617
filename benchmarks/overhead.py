"""Step-time overhead of the tricks core against a hand-written PyTorch loop.

Same model (CIFAR ResNet), same data (CIFAR-shaped uint8 images held on the device), same batch
size and number of steps, same augmentation (random crop with padding, flip, normalization), in
one process, alternating core and hand-written epochs. Settings: no plugins against a plain
loop, and mixup + cosine against a loop with mixup and cosine written by hand; each with the
chosen ResNet and with a linear classifier ("tiny"), whose steps cost so little that the
difference is the loop's own overhead per step.

    python benchmarks/overhead.py                  # CPU, defaults
    python benchmarks/overhead.py --device cuda --steps 200 --batch-size 256

Prints the median seconds per step of each, their ratio, the median of the ratios of each
core epoch to the hand-written epoch that follows it (cancels slow drifts of the machine), and
the ratio of the minima (the least disturbed epochs) (goal: <= 1.03 without plugins,
<= 1.05 with mixup and cosine). Timings only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import tricks
from tricks.data import random_crop, random_flip
from tricks.models import create_model


def make_data(folder: Path, n: int, seed: int = 0) -> None:
    """A CIFAR-shaped .npz data set of random images (timing does not depend on content)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in (("train_0.npz", n), ("test.npz", 64)):
        np.savez(folder / name, x=rng.integers(0, 256, (size, 32, 32, 3), dtype=np.uint8),
                 y=rng.integers(0, 10, size).astype(np.int64))


class TinyModel(tricks.Plugin):
    """Provides a linear classifier, so that a step costs little beside the loop's own work."""

    name = "tiny_model"

    @tricks.hookimpl
    def build_model(self, ctx):
        return tiny()


def tiny() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))


def hand_epoch(args, x_all, y_all, mean, std, mix: bool, cosine: bool, model_name: str) -> float:
    """One epoch of a plain PyTorch loop; returns seconds per step."""
    device = torch.device(args.device)
    model = (tiny() if model_name == "tiny" else create_model(model_name, 10, 3)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps, bs = args.steps, args.batch_size
    order = torch.randperm(len(y_all), device=device)
    model.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        idx = order[i * bs:(i + 1) * bs]
        xb = (random_crop(x_all[idx], 4).float() - mean) / std
        xb = random_flip(xb)
        yb = y_all[idx]
        if mix:
            lam = float(torch.distributions.Beta(0.2, 0.2).sample())
            perm = torch.randperm(bs, device=device)
            xb = lam * xb + (1 - lam) * xb[perm]
            onehot = F.one_hot(yb, 10).float()
            target = lam * onehot + (1 - lam) * onehot[perm]
        if cosine:
            for g in opt.param_groups:
                g["lr"] = 0.1 * 0.5 * (1 + math.cos(math.pi * i / steps))
        out = model(xb)
        loss = -(target * F.log_softmax(out, 1)).sum(1).mean() if mix else F.cross_entropy(out, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach() * bs
    sync(device)
    elapsed = time.perf_counter() - start
    loss_sum.item()
    return elapsed / steps


def core_epoch(args, data_dir: Path, plugins: list, out: Path, model_name: str) -> float:
    """One epoch of the tricks core; returns its measured training seconds per step."""
    if model_name == "tiny":
        plugins = [*plugins, TinyModel()]
    tricks.run(plugins=plugins, epochs=1, model=args.model, dataset="npz", data_dir=str(data_dir),
                         batch_size=args.batch_size, train_limit=args.steps * args.batch_size, device=args.device,
                         out=out)
    row = [__import__("json").loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][-1]
    seen = args.steps * args.batch_size
    return seen / row["images_per_second"] / args.steps


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_data(tmp / "data", args.steps * args.batch_size)
        with np.load(tmp / "data" / "train_0.npz") as z:
            x_all = torch.from_numpy(z["x"].transpose(0, 3, 1, 2).copy()).to(device)
            y_all = torch.from_numpy(z["y"]).to(device)
        flat = x_all.permute(0, 2, 3, 1).reshape(-1, 3).double()
        mean = flat.mean(0).float().view(1, 3, 1, 1)
        std = flat.std(0).float().view(1, 3, 1, 1)
        print(f"device {device}, model {args.model}, batch {args.batch_size}, {args.steps} steps x {args.repeats} repeats, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(f"{'setting':<18}{'hand s/step':>13}{'core s/step':>13}{'ratio':>7}{'pair ratio':>13}{'min ratio':>11}{'core-hand us':>13}")
        settings = [("no plugins", [], False, False, args.model),
                    ("mixup + cosine", ["mixup", "cosine"], True, True, args.model),
                    ("tiny, no plugins", [], False, False, "tiny"),
                    ("tiny, mixup+cos", ["mixup", "cosine"], True, True, "tiny")]
        for i, (label, plugins, mix, cos, model_name) in enumerate(settings):
            hand, core = [], []
            hand_epoch(args, x_all, y_all, mean, std, mix, cos, model_name)  # warm-up
            for r in range(args.repeats):
                torch.manual_seed(r)
                core.append(core_epoch(args, tmp / "data", plugins, tmp / f"run-{i}-{r}", model_name))
                torch.manual_seed(r)
                hand.append(hand_epoch(args, x_all, y_all, mean, std, mix, cos, model_name))
            h, c = statistics.median(hand), statistics.median(core)
            pairs = statistics.median(ci / hi for ci, hi in zip(core, hand))
            print(f"{label:<18}{h:>13.5f}{c:>13.5f}{c / h:>7.3f}{pairs:>13.3f}{min(core) / min(hand):>11.3f}"
                  f"{1e6 * (c - h):>+13.0f}")


if __name__ == "__main__":
    main()
