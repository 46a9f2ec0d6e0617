"""Trained networks per hour: several networks at once on one device (``--per-gpu K``) against one
at a time, on the same sampled networks, in one run.

Samples --n networks once, trains them with per_gpu=1 and then with per_gpu=K (each in a fresh
job folder, same recipe), and prints both wall times, networks per hour and the ratio. Goal on
one H100-class GPU, for CIFAR-sized networks: a ratio of at least 3. Printed, never asserted.

    python benchmarks/sample_throughput.py --data-dir DATA/cifar10 --dataset npz --per-gpu 4
    python benchmarks/sample_throughput.py --dataset digits --device cpu --n 4 --per-gpu 2   # a smoke run
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from tricks_regnet.spaces import Window
from tricks_regnet.sweep import sample_job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="regnetx")
    parser.add_argument("--flops", default="10M:40M")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--per-gpu", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--dataset", default="npz")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--val-limit", type=int, default=None, help="evaluate on the first N validation images only (smoke runs)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--gpus", default=None)
    args = parser.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    recipe = dict(dataset=args.dataset, data_dir=args.data_dir, train_limit=args.train_limit, val_limit=args.val_limit,
                  epochs=args.epochs, batch_size=args.batch_size, device=args.device, precision="bf16" if cuda else "fp32",
                  channels_last=cuda)
    recipe = {k: v for k, v in recipe.items() if v is not None}
    device = torch.cuda.get_device_name(0) if cuda else (platform.processor() or platform.machine())
    print(f"{device}; torch {torch.__version__}; {args.space} {args.flops}, n={args.n}, {args.epochs} epoch(s), "
          f"batch {args.batch_size}, {'bf16 + channels_last' if cuda else 'fp32'}")
    walls = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in (1, args.per_gpu):
            start = time.perf_counter()
            summary = sample_job(Path(tmp) / f"k{k}", args.space, args.n, 0, Window.parse(flops=args.flops),
                                 overrides=recipe, gpus=args.gpus, per_gpu=k)
            walls[k] = time.perf_counter() - start
            print(f"per_gpu={k}: {walls[k]:.1f} s for {summary['ok']} networks ({summary['failed']} failed), "
                  f"{3600 * args.n / walls[k]:.1f} networks/hour", flush=True)
    print(f"ratio (per_gpu={args.per_gpu} over per_gpu=1): {walls[1] / walls[args.per_gpu]:.2f}x")


if __name__ == "__main__":
    main()
