"""Inpainting: y = m * x for a binary mask m (1 = observed). Box, random-pixel, uncropping and
file masks; the random ones are templates drawn once per item from that item's seed.

The measurement keeps the image's shape (missing pixels are 0), as in the DPS code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ._checks import check_images, check_items, generator_from_seed, image_shape3, item_slice
from .base import LinearOperator
from .svd_views import MaskSVD
from .template import Template

__all__ = [
    "Inpainting", "InpaintingTemplate", "BoxInpainting", "RandomInpainting", "MaskSetInpainting",
    "box_mask", "random_mask", "uncrop_mask", "load_mask",
]

def _range(value: float | Sequence[float], name: str) -> tuple[float, float]:
    lo, hi = (value, value) if isinstance(value, (int, float)) else tuple(value)
    if lo > hi:
        raise ValueError(f"{name} must be a number or a range (low, high) with low <= high, got {value}")
    return float(lo), float(hi)


def box_mask(gen: torch.Generator, height: int, width: int, side: tuple[int, int] = (128, 128),
             margin: int = 16) -> Tensor:
    """(1, H, W) mask with one square hole: side s drawn in [side[0], side[1]], its top-left corner
    drawn uniformly in [margin, H - s - margin) x [margin, W - s - margin), upper bounds excluded.

    The excluded upper bound is the DPS code's convention (its `random_sq_bbox` draws the corner
    with numpy's half-open `randint`): a 128 box in a 256 image with a 16 px margin starts at rows
    16..111, so the far border keeps margin + 1 px. Raises ValueError when no corner is possible
    (s + 2 * margin >= min(H, W)).
    """
    lo, hi = int(side[0]), int(side[1])
    s = int(torch.randint(lo, hi + 1, (1,), generator=gen))
    if s + 2 * margin >= min(height, width):
        raise ValueError(
            f"a {s}x{s} box with a {margin} px margin does not fit a {height}x{width} image "
            f"(the corner is drawn in [margin, size - side - margin), which needs side + 2 margin < size)"
        )
    top = int(torch.randint(margin, height - margin - s, (1,), generator=gen))
    left = int(torch.randint(margin, width - margin - s, (1,), generator=gen))
    mask = torch.ones(1, height, width)
    mask[:, top : top + s, left : left + s] = 0
    return mask


def random_mask(gen: torch.Generator, height: int, width: int,
                drop: tuple[float, float] = (0.92, 0.92)) -> Tensor:
    """(1, H, W) mask missing round(p * H * W) pixels chosen uniformly, p drawn in [drop[0],
    drop[1]]; the same pixels are missing in every channel."""
    p = drop[0] + (drop[1] - drop[0]) * float(torch.rand((), generator=gen))
    n = height * width
    missing = torch.randperm(n, generator=gen)[: round(p * n)]
    mask = torch.ones(n)
    mask[missing] = 0
    return mask.reshape(1, height, width)


def uncrop_mask(height: int, width: int, keep: str = "center", fraction: float = 0.5) -> Tensor:
    """(1, H, W) mask that observes a central box (`keep="center"`, sides `fraction` of the
    image's) or the `fraction` of the image on one side ("left", "right", "top", "bottom")."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    mask = torch.zeros(1, height, width)
    kh, kw = max(1, round(fraction * height)), max(1, round(fraction * width))
    if keep == "center":
        top, left = (height - kh) // 2, (width - kw) // 2
        mask[:, top : top + kh, left : left + kw] = 1
    elif keep == "left":
        mask[:, :, :kw] = 1
    elif keep == "right":
        mask[:, :, width - kw :] = 1
    elif keep == "top":
        mask[:, :kh, :] = 1
    elif keep == "bottom":
        mask[:, height - kh :, :] = 1
    else:
        raise ValueError(f"keep must be 'center', 'left', 'right', 'top' or 'bottom', got {keep!r}")
    return mask


def load_mask(path: str | Path, size: Sequence[int] | None = None, keep: str = "white") -> Tensor:
    """(1, H, W) binary mask from an image file: `dpgkit.io.load_mask` (the one mask threshold:
    pixels brighter than mid-grey are observed with `keep="white"`, missing with `keep="black"`),
    resized (nearest) to `size` (H, W) if given."""
    from ..io import load_mask as read_mask

    return read_mask(path, size, keep)


class Inpainting(LinearOperator):
    """y = mask * x. `mask` (H, W) or (1 or B, 1 or C, H, W), 1 = observed, 0 = missing.

    A mask with a leading dimension B > 1 holds one mask per item (see `item`).
    Constructors: `Inpainting.box`, `.random`, `.uncrop`, `.from_file`, `.from_files`.
    """

    task_name = "inpaint"
    measurement_unit = "picture"

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        mask = torch.as_tensor(mask)
        if not mask.is_floating_point():
            mask = mask.float()
        if mask.dim() == 2:
            mask = mask[None, None]
        if mask.dim() != 4:
            raise ValueError(f"mask must have shape (H, W) or (B, 1 or C, H, W), got {tuple(mask.shape)}")
        if bool(((mask < 0) | (mask > 1)).any()):
            raise ValueError("mask values must lie in [0, 1] (1 = observed)")
        self.register_buffer("mask", mask)

    def __repr__(self) -> str:
        return f"Inpainting(mask={tuple(self.mask.shape)}, observed={float(self.mask.mean()):.3f})"

    @property
    def batch_size(self) -> int | None:
        return self.mask.shape[0] if self.mask.shape[0] > 1 else None

    def item(self, b: int) -> Inpainting:
        if self.mask.shape[0] == 1:
            return self
        return Inpainting(self.mask[item_slice(b, self.mask.shape[0], "Inpainting")])

    def _check(self, x: Tensor) -> None:
        check_images(x, "Inpainting")
        c, h, w = self.mask.shape[1:]
        if x.shape[-2:] != (h, w) or c not in (1, x.shape[1]):
            raise ValueError(
                f"Inpainting mask of shape {tuple(self.mask.shape)} does not fit images of shape "
                f"{tuple(x.shape)}: expected (B, {'C' if c == 1 else c}, {h}, {w})"
            )
        check_items(x, self.mask.shape[0], "Inpainting")

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        return x * self.mask.to(x.dtype)

    def adjoint(self, y: Tensor) -> Tensor:
        self._check(y)
        return y * self.mask.to(y.dtype)

    def observed(self) -> Tensor:
        return self.mask

    def gather_form(self, image_shape: Sequence[int]) -> tuple:
        return ("mask", self.mask)

    def svd(self, image_shape: Sequence[int] | None = None) -> MaskSVD:
        """Permutation view (kept pixels first) for images (C, H, W); `image_shape` may be left
        out when the mask has one entry per channel."""
        mask = self.mask
        if image_shape is None and mask.shape[1] == 1:
            raise ValueError("Inpainting.svd needs the image shape (C, H, W) for a mask shared by "
                             "the channels: the view acts on vectors of C*H*W entries")
        if image_shape is not None:
            c, h, w = image_shape3(image_shape, "Inpainting.svd")
            if mask.shape[-2:] != (h, w) or mask.shape[1] not in (1, c):
                raise ValueError(f"mask {tuple(mask.shape)} does not fit images of shape {(c, h, w)}")
            mask = mask.expand(-1, c, -1, -1)
        return MaskSVD(mask)

    def row_space(self, image_shape: Sequence[int]) -> dict:
        """{"kind": "select"} (see `Operator.row_space`): the observed entries of images (C, H, W),
        the mask broadcast over channels; soft masks too (any nonzero weight is observed)."""
        if self.mask.shape[0] != 1:
            raise ValueError(f"this Inpainting holds {self.mask.shape[0]} per-item masks; the row space "
                             "is per item: call item(b) first")
        c, h, w = image_shape3(image_shape, "Inpainting.row_space")
        if self.mask.shape[-2:] != (h, w) or self.mask.shape[1] not in (1, c):
            raise ValueError(f"mask {tuple(self.mask.shape)} does not fit images of shape {(c, h, w)}")
        full = self.mask[0].expand(c, h, w).reshape(-1)
        index = torch.nonzero(full, as_tuple=True)[0]
        return {"kind": "select", "index": index, "weight": full[index]}

    @staticmethod
    def box(side: int | Sequence[int] = (128, 128), margin: int = 16) -> BoxInpainting:
        """A square hole of side in the range `side` (px, inclusive) at a random place with a
        `margin` px border (paper: 128 x 128, 16 px)."""
        return BoxInpainting(side, margin)

    @staticmethod
    def random(drop: float | Sequence[float] = (0.92, 0.92)) -> RandomInpainting:
        """Random missing pixels, a fraction drawn in the range `drop` (paper: about 0.92)."""
        return RandomInpainting(drop)

    @staticmethod
    def uncrop(image_size: Sequence[int], keep: str = "center", fraction: float = 0.5) -> Inpainting:
        """Uncropping (outpainting): observe only the centre or one side; `image_size` (H, W)."""
        h, w = (int(s) for s in image_size)
        return Inpainting(uncrop_mask(h, w, keep, fraction)[None])

    @staticmethod
    def from_file(path: str | Path, size: Sequence[int] | None = None, keep: str = "white") -> Inpainting:
        """One mask for every image, read from an image file (see `load_mask`)."""
        return Inpainting(load_mask(path, size, keep)[None])

    @staticmethod
    def from_files(paths: Sequence[str | Path], size: Sequence[int] | None = None,
                   keep: str = "white") -> MaskSetInpainting:
        """A mask set: each item gets one of the files, picked from its seed."""
        return MaskSetInpainting(paths, size, keep)


class InpaintingTemplate(Template):
    """A random mask family; `draw(seeds, image_shape)` gives the `Inpainting` of those items.

    Subclasses implement `sample(generator, height, width)` -> a (1, H, W) mask.
    """

    measurement_unit = "picture"

    def sample(self, gen: torch.Generator, height: int, width: int) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def draw(self, seeds: Sequence[int], image_shape: Sequence[int]) -> Inpainting:
        _, h, w = image_shape3(image_shape, repr(self))
        if len(seeds) == 0:
            raise ValueError("draw needs at least one seed")
        return Inpainting(torch.stack([self.sample(generator_from_seed(s), h, w) for s in seeds]))


class BoxInpainting(InpaintingTemplate):
    """A square hole, side drawn in `side` (px, inclusive), placed at random `margin` px or more
    from the top/left border and `margin` + 1 px or more from the bottom/right one (the DPS code's
    half-open corner range, see `box_mask`; paper: 128 x 128, 16 px). Also `Inpainting.box(...)`."""

    task_name = "inpaint (box)"

    def __init__(self, side: int | Sequence[int] = (128, 128), margin: int = 16) -> None:
        super().__init__()
        lo, hi = _range(side, "side")
        if lo < 1 or margin < 0:
            raise ValueError(f"need a box side >= 1 px and a margin >= 0, got {side}, {margin}")
        self.side, self.margin = (int(lo), int(hi)), int(margin)

    def __repr__(self) -> str:
        return f"Inpainting.box(side={self.side}, margin={self.margin})"

    def sample(self, gen: torch.Generator, height: int, width: int) -> Tensor:
        return box_mask(gen, height, width, self.side, self.margin)


class RandomInpainting(InpaintingTemplate):
    """Random missing pixels (the same in every channel), a fraction drawn in the range `drop`
    (paper: about 0.92). Also `Inpainting.random(...)`."""

    task_name = "inpaint (random)"

    def __init__(self, drop: float | Sequence[float] = (0.92, 0.92)) -> None:
        super().__init__()
        self.drop = _range(drop, "drop")
        if self.drop[0] < 0 or self.drop[1] > 1:
            raise ValueError(f"drop must lie in [0, 1], got {drop}")

    def __repr__(self) -> str:
        return f"Inpainting.random(drop={self.drop})"

    def sample(self, gen: torch.Generator, height: int, width: int) -> Tensor:
        return random_mask(gen, height, width, self.drop)


class MaskSetInpainting(InpaintingTemplate):
    """Masks read from files (see `load_mask`); each item gets one, picked from its seed.
    Also `Inpainting.from_files(...)`."""

    task_name = "inpaint (masks)"

    def __init__(self, paths: Sequence[str | Path], size: Sequence[int] | None = None,
                 keep: str = "white") -> None:
        super().__init__()
        if len(paths) == 0:
            raise ValueError("a mask set needs at least one mask file")
        loaded = [load_mask(p, size, keep) for p in paths]
        sizes = sorted({tuple(m.shape[-2:]) for m in loaded})
        if len(sizes) != 1:
            raise ValueError(f"mask files differ in size ({sizes}); pass size=(H, W)")
        self.register_buffer("masks", torch.stack(loaded))

    def __repr__(self) -> str:
        return f"Inpainting.from_files({len(self.masks)} masks of {tuple(self.masks.shape[-2:])})"

    def sample(self, gen: torch.Generator, height: int, width: int) -> Tensor:
        if self.masks.shape[-2:] != (height, width):
            raise ValueError(f"mask files are {tuple(self.masks.shape[-2:])}, images are "
                             f"{(height, width)}; pass size=(H, W) to from_files")
        return self.masks[int(torch.randint(len(self.masks), (1,), generator=gen))].cpu()
