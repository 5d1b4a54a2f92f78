"""What every metric shares: the [0, 1] image convention, its checks, and `MetricUnavailable`.

Every metric of `dpgkit.metrics` takes images as float tensors in **[0, 1]**, NCHW, RGB: the
paper's convention. Library images live in [-1, 1]; map them with :func:`to_unit_range` first.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

__all__ = ["MetricUnavailable", "check_images", "check_pair", "hub_checkpoints", "to_unit_range"]

_RANGE_TOL = 1e-4


class MetricUnavailable(RuntimeError):
    """A metric's weights are not on this machine; the message names the file and its source."""


def to_unit_range(x: Tensor) -> Tensor:
    """Map library images in [-1, 1] to the metrics' [0, 1]: (x + 1) / 2, clamped."""
    return ((x + 1) / 2).clamp(0, 1)


def check_images(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        found = f"{type(x).__name__}" if not isinstance(x, Tensor) else f"{x.dtype} {tuple(x.shape)}"
        raise ValueError(f"{name}: expected a float tensor N x C x H x W, found {found}")
    lo, hi = float(x.min()), float(x.max())
    if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise ValueError(
            f"{name}: expected values in [0, 1] (map [-1, 1] images with to_unit_range), "
            f"found [{lo:.4g}, {hi:.4g}]"
        )


def check_pair(x: Tensor, y: Tensor) -> None:
    check_images(x, "x")
    check_images(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, found {tuple(x.shape)} and {tuple(y.shape)}")


def hub_checkpoints() -> Path:
    """The torch hub cache's checkpoint folder, where the backbones' and Inception's files are looked up."""
    return Path(torch.hub.get_dir()) / "checkpoints"
