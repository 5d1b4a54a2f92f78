"""JPEG compression through a real codec (Pillow): a non-differentiable forward model."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ._checks import check_images
from .base import Operator

__all__ = ["JPEG"]


class JPEG(Operator):
    """y = decode(encode(x)) at JPEG `quality` (1..95), per image, through Pillow.

    Images (B, 1 or 3, H, W) in [-1, 1] are quantised to 8 bits first; y is float in [-1, 1] on
    x's device. Never differentiated: DPG can use it, DPS refuses it. The default quality 10 is
    the strong compression used in JPEG-restoration benchmarks (the paper names JPEG only as a
    limitation, without a setting).
    """

    task_name = "JPEG restoration"

    differentiable = False
    measurement_unit = "picture"

    def __init__(self, quality: int = 10) -> None:
        super().__init__()
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
        self.quality = int(quality)

    def __repr__(self) -> str:
        return f"JPEG(quality={self.quality})"

    def _codec(self, img: np.ndarray) -> np.ndarray:
        """One (C, H, W) uint8 image through the codec."""
        mode = "L" if img.shape[0] == 1 else "RGB"
        pil = Image.fromarray(img[0] if mode == "L" else img.transpose(1, 2, 0), mode=mode)
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=self.quality)
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert(mode))
        return out[None] if mode == "L" else out.transpose(2, 0, 1)

    def forward(self, x: Tensor) -> Tensor:
        check_images(x, "JPEG")
        if x.shape[1] not in (1, 3):
            raise ValueError(f"JPEG expects 1 or 3 channels, got images of shape {tuple(x.shape)}")
        with torch.no_grad():
            u8 = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
            out = np.stack([self._codec(img) for img in u8])
            y = torch.from_numpy(out).to(device=x.device, dtype=x.dtype)
        return y / 127.5 - 1
