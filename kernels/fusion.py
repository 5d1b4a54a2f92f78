"""Which guidance problems the fused kernels can run, described as gather tables.

Every fused operator is linear with a small fixed fan-in: output o of A is
``(A x)[o] = sum_k wts[k, o] * x[idx[k, o]]`` over the flattened image x (C*H*W). That covers masks
(inpainting, uncropping: K = 1), average-pool super-resolution by a factor f (K = f*f),
denoising (K = 1) and colorization (channel mean, K = C). The kernels draw eps at the gathered
elements, so A eps costs K Philox draws per output and no memory traffic.

Masked-out outputs (weight 0) do not depend on the state at all: they are dropped from the table
and their residual energy, the same for every Monte Carlo sample, is added back as a constant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GatherPlan", "plan_for", "energy_kind", "apply_plan"]


@dataclass(frozen=True)
class GatherPlan:
    """A x = scatter(keep, sum_k wts[k] * x[idx[k]]) for one image of shape `image_shape`.

    idx (K, M) int32 and wts (K, M) float32 describe the M kept outputs; keep (M,) int64 are their
    positions in the flattened output of `out_numel` entries (None: all outputs, in order).
    """

    kind: str
    image_shape: tuple[int, int, int]
    idx: Tensor
    wts: Tensor
    keep: Tensor | None
    out_numel: int

    @property
    def fan_in(self) -> int:
        return self.idx.shape[0]

    @property
    def kept(self) -> int:
        return self.idx.shape[1]


def energy_kind(noise) -> str | None:
    """"l2" (squared L2, Gaussian) or "l1" (Poisson): the noise model's `energy_kind`, read as
    plain data (a model whose energy is not a stock one says None and is not fused)."""
    kind = getattr(noise, "energy_kind", None)
    return kind if kind in ("l2", "l1") else None


def _mask_plan(mask: Tensor, shape: tuple[int, int, int], device: torch.device) -> GatherPlan:
    c, h, w = shape
    if mask.dim() != 4 or mask.shape[0] != 1 or mask.shape[-2:] != (h, w) or mask.shape[1] not in (1, c):
        raise ValueError(f"an item's mask must be (1, 1 or {c}, {h}, {w}), got {tuple(mask.shape)}")
    full = mask[0].to(device=device, dtype=torch.float32).expand(c, h, w).reshape(-1)
    keep = torch.nonzero(full, as_tuple=True)[0]
    return GatherPlan("mask", shape, keep.to(torch.int32)[None].contiguous(), full[keep][None].contiguous(),
                      keep, c * h * w)


def _identity_plan(shape: tuple[int, int, int], device: torch.device) -> GatherPlan:
    d = shape[0] * shape[1] * shape[2]
    idx = torch.arange(d, device=device, dtype=torch.int32)[None]
    return GatherPlan("identity", shape, idx, torch.ones(1, d, device=device), None, d)


def _avgpool_plan(factor: int, shape: tuple[int, int, int], device: torch.device) -> GatherPlan:
    c, h, w = shape
    if h % factor or w % factor:
        raise ValueError(f"average pooling by {factor} needs the image size divisible by it, got {h}x{w}")
    ho, wo = h // factor, w // factor
    ch = torch.arange(c, device=device).view(c, 1, 1)
    oy = torch.arange(ho, device=device).view(1, ho, 1)
    ox = torch.arange(wo, device=device).view(1, 1, wo)
    taps = []
    for u in range(factor):
        for v in range(factor):
            taps.append(((ch * h + oy * factor + u) * w + ox * factor + v).reshape(-1))
    idx = torch.stack(taps).to(torch.int32).contiguous()
    wts = torch.full(idx.shape, 1.0 / (factor * factor), device=device)
    return GatherPlan(f"avgpool{factor}", shape, idx, wts, None, c * ho * wo)


def _channel_mean_plan(shape: tuple[int, int, int], device: torch.device) -> GatherPlan:
    c, h, w = shape
    pix = torch.arange(h * w, device=device)
    idx = torch.stack([k * h * w + pix for k in range(c)]).to(torch.int32).contiguous()
    wts = torch.full(idx.shape, 1.0 / c, device=device)
    return GatherPlan("channel_mean", shape, idx, wts, None, h * w)


def plan_for(operator, image_shape, device: torch.device | str) -> GatherPlan | str:
    """The gather table of an item-level operator for images (C, H, W), or why there is none.

    The operator describes itself as plain data through `operator.gather_form(image_shape)`
    (e.g. ("mask", m), ("avgpool", f)); the kernels import nothing from dpgkit."""
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3:
        return f"images must be (C, H, W), got {shape}"
    device = torch.device(device)
    form_of = getattr(operator, "gather_form", None)
    form = form_of(shape) if callable(form_of) else None
    if form is None:
        return f"{type(operator).__name__} has no fused form"
    kind, *args = form
    if kind == "mask":
        return _mask_plan(args[0], shape, device)
    if kind == "avgpool":
        return _avgpool_plan(int(args[0]), shape, device)
    if kind == "identity":
        return _identity_plan(shape, device)
    if kind == "channel_mean":
        return _channel_mean_plan(shape, device)
    return f"{type(operator).__name__}'s gather form {kind!r} is not one the kernels know"


def apply_plan(plan: GatherPlan, x: Tensor) -> Tensor:
    """A x for one image x (C, H, W) through the table: the flattened output (out_numel,), float32."""
    flat = x.reshape(-1).float()
    kept = (plan.wts * flat[plan.idx.long()]).sum(0)
    if plan.keep is None:
        return kept
    return torch.zeros(plan.out_numel, device=x.device).index_put_((plan.keep,), kept)
