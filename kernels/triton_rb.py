"""The Rao-Blackwellized DPG direction fused in Triton: m coordinates per sample instead of D.

For the diagonal row spaces of `kernels.rao_blackwell` (masks, average pooling, channel means),
A V a = coef * a at fixed outputs: the measurement of a state is A x0hat + r coef * a, a gather
table of fan-in 1 over the m coordinates. So the fused DPG kernels of `kernels.triton_dpg` run
unchanged on a table (idx = 0..m-1, wts = coef) over "images" of m entries: pass 1 draws
a[i, k] = Philox(seed; k, i) in registers and reduces each sample's residual energy, pass 2
regenerates them and accumulates sum_i w_i a_i (m,). Only then is the result lifted to the image,
V (sum_i w_i a_i), in torch (a scatter, a block repeat or a channel broadcast: O(D) once).

The noise is `kernels.philox.philox_normal` over (sample, coordinate), so the torch reference fed
that stream (`rb_direction_eager(..., stream=philox_normal)`) sees the very same numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fusion import GatherPlan, energy_kind
from .rao_blackwell import DIAGONAL_KINDS, RowSpace, _diagonal_parts
from .reference import direction_from_energies
from .triton_dpg import DEFAULT_CONFIG, FusedConfig, energies_fused, weighted_noise_sum

__all__ = ["rb_direction_fused", "coordinate_plan"]


def coordinate_plan(space: RowSpace) -> GatherPlan:
    """The fan-in-1 table of A V over the m coordinates (the touched outputs only)."""
    if space.kind not in DIAGONAL_KINDS:
        raise ValueError(f"the fused kernels take the diagonal row spaces {DIAGONAL_KINDS}, got {space.kind!r}")
    m = space.rank
    idx = torch.arange(m, device=space.coef.device, dtype=torch.int32)[None].contiguous()
    return GatherPlan(f"rb-{space.kind}", (1, 1, m), idx, space.coef.float()[None].contiguous(), None, m)


def rb_direction_fused(
    x0hat: Tensor, y: Tensor, operator, space: RowSpace, noise, r: Tensor, z: Tensor, z_raw: Tensor,
    num_samples: int, seed: int, config: FusedConfig = DEFAULT_CONFIG,
) -> tuple[Tensor, Tensor]:
    """As `kernels.rao_blackwell.rb_direction_eager` for one image, fused: x0hat (C, H, W), y the
    item's measurement, `space` the operator's diagonal row space (from `row_space_of`).

    `noise` must reduce squared L2 (Gaussian) or L1 (Poisson) energies. Returns (v_unit (C, H, W),
    m float64) with v_RB = exp(m) v_unit.
    """
    kind = energy_kind(noise)
    if kind is None:
        raise ValueError(f"the fused kernels reduce squared L2 or L1 energies; {noise!r} has another")
    if num_samples < 2:
        raise ValueError(f"DPG needs at least 2 Monte Carlo samples for its baseline, got {num_samples}")
    plan = coordinate_plan(space)
    with torch.no_grad():
        rr = float(r)
        yk, ak, const = _diagonal_parts(space, y, operator(x0hat[None]), noise)
        e = (yk - ak).reshape(-1).float().contiguous()
        energies = energies_fused(plan, e, rr, num_samples, seed, kind == "l1", config) + const
        w, m = direction_from_energies(energies, z, z_raw, noise.reward_shift_uses_z_raw)
        if space.rank == 0:  # nothing observed: no coordinate to draw
            s = torch.zeros(0, device=x0hat.device, dtype=torch.float64)
        else:
            s = weighted_noise_sum(w.float().contiguous(), space.rank, seed, config)
        return (-space.lift(s[None])[0] / rr).view_as(x0hat).to(x0hat.dtype), m
