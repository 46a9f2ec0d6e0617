"""Teach ``torch.utils.flop_counter`` the CPU's fused attention kernel, so that the core's
``complexity`` (multiply-accumulates of a forward pass) counts a ViT's attention on the CPU as it
does on a GPU. Same formula as torch's for the CUDA kernels: ``sdpa_flop_count``."""

from __future__ import annotations

import torch
from torch.utils import flop_counter

_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

if _CPU_SDPA is not None and _CPU_SDPA not in flop_counter.flop_registry:
    @flop_counter.register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)
