"""Denoising: A = I, the measurement is the noisy image itself."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._checks import check_images, image_shape3
from .base import LinearOperator
from .svd_views import IdentitySVD

__all__ = ["Denoising"]


class Denoising(LinearOperator):
    measurement_unit = "picture"
    """y = x (the noise model adds the noise)."""

    task_name = "denoising"

    def __init__(self) -> None:
        super().__init__()
        # lets svd() find the module's device and dtype
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    def __repr__(self) -> str:
        return "Denoising()"

    def forward(self, x: Tensor) -> Tensor:
        check_images(x, "Denoising")
        return x

    def adjoint(self, y: Tensor) -> Tensor:
        check_images(y, "Denoising.adjoint")
        return y

    def gather_form(self, image_shape: Sequence[int]) -> tuple:
        return ("identity",)

    def row_space(self, image_shape: Sequence[int]) -> dict:
        """{"kind": "identity"} (see `Operator.row_space`): A = I."""
        image_shape3(image_shape, "Denoising.row_space")
        return {"kind": "identity"}

    def svd(self, image_shape: Sequence[int] | None = None) -> IdentitySVD:
        return IdentitySVD(math.prod(image_shape3(image_shape, "Denoising.svd")), self._anchor)
