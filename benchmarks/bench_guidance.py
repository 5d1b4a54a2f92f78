"""The DPG direction at the paper's size: eager vs chunked vs fused (triton, CUDA only), and the
Rao-Blackwellized estimator (ids rb-*) beside them.

D = 3 x 256 x 256, SR x4 by average pooling, Gaussian noise; N in {500, 5000}, batch 1 and 4.
Each case records time per call (pytest-benchmark) and the peak memory one call adds
(extra_info["peak_mib"]: the CUDA allocator's peak, or the CPU's peak resident set).
On the CPU the triton backend runs under Triton's interpreter, a correctness path, so it is not
timed there.

    pytest benchmarks/bench_guidance.py --benchmark-enable -m "not large" --benchmark-json=out.json
"""

from __future__ import annotations

import pytest
import torch
from guidance_cases import direction_fn, peak_memory_mb

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BACKENDS = ["eager", "chunked", "triton"] if CUDA else ["eager", "chunked"]


# the Rao-Blackwellized estimator (estimator="rao-blackwell"): its torch path streams chunks of
# RB_CHUNK x m coordinates (m = D/16 here; 256 keeps its buffers under glibc's mmap threshold, so they
# are reused instead of faulted in afresh each chunk), the fused one runs on CUDA
RB_BACKENDS = ["chunked", "triton"] if CUDA else ["chunked"]
RB_CHUNK = 256


def _cases():
    for num_samples in (500, 5000):
        for batch in (1, 4):
            large = num_samples == 5000 or batch == 4
            marks = [pytest.mark.large] if large else []
            # the small Rao-Blackwellized cases first: the CPU's peak-RSS measure cannot see memory
            # that an earlier, larger case left in the allocator
            for backend in RB_BACKENDS:
                yield pytest.param(backend, num_samples, batch, "rao-blackwell", marks=marks,
                                   id=f"rb-{backend}-N{num_samples}-B{batch}")
            for backend in BACKENDS:
                yield pytest.param(backend, num_samples, batch, "published", marks=marks,
                                   id=f"{backend}-N{num_samples}-B{batch}")


@pytest.mark.parametrize("backend,num_samples,batch,estimator", list(_cases()))
def test_dpg_direction(benchmark, backend, num_samples, batch, estimator):
    chunk = RB_CHUNK if estimator == "rao-blackwell" else 256
    fn = direction_fn(backend, num_samples, batch, DEVICE, chunk_size=chunk, estimator=estimator)
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if CUDA else "cpu",
                                threads=torch.get_num_threads(), backend=backend, estimator=estimator,
                                chunk_size=chunk, num_samples=num_samples, batch=batch, numel=3 * 256 * 256)
    benchmark.extra_info["peak_mib"] = round(peak_memory_mb(fn, DEVICE), 1)
    # CPU calls take seconds to minutes: few rounds; the memory call above is the warm-up
    rounds = 5 if CUDA or estimator == "rao-blackwell" else (1 if num_samples == 5000 else 2)
    v, m = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1 if CUDA else 0)
    assert v.shape == (batch, 3, 256, 256) and torch.isfinite(v).all() and torch.isfinite(m).all()
