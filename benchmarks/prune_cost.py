"""What structured pruning buys: parameters, MACs and CPU latency per image before and after.

For each model and each fraction of channels removed (the ``prune`` plugin's ``prune_model``,
L1 criterion, one global ranking), prints the parameter count, the multiply-accumulates of one
image (torch's ``FlopCounterMode``, through ``tricks.models.complexity``) and the median CPU
latency per image of a batch forward pass, each beside the unpruned model's as a ratio, in one
run. With a ratio of 0 it also checks that the "pruned" model's outputs equal the unpruned
model's (the dependency graph must not change anything it does not remove).

    python benchmarks/prune_cost.py                                  # resnet20 and resnet56 at 32x32
    python benchmarks/prune_cost.py --models resnet56 --ratios 0,0.3,0.5,0.7 --batch-size 64

Run it with nothing else on the machine: the latencies are worthless otherwise. Timings only:
nothing is asserted but the equality at ratio 0.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from tricks.models import complexity, create_model
from tricks_prune import prune_model


def latency(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds per image of ``repeats`` timed batch forward passes (after two warm-ups)."""
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            start = time.perf_counter()
            model(x)
            if i >= 2:
                times.append(time.perf_counter() - start)
    return statistics.median(times) / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,resnet56")
    parser.add_argument("--ratios", default="0,0.3,0.5,0.7")
    parser.add_argument("--criterion", default="l1")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    example = x[:1]
    print(f"CPU, {args.threads} thread(s), batch {args.batch_size}, {args.image_size}x{args.image_size}, "
          f"criterion {args.criterion}; ratios are pruned / unpruned")
    print(f"{'model':<10} {'removed':>7} {'params':>10} {'ratio':>6} {'MACs':>12} {'ratio':>6} "
          f"{'ms/image':>9} {'ratio':>6}  outputs")
    for name in args.models.split(","):
        base = create_model(name, 10, 3).eval()
        base_size = complexity(base, 3, args.image_size)
        base_time = latency(base, x, args.repeats)
        for ratio in [float(r) for r in args.ratios.split(",")]:
            model = copy.deepcopy(base)
            prune_model(model, example, ratio, criterion=args.criterion)
            size = complexity(model, 3, args.image_size)
            seconds = latency(model, x, args.repeats)
            check = ""
            if ratio == 0:
                with torch.no_grad():
                    same = torch.allclose(model(x), base(x), rtol=0, atol=0)
                check = "equal" if same else "DIFFERENT"
            print(f"{name:<10} {ratio:>7.0%} {size['params']:>10,} {size['params'] / base_size['params']:>6.2f} "
                  f"{size['macs']:>12,} {size['macs'] / base_size['macs']:>6.2f} {1e3 * seconds:>9.3f} "
                  f"{seconds / base_time:>6.2f}  {check}")


if __name__ == "__main__":
    main()
