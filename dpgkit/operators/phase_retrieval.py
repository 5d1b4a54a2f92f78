"""Phase retrieval: y = |FFT2(zero-padded x)|, a non-linear but differentiable forward model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_images
from .base import Operator

__all__ = ["PhaseRetrieval"]


class PhaseRetrieval(Operator):
    """y (B, C, H + 2p, W + 2p) = |F(pad(x))|, the orthonormal 2-D DFT with the zero frequency
    at the centre, x zero-padded by p = int(oversample / 8 * H) px per side (and likewise for W).

    oversample = 2 pads 64 px per side at 256 px, as in the paper and the DPS code. y is a
    magnitude, not a picture: at 32 x 32 px its DC term reaches 6.7.
    """

    task_name = "phase retrieval"
    measurement_unit = "magnitude"

    def __init__(self, oversample: float = 2.0) -> None:
        super().__init__()
        if oversample < 0:
            raise ValueError(f"oversample must be >= 0, got {oversample}")
        self.oversample = float(oversample)

    def __repr__(self) -> str:
        return f"PhaseRetrieval(oversample={self.oversample})"

    def padding(self, height: int, width: int) -> tuple[int, int]:
        """Pixels added on each side along H and along W."""
        return int(self.oversample / 8.0 * height), int(self.oversample / 8.0 * width)

    def forward(self, x: Tensor) -> Tensor:
        check_images(x, "PhaseRetrieval")
        ph, pw = self.padding(*x.shape[-2:])
        spectrum = torch.fft.fft2(F.pad(x, (pw, pw, ph, ph)), norm="ortho")
        return torch.fft.fftshift(spectrum, dim=(-2, -1)).abs()
