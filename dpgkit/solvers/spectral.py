"""A linear measurement seen in its operator's SVD basis: the shared piece of DDRM, DDNM and the
pseudo-inverse initialisations (A = U diag(s) V^T; Kawar et al. 2022, Section 3)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..noise import Gaussian
from ..operators.base import LinearOperator, SVDView
from ..task import Task

__all__ = ["Spectral", "spectral_problem"]


@dataclass
class Spectral:
    """A measurement seen in the SVD basis; vectors are (B, D), D = C*H*W.

    s: singular values padded with zeros to D, (1 or B, D). uty: (U^T y) on the first R entries,
    zeros after. ybar: uty / s where s > 0, else 0. sigma_y: the Gaussian noise level.
    """

    svd: SVDView
    s: Tensor
    uty: Tensor
    ybar: Tensor
    sigma_y: float

    @property
    def observed(self) -> Tensor:
        return self.s > 0

    def safe_s(self) -> Tensor:
        """s with the zeros replaced by 1, for divisions whose result is masked out anyway."""
        return torch.where(self.observed, self.s, torch.ones_like(self.s))

    def vt(self, x: Tensor) -> Tensor:
        return self.svd.vt(x.flatten(1))

    def v(self, z: Tensor, like: Tensor) -> Tensor:
        return self.svd.v(z).reshape(like.shape)


def spectral_problem(method: str, task: Task, y: Tensor, image_shape: Sequence[int],
                     s_min: float = 0.0) -> Spectral:
    """Check that `method` applies to the task and put y in A's SVD basis.

    Singular values below `s_min` count as 0 (DDRM's H-functions truncate a blur's at 3e-2 so that
    y-bar = U^T y / s does not blow up the noise on nearly lost frequencies).
    """
    op, noise = task.operator, task.noise
    if not isinstance(noise, Gaussian):
        raise ValueError(
            f"{method} assumes Gaussian (or no) measurement noise, got {noise!r}. "
            "Use dpgkit.solvers.DPG, which supports Poisson noise."
        )
    if not isinstance(op, LinearOperator) or not op.is_linear:
        raise ValueError(
            f"{method} needs a linear operator with an SVD view, got {type(op).__name__}, which is "
            "not linear. Use dpgkit.solvers.DPG (any operator) or DPS (differentiable ones)."
        )
    try:
        svd = op.svd(tuple(image_shape))
    except NotImplementedError as err:
        raise ValueError(
            f"{method} needs the operator's SVD view: {err}. Use dpgkit.solvers.DPG or DPS instead."
        ) from err
    dim = int(torch.Size(image_shape).numel())
    batch = y.shape[0]
    s = svd.singulars().to(y)
    s = s.reshape(1, -1) if s.dim() == 1 else s
    if s.shape[0] not in (1, batch) or s.shape[1] > dim:
        raise ValueError(f"the SVD view's singular values have shape {tuple(s.shape)}; expected "
                         f"(R,) or ({batch}, R) with R <= {dim}")
    rank = s.shape[1]
    s = torch.nn.functional.pad(torch.where(s >= s_min, s, torch.zeros_like(s)), (0, dim - rank))
    uty = svd.ut(y.flatten(1))[:, :rank]
    uty = torch.nn.functional.pad(uty, (0, dim - rank))
    _check_view(method, op, svd, y, image_shape)
    spec = Spectral(svd, s, uty, uty, float(noise.sigma))
    spec.ybar = torch.where(spec.observed, uty / spec.safe_s(), torch.zeros_like(uty))
    return spec


def _check_view(method: str, op: LinearOperator, svd: SVDView, y: Tensor, image_shape: Sequence[int]) -> None:
    """Warn when U diag(s) V^T is not the operator (a reflect-padded blur's view is circular)."""
    probe = torch.randn(y.shape[0], *image_shape, generator=torch.Generator().manual_seed(0))
    probe = probe.to(device=y.device, dtype=y.dtype)
    with torch.no_grad():
        direct = op(probe).flatten(1)
        via_svd = svd.apply(probe.flatten(1))
    if via_svd.shape != direct.shape:
        raise ValueError(f"the SVD view of {type(op).__name__} gives measurements of shape "
                         f"{tuple(via_svd.shape)}, the operator {tuple(direct.shape)}")
    gap = float((via_svd - direct).norm() / direct.norm().clamp_min(1e-12))
    if gap > 1e-3:
        warnings.warn(
            f"{method}: the SVD view of {op!r} differs from the operator by {gap:.1%} (relative), e.g. "
            "a reflect-padded blur whose view is circular; the method fits y with the view's model, "
            "so expect artefacts where they differ (a blur with padding='circular' matches exactly)",
            RuntimeWarning, stacklevel=3,
        )
