"""What distillation adds to a training step: the time of one step with and without kd.

    python plugins/kd/benchmarks/step_cost.py [--device cpu|cuda] [--repeats 50] [--quick]

A step is forward, loss, backward and an SGD update of the student, on random inputs; with kd the
loss also runs the teacher (eval mode, no_grad) and the soft term. Prints the median time per
step for a few student/teacher pairs and batch shapes. Teachers are freshly initialised: the
cost does not depend on their weights. ``--quick`` uses batch 2 in every case, to check in seconds
that the script runs (its timings mean nothing).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch.utils import benchmark

from tricks.builtin import base_loss
from tricks.models import create_model
from tricks_kd import prepare_teacher, soft_loss

CASES = {  # name: (student, teacher, batch, channels, side, classes)
    "digits resnet8 <- resnet20, 64x1x8x8": ("resnet8", "resnet20", 64, 1, 8, 10),
    "CIFAR resnet20 <- resnet56, 128x3x32x32": ("resnet20", "resnet56", 128, 3, 32, 10),
}


def median_seconds(fn, repeats: int) -> float:
    """Median seconds of one call over ``repeats`` calls after a warm-up (torch.utils.benchmark, which synchronizes CUDA)."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    timer.timeit(3)
    return statistics.median(timer.timeit(1).mean for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="batch 2 in every case: checks that the script runs (timings mean nothing)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
          + (", --quick: batch 2 in every case, not the batches named below" if args.quick else ""))
    for name, (student_name, teacher_name, b, c, side, k) in CASES.items():
        b = 2 if args.quick else b
        student = create_model(student_name, k, c).to(device).train()
        teacher = prepare_teacher(create_model(teacher_name, k, c), device)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
        batch = {"input": torch.randn(b, c, side, side, device=device), "target": torch.randint(0, k, (b,), device=device)}

        def step(kd: bool):
            output = student(batch["input"])
            loss = base_loss(output, batch)
            if kd:
                with torch.no_grad():
                    teacher_logits = teacher(batch["input"])
                loss = 0.5 * loss + 0.5 * soft_loss(output, teacher_logits, 4.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        plain = median_seconds(lambda: step(False), args.repeats)
        distilled = median_seconds(lambda: step(True), args.repeats)
        print(f"{name:<42} plain {1e3 * plain:8.2f} ms   kd {1e3 * distilled:8.2f} ms   (+{100 * (distilled / plain - 1):.0f}%)")


if __name__ == "__main__":
    main()
