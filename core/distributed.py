"""torch.distributed, as the loop needs it: set up from torchrun's environment, reduce sums.

Under ``torchrun --nproc-per-node N`` every process trains its shard of each epoch; the
gradients are averaged by DistributedDataParallel; metrics are summed across processes; only
rank 0 writes the run directory. Backend: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as tdist


def setup() -> tuple[int, int, int]:
    """(rank, world size, local rank); initializes the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not tdist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("TRICKS_DIST_BACKEND") != "gloo" else "gloo"
        tdist.init_process_group(backend)
    if tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not tdist.is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    DistributedDataParallel broadcasts them at the start of each forward pass, so after an
    epoch every rank holds statistics its last batch updated; evaluation must use rank 0's,
    the ones the checkpoint keeps.
    """
    if not tdist.is_initialized():
        return
    for buffer in module.buffers():
        if tdist.get_backend() == "gloo" and buffer.device.type != "cpu":
            host = buffer.cpu()
            tdist.broadcast(host, src=0)
            buffer.copy_(host)
        else:
            tdist.broadcast(buffer, src=0)


def reduce_sum(values: list, device: torch.device) -> list[float]:
    """Sum each value (tensor or number) over all processes; one host sync for the lot."""
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
    if tdist.is_initialized():
        if tdist.get_backend() == "gloo" and stacked.device.type != "cpu":
            stacked = stacked.cpu()
        tdist.all_reduce(stacked)
    return stacked.tolist()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
