"""PSNR and SSIM per image (the paper's fidelity metrics), on [0, 1] images.

torchmetrics' functional API with data range 1; SSIM with an 11x11 Gaussian window, sigma 1.5,
k1 = 0.01, k2 = 0.03, averaged without the border (as scikit-image and Wang et al.'s reference
code do).
"""

from __future__ import annotations

from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from .common import check_pair

__all__ = ["psnr", "ssim"]


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """PSNR in dB per image: 10 log10(1 / MSE). x, y: (N, C, H, W) in [0, 1]. Returns (N,)."""
    check_pair(x, y)
    return peak_signal_noise_ratio(
        x.double(), y.double(), data_range=1.0, reduction="none", dim=(1, 2, 3)
    ).to(x.dtype)


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """SSIM per image: Gaussian window 11x11, sigma 1.5, k1 0.01, k2 0.03, data range 1.
    x, y: (N, C, H, W) in [0, 1], H, W > 10. Returns (N,).

    The SSIM map is torchmetrics'; it is averaged over the pixels whose window lies inside the
    image (a 5-pixel border dropped), as in Wang et al.'s reference code and scikit-image.
    torchmetrics' own scalar also averages the reflection-padded border, which lowers it on small
    images.
    """
    check_pair(x, y)
    if min(x.shape[-2:]) <= 10:
        raise ValueError(f"SSIM needs images larger than 10 x 10 pixels, found {tuple(x.shape[-2:])}")
    _, full = structural_similarity_index_measure(
        x.double(),
        y.double(),
        gaussian_kernel=True,
        sigma=1.5,
        kernel_size=11,
        reduction="none",
        data_range=1.0,
        k1=0.01,
        k2=0.03,
        return_full_image=True,
    )
    return full[..., 5:-5, 5:-5].mean(dim=(1, 2, 3)).to(x.dtype)
