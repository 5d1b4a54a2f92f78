"""Super-resolution: y = downsample(x) by an integer factor, average pooling or bicubic.

"avgpool" (the paper) averages factor x factor blocks. "bicubic" (the DPS code's default) is
antialiased bicubic resizing as in MATLAB's imresize, which the DPS code's Resizer mirrors: the
cubic kernel (a = -0.5) stretched by the factor, weights normalised per output pixel, and
boundaries mirrored with the edge pixel repeated. Both are separable, A x = Mh X Mw^T per
channel, so both have an exact adjoint and an SVD view.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_images, image_shape3
from .base import LinearOperator
from .svd_views import SeparableSVD, householder

__all__ = ["SuperResolution", "bicubic_matrix", "avgpool_matrix"]

_MODES = ("avgpool", "bicubic")


def _cubic(t: Tensor, a: float = -0.5) -> Tensor:
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def bicubic_matrix(n: int, factor: int) -> Tensor:
    """(n // factor, n) float64: antialiased bicubic downsampling of a length-n signal."""
    m = n // factor
    centre = (torch.arange(m, dtype=torch.float64) + 0.5) * factor - 0.5  # in input pixels
    reach = 2 * factor  # the cubic's support, stretched by the factor (antialiasing)
    taps = torch.arange(-reach, reach + 2, dtype=torch.float64)
    j = torch.floor(centre)[:, None] + taps[None, :]  # (m, taps)
    w = _cubic((j - centre[:, None]) / factor)
    w = w / w.sum(1, keepdim=True)
    # mirror with the edge repeated: -1 -> 0, n -> n - 1 (periodic with period 2n)
    src = j.long() % (2 * n)
    src = torch.where(src >= n, 2 * n - 1 - src, src)
    mat = torch.zeros(m, n, dtype=torch.float64)
    mat.scatter_add_(1, src, w)
    return mat


def avgpool_matrix(n: int, factor: int) -> Tensor:
    """(n // factor, n) float64: block averages."""
    return torch.kron(torch.eye(n // factor, dtype=torch.float64),
                      torch.full((1, factor), 1.0 / factor, dtype=torch.float64))


def _avgpool_svd(n: int, factor: int) -> tuple[Tensor, Tensor, Tensor]:
    """U = I, s = 1/sqrt(f), V = per-block Householder bases (block means first), exactly."""
    m = n // factor
    q = householder(factor)
    eye = torch.eye(m, dtype=torch.float64)
    v = torch.cat([torch.kron(eye, q[:, :1]), torch.kron(eye, q[:, 1:])], 1)
    return eye, torch.full((m,), 1.0 / math.sqrt(factor), dtype=torch.float64), v


def _matrix_svd(mat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    u, s, vh = torch.linalg.svd(mat, full_matrices=True)
    return u, s, vh.T


class SuperResolution(LinearOperator):
    """y (B, C, H/f, W/f) = downsample(x (B, C, H, W)) by an integer `factor` (paper: 4)."""

    # weights sum to 1 (bicubic's small negative lobes overshoot [-1, 1] by a few percent at most)
    measurement_unit = "picture"

    def __init__(self, factor: int = 4, mode: str = "avgpool") -> None:
        super().__init__()
        if int(factor) != factor or factor < 1:
            raise ValueError(f"factor must be a positive integer, got {factor}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.factor, self.mode = int(factor), mode
        self._matrices: dict[tuple, Tensor] = {}
        # lets svd() find the module's device and dtype
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    def __repr__(self) -> str:
        return f"SuperResolution(factor={self.factor}, mode={self.mode!r})"

    def _check_size(self, h: int, w: int) -> None:
        if h % self.factor or w % self.factor:
            raise ValueError(
                f"SuperResolution factor {self.factor} must divide the image size, got {h}x{w}"
            )

    def _matrix(self, n: int, like: Tensor) -> Tensor:
        key = (n, like.dtype, like.device)
        if key not in self._matrices:
            self._matrices[key] = bicubic_matrix(n, self.factor).to(device=like.device, dtype=like.dtype)
        return self._matrices[key]

    def forward(self, x: Tensor) -> Tensor:
        check_images(x, "SuperResolution")
        self._check_size(*x.shape[-2:])
        if self.mode == "avgpool":
            return F.avg_pool2d(x, self.factor)
        mh, mw = self._matrix(x.shape[-2], x), self._matrix(x.shape[-1], x)
        return torch.einsum("ih,bchw,jw->bcij", mh, x, mw)

    def adjoint(self, y: Tensor) -> Tensor:
        check_images(y, "SuperResolution.adjoint")
        f = self.factor
        if self.mode == "avgpool":
            return y.repeat_interleave(f, -2).repeat_interleave(f, -1) / (f * f)
        mh, mw = self._matrix(y.shape[-2] * f, y), self._matrix(y.shape[-1] * f, y)
        return torch.einsum("ih,bcij,jw->bchw", mh, y, mw)

    @property
    def label(self) -> str:
        return f"SR x{self.factor}"

    def gather_form(self, image_shape: Sequence[int]) -> tuple | None:
        return ("avgpool", self.factor) if self.mode == "avgpool" else None

    def row_space(self, image_shape: Sequence[int]) -> dict | None:
        """Average pooling: {"kind": "avgpool"} (the normalised block indicators); bicubic: from
        the SVD view (see `Operator.row_space`)."""
        c, h, w = image_shape3(image_shape, "SuperResolution.row_space")
        self._check_size(h, w)
        if self.mode == "avgpool":
            return {"kind": "avgpool", "factor": self.factor}
        return super().row_space((c, h, w))

    def svd(self, image_shape: Sequence[int] | None = None) -> SeparableSVD:
        """Kronecker view from the 1-D SVDs of the row and column maps; images (C, H, W)."""
        c, h, w = image_shape3(image_shape, "SuperResolution.svd")
        self._check_size(h, w)
        if self.mode == "avgpool":
            (uh, sh, vh), (uw, sw, vw) = _avgpool_svd(h, self.factor), _avgpool_svd(w, self.factor)
        else:
            uh, sh, vh = _matrix_svd(bicubic_matrix(h, self.factor))
            uw, sw, vw = _matrix_svd(bicubic_matrix(w, self.factor))
        a = self._anchor
        factors = [t.to(device=a.device, dtype=a.dtype) for t in (uh, sh, vh, uw, sw, vw)]
        return SeparableSVD(c, *factors)
