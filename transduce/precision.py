"""Which precision training runs its matmuls in: `train.bf16: true | false | auto`.

bf16 autocast (fp32 master weights, loss in fp32) pays only where the
hardware multiplies bf16 natively (AMX on Intel Sapphire Rapids and later,
AVX512-BF16 on AMD Zen 4 and Intel Cooper Lake); elsewhere PyTorch emulates
bf16 matmuls, slower than fp32 (docs/benchmarks.md, "Training throughput"). `auto` takes
bf16 where it pays: a CUDA device that supports it, or a CPU with AMX bf16 or
AVX512-BF16.
"""
from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("transduce")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices natively (on a CPU: AMX or AVX512-BF16; on CUDA: bf16 support)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    flags = cpu_flags()
    return {"amx_bf16", "amx_tile"} <= flags or "avx512_bf16" in flags


def cpu_bf16_kind() -> str:
    """Which native bf16 this CPU has, for logs: "AMX", "AVX512-BF16" or "none"."""
    flags = cpu_flags()
    return "AMX" if {"amx_bf16", "amx_tile"} <= flags else "AVX512-BF16" if "avx512_bf16" in flags else "none"


def use_bf16(setting: bool | str, device: torch.device) -> bool:
    """`train.bf16` resolved for `device`: true and false as they are, "auto" by the hardware."""
    if setting == "auto":
        chosen = native_bf16(device)
        log.info("train.bf16 auto: %s (%s)", "bf16 autocast" if chosen else "fp32",
                 f"{device.type} {'with' if chosen else 'without'} native bf16 matmuls"
                 + (f" ({cpu_bf16_kind()})" if chosen and device.type == "cpu" else ""))
        return chosen
    if setting and not native_bf16(device):
        log.warning("train.bf16 is on but this %s has no native bf16 matmuls (on a CPU: neither AMX nor AVX512-BF16): PyTorch "
                    "emulates them: a training step ~2x slower than fp32 with AVX-512, matmuls ~100x slower on an AVX2-only CPU; "
                    "`bf16: auto` chooses by the hardware", device.type)
    return bool(setting)
