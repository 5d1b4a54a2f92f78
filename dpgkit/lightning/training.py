"""Training a diffusion prior: `DiffusionTrainingModule`, `ImageDataModule` and `fit_main`.

The module trains a guided-diffusion UNet to predict the noise (eps) of
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps under the linear schedule (T = 1000), t uniform,
keeps an exponential moving average (EMA) of its weights and can export the EMA weights as a
safetensors state dict that `dpgkit.models.load(config, checkpoint=...)` reads.
Run from the command line as `dpgkit fit --config recipes/train_demo_prior.yaml`.
"""

from __future__ import annotations

import copy
import gzip
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..diffusion import Schedule, q_sample
from ..models.unet import UNET_DEFAULTS, unet_from_config

__all__ = [
    "DiffusionTrainingModule",
    "FolderImages",
    "ImageDataModule",
    "TensorImages",
    "fit_main",
    "pad_or_resize",
    "read_idx_images",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ----------------------------------------------------------------------------------------- data


def read_idx_images(path: str | Path) -> np.ndarray:
    """The images of an idx3-ubyte file (optionally .gz) as uint8 (N, H, W)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"idx file not found: {path} (Fashion-MNIST: `apt-get install dataset-fashion-mnist` "
            f"puts it in {FASHION_MNIST_DIR})"
        )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic, n, h, w = struct.unpack(">IIII", data[:16])
    if magic != 2051:
        raise ValueError(f"{path}: expected an idx3-ubyte image file (magic 2051), found {magic}")
    if len(data) != 16 + n * h * w:
        raise ValueError(f"{path}: expected {16 + n * h * w} bytes for {n}x{h}x{w}, found {len(data)}")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, h, w)


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
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) under {self.root}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.size, self.channels, self.mode = size, channels, mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            arr = np.asarray(im.convert("L" if self.channels == 1 else "RGB"), dtype=np.float32)
        x = torch.from_numpy(arr.copy())
        x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
        x = x / 127.5 - 1.0
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


# ---------------------------------------------------------------------------------------- model


class DiffusionTrainingModule(L.LightningModule):
    """Eps-prediction training of a guided-diffusion UNet with EMA weights.

    Args:
        unet: guided-diffusion UNet arguments (see `dpgkit.models.unet.UNET_DEFAULTS`; dpgkit adds
            `in_channels`). `learn_sigma` must be False: only the eps (simple MSE) loss is trained.
        lr, weight_decay, betas: AdamW's; `warmup_steps` ramps the learning rate up linearly.
        ema_decay: EMA weight of the old average per step.
        num_timesteps: length of the linear schedule (1000 for guided-diffusion priors).
        seed: seeds the initial weights and the (t, eps) draws, each with its own generator.
        export_path: where to write the EMA weights (.safetensors); every `export_every` steps
            (0: only at the end of training) and when training ends.
        init_from: start from these weights (a .safetensors / .pt UNet state dict, e.g. an
            exported EMA) instead of a fresh init: fine-tuning, or continuing a stopped run.
    """

    def __init__(
        self,
        unet: dict[str, Any] | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        betas: Sequence[float] = (0.9, 0.999),
        warmup_steps: int = 200,
        ema_decay: float = 0.999,
        num_timesteps: int = 1000,
        seed: int = 0,
        export_path: str | None = None,
        export_every: int = 0,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        cfg = {**UNET_DEFAULTS, **dict(unet or {})}
        if cfg["learn_sigma"]:
            raise ValueError("learn_sigma=True needs the variational-bound loss; only eps-MSE is trained")
        self.unet_config = cfg
        # the default init draws from the global RNG: fork it so it stays untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = unet_from_config(cfg)
        if init_from:
            from ..models.registry import check_state_dict, read_checkpoint

            state = read_checkpoint(init_from)
            check_state_dict(self.net, state, source=str(init_from))
            self.net.load_state_dict(state, strict=True)
        self.ema = copy.deepcopy(self.net).requires_grad_(False).eval()
        self.schedule = Schedule.linear(num_timesteps)
        self.register_buffer("abar", self.schedule.alphas_cumprod.float(), persistent=False)
        self._gen: torch.Generator | None = None

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            # one stream per rank; a resumed run continues from a seed tied to its step
            seed = int(self.hparams.seed) * 1_000_003 + self.global_rank * 7919 + self.global_step
            self._gen = torch.Generator(device=device).manual_seed(seed)
        return self._gen

    def loss(self, x0: Tensor, generator: torch.Generator) -> Tensor:
        """Mean squared error of the predicted eps; x0 (B, C, H, W) in [-1, 1]."""
        n = len(self.schedule)
        t = torch.randint(0, n, (x0.shape[0],), generator=generator, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = q_sample(self.schedule, t, x0, eps)
        return torch.nn.functional.mse_loss(self.net(x_t, t), eps)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        x0 = batch[0] if isinstance(batch, (list, tuple)) else batch
        if x0.dim() != 4 or x0.shape[1] != self.unet_config["in_channels"]:
            raise ValueError(
                f"expected batches (B, {self.unet_config['in_channels']}, H, W), got {tuple(x0.shape)}"
            )
        loss = self.loss(x0, self._generator(x0.device))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    @torch.no_grad()
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # a short run warms the EMA up (decay min(d, (1+s)/(10+s))) so early exports are usable
        s = self.global_step
        decay = min(float(self.hparams.ema_decay), (1 + s) / (10 + s))
        for e, p in zip(self.ema.parameters(), self.net.parameters()):
            e.lerp_(p.detach(), 1.0 - decay)
        every = int(self.hparams.export_every)
        if every > 0 and s > 0 and s % every == 0:
            self.export_ema()

    def on_train_end(self) -> None:
        self.export_ema()

    def export_ema(self, path: str | Path | None = None) -> Path | None:
        """Write the EMA weights (float32 safetensors, atomic replace); returns the path."""
        path = path or self.hparams.export_path
        if not path or self.global_rank != 0:
            return None
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.ema.state_dict().items()}
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_file(state, str(tmp), metadata={"step": str(self.global_step), "config": repr(self.unet_config)})
        os.replace(tmp, path)
        return path

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(
            self.net.parameters(),
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            weight_decay=self.hparams.weight_decay,
        )
        warm = max(1, int(self.hparams.warmup_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def ema_state(module: DiffusionTrainingModule) -> Mapping[str, Tensor]:
    """The EMA weights as a state dict of the bare UNet (the names `models.load` expects)."""
    return module.ema.state_dict()


def fit_main(argv: Sequence[str] | None = None) -> None:
    """`dpgkit fit [--config] recipe.yaml [--trainer.max_steps N ...]`: LightningCLI's `fit`.

    argv may start with "fit" or not. DPGKIT_THREADS=n sets torch's intra-op threads (on a
    shared CPU, 1 thread per process avoids oversubscription; use --trainer.devices 2
    --trainer.strategy ddp for two processes).
    """
    from lightning.pytorch.cli import LightningCLI

    # None: LightningCLI reads sys.argv itself (`python -m dpgkit.lightning.training fit ...`)
    args = list(argv) if argv is not None else None
    if args is not None and (not args or args[0] != "fit"):
        args = ["fit", *args]
    if args is not None and len(args) >= 2 and args[1].endswith((".yaml", ".yml")):
        args = ["fit", "--config", *args[1:]]  # `dpgkit fit RECIPE.yaml ...`: positional recipe
    if os.environ.get("DPGKIT_THREADS"):
        torch.set_num_threads(int(os.environ["DPGKIT_THREADS"]))
    LightningCLI(
        DiffusionTrainingModule,
        ImageDataModule,
        args=args,
        seed_everything_default=False,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":  # pragma: no cover
    fit_main()
