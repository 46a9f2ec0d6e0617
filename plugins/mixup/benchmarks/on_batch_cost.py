"""What mixup adds to a training step: the time of ``Mixup.on_batch`` per batch.

    python plugins/mixup/benchmarks/on_batch_cost.py [--device cpu|cuda] [--repeats 200]

Prints, for a few batch shapes, the median time of one ``on_batch`` call (lambda draw, partner
indices, mixing of images and targets), and separately of the lambda draw alone. On CUDA the
device is synchronized around every call, so the time includes the kernels.
"""

from __future__ import annotations

import argparse
import statistics
from types import SimpleNamespace

import torch
from torch.utils import benchmark

from tricks_mixup import Mixup, MixupSettings, sample_lambda

SHAPES = {  # name: (batch, channels, side, classes)
    "digits 64x1x8x8": (64, 1, 8, 10),
    "CIFAR 128x3x32x32": (128, 3, 32, 10),
    "ImageNet 64x3x224x224": (64, 3, 224, 1000),
}


def median_seconds(fn, repeats: int) -> float:
    """Median seconds of one call over ``repeats`` calls after a warm-up (torch.utils.benchmark, which synchronizes CUDA)."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    timer.timeit(3)
    return statistics.median(timer.timeit(1).mean for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    print(f"sample_lambda(0.2) alone: {1e6 * median_seconds(lambda: sample_lambda(0.2), args.repeats):.0f} us")
    for pairing in ("permutation", "roll"):
        plugin = Mixup(MixupSettings(pairing=pairing))
        for name, (b, c, side, k) in SHAPES.items():
            x = torch.randn(b, c, side, side, device=device)
            y = torch.randint(0, k, (b,), device=device)
            ctx = SimpleNamespace(num_classes=k)
            seconds = median_seconds(lambda: plugin.on_batch(ctx, {"input": x, "target": y}), args.repeats)
            print(f"on_batch {pairing:<11} {name:<22} {1e3 * seconds:8.3f} ms")


if __name__ == "__main__":
    main()
