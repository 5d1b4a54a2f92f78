"""Colorization: y = the mean of the channels (a grey image)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._checks import check_images, image_shape3
from .base import LinearOperator
from .svd_views import ChannelMeanSVD

__all__ = ["Colorization"]


class Colorization(LinearOperator):
    measurement_unit = "picture"
    """y (B, 1, H, W) = mean over the C channels of x (B, C, H, W)."""

    task_name = "colorization"

    def __init__(self) -> None:
        super().__init__()
        # lets svd() find the module's device and dtype
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    def __repr__(self) -> str:
        return "Colorization()"

    def forward(self, x: Tensor) -> Tensor:
        check_images(x, "Colorization")
        return x.mean(1, keepdim=True)

    def adjoint(self, y: Tensor, channels: int = 3) -> Tensor:
        """x (B, channels, H, W) = y / channels in every channel (y: (B, 1, H, W))."""
        check_images(y, "Colorization.adjoint")
        if y.shape[1] != 1:
            raise ValueError(f"Colorization.adjoint expects (B, 1, H, W), got {tuple(y.shape)}")
        return y.expand(-1, channels, -1, -1) / channels

    def gather_form(self, image_shape: Sequence[int]) -> tuple:
        return ("channel_mean",)

    def row_space(self, image_shape: Sequence[int]) -> dict:
        """{"kind": "channel_mean"} (see `Operator.row_space`): one direction per pixel."""
        c, _, _ = image_shape3(image_shape, "Colorization.row_space")
        return {"kind": "channel_mean", "channels": c}

    def svd(self, image_shape: Sequence[int] | None = None) -> ChannelMeanSVD:
        c, h, w = image_shape3(image_shape, "Colorization.svd")
        return ChannelMeanSVD(c, h * w, self._anchor)
