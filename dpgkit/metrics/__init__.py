"""Image quality metrics of the paper: PSNR, SSIM, LPIPS (per image) and FID (per set).

Every metric takes images as float tensors in **[0, 1]**, NCHW, RGB (the paper's convention);
map library images in [-1, 1] with :func:`to_unit_range` first. One module per metric family:

- `dpgkit.metrics.image`: :func:`psnr`, :func:`ssim` (torchmetrics, data range 1).
- `dpgkit.metrics.lpips`: :class:`LPIPS` (the ``lpips`` package; backbone weights read from disk).
- `dpgkit.metrics.fid`: :class:`FID` and its Inception feature extractors.
- `dpgkit.metrics.common`: the range convention and :class:`MetricUnavailable`.
"""

from .common import MetricUnavailable, to_unit_range
from .fid import (
    FID,
    FIDInceptionV3,
    InceptionFeatures,
    compare_feature_extractors,
    fid_inception_available,
    inception_state_dict_from_torchscript,
    load_fid_inception,
)
from .image import psnr, ssim
from .lpips import LPIPS, lpips_available

__all__ = [
    "FID",
    "LPIPS",
    "FIDInceptionV3",
    "InceptionFeatures",
    "MetricUnavailable",
    "compare_feature_extractors",
    "fid_inception_available",
    "inception_state_dict_from_torchscript",
    "load_fid_inception",
    "lpips_available",
    "psnr",
    "ssim",
    "to_unit_range",
]
