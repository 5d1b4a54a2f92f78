"""The Monte Carlo noise of DPG as a counter-based stream: eps[i, j] is a pure function of
(seed, sample i, element j).

This torch implementation is the definition; the Triton kernels draw the very same numbers in
registers with `tl.philox` (Philox4x32-10 with counter (j, i, 0, 0) and key = the 64-bit seed),
then `tl.uint_to_uniform_float` and Box-Muller, so eps does not depend on the chunk size, the batch
or the device. The eager and chunked paths draw `reference.torch_normal` by default (Philox in
torch is ~100x slower on the CPU) and this stream only when passed `stream=philox_normal`, as the
kernels' tests do.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["philox4x32", "philox_normal"]

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_ROUNDS = 10


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of a * b for a uint32 constant and uint32 values held in int64.

    Split b in 16-bit halves so that no intermediate leaves the int64 range.
    """
    b_hi, b_lo = b >> 16, b & 0xFFFF
    lo_part = a * b_lo  # < 2^48
    hi_part = a * b_hi  # < 2^48, weight 2^16
    low = (lo_part + ((hi_part & 0xFFFF) << 16)) & _MASK32
    high = (hi_part + (lo_part >> 16)) >> 16
    return high & _MASK32, low


def philox4x32(seed: int, c0: Tensor, c1: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 of the counter (c0, c1, 0, 0) under the key (seed lo, seed hi), as int64 words."""
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0 = c0.to(torch.int64) & _MASK32
    c1 = c1.to(torch.int64) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _to_uniform(word: Tensor) -> Tensor:
    """Triton's uint_to_uniform_float: the word as int32, negatives folded, times 2^-31 (just below)."""
    signed = torch.where(word >= 2**31, word - 2**32, word)
    folded = torch.where(signed < 0, -signed - 1, signed).to(torch.int32)
    return folded.to(torch.float32) * 4.6566127342e-10


def philox_normal(
    seed: int, sample_start: int, num_samples: int, numel: int, device: torch.device | str = "cpu",
    out: Tensor | None = None,
) -> Tensor:
    """Standard normals eps[i, j] for samples sample_start..+num_samples and elements 0..numel-1.

    Returns (num_samples, numel) float32 on `device`, written into `out` when given.
    """
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be a 64-bit unsigned integer, got {seed}")
    if numel >= 2**31:
        raise ValueError(f"at most 2^31 - 1 elements per image, got {numel}")
    j = torch.arange(numel, device=device, dtype=torch.int64)
    i = torch.arange(sample_start, sample_start + num_samples, device=device, dtype=torch.int64)
    w0, w1, _, _ = philox4x32(seed, j.expand(num_samples, numel), i[:, None].expand(num_samples, numel))
    u1 = _to_uniform(w0).clamp_min(1.0e-7)
    u2 = _to_uniform(w1)
    eps = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)
    return eps if out is None else out.copy_(eps)
