"""What the batch augmentations cost: mixup, cutmix, cutout and gridmask against a training step
and against timm's ``Mixup``.

    python benchmarks/augment_cost.py                                   # GPU session: the defaults
    python benchmarks/augment_cost.py --device cpu --sizes 32,224 --batch-size 256,16 \\
        --repeats 10 --step-repeats 3 --threads 1                       # a small CPU run

For each image side (``--sizes``), on a batch of 3-channel normalized images held on the
device, it times one ``on_batch`` call of each plugin (``tricks_mixup.Mixup``, ``CutMix``,
``Cutout``, ``GridMask``), timm's ``Mixup`` in mixup mode and in CutMix mode (batch mode,
one lambda per batch, as ours), and one training step of the same batch: forward, backward and
an SGD step (momentum, Nesterov, weight decay) of the CIFAR ResNet-20 of ``tricks.models`` for
sides up to 64, of torchvision's ResNet-50 (1,000 classes) above. Each time is the median of
``--repeats`` measurements (``--step-repeats`` for the training step), after warm-up (the
fastest measurement is printed too: on a shared machine it is the least disturbed); on CUDA
the device is synchronized before and after each measurement, and a measurement of an
augmentation runs ``--inner`` calls to amortize the synchronization. Printed side by side: each
augmentation's time as a share of the training step, and ours over timm's (mixup, cutmix).

The goal on a GPU: at 224x224, batch 256, no augmentation above 3% of a ResNet-50 step, and ours
no slower than timm's. Timings only: nothing is asserted.

Settings as timed: mixup alpha 0.2, permutation pairing; cutmix alpha 1, prob 1, permutation;
cutout one hole of side ``side // 2`` (16 at 32x32), prob 1; gridmask at its full probability
(0.8, ramp over), ratio 0.6, rotation up to 360 degrees; timm ``Mixup(label_smoothing=0)``
with mixup_alpha 0.2 (mixup mode) or cutmix_alpha 1 (CutMix mode). The plugins and timm change
the batch in place where they can (cutmix, cutout, gridmask, timm); mixup returns a new batch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from tricks.models import create_model
from tricks_cutmix import CutMix, CutMixSettings
from tricks_cutout import Cutout, CutoutSettings
from tricks_gridmask import GridMask, GridMaskSettings
from tricks_mixup import Mixup, MixupSettings


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda, cuda:N (default: cuda when there is one)")
    parser.add_argument("--sizes", type=int_list, default=[32, 224], help="image sides, comma-separated (default 32,224)")
    parser.add_argument("--batch-size", type=int_list, default=[256],
                        help="batch size, one for all sides or one per side, comma-separated (default 256)")
    parser.add_argument("--repeats", type=int, default=30, help="measurements per augmentation (median taken)")
    parser.add_argument("--step-repeats", type=int, default=10, help="measurements of the training step (median taken)")
    parser.add_argument("--inner", type=int, default=0,
                        help="augmentation calls per measurement (default: 10 on CUDA, 1 on CPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before measuring")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="autocast of the training step's forward pass (the augmentations see fp32 input)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last input and model")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--no-timm", action="store_true", help="leave out timm's Mixup")
    args = parser.parse_args()
    if len(args.batch_size) not in (1, len(args.sizes)):
        parser.error("--batch-size takes one value or one per size")
    return args


def make_timer(device: torch.device):
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def median_seconds(fn, repeats: int, inner: int, warmup: int) -> tuple[float, float]:
        """(median, minimum) seconds per call."""
        for _ in range(warmup):
            fn()
        sync()
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            times.append((time.perf_counter() - start) / inner)
        return statistics.median(times), min(times)

    return median_seconds


def step_model(side: int, num_classes: int, device, channels_last: bool):
    if side <= 64:
        name, model = "resnet20", create_model("resnet20", num_classes, 3)
    else:
        from torchvision.models import resnet50

        name, model = "resnet50", resnet50(num_classes=num_classes)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return name, model


def training_step(model, x, y, precision: str):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    dtype = {"bf16": torch.bfloat16}.get(precision)

    def step():
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def augmentations(side: int, num_classes: int, epochs: int, with_timm: bool):
    """name -> (kind, callable(x, y)); kind pairs ours with timm's."""
    ctx = SimpleNamespace(num_classes=num_classes, epoch=epochs, epochs=epochs, log=print)
    plugins = {
        "mixup": ("mixup", Mixup(MixupSettings(alpha=0.2))),
        "mixup, reverse pairing (as timm)": ("mixup", Mixup(MixupSettings(alpha=0.2, pairing="reverse"))),
        "cutmix": ("cutmix", CutMix(CutMixSettings(alpha=1.0))),
        "cutmix, reverse pairing (as timm)": ("cutmix", CutMix(CutMixSettings(alpha=1.0, pairing="reverse"))),
        "cutout": (None, Cutout(CutoutSettings(length=max(1, side // 2)))),
        "gridmask": (None, GridMask(GridMaskSettings())),
    }
    out = {name: (kind, (lambda p: lambda x, y: p.on_batch(ctx, {"input": x, "target": y}))(p))
           for name, (kind, p) in plugins.items()}
    if with_timm:
        from timm.data import Mixup as TimmMixup

        timm_mixup = TimmMixup(mixup_alpha=0.2, cutmix_alpha=0.0, label_smoothing=0.0, mode="batch", num_classes=num_classes)
        timm_cutmix = TimmMixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, mode="batch", num_classes=num_classes)
        out["timm Mixup (mixup)"] = ("mixup", timm_mixup)
        out["timm Mixup (cutmix)"] = ("cutmix", timm_cutmix)
    return out


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    inner = args.inner or (10 if device.type == "cuda" else 1)
    median_seconds = make_timer(device)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, device {device} ({name}), {torch.get_num_threads()} CPU threads, "
          f"step precision {args.precision}{', channels-last' if args.channels_last else ''}")
    with_timm = not args.no_timm
    if with_timm:
        try:
            import timm

            print(f"timm {timm.__version__}")
        except ImportError:
            print("timm is not installed: its rows are left out")
            with_timm = False
    worst, versus = {}, {}
    for i, side in enumerate(args.sizes):
        batch = args.batch_size[i] if len(args.batch_size) > 1 else args.batch_size[0]
        num_classes = 10 if side <= 64 else 1000
        memory = torch.channels_last if args.channels_last else torch.contiguous_format
        x = torch.randn(batch, 3, side, side, device=device).contiguous(memory_format=memory)
        y = torch.randint(0, num_classes, (batch,), device=device)
        model_name, model = step_model(side, num_classes, device, args.channels_last)
        step, step_min = median_seconds(training_step(model, x, y, args.precision), args.step_repeats, 1,
                                        min(args.warmup, 2))
        del model
        print(f"\n### {side}x{side}, batch {batch}: training step of {model_name} {1e3 * step:.2f} ms "
              f"(fastest {1e3 * step_min:.2f} ms)\n")
        print("| augmentation | ms per batch | fastest, ms | share of the step | ours / timm |")
        print("| --- | --- | --- | --- | --- |")
        times = {}
        for aug_name, (kind, fn) in augmentations(side, num_classes, epochs=10, with_timm=with_timm).items():
            work = x.clone(memory_format=memory)  # the in-place ones change their copy only
            times[aug_name] = (kind, median_seconds(lambda: fn(work, y), args.repeats, inner, args.warmup))
        timm_times = {kind: t for n, (kind, (t, _)) in times.items() if n.startswith("timm")}
        for aug_name, (kind, (t, t_min)) in times.items():
            ratio = ""
            if not aug_name.startswith("timm") and kind in timm_times:
                ratio = f"{t / timm_times[kind]:.2f}"
                versus.setdefault(side, []).append(f"{aug_name} {ratio}")
            print(f"| {aug_name} | {1e3 * t:.3f} | {1e3 * t_min:.3f} | {100 * t / step:.2f}% | {ratio} |")
            if not aug_name.startswith("timm"):
                worst[side] = max(worst.get(side, 0.0), t / step)
    print()
    for side, share in worst.items():
        goal = " (goal at 224x224: at most 3%)" if side == 224 else ""
        print(f"{side}x{side}: the costliest of our augmentations is {100 * share:.2f}% of a training step{goal}")
        if side in versus:
            print(f"{side}x{side}: ours / timm (goal: at most 1): {', '.join(versus[side])}")


if __name__ == "__main__":
    main()
