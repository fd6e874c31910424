"""Pick the fastest precision by measuring it where the work runs.

CPUs of one cloud machine type differ: an Intel Xeon with AMX multiplies bf16 matrices ~7x faster than fp32, an AMD
EPYC with AVX2 only emulates bf16 and runs it tens of times slower than fp32. So ``precision: auto`` (training) and
``dtype: auto`` (vLLM engines and Serve replicas on CPU) are settled by a sub-second matmul probe in the process that
will do the work, at its thread count, and the choice and its reason are recorded in the manifests. On a GPU, bf16
is used wherever the device supports it.
"""

from __future__ import annotations

import os
import time
from typing import Any

__all__ = ["choose_precision", "cpu_engine_env", "matmul_tflops", "resolve_dtype"]

_TORCH_DTYPE = {"bf16": "bfloat16", "fp32": "float32"}


def matmul_tflops(precision: str, *, size: int = 512, min_seconds: float = 0.1) -> float:
    """Measured TFLOPS of a ``size`` x ``size`` CPU matmul in ``precision`` ('bf16' or 'fp32') at the current
    torch thread count; one warm-up, then repeats until ``min_seconds`` have passed."""
    import torch

    dtype = getattr(torch, _TORCH_DTYPE[precision])
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(dtype)
    b = torch.randn(size, size, generator=gen).to(dtype)
    torch.mm(a, b)
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds or n == 0:
        torch.mm(a, b)
        n += 1
    return 2 * size**3 * n / elapsed / 1e12


def choose_precision(*, use_gpu: bool = False) -> dict[str, Any]:
    """The faster of bf16 and fp32 on this device.

    Returns:
        ``precision`` ('bf16' or 'fp32'), ``reason`` (one line), and on CPU ``tflops`` (measured, per precision)
        and ``threads``.
    """
    import torch

    if use_gpu:
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return {"precision": "bf16" if ok else "fp32",
                "reason": "the GPU supports bf16" if ok else "the GPU lacks bf16 support"}
    tflops = {"bf16": 0.0, "fp32": 0.0}
    for _ in range(3):  # alternate and keep each one's best: other load on the CPU only ever slows a measurement
        for p in tflops:
            tflops[p] = max(tflops[p], matmul_tflops(p))
    tflops = {p: round(v, 4) for p, v in tflops.items()}
    best = max(tflops, key=tflops.get)
    other = "fp32" if best == "bf16" else "bf16"
    ratio = tflops[best] / max(tflops[other], 1e-12)
    return {
        "precision": best,
        "reason": f"{best} matmul measured {ratio:.1f}x faster than {other} on this CPU "
                  f"({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thread(s))",
        "tflops": tflops,
        "threads": torch.get_num_threads(),
    }


def resolve_dtype(dtype: str, *, use_gpu: bool) -> tuple[str, str]:
    """A vLLM ``dtype`` for a config value: 'auto' on CPU becomes 'bfloat16' or 'float32', whichever is faster here
    (on GPU it stays 'auto': the checkpoint's dtype); anything else is kept. Returns ``(dtype, reason)``."""
    if dtype != "auto":
        return dtype, "set in the config"
    if use_gpu:
        return "auto", "the checkpoint's dtype (GPU)"
    choice = choose_precision()
    return _TORCH_DTYPE[choice["precision"]], choice["reason"]


def cpu_engine_env(reserved_cpus: int | None) -> dict[str, str]:
    """Environment of a vLLM CPU engine: how many of this host's cores it keeps off its OpenMP compute threads.

    vLLM binds its compute threads to the host's cores minus one reserved for its scheduler process. On a 2-core
    host that computes on one core: reserving none decodes 1.5x and scores prompts 1.8x faster there
    (benchmarks/bench_engine_threads.py).
    ``None`` reserves none on hosts with at most 8 CPUs and keeps vLLM's default above.
    """
    if reserved_cpus is None and len(os.sched_getaffinity(0)) > 8:
        return {}
    return {"VLLM_CPU_NUM_OF_RESERVED_CPU": str(reserved_cpus or 0)}
