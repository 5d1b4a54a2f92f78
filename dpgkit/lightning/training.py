"""Training a diffusion prior: `DiffusionTrainingModule` and `fit_main` (`dpgkit fit`).

The module trains a guided-diffusion UNet to predict the noise (eps) of
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps under the linear schedule (T = 1000), t uniform
(Ho et al. 2020, Algorithm 1), keeps an exponential moving average (EMA) of its weights and can
export the EMA weights as a safetensors state dict that `dpgkit.models.load(config, checkpoint=...)`
reads. Its data: `dpgkit.lightning.training_data.ImageDataModule`.
Run from the command line as `dpgkit fit --config recipes/train_demo_prior.yaml`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from ..diffusion import Schedule, q_sample
from ..models.unet import UNET_DEFAULTS, unet_from_config
from .training_data import ImageDataModule

__all__ = ["DiffusionTrainingModule", "ema_state", "fit_main"]



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
