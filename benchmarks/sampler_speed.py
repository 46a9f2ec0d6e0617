"""How fast the design-space sampler draws valid networks inside a complexity window.

For each space: the median time (over --repeats runs, different seeds) to draw --n distinct
networks inside a window of +-5% around a target (a 10% window), at the ImageNet shape (224x224,
1000 classes) and at the 32x32 CIFAR shape (10 classes). Goal: at least 1,000 valid samples per
second on one CPU core. Printed, never asserted.

    python benchmarks/sampler_speed.py
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

from tricks_regnet.spaces import SPACES, Window, get_space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spaces", default=",".join(SPACES))
    args = parser.parse_args()
    shapes = [("224, 360M:400M", 224, "imagenet", 1000, Window.parse(flops="360M:400M")),
              ("32, 190M:210M", 32, "cifar", 10, Window.parse(flops="190M:210M"))]
    print(f"{platform.processor() or platform.machine()}, python {platform.python_version()}, n={args.n}, "
          f"median of {args.repeats}")
    print("| space | " + " | ".join(f"samples/s ({label})" for label, *_ in shapes) + " |")
    print("| --- | " + " | ".join("---" for _ in shapes) + " |")
    for name in args.spaces.split(","):
        space = get_space(name)
        cells = []
        for _, resolution, stem, classes, window in shapes:
            times = []
            for seed in range(args.repeats):
                start = time.perf_counter()
                space.sample(args.n, seed=seed, window=window, resolution=resolution, stem=stem, num_classes=classes)
                times.append(time.perf_counter() - start)
            cells.append(f"{args.n / statistics.median(times):,.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
