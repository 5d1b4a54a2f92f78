"""The images a diffusion prior is trained on: `ImageDataModule` (Fashion-MNIST or a folder).

Files are read through `dpgkit.io` (idx files with `read_idx_images`, image files with
`load_image`); items are float tensors (C, H, W) in [-1, 1].
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..io import IMAGE_EXTENSIONS, load_image, read_idx_images

__all__ = [
    "FASHION_MNIST_DIR",
    "FolderImages",
    "ImageDataModule",
    "TensorImages",
    "load_fashion_mnist",
    "pad_or_resize",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"



def pad_or_resize(x: Tensor, size: int, mode: str = "pad") -> Tensor:
    """(N, C, h, w) in [-1, 1] -> (N, C, size, size): "pad" centres it on a -1 (black) border,
    "resize" resamples it (bilinear, antialiased)."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if mode == "pad":
        if h > size or w > size:
            raise ValueError(f"cannot pad {h}x{w} images to {size}x{size}; use mode='resize'")
        top, left = (size - h) // 2, (size - w) // 2
        return torch.nn.functional.pad(x, (left, size - w - left, top, size - h - top), value=-1.0)
    if mode == "resize":
        return torch.nn.functional.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        ).clamp(-1, 1)
    raise ValueError(f"mode must be 'pad' or 'resize', got {mode!r}")


class TensorImages(Dataset):
    """Images held in memory: a float tensor (N, C, H, W) in [-1, 1]; items are (C, H, W)."""

    def __init__(self, images: Tensor) -> None:
        if images.dim() != 4:
            raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


class FolderImages(Dataset):
    """Every image file under a folder (recursively), as (C, size, size) float in [-1, 1]."""

    def __init__(self, root: str | Path, size: int, channels: int = 3, mode: str = "resize") -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.size, self.channels, self.mode = size, channels, mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor:
        # transparent pixels over black: the background of the padded Fashion-MNIST frames
        x, _ = load_image(self.files[i], channels=self.channels, alpha="black")
        return pad_or_resize(x[None], self.size, self.mode)[0]


def load_fashion_mnist(
    root: str | Path = FASHION_MNIST_DIR, split: str = "train", size: int = 32, limit: int | None = None
) -> Tensor:
    """Fashion-MNIST `split` ("train": 60,000, "test": 10,000) as (N, 1, size, size) in [-1, 1],
    the 28x28 images padded with black (-1) to `size`; the first `limit` images if given."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    path = root / f"{prefix}-images-idx3-ubyte.gz"
    if not path.is_file() and (root / path.stem).is_file():
        path = root / path.stem
    arr = read_idx_images(path)
    if limit is not None:
        arr = arr[:limit]
    x = torch.from_numpy(arr.astype(np.float32))[:, None] / 127.5 - 1.0
    return pad_or_resize(x, size, "pad")


class ImageDataModule(L.LightningDataModule):
    """Training images from Fashion-MNIST idx files or from a folder of image files.

    Args:
        source: "fashion-mnist" or a folder of images (png/jpg/...).
        root: where the idx files are (Fashion-MNIST only).
        image_size: side of the square training images (Fashion-MNIST's 28 px are padded).
        channels: 1 (grayscale) or 3 (RGB), for folders; Fashion-MNIST is always 1.
        batch_size, num_workers: of the training DataLoader.
        limit: use only the first `limit` images (for quick runs and tests).
        seed: seeds the shuffling (its own generator; the global RNG is not used).
    """

    def __init__(
        self,
        source: str = "fashion-mnist",
        root: str = FASHION_MNIST_DIR,
        image_size: int = 32,
        channels: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
        limit: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.source, self.root = source, root
        self.image_size, self.channels = image_size, channels
        self.batch_size, self.num_workers = batch_size, num_workers
        self.limit, self.seed = limit, seed
        self.dataset: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        if self.source == "fashion-mnist":
            if self.channels != 1:
                raise ValueError(f"Fashion-MNIST is grayscale: channels must be 1, got {self.channels}")
            self.dataset = TensorImages(load_fashion_mnist(self.root, "train", self.image_size, self.limit))
        else:
            ds = FolderImages(self.source, self.image_size, self.channels)
            if self.limit is not None:
                ds.files = ds.files[: self.limit]
            self.dataset = ds

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        assert self.dataset is not None
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=len(self.dataset) >= self.batch_size,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
            persistent_workers=self.num_workers > 0,
        )
