"""Blur: y = k * x per channel, for a given kernel, a Gaussian, or a random motion kernel.

The kernel is applied as a correlation (y[i] = sum_a k[a] x[i + a - c], c = (kh - 1) // 2),
like the DPS code's Conv2d, at the image's size. Boundaries: "reflect" (default, as the DPS code:
torch's reflection without repeating the edge) or "circular". Both are computed with FFTs, so a
61 x 61 kernel costs the same as a 3 x 3 one; the adjoint is exact.

The SVD view (DDRM, DDNM) diagonalises the *circular* operator with the 2-D DFT; for a
"circular" Blur it reproduces forward() exactly, for a "reflect" one it differs near the
borders (within half a kernel).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_images, check_items, generator_from_seed, image_shape3, item_slice
from .base import LinearOperator
from .blur_kernels import gaussian_kernel, motion_kernel
from .svd_views import FourierSVD
from .template import Template

__all__ = ["Blur", "GaussianBlur", "MotionBlur"]

_PADDINGS = ("reflect", "circular")


def _reflect_index(n: int, before: int, after: int, device: torch.device) -> Tensor:
    """Source index of each padded position, reflecting without repeating the edge (any pad)."""
    i = torch.arange(-before, n + after, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i % period
    return torch.where(i >= n, period - i, i)


class Blur(LinearOperator):
    """y = kernel (correlated) with each channel of x.

    kernel: (kh, kw) shared by all items, or (B, kh, kw) one per item. padding: "reflect" or
    "circular". Images (N, C, H, W) of any size; a per-item kernel needs N = B (or `item(b)`).
    """

    task_name = "deblur"

    def __init__(self, kernel: Tensor, padding: str = "reflect") -> None:
        super().__init__()
        kernel = torch.as_tensor(kernel)
        if not kernel.is_floating_point():
            kernel = kernel.float()
        if kernel.dim() == 2:
            kernel = kernel[None]
        if kernel.dim() != 3 or min(kernel.shape) < 1:
            raise ValueError(f"kernel must have shape (kh, kw) or (B, kh, kw), got {tuple(kernel.shape)}")
        if padding not in _PADDINGS:
            raise ValueError(f"padding must be one of {_PADDINGS}, got {padding!r}")
        self.padding = padding
        self.register_buffer("kernel", kernel)
        # a weighted average of pixels (non-negative weights summing to 1) keeps the picture scale
        sums = kernel.double().flatten(1).sum(1)
        averaging = bool((kernel >= 0).all()) and bool(((sums - 1).abs() < 1e-4).all())
        self.measurement_unit = "picture" if averaging else "real"

    def __repr__(self) -> str:
        b, kh, kw = self.kernel.shape
        items = f", items={b}" if b > 1 else ""
        return f"{type(self).__name__}(kernel={kh}x{kw}{items}, padding={self.padding!r})"

    @property
    def batch_size(self) -> int | None:
        return self.kernel.shape[0] if self.kernel.shape[0] > 1 else None

    def item(self, b: int) -> Blur:
        if self.kernel.shape[0] == 1:
            return self
        return Blur(self.kernel[item_slice(b, self.kernel.shape[0], "Blur")], self.padding)

    # -- the kernel laid out for a circular correlation on an (h, w) grid --------------------
    def _offsets(self) -> tuple[int, int]:
        kh, kw = self.kernel.shape[-2:]
        return (kh - 1) // 2, (kw - 1) // 2

    def _grid_kernel(self, h: int, w: int, dtype: torch.dtype) -> Tensor:
        """(B, h, w): kernel tap a placed at (a - c) mod size, so that circular correlation with
        it is the circular blur; taps that wrap more than once add up."""
        k = self.kernel.to(dtype)
        b, kh, kw = k.shape
        ch, cw = self._offsets()
        rows = (torch.arange(kh, device=k.device) - ch) % h
        cols = (torch.arange(kw, device=k.device) - cw) % w
        bidx = torch.arange(b, device=k.device)
        grid = torch.zeros(b, h, w, dtype=dtype, device=k.device)
        grid.index_put_((bidx[:, None, None], rows[None, :, None], cols[None, None, :]), k,
                        accumulate=True)
        return grid

    def _check(self, x: Tensor) -> None:
        check_images(x, type(self).__name__)
        check_items(x, self.kernel.shape[0], type(self).__name__)

    @staticmethod
    def _correlate(x: Tensor, grid: Tensor, adjoint: bool) -> Tensor:
        """Circular correlation of x (N, C, h, w) with grid (B, h, w) (its adjoint: convolution)."""
        kf = torch.fft.rfft2(grid)[:, None]
        xf = torch.fft.rfft2(x)
        return torch.fft.irfft2(xf * (kf if adjoint else kf.conj()), s=x.shape[-2:])

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        h, w = x.shape[-2:]
        if self.padding == "circular":
            return self._correlate(x, self._grid_kernel(h, w, x.dtype), adjoint=False)
        kh, kw = self.kernel.shape[-2:]
        ch, cw = self._offsets()
        ih = _reflect_index(h, ch, kh - 1 - ch, x.device)
        iw = _reflect_index(w, cw, kw - 1 - cw, x.device)
        xp = x.index_select(-2, ih).index_select(-1, iw)
        # on the padded grid the kernel sits at the origin: no tap of a kept output wraps around
        grid = F.pad(self.kernel.to(x.dtype), (0, xp.shape[-1] - kw, 0, xp.shape[-2] - kh))
        return self._correlate(xp, grid, adjoint=False)[..., :h, :w]

    def adjoint(self, y: Tensor) -> Tensor:
        self._check(y)
        h, w = y.shape[-2:]
        if self.padding == "circular":
            return self._correlate(y, self._grid_kernel(h, w, y.dtype), adjoint=True)
        kh, kw = self.kernel.shape[-2:]
        ch, cw = self._offsets()
        ih = _reflect_index(h, ch, kh - 1 - ch, y.device)
        iw = _reflect_index(w, cw, kw - 1 - cw, y.device)
        hp, wp = len(ih), len(iw)
        yp = F.pad(y, (0, wp - w, 0, hp - h))
        grid = F.pad(self.kernel.to(y.dtype), (0, wp - kw, 0, hp - kh))
        g = self._correlate(yp, grid, adjoint=True)
        # the adjoint of the reflect padding folds the padded borders back onto their sources
        out = torch.zeros(*g.shape[:-2], h, wp, dtype=g.dtype, device=g.device).index_add(-2, ih, g)
        return torch.zeros(*g.shape[:-2], h, w, dtype=g.dtype, device=g.device).index_add(-1, iw, out)

    def svd(self, image_shape: Sequence[int] | None = None) -> FourierSVD:
        """The DFT view of the circular blur for images (C, H, W) (exact for padding="circular")."""
        c, h, w = image_shape3(image_shape, f"{type(self).__name__}.svd")
        lam = torch.fft.fft2(self._grid_kernel(h, w, self.kernel.dtype)).conj()  # its eigenvalues
        return FourierSVD(c, lam)


class GaussianBlur(Blur):
    """Gaussian blur (paper: 61 x 61 kernel, std 3.0)."""

    task_name = "Gaussian deblur"

    def __init__(self, kernel_size: int = 61, std: float = 3.0, padding: str = "reflect") -> None:
        super().__init__(gaussian_kernel(kernel_size, std), padding)
        self.kernel_size, self.std = kernel_size, std

    def __repr__(self) -> str:
        return f"GaussianBlur(kernel_size={self.kernel_size}, std={self.std}, padding={self.padding!r})"


class MotionBlur(Template):
    """Random camera-shake blur (paper: 61 x 61, intensity 0.5), one kernel per item drawn from
    its seed (see `blur_kernels.motion_kernel`); `draw` returns a `Blur`."""

    task_name = "motion deblur"

    def __init__(self, kernel_size: int = 61, intensity: float = 0.5, padding: str = "reflect") -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        if not 0 <= intensity <= 1:
            raise ValueError(f"intensity must lie in [0, 1], got {intensity}")
        if padding not in _PADDINGS:
            raise ValueError(f"padding must be one of {_PADDINGS}, got {padding!r}")
        self.kernel_size, self.intensity, self.padding = kernel_size, intensity, padding
        self.measurement_unit = "picture"  # its kernels are non-negative and sum to 1

    def __repr__(self) -> str:
        return (f"MotionBlur(kernel_size={self.kernel_size}, intensity={self.intensity}, "
                f"padding={self.padding!r})")

    def draw(self, seeds: Sequence[int], image_shape: Sequence[int]) -> Blur:
        image_shape3(image_shape, repr(self))
        if len(seeds) == 0:
            raise ValueError("draw needs at least one seed")
        kernels = [motion_kernel(self.kernel_size, self.intensity, generator_from_seed(s)) for s in seeds]
        return Blur(torch.stack(kernels), self.padding)
