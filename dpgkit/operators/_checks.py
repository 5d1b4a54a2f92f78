"""Shape checks shared by the operators, so that every error says what was expected and found."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def check_images(x: Tensor, who: str, ndim: int = 4) -> None:
    """x must be an NCHW float batch."""
    if x.dim() != ndim:
        raise ValueError(f"{who} expects images of shape (B, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{who} expects a floating-point tensor, got {x.dtype}")


def check_items(x: Tensor, items: int, who: str) -> None:
    """A drawn operator holding `items` > 1 per-item tensors applies to exactly that many images."""
    if items > 1 and x.shape[0] != items:
        raise ValueError(
            f"{who} holds {items} per-item operators but got a batch of {x.shape[0]} images; "
            "use .item(b) to apply item b's operator to any number of images"
        )


def item_slice(b: int, items: int, who: str) -> slice:
    """The slice of item b in tensors with a leading dimension of `items`."""
    if not -items <= b < items:
        raise IndexError(f"{who} holds {items} items, got item index {b}")
    b = b % items
    return slice(b, b + 1)


def image_shape3(image_shape: Sequence[int] | None, who: str) -> tuple[int, int, int]:
    """(C, H, W) from an image shape, with a clear error when it is missing or malformed."""
    if image_shape is None:
        raise ValueError(f"{who} needs the image shape (C, H, W) for this, got None")
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{who} expects an image shape (C, H, W), got {tuple(image_shape)}")
    return shape  # type: ignore[return-value]


def generator_from_seed(seed: int) -> torch.Generator:
    """A CPU generator for one item's draw (seeds come from dpgkit.seeding.derive_seed)."""
    return torch.Generator().manual_seed(int(seed))
