"""The DPG direction in torch (spec, steps 3 to 6): the definition the fused kernels must match.

For one image with Tweedie estimate x0hat, measurement y, policy width r and temperature Z:

    x0_i = x0hat + r eps_i                 eps_i = stream(seed)[i], i = 1..N
    log p_i = -(E(y, A x0_i) - shift) / Z  E = ||.||^2 (Gaussian, shift = Z_raw) or ||.||_1 (Poisson)
    w_i = p_i - (sum_j p_j - p_i) / (N - 1)
    v = -(1 / (N r)) sum_i w_i eps_i

To keep exp in range whatever the residuals, the rewards are taken relative to their maximum m:
the functions return (v_unit, m) with v = exp(m) v_unit, so the published scale is kept exactly
(it matters under momentum) and nothing overflows.

`eager` holds the N x D noise at once (the readable reference); `chunked` streams it in chunks and
regenerates each chunk in a second pass (memory O(chunk x D)). Both draw the same noise from a
`stream(seed, start, n, numel, device, out=None) -> (n, numel)`: by default `torch_normal` (torch's
own generator, one per block of samples: fast on any device); the fused kernels draw `philox_normal`
in registers, and their tests pass `stream=philox_normal` here to compare on the very same numbers.

The streaming paths allocate their chunk buffers once per call and write into them (`out=`), and
give freed pages back after each chunk: with fresh buffers per chunk, glibc kept the freed ones
resident and the CPU's peak resident memory grew with N (two 3 x 64 x 64 images, chunk 256: +207 MiB
at N = 256, +981 MiB at N = 8192) although no N x D tensor was ever live; now +234 to +283 MiB,
flat from the third chunk on (benchmarks/bench_memory.py).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable

import torch
from torch import Tensor

from .philox import philox_normal

# stream(seed, sample_start, num_samples, numel, device, out=None): `out`, when given, is a
# contiguous (num_samples, numel) float32 tensor on `device` that receives the samples
NoiseStream = Callable[..., Tensor]

__all__ = ["torch_normal", "weighted_sum", "philox_normal", "NoiseStream", "log_rewards", "loo_weights",
           "direction_from_energies", "dpg_direction_eager", "dpg_direction_batched",
           "dpg_direction_chunked"]


STREAM_BLOCK = 64


def torch_normal(seed: int, sample_start: int, num_samples: int, numel: int,
                 device: torch.device | str = "cpu", out: Tensor | None = None) -> Tensor:
    """eps[i] for samples sample_start..+num_samples: (num_samples, numel) float32 on `device`,
    written into `out` when given (a contiguous tensor of that shape, e.g. a reused chunk buffer).

    Samples come in fixed blocks of STREAM_BLOCK, block k drawn from a torch generator seeded by
    (seed, k), so a sample's noise does not depend on how the samples are chunked. Bits are the same
    on every machine of one device type (CPU and CUDA generators give different numbers).
    """
    device = torch.device(device)
    if out is None:
        out = torch.empty(num_samples, numel, device=device)
    elif out.shape != (num_samples, numel) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape {(num_samples, numel)}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    end = sample_start + num_samples
    for k in range(sample_start // STREAM_BLOCK, (end - 1) // STREAM_BLOCK + 1):
        gen = torch.Generator(device=device).manual_seed((seed + k * 0x9E3779B97F4A7C15) % 2**63)
        lo, hi = k * STREAM_BLOCK, (k + 1) * STREAM_BLOCK
        if sample_start <= lo and hi <= end:  # a whole block: draw it in place
            torch.randn(STREAM_BLOCK, numel, generator=gen, device=device,
                        out=out[lo - sample_start : hi - sample_start])
        else:
            block = torch.randn(STREAM_BLOCK, numel, generator=gen, device=device)
            a, b = max(lo, sample_start), min(hi, end)
            out[a - sample_start : b - sample_start] = block[a - lo : b - lo]
    return out


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library or platform)."""
    if os.name != "posix" or os.uname().sysname != "Linux":
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _release_freed(device: torch.device) -> None:
    """Give the pages of freed CPU buffers back to the system (glibc keeps them otherwise).

    The chunk buffers of this module are reused, but the operator and the noise model allocate
    their own temporaries per chunk; glibc serves those from its heap once they have been freed
    once (its mmap threshold adapts upwards) and fragmentation then grows the resident set chunk
    after chunk. malloc_trim(0) returns the free pages at once; on other platforms nothing is done.
    """
    if device.type == "cpu" and (trim := _malloc_trim()) is not None:
        trim(0)


def _draw(stream: NoiseStream, out: Tensor, seed: int, start: int, n: int, numel: int, device) -> Tensor:
    """The stream's samples written into the buffer `out` (n, numel): in place for this package's
    streams, drawn and copied for others (custom test streams need no `out` parameter)."""
    if stream is torch_normal or stream is philox_normal:
        return stream(seed, start, n, numel, device, out=out)
    return out.copy_(stream(seed, start, n, numel, device))


def weighted_sum(w: Tensor, eps: Tensor, acc: Tensor | None = None, scratch: Tensor | None = None) -> Tensor:
    """sum_i w_i eps_i in float64, (n,) x (n, D) -> (D,) (or batched (B, n) x (B, n, D) -> (B, D)).

    Taken STREAM_BLOCK samples at a time: float64 accuracy (so the result does not depend on how
    the samples were chunked) without a float64 copy of the whole noise. With `acc` (float64, the
    result's shape) the sum is added into it in place and `acc` returned: a caller streaming chunks
    accumulates block after block exactly as one call over all the samples would. `scratch`: a
    float64 buffer of at least STREAM_BLOCK x D elements per item, reused instead of allocated.
    """
    for s in range(0, eps.shape[-2], STREAM_BLOCK):
        block = eps[..., s : s + STREAM_BLOCK, :]
        if scratch is None:  # one float64 block buffer per call, reused for every block
            scratch = torch.empty(block.numel(), dtype=torch.float64, device=eps.device)
        part64 = scratch[: block.numel()].view(block.shape)
        part64.copy_(block)
        part = torch.matmul(w[..., None, s : s + STREAM_BLOCK], part64)[..., 0, :]
        if acc is None:
            acc = part
        else:
            acc += part
    return acc


def log_rewards(energies: Tensor, z: Tensor, shift: Tensor) -> Tensor:
    """log p_i = -(E_i - shift) / Z in float64, energies (N,)."""
    return -(energies.double() - shift.double()) / z.double().clamp_min(torch.finfo(torch.float64).tiny)


def loo_weights(log_p: Tensor) -> tuple[Tensor, Tensor]:
    """Leave-one-out weights relative to the largest reward, over the last dim (N):
    (w_i / exp(m), m), float64."""
    n = log_p.shape[-1]
    if n < 2:
        raise ValueError(f"DPG needs at least 2 Monte Carlo samples for its baseline, got {n}")
    m = log_p.max(dim=-1, keepdim=True).values
    p = torch.exp(log_p - m)
    return p - (p.sum(dim=-1, keepdim=True) - p) / (n - 1), m.squeeze(-1)


def direction_from_energies(energies: Tensor, z: Tensor, z_raw: Tensor, gaussian_shift: bool) -> tuple[Tensor, Tensor]:
    """Per-sample weights already divided by N, and m: v_unit = -(1/r) sum_i weights_i eps_i.

    energies (N,) with scalar z, z_raw; or (B, N) with z, z_raw of shape (B,).
    """
    z, z_raw = z.double(), z_raw.double()
    if energies.dim() == 2:
        z, z_raw = z[:, None], z_raw[:, None]
    shift = z_raw if gaussian_shift else torch.zeros_like(z_raw)
    w, m = loo_weights(log_rewards(energies, z, shift))
    return w / energies.shape[-1], m


def _energies(x0hat: Tensor, y: Tensor, operator, noise, r: float, eps: Tensor) -> Tensor:
    states = x0hat.unsqueeze(0) + r * eps.view(-1, *x0hat.shape).to(x0hat.dtype)
    return noise.energy(y.unsqueeze(0), operator(states))


def dpg_direction_eager(
    x0hat: Tensor, y: Tensor, operator, noise, r: Tensor, z: Tensor, z_raw: Tensor,
    num_samples: int, seed: int, stream: NoiseStream = torch_normal,
) -> tuple[Tensor, Tensor]:
    """One image: x0hat (C, H, W), y its measurement (no batch dim), operator item-level.

    Returns (v_unit (C, H, W) float32, m (float64 scalar)) with v = exp(m) v_unit.
    """
    with torch.no_grad():
        eps = stream(seed, 0, num_samples, x0hat.numel(), x0hat.device)
        rr = float(r)
        energies = _energies(x0hat, y, operator, noise, rr, eps)
        w, m = direction_from_energies(energies, z, z_raw, noise.reward_shift_uses_z_raw)
        v = -weighted_sum(w, eps) / rr
        return v.view_as(x0hat).to(x0hat.dtype), m


def dpg_direction_chunked(
    x0hat: Tensor, y: Tensor, operator, noise, r: Tensor, z: Tensor, z_raw: Tensor,
    num_samples: int, seed: int, chunk_size: int = 256, stream: NoiseStream = torch_normal,
) -> tuple[Tensor, Tensor]:
    """As `dpg_direction_eager`, holding at most `chunk_size` x D noise at a time."""
    with torch.no_grad():
        d, rr = x0hat.numel(), float(r)
        starts = range(0, num_samples, chunk_size)
        # buffers reused by every chunk of both passes (see the module note on resident memory)
        eps_buf = torch.empty(min(chunk_size, num_samples) * d, device=x0hat.device)
        states_buf = torch.empty(min(chunk_size, num_samples) * d, device=x0hat.device, dtype=x0hat.dtype)
        flat = x0hat.reshape(1, d)
        energies = None
        for s in starts:
            n = min(chunk_size, num_samples - s)
            eps = _draw(stream, eps_buf[: n * d].view(n, d), seed, s, n, d, x0hat.device)
            states = states_buf[: n * d].view(n, d)
            torch.mul(eps, rr, out=states)  # r eps, then + x0hat: the eager path's roundings
            states += flat
            e = noise.energy(y.unsqueeze(0), operator(states.view(n, *x0hat.shape)))
            if energies is None:
                energies = torch.empty(num_samples, dtype=e.dtype, device=e.device)
            energies[s : s + n] = e
            del e
            _release_freed(x0hat.device)
        w, m = direction_from_energies(energies, z, z_raw, noise.reward_shift_uses_z_raw)
        # float64 accumulation: the sum does not depend on how the samples are chunked
        v = torch.zeros(d, device=x0hat.device, dtype=torch.float64)
        scratch = torch.empty(STREAM_BLOCK * d, device=x0hat.device, dtype=torch.float64)
        for s in starts:
            n = min(chunk_size, num_samples - s)
            eps = _draw(stream, eps_buf[: n * d].view(n, d), seed, s, n, d, x0hat.device)
            weighted_sum(w[s : s + n], eps, acc=v, scratch=scratch)
        return (-v / rr).view_as(x0hat).to(x0hat.dtype), m


def dpg_direction_batched(
    x0hat: Tensor, y: Tensor, operator, noise, r: Tensor, z: Tensor, z_raw: Tensor,
    num_samples: int, seeds: list[int], chunk_size: int = 256, stream: NoiseStream = torch_normal,
) -> tuple[Tensor, Tensor]:
    """The chunked direction for a batch that shares one operator, vectorised over the items.

    x0hat (B, C, H, W), y (B, ...), r, z, z_raw (B,); item b's noise from seeds[b]. Returns
    (v_unit (B, C, H, W), m (B,)): the same numbers as `dpg_direction_chunked` item by item,
    without a Python loop over items (what makes small images and large batches fast).
    """
    with torch.no_grad():
        b, d = x0hat.shape[0], x0hat[0].numel()
        rr = r.to(x0hat.dtype).view(b, 1, 1)
        flat = x0hat.reshape(b, 1, d)
        # buffers reused by every chunk of both passes (see the module note on resident memory);
        # a chunk of n samples uses their contiguous prefix
        size = b * min(chunk_size, num_samples) * d
        eps_buf = torch.empty(size, device=x0hat.device)
        states_buf = torch.empty(size, device=x0hat.device, dtype=x0hat.dtype)

        def chunk(s: int, n: int) -> Tensor:  # (B, n, D)
            eps = eps_buf[: b * n * d].view(b, n, d)
            for k, seed in enumerate(seeds):
                _draw(stream, eps[k], seed, s, n, d, x0hat.device)
            return eps

        starts = range(0, num_samples, chunk_size)
        energies = None
        for s in starts:
            n = min(chunk_size, num_samples - s)
            states = states_buf[: b * n * d].view(b, n, d)
            torch.mul(chunk(s, n), rr, out=states)
            states += flat
            ax = operator(states.view(b * n, *x0hat.shape[1:])).view(b, n, *y.shape[1:])
            e = noise.energy(y.unsqueeze(1), ax, batch_dims=2)
            if energies is None:
                energies = torch.empty(b, num_samples, dtype=e.dtype, device=e.device)
            energies[:, s : s + n] = e
            del ax, e
            _release_freed(x0hat.device)
        w, m = direction_from_energies(energies, z, z_raw, noise.reward_shift_uses_z_raw)
        v = torch.zeros(b, d, device=x0hat.device, dtype=torch.float64)
        scratch = torch.empty(b * STREAM_BLOCK * d, device=x0hat.device, dtype=torch.float64)
        for s in starts:
            n = min(chunk_size, num_samples - s)
            weighted_sum(w[:, s : s + n], chunk(s, n), acc=v, scratch=scratch)
        return (-v / r.double().view(b, 1)).view_as(x0hat).to(x0hat.dtype), m
