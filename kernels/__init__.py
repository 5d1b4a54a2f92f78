"""Guidance kernels (installed as `dpgkit.kernels`): the DPG direction, eager, chunked and fused.

Estimators: "published" (the paper's, `kernels.reference` and `kernels.triton_dpg`) and
"rao-blackwell" (its Rao-Blackwellization over the operator's row space, `kernels.rao_blackwell`
and `kernels.triton_rb`: the same expectation, less variance, N x m normals instead of N x D).

Backends: "eager" (the readable reference, N x D in memory), "chunked" (the same numbers in
O(chunk x D) memory), "triton" (fused kernels, `kernels.triton_dpg`, for the operators listed in
`kernels.fusion`), "auto" (triton on CUDA when the problem is fused, chunked otherwise). A problem
the fused kernels cannot run (another operator or noise model, no usable Triton) falls back to
chunked, logged once per reason.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from .fusion import GatherPlan, apply_plan, energy_kind, plan_for
from .philox import philox_normal
from .rao_blackwell import DIAGONAL_KINDS, rb_direction_eager, rb_direction_streamed, row_space_of
from .reference import dpg_direction_batched, dpg_direction_chunked, dpg_direction_eager

__all__ = ["dpg_direction", "fused_plan", "self_check", "philox_normal", "BACKENDS", "ESTIMATORS"]

BACKENDS = ("auto", "eager", "chunked", "triton")
ESTIMATORS = ("published", "rao-blackwell")

log = logging.getLogger(__name__)
_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.warning(message)


@functools.cache
def _triton():
    """The fused module, or why it cannot be imported here (a string)."""
    try:
        from . import triton_dpg
    except Exception as err:  # no triton, or a triton that fails to initialise on this machine
        return f"triton is not usable here ({type(err).__name__}: {err})"
    return triton_dpg


def fused_plan(x0hat: Tensor, operator, noise, ax0: Tensor | None = None) -> GatherPlan | str:
    """The fused kernels' table for one item (x0hat (C, H, W), item-level operator), or why not.

    The table is checked against the operator itself on x0hat (`ax0` = operator(x0hat), computed
    when None), so an operator whose meaning differs from what its type promises is not fused.
    """
    if energy_kind(noise) is None:
        return f"noise model {noise!r} has no fused energy (squared L2 or L1)"
    module = _triton()
    if isinstance(module, str):
        return module
    reason = module.usable_on(x0hat.device)
    if reason is not None:
        return reason
    plan = plan_for(operator, x0hat.shape, x0hat.device)
    if isinstance(plan, str):
        return plan
    ax = (operator(x0hat[None]) if ax0 is None else ax0).reshape(-1).float()
    if ax.numel() != plan.out_numel:
        return f"{type(operator).__name__} gives {ax.numel()} outputs, its fused table {plan.out_numel}"
    if not torch.allclose(apply_plan(plan, x0hat), ax, rtol=1e-4, atol=1e-5):
        return f"{type(operator).__name__} does not compute what its fused table ({plan.kind}) does"
    return plan


def _fused_or_none(x0hat: Tensor, operator, noise, backend: str, y: Tensor, r: Tensor, z: Tensor, z_raw: Tensor):
    """(module, plan, ax0) when this item runs fused, else None (after logging why, once)."""
    module = _triton()
    # the interpreter is a correctness path: auto never picks it
    if backend == "auto" and (x0hat.device.type != "cuda" or isinstance(module, str) or module.INTERPRETED):
        return None
    ax0 = operator(x0hat[None])
    plan = fused_plan(x0hat, operator, noise, ax0)
    if isinstance(plan, str):
        _log_once(f"DPG guidance for {type(operator).__name__} with {type(noise).__name__} noise: "
                  f"backend {backend!r} falls back to 'chunked' ({plan})")
        return None
    failure = self_check(module, x0hat, y, operator, noise, plan, ax0, r, z, z_raw)
    if failure is not None:
        _log_once(f"DPG guidance for {type(operator).__name__} with {type(noise).__name__} noise: the fused "
                  f"kernel ({plan.kind}, {energy_kind(noise)}) failed its self-check on {x0hat.device}, "
                  f"backend {backend!r} falls back to 'chunked' ({failure})")
        return None
    return module, plan, ax0


SELF_CHECK_SAMPLES = 16
_checked: dict[tuple[str, str, str], str | None] = {}


def self_check(module, x0hat: Tensor, y: Tensor, operator, noise, plan: GatherPlan, ax0: Tensor,
               r: Tensor, z: Tensor, z_raw: Tensor) -> str | None:
    """Before a fused kernel kind first runs on a device: the kernel against the eager reference on the
    same Philox noise, on this very item with a few samples. None when they agree, else why not.

    Done once per (device, operator kind, energy kind) and remembered, so a kernel that was never
    run on this hardware can fail safely into the chunked path instead of giving wrong guidance.
    """
    key = (str(x0hat.device), plan.kind.rstrip("0123456789"), str(energy_kind(noise)))
    if key not in _checked:
        try:
            v, m = module.dpg_direction_fused(x0hat, y, plan, noise, r, z, z_raw, SELF_CHECK_SAMPLES, 12345, ax0=ax0)
            v_ref, m_ref = dpg_direction_eager(x0hat, y, operator, noise, r, z, z_raw, SELF_CHECK_SAMPLES, 12345,
                                               stream=philox_normal)
            gap = float((v.double() * torch.exp(m - m_ref) - v_ref.double()).norm()
                        / v_ref.double().norm().clamp_min(1e-30))
            finite = bool(torch.isfinite(v).all()) and bool(torch.isfinite(m))
            _checked[key] = None if finite and gap < 1e-3 else f"relative error {gap:.2e} against the reference"
        except Exception as err:  # any launch or compile failure on this hardware
            _checked[key] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return _checked[key]


def dpg_direction(
    x0hat: Tensor, y: Tensor, operator, noise, r: Tensor, z: Tensor, z_raw: Tensor,
    num_samples: int, seeds: Sequence[int], backend: str = "auto", chunk_size: int = 256,
    estimator: str = "published",
) -> tuple[Tensor, Tensor]:
    """The DPG direction for a batch: x0hat (B, C, H, W), y (B, ...), r, z, z_raw (B,).

    Item b draws its noise from seeds[b] and uses operator.item(b). Returns (v_unit (B, C, H, W),
    m (B,) float64) with the published v = exp(m) v_unit (see kernels.reference).
    estimator "rao-blackwell": see `kernels.rao_blackwell`; an item whose operator has no row
    space (not linear, a black box, no description) gets the published estimator, logged once.
    Raises ValueError for an unknown backend or estimator, or a seed count other than B.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown guidance backend {backend!r}: expected one of {BACKENDS}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown DPG estimator {estimator!r}: expected one of {ESTIMATORS}")
    batch = x0hat.shape[0]
    if len(seeds) != batch:
        raise ValueError(f"expected one seed per item ({batch}), got {len(seeds)}")
    if estimator == "rao-blackwell":
        return _rb_direction(x0hat, y, operator, noise, r, z, z_raw, num_samples, seeds, backend, chunk_size)
    out: dict[int, tuple[Tensor, Tensor]] = {}
    for b in range(batch) if backend in ("auto", "triton") else ():
        op = operator.item(b)
        fused = _fused_or_none(x0hat[b], op, noise, backend, y[b], r[b], z[b], z_raw[b])
        if fused is not None:
            module, plan, ax0 = fused
            out[b] = module.dpg_direction_fused(x0hat[b], y[b], plan, noise, r[b], z[b], z_raw[b],
                                                num_samples, seeds[b], ax0=ax0)
    rest = [b for b in range(batch) if b not in out]
    if backend != "eager" and len(rest) > 1 and operator.batch_size is None:
        # one operator for the whole batch: the chunked path vectorised over the items
        idx = torch.tensor(rest, device=x0hat.device)
        v, m = dpg_direction_batched(x0hat[idx], y[idx], operator, noise, r[idx], z[idx], z_raw[idx],
                                     num_samples, [seeds[b] for b in rest], chunk_size=chunk_size)
        out.update({b: (v[k], m[k]) for k, b in enumerate(rest)})
        rest = []
    for b in rest:
        args = (x0hat[b], y[b], operator.item(b), noise, r[b], z[b], z_raw[b], num_samples, seeds[b])
        if backend == "eager":
            out[b] = dpg_direction_eager(*args)
        else:
            out[b] = dpg_direction_chunked(*args, chunk_size=chunk_size)
    return torch.stack([out[b][0] for b in range(batch)]), torch.stack([out[b][1] for b in range(batch)])


def _rb_fused(x0hat: Tensor, space, noise, backend: str):
    """The fused Rao-Blackwellized module for this item, or None (after logging why, once)."""
    module = _triton()
    if backend == "auto" and (x0hat.device.type != "cuda" or isinstance(module, str) or module.INTERPRETED):
        return None
    why = None
    if space.kind not in DIAGONAL_KINDS:
        why = f"row space {space.kind!r} is not fused (only {DIAGONAL_KINDS})"
    elif energy_kind(noise) is None:
        why = f"noise model {noise!r} has no fused energy (squared L2 or L1)"
    elif isinstance(module, str):
        why = module
    else:
        why = module.usable_on(x0hat.device)
    if why is not None:
        _log_once(f"Rao-Blackwellized DPG guidance with {type(noise).__name__} noise: backend {backend!r} "
                  f"falls back to 'chunked' ({why})")
        return None
    from . import triton_rb

    return triton_rb


def _rb_direction(x0hat, y, operator, noise, r, z, z_raw, num_samples, seeds, backend, chunk_size):
    out: list[tuple[Tensor, Tensor]] = []
    for b in range(x0hat.shape[0]):
        op = operator.item(b)
        space = row_space_of(op, x0hat[b])
        if isinstance(space, str) or space.kind == "identity":
            if isinstance(space, str):
                _log_once(f"Rao-Blackwellized DPG: {space}; the published estimator is used for it")
            # V = I: the Rao-Blackwellized estimator is the published one, numbers included
            v, m = dpg_direction(x0hat[b : b + 1], y[b : b + 1], op, noise, r[b : b + 1], z[b : b + 1],
                                 z_raw[b : b + 1], num_samples, [seeds[b]], backend, chunk_size)
            out.append((v[0], m[0]))
            continue
        args = (x0hat[b], y[b], op, noise, r[b], z[b], z_raw[b], num_samples, seeds[b])
        fused = _rb_fused(x0hat[b], space, noise, backend) if backend in ("auto", "triton") else None
        if backend == "eager":
            out.append(rb_direction_eager(*args, space=space))
        elif fused is not None:
            out.append(fused.rb_direction_fused(x0hat[b], y[b], op, space, noise, r[b], z[b], z_raw[b],
                                                num_samples, seeds[b]))
        else:
            out.append(rb_direction_streamed(*args, space=space, chunk_size=chunk_size))
    return torch.stack([v for v, _ in out]), torch.stack([m for _, m in out])
