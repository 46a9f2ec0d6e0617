"""Scaled dot-product attention through ``torch.nn.functional.scaled_dot_product_attention``
against the reference formula (``tricks_vit.reference_attention``: ``softmax(QK^T/sqrt(d))V``
written out), for a few sequence lengths; and one training step of the CIFAR ViT against CIFAR
ResNets of similar cost.

    python plugins/vit/benchmarks/attention_cost.py                       # CPU: the defaults
    python plugins/vit/benchmarks/attention_cost.py --device cuda --dtype bf16 --batch 64 --lengths 65,197,577,1025

Attention: ``--batch`` sequences of ``--heads`` heads of width ``--head-dim``, forward and
backward (the sum of the output as the loss), median of ``--repeats`` after warm-up; on CUDA the
device is synchronized around each measurement and the peak memory of one forward+backward is
read from ``torch.cuda.max_memory_allocated``; on the CPU (Linux) each forward+backward runs once more in a
fresh process, and the growth of its peak resident memory (``VmHWM``, reset just before the call)
over its resident memory before the call is printed (the ``L x L`` weights per head that the reference must hold, ``batch * heads
* L^2 * bytes``, are printed beside it).
Training step: forward, backward and an AdamW step on a batch of ``--step-batch`` 32x32 images,
for ``vit_cifar``, ``resnet20`` and ``resnet56``, with each model's multiply-adds per image.
Printed side by side; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from tricks.models import complexity, create_model
from tricks_vit import reference_attention, vit

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


PEAK = """
import json, sys, torch, torch.nn.functional as F
from tricks_vit import reference_attention

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

torch.set_num_threads({threads})
q, k, v = (torch.randn({shape}, dtype={dtype}, requires_grad=True) for _ in range(3))
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from the current size
before = status("VmRSS:")
out = F.scaled_dot_product_attention(q, k, v) if {fused} else reference_attention(q, k, v)[0]
out.sum().backward()
print(json.dumps(status("VmHWM:") - before))
"""


def cpu_peak(shape, dtype, fused: bool, threads: int) -> int:
    """Bytes by which one forward+backward raises the peak resident memory of a fresh process."""
    code = PEAK.format(shape=tuple(shape), dtype=f"torch.{str(dtype).split('.')[-1]}", fused=fused, threads=threads)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def attention_rows(args, device, dtype):
    rows = []
    for length in args.lengths:
        shape = (args.batch, args.heads, length, args.head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

        def fused():
            F.scaled_dot_product_attention(q, k, v).sum().backward()

        def reference():
            reference_attention(q, k, v)[0].sum().backward()

        row = {"L": length}
        for name, fn in (("sdpa", fused), ("reference", reference)):
            row[name] = timed(fn, device, args.repeats)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                fn()
                sync(device)
                row[name + "_mem"] = torch.cuda.max_memory_allocated(device) - base
        if device.type != "cuda":
            row["weights_mem"] = args.batch * args.heads * length * length * torch.finfo(dtype).bits // 8
            for name, fused_ in (("sdpa", True), ("reference", False)):
                row[name + "_mem"] = cpu_peak(shape, dtype, fused_, torch.get_num_threads())
        rows.append(row)
    return rows


def step_rows(args, device):
    rows = []
    for name in ("vit_cifar", "resnet20", "resnet56"):
        torch.manual_seed(0)
        model = (vit(name, num_classes=10) if name.startswith("vit") else create_model(name, 10, 3)).to(device)
        macs = complexity(model, 3, 32)["macs"]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        x = torch.randn(args.step_batch, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (args.step_batch,), device=device)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        seconds = timed(step, device, args.step_repeats, warmup=1)
        rows.append({"model": name, "macs": macs, "params": sum(p.numel() for p in model.parameters()),
                     "step": seconds, "images_per_s": args.step_batch / seconds})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--lengths", type=lambda s: [int(v) for v in s.split(",")], default=[17, 65, 197, 577])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--step-batch", type=int, default=128)
    p.add_argument("--step-repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    print(f"torch {torch.__version__}, {device}, {args.dtype}, {torch.get_num_threads()} threads")
    print(f"\nattention forward+backward, batch {args.batch}, {args.heads} heads of {args.head_dim} "
          f"(median of {args.repeats})")
    mem = ("peak MiB sdpa / reference" if device.type == "cuda"
           else "peak RSS growth MiB sdpa / reference (L x L weights MiB)")
    print(f"{'L':>6} {'sdpa ms':>10} {'reference ms':>13} {'reference / sdpa':>17}   {mem}")
    for r in attention_rows(args, device, dtype):
        m = f"{r['sdpa_mem'] / 2**20:.1f} / {r['reference_mem'] / 2**20:.1f}"
        if device.type != "cuda":
            m += f" ({r['weights_mem'] / 2**20:.1f})"
        print(f"{r['L']:>6} {1e3 * r['sdpa']:>10.2f} {1e3 * r['reference']:>13.2f} {r['reference'] / r['sdpa']:>17.2f}   {m}")
    print(f"\ntraining step (forward, backward, AdamW), batch {args.step_batch} of 32x32 images "
          f"(median of {args.step_repeats})")
    rows = step_rows(args, device)
    base = rows[0]["step"]
    print(f"{'model':>10} {'MMACs/img':>10} {'params':>9} {'step ms':>9} {'images/s':>9} {'time / vit_cifar':>17}")
    for r in rows:
        print(f"{r['model']:>10} {r['macs'] / 1e6:>10.1f} {r['params'] / 1e6:>8.2f}M {1e3 * r['step']:>9.1f} "
              f"{r['images_per_s']:>9.1f} {r['step'] / base:>17.2f}")


if __name__ == "__main__":
    main()
