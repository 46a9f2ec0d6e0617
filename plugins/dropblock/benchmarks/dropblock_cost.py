"""What DropBlock adds to a training step.

    python plugins/dropblock/benchmarks/dropblock_cost.py [--device cpu|cuda] [--repeats 20] [--quick]

Prints (1) the median time of one DropBlock layer (forward) on the feature maps of the last two
stages of ResNet-50 at 224x224 and of a CIFAR ResNet at 32x32, next to the time of an
elementwise product of the same tensors (the least any mask costs); (2) the median time of a
training step (forward, backward, SGD step) of a CIFAR-shaped ResNet with and without the
plugin's default insertion (last two stages, branch and shortcut), with every keep_prob at 0.9.
On CUDA the device is synchronized around every call. ``--quick`` uses batch 2 everywhere, to
check in seconds that the script runs (its timings mean nothing).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch.utils import benchmark

from tricks_dropblock import drop_block, dropblock_layers, insert_dropblock

MAPS = {  # name: (batch, channels, side)
    "ResNet-50 stage 3, 224px, batch 32": (32, 1024, 14),
    "ResNet-50 stage 4, 224px, batch 32": (32, 2048, 7),
    "resnet20 stage 2, 32px, batch 128": (128, 32, 16),
    "resnet20 stage 3, 32px, batch 128": (128, 64, 8),
}


def median_seconds(fn, repeats: int) -> float:
    """Median seconds of one call over ``repeats`` calls after a warm-up (torch.utils.benchmark, which synchronizes CUDA)."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    timer.timeit(3)
    return statistics.median(timer.timeit(1).mean for _ in range(repeats))


def step_time(model, x, y, repeats) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return median_seconds(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--quick", action="store_true", help="batch 2 everywhere: checks that the script runs (timings mean nothing)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
          + (", --quick: batch 2 everywhere, not the batches named below" if args.quick else ""))
    print("one layer, forward (block_size 7, keep_prob 0.9) vs x * mask:")
    for name, (b, c, side) in MAPS.items():
        x = torch.randn(2 if args.quick else b, c, side, side, device=device)
        mask = torch.ones_like(x)
        t_drop = median_seconds(lambda: drop_block(x, 0.9, 7), args.repeats)
        t_mul = median_seconds(lambda: x * mask, args.repeats)
        print(f"  {name:40s} dropblock {1e3 * t_drop:8.2f} ms   x*mask {1e3 * t_mul:7.2f} ms")

    from tricks.models import create_model

    batch = 2 if args.quick else 128
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    torch.manual_seed(0)
    plain = create_model(args.model, 10, 3).to(device).train()
    torch.manual_seed(0)
    dropped = create_model(args.model, 10, 3)
    insert_dropblock(dropped)
    dropped = dropped.to(device).train()
    for layer in dropblock_layers(dropped):
        layer.set_keep_prob(0.9)
    t_plain = step_time(plain, x, y, args.repeats)
    t_drop = step_time(dropped, x, y, args.repeats)
    n = len(dropblock_layers(dropped))
    print(f"training step, {args.model}, batch {batch}x3x32x32: plain {1e3 * t_plain:.1f} ms, "
          f"with {n} DropBlock layers {1e3 * t_drop:.1f} ms (+{100 * (t_drop / t_plain - 1):.0f}%)")


if __name__ == "__main__":
    main()
