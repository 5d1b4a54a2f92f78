"""The DPG direction fused in Triton (spec, steps 3 to 6): no N x D tensor ever exists.

Pass 1, per (output block, sample tile): draw eps in registers at the gathered elements
(`kernels.fusion`), form the residual e - r A eps with e = y - A x0hat (A is linear, so
A(x0hat + r eps) = A x0hat + r A eps), reduce it (squared L2 or L1) over the block and write one
partial per (block, sample). The partials are summed in float64 in a fixed order, giving the N
energies; rewards, leave-one-out weights and normaliser are the reference's own functions on that
N-vector. Pass 2, per (element block, sample split): regenerate the same eps and accumulate
sum_i w_i eps_i over the split's sample tiles in a fixed order; the splits are summed in float64.
No atomics, and the launch shapes depend only on (N, D) and the config, never on the GPU: the same
seed gives the same bits.

The noise is `kernels.philox.philox_normal`: Philox4x32-10 of the counter (element, sample, 0, 0)
under the 64-bit seed, the first two words to uniforms, Box-Muller's cosine branch. It agrees with
the torch definition up to the last bits of log and cos (about 5e-7; see FusedConfig.fast_math).

Why the residual is formed directly rather than as ||e||^2 - 2r <A^T e, eps> + r^2 ||A eps||^2: with
A a gather of fan-in K, A eps costs the same K draws per output either way, the direct form is the
more accurate one, and it is the only one valid for L1 (Poisson). Blur (a wide dense stencil,
about 2 x 61 taps per output even when separable) is not fused: it falls back to chunked.

On CUDA tensors the kernels are compiled. On CPU tensors they need Triton's interpreter, which is
chosen when `triton` is first imported with TRITON_INTERPRET=1 (a correctness path, not a fast one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

try:  # where Triton 3.x keeps CUDA's approximate math
    from triton.language.extra.cuda import libdevice
except ImportError:  # pragma: no cover - other Triton layouts
    from triton.language.extra import libdevice

from .fusion import GatherPlan, apply_plan, energy_kind
from .reference import direction_from_energies

__all__ = ["FusedConfig", "DEFAULT_CONFIG", "dpg_direction_fused", "philox_normal_triton",
           "energies_fused", "weighted_noise_sum", "num_splits", "INTERPRETED", "usable_on"]


@dataclass(frozen=True)
class FusedConfig:
    """Launch shapes. None of them changes what is computed, only the float summation order.

    energy_block: (samples, outputs) per pass-1 program; combine_block: (samples, elements) per
    pass-2 program; target_programs: pass 2 splits the samples until about this many programs
    run (a function of N and D only, never of the GPU, so the bits do not move between cards);
    splits: force that many sample splits in pass 2; fast_math: lg2.approx and cos.approx for
    Box-Muller (compiled CUDA only: about 2.4x fewer instructions per draw, eps within about 1e-6
    of the torch definition except where u1 is within 1e-6 of 1).
    """

    energy_block: tuple[int, int] = (16, 128)
    combine_block: tuple[int, int] = (16, 128)
    num_warps: int = 4
    target_programs: int = 2048
    splits: int | None = None
    fast_math: bool = False


@triton.jit
def _box_muller(w0, w1, FAST_MATH: tl.constexpr):
    """Box-Muller's cosine branch of two Philox words, as `kernels.philox.philox_normal`."""
    u1 = tl.maximum(tl.uint_to_uniform_float(w0), 1.0e-7)
    u2 = tl.uint_to_uniform_float(w1)
    if FAST_MATH:
        # the SFU's lg2.approx and cos.approx: a few ulp from the accurate ones, far cheaper
        lg = -1.3862943611198906 * libdevice.fast_log2f(u1)
        return tl.sqrt(lg) * libdevice.fast_cosf(6.283185307179586 * u2)
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)


@triton.jit(do_not_specialize=["seed"])
def _noise_kernel(out_ptr, seed, start, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  FAST_MATH: tl.constexpr):
    """out[i, j] = eps[start + i, j]: the kernels' noise, for tests."""
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    zero = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.uint32)
    w0, w1, _, _ = tl.philox(seed, offs_d.to(tl.uint32)[None, :] + zero,
                             (start + offs_n).to(tl.uint32)[:, None] + zero, zero, zero)
    eps = _box_muller(w0, w1, FAST_MATH)
    keep = (offs_n < N)[:, None] & (offs_d < D)[None, :]
    tl.store(out_ptr + offs_n[:, None] * D + offs_d[None, :], eps, mask=keep)


@triton.jit(do_not_specialize=["seed"])
def _energy_kernel(e_ptr, idx_ptr, wts_ptr, part_ptr, seed, r, N, M,
                   K: tl.constexpr, L1: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                   FAST_MATH: tl.constexpr):
    """part[block, i] = sum over the block's outputs o of |e_o - r (A eps_i)_o|^p (p = 2 or 1)."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    zero = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.uint32)
    sample = offs_n.to(tl.uint32)[:, None] + zero
    a_eps = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(K):
        # padded outputs gather element 0 with weight 0: finite, and they add nothing
        j = tl.load(idx_ptr + k * M + offs_m, mask=mask_m, other=0)
        a = tl.load(wts_ptr + k * M + offs_m, mask=mask_m, other=0.0)
        w0, w1, _, _ = tl.philox(seed, j.to(tl.uint32)[None, :] + zero, sample, zero, zero)
        eps = _box_muller(w0, w1, FAST_MATH)
        a_eps += a[None, :] * eps
    e = tl.load(e_ptr + offs_m, mask=mask_m, other=0.0)
    res = e[None, :] - r * a_eps
    val = tl.abs(res) if L1 else res * res
    val = tl.where(mask_m[None, :], val, 0.0)
    tl.store(part_ptr + pid_m * N + offs_n, tl.sum(val, axis=1), mask=offs_n < N)


@triton.jit(do_not_specialize=["seed"])
def _combine_kernel(w_ptr, part_ptr, seed, N, D, tiles_per_split,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FAST_MATH: tl.constexpr):
    """part[split, j] = sum over the split's samples i of w_i eps[i, j], tiles in order."""
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    first = tl.program_id(1) * tiles_per_split
    zero = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.uint32)
    elem = offs_d.to(tl.uint32)[None, :] + zero
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for t in range(tiles_per_split):
        offs_n = (first + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        # samples past N get weight 0; their eps are finite (u1 >= 1e-7)
        w = tl.load(w_ptr + offs_n, mask=offs_n < N, other=0.0)
        w0, w1, _, _ = tl.philox(seed, elem, offs_n.to(tl.uint32)[:, None] + zero, zero, zero)
        eps = _box_muller(w0, w1, FAST_MATH)
        acc += w[:, None] * eps
    tl.store(part_ptr + tl.program_id(1) * D + offs_d, tl.sum(acc, axis=0), mask=offs_d < D)


def _interpreted(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


# Triton decides at decoration time whether a kernel is compiled or interpreted; its own library
# functions (tl.philox) were decorated when triton was first imported. Both must agree.
INTERPRETED = _interpreted(_energy_kernel)
_CONSISTENT = _interpreted(tl.philox) is INTERPRETED
# The approximate functions exist on CUDA only. The interpreter runs each program as numpy calls,
# so there fewer, larger programs are much faster.
DEFAULT_CONFIG = (FusedConfig((64, 256), (64, 256)) if INTERPRETED else FusedConfig(fast_math=True))


def usable_on(device: torch.device) -> str | None:
    """None when the kernels can run on tensors of `device`, else why not."""
    if not _CONSISTENT:
        return ("TRITON_INTERPRET changed after triton was imported: its library and these kernels "
                "disagree on interpretation (set it before anything imports triton)")
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if INTERPRETED:
            return None
        return "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)"
    return f"no Triton backend for {device.type} tensors"


def _check_seed(seed: int) -> int:
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be a 64-bit unsigned integer, got {seed}")
    return seed


def _fast(cfg: FusedConfig) -> bool:
    if cfg.fast_math and INTERPRETED:
        raise ValueError("fast_math uses CUDA's approximate functions; the interpreter has none")
    return cfg.fast_math


def philox_normal_triton(seed: int, sample_start: int, num_samples: int, numel: int,
                         device: torch.device | str = "cpu", config: FusedConfig = DEFAULT_CONFIG) -> Tensor:
    """The kernels' own noise eps[i, j] as a (num_samples, numel) float32 tensor (for tests)."""
    seed = _check_seed(seed)
    out = torch.empty(num_samples, numel, device=device, dtype=torch.float32)
    bn, bd = config.combine_block
    grid = (triton.cdiv(numel, bd), triton.cdiv(num_samples, bn))
    _noise_kernel[grid](out, seed, sample_start, num_samples, numel, BLOCK_N=bn, BLOCK_D=bd,
                        FAST_MATH=_fast(config), num_warps=config.num_warps)
    return out


def energies_fused(plan: GatherPlan, e: Tensor, r: float, num_samples: int, seed: int, l1: bool,
                   config: FusedConfig = DEFAULT_CONFIG) -> Tensor:
    """Pass 1: the energies over the plan's kept outputs, (num_samples,) float64.

    e (M,) float32 holds y - A x0hat at the kept outputs.
    """
    bn, bm = config.energy_block
    m = plan.kept
    if m == 0:
        return torch.zeros(num_samples, device=e.device, dtype=torch.float64)
    nblocks = triton.cdiv(m, bm)
    part = torch.empty(nblocks, num_samples, device=e.device, dtype=torch.float32)
    grid = (nblocks, triton.cdiv(num_samples, bn))
    _energy_kernel[grid](e, plan.idx, plan.wts, part, _check_seed(seed), float(r), num_samples, m,
                         K=plan.fan_in, L1=bool(l1), BLOCK_N=bn, BLOCK_M=bm, FAST_MATH=_fast(config),
                         num_warps=config.num_warps)
    return part.double().sum(0)


def num_splits(num_samples: int, numel: int, config: FusedConfig = DEFAULT_CONFIG) -> tuple[int, int]:
    """(splits, sample tiles per split) of pass 2: from (N, D) and the config only."""
    bn, bd = config.combine_block
    tiles = triton.cdiv(num_samples, bn)
    splits = config.splits or math.ceil(config.target_programs / triton.cdiv(numel, bd))
    per_split = triton.cdiv(tiles, max(1, min(tiles, splits)))
    return triton.cdiv(tiles, per_split), per_split  # no split left empty


def weighted_noise_sum(weights: Tensor, numel: int, seed: int, config: FusedConfig = DEFAULT_CONFIG) -> Tensor:
    """Pass 2: sum_i weights_i eps_i, (numel,) float64; weights (N,) float32."""
    bn, bd = config.combine_block
    n = weights.shape[0]
    splits, per_split = num_splits(n, numel, config)
    part = torch.empty(splits, numel, device=weights.device, dtype=torch.float32)
    grid = (triton.cdiv(numel, bd), splits)
    _combine_kernel[grid](weights, part, _check_seed(seed), n, numel, per_split, BLOCK_N=bn, BLOCK_D=bd,
                          FAST_MATH=_fast(config), num_warps=config.num_warps)
    return part.double().sum(0)


def dpg_direction_fused(
    x0hat: Tensor, y: Tensor, plan: GatherPlan, noise, r: Tensor, z: Tensor, z_raw: Tensor,
    num_samples: int, seed: int, ax0: Tensor | None = None, config: FusedConfig = DEFAULT_CONFIG,
) -> tuple[Tensor, Tensor]:
    """As `kernels.reference.dpg_direction_eager` for one image, with A given by `plan`.

    x0hat (C, H, W), y the item's measurement, ax0 = A x0hat as the operator computes it (taken
    from the plan when None). `noise` must reduce squared L2 (Gaussian) or L1 (Poisson) energies,
    see `kernels.fusion.energy_kind`. Returns (v_unit (C, H, W), m float64), v = exp(m) v_unit.
    """
    kind = energy_kind(noise)
    if kind is None:
        raise ValueError(f"the fused kernels reduce squared L2 or L1 energies; {noise!r} has another")
    if tuple(x0hat.shape) != plan.image_shape:
        raise ValueError(f"plan built for images {plan.image_shape}, got x0hat {tuple(x0hat.shape)}")
    if y.numel() != plan.out_numel:
        raise ValueError(f"the operator gives {plan.out_numel} outputs, the measurement has {y.numel()}")
    if num_samples < 2:
        raise ValueError(f"DPG needs at least 2 Monte Carlo samples for its baseline, got {num_samples}")
    with torch.no_grad():
        rr = float(r)
        ax = (ax0 if ax0 is not None else apply_plan(plan, x0hat)).reshape(-1).float()
        resid = y.reshape(-1).float() - ax
        if plan.keep is None:
            e, dropped = resid, resid[:0]
        else:
            kept = torch.zeros_like(resid, dtype=torch.bool).index_fill_(0, plan.keep, True)
            e, dropped = resid[plan.keep], resid[~kept]
        # outputs the state never reaches: the same energy for every sample
        const = dropped.double().abs().sum() if kind == "l1" else dropped.double().square().sum()
        energies = energies_fused(plan, e.contiguous(), rr, num_samples, seed, kind == "l1", config) + const
        w, m = direction_from_energies(energies, z, z_raw, noise.reward_shift_uses_z_raw)
        v = weighted_noise_sum(w.float().contiguous(), x0hat.numel(), seed, config)
        return (-v / rr).view(x0hat.shape).to(x0hat.dtype), m
