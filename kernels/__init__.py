"""Guidance kernels (installed as `dpgkit.kernels`): the DPG direction, eager, chunked and fused."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .philox import philox_normal
from .reference import dpg_direction_chunked, dpg_direction_eager

__all__ = ["dpg_direction", "philox_normal", "BACKENDS"]

BACKENDS = ("auto", "eager", "chunked", "triton")


def dpg_direction(
    x0hat: Tensor, y: Tensor, operator, noise, r: Tensor, z: Tensor, z_raw: Tensor,
    num_samples: int, seeds: Sequence[int], backend: str = "auto", chunk_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """The DPG direction for a batch: x0hat (B, C, H, W), y (B, ...), r, z, z_raw (B,).

    Item b draws its noise from seeds[b] and uses operator.item(b). Returns (v_unit (B, C, H, W),
    m (B,) float64) with the published v = exp(m) v_unit (see kernels.reference).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown guidance backend {backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        backend = "chunked"
    vs, ms = [], []
    for b in range(x0hat.shape[0]):
        args = (x0hat[b], y[b], operator.item(b), noise, r[b], z[b], z_raw[b], num_samples, seeds[b])
        if backend == "eager":
            v, m = dpg_direction_eager(*args)
        elif backend == "chunked":
            v, m = dpg_direction_chunked(*args, chunk_size=chunk_size)
        else:
            raise NotImplementedError("the triton backend is not built yet")
        vs.append(v)
        ms.append(m)
    return torch.stack(vs), torch.stack(ms)
