"""Shared by the guidance benchmarks and gpu_check.py: the benchmark problem and the measurements.

The problem is the paper's ImageNet setting: 3 x 256 x 256 images (D = 196608), average-pool
super-resolution x4, Gaussian noise sigma 0.05, with r, Z and Z_raw as DPG computes them at a
mid-chain step (x0hat a noisy version of the truth).
"""

from __future__ import annotations

import gc
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

import dpgkit as dk
from dpgkit import kernels

SHAPE = (3, 256, 256)
BACKENDS = ("eager", "chunked", "triton")


def problem(batch: int, device: torch.device | str, shape=SHAPE, operator=None, noise=None, seed: int = 0):
    """x0hat (B, C, H, W), y, operator, noise, r, Z, Z_raw: the arguments of kernels.dpg_direction."""
    operator = operator if operator is not None else dk.operators.SuperResolution(4)
    noise = noise if noise is not None else dk.noise.Gaussian(0.05)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, *shape, generator=g) * 2 - 1
    x0hat = (x + 0.2 * torch.randn(batch, *shape, generator=g)).clamp(-1, 1).to(device)
    x, operator = x.to(device), operator.to(device)
    y = noise.simulate(operator(x), [torch.Generator().manual_seed(seed + b) for b in range(batch)])
    z_raw = noise.energy(y, operator(x0hat)).double()
    z = z_raw.clone()
    r = noise.width(z, float(x0hat[0].numel()), 0.05)
    return x0hat, y, operator, noise, r, z, z_raw


def direction_fn(backend: str, num_samples: int, batch: int, device, chunk_size: int = 256,
                 estimator: str = "published", **kw) -> Callable:
    """A no-argument callable computing the DPG direction once (synchronised on CUDA)."""
    x0hat, y, op, noise, r, z, z_raw = problem(batch, device, **kw)
    seeds = [1000 + b for b in range(batch)]
    cuda = torch.device(device).type == "cuda"

    def run():
        out = kernels.dpg_direction(x0hat, y, op, noise, r, z, z_raw, num_samples, seeds,
                                    backend=backend, chunk_size=chunk_size, estimator=estimator)
        if cuda:
            torch.cuda.synchronize()
        return out

    return run


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def peak_memory_mb(fn: Callable, device) -> float:
    """Peak memory that one call of fn adds, in MiB: CUDA allocator peak, or on the CPU the peak
    resident set size (VmHWM, reset through /proc/self/clear_refs) above the RSS before the call."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    return (_rss_kib("VmHWM") - base) / 1024


def time_call(fn: Callable, rounds: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `rounds` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times
