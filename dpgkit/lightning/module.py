"""`RestorationModule`: restores batches of images in `predict_step`, each item seeded by its index.

The module holds what a recipe names: the prior (a preset and its checkpoint, built lazily), the
task (an operator and a noise model), the solver and the run seed. Item b of a batch with dataset
index i draws its operator (mask, kernel), its measurement noise and every solver draw from
(seed, i), so the pixels do not depend on the batch it landed in, the rank, or the number of ranks.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import metrics
from ..io import ImageError, quantize
from ..models.base import DiffusionModel
from ..noise import Gaussian, NoiseModel
from ..operators.base import Operator
from ..solvers.base import Solver
from ..task import Task

__all__ = ["Prior", "RestorationModule", "measurement_picture", "operator_mask"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Prior:
    """Which diffusion prior to load: a preset of `dpgkit.models.PRESETS` (or a guided-diffusion UNet
    config dict) and its checkpoint file. Nothing is read until `build()`.

    Args:
        preset: e.g. "adm-imagenet256", or a dict of UNet arguments (tests use tiny ones).
        diffusers: instead of a preset, a local diffusers folder (`save_pretrained` of a pixel-space
            UNet2DModel pipeline, or a UNet folder with scheduler_config.json), read by
            `dpgkit.models.from_diffusers`; recipes write `prior: {diffusers: PATH}`.
        checkpoint: the weights file (or the folder holding the preset's file). None builds
            seeded RANDOM weights: for tests and dry runs only, never a prior of anything.
        dtype: compute dtype of the network: "float32" (default), "bfloat16" or "float16".
        activation_checkpointing: recompute activations in the guidance backward pass (less memory).
        seed: seeds the random weights when `checkpoint` is None.
        device: where `build` puts the weights ("meta": structure only, for checks).

    Subclass it and override `build` to use any other eps network.
    """

    def __init__(self, preset: str | dict[str, Any] | None = None, checkpoint: str | None = None,
                 dtype: str | None = None, activation_checkpointing: bool = False, seed: int = 0,
                 device: str = "cpu", diffusers: str | None = None) -> None:
        from ..models import PRESETS

        if (preset is None) == (diffusers is None):
            raise ValueError("a prior names exactly one of preset (a dpgkit preset or UNet config) and diffusers "
                             f"(a diffusers folder); got preset={preset!r}, diffusers={diffusers!r}")
        if diffusers is not None and checkpoint is not None:
            raise ValueError("a diffusers prior reads its weights from its folder; drop checkpoint")
        self.diffusers = diffusers
        if isinstance(preset, str) and preset not in PRESETS:
            raise KeyError(f"unknown prior preset {preset!r}; registered: {sorted(PRESETS)} "
                           "(or give a UNet config dict)")
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"prior dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if isinstance(preset, dict):
            # YAML reads `channel_mult: "1"` or `attention_resolutions: 16` as numbers; the UNet wants text
            preset = {k: str(v) if k in ("channel_mult", "attention_resolutions") and isinstance(v, int) else v
                      for k, v in preset.items()}
        self.preset, self.checkpoint, self.dtype = preset, checkpoint, dtype
        self.activation_checkpointing, self.seed, self.device = activation_checkpointing, seed, device

    def __repr__(self) -> str:
        if getattr(self, "diffusers", None) is not None:
            return f"Prior(diffusers {self.diffusers})"
        preset = self.preset if isinstance(self.preset, str) else "custom UNet config"
        weights = self.checkpoint if self.checkpoint is not None else "random weights"
        return f"Prior({preset}, {weights})"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the prior generates, known before `build`."""
        from ..models import PRESETS

        if getattr(self, "diffusers", None) is not None:
            from ..models.diffusers import diffusers_image_shape

            return diffusers_image_shape(self.diffusers)
        if isinstance(self.preset, str):
            return tuple(PRESETS[self.preset].image_shape)
        size = int(self.preset.get("image_size", 64))
        return (int(self.preset.get("in_channels", 3)), size, size)

    @property
    def expected_checkpoint(self) -> str | None:
        """The checkpoint file name the preset expects (None for config dicts)."""
        from ..models import PRESETS

        return PRESETS[self.preset].checkpoint_name if isinstance(self.preset, str) and self.preset in PRESETS else None

    def build(self) -> DiffusionModel:
        from ..models import load

        dtype = _DTYPES[self.dtype] if self.dtype is not None else None
        if getattr(self, "diffusers", None) is not None:
            from ..models.diffusers import from_diffusers

            return from_diffusers(self.diffusers, dtype=dtype, device=self.device)
        return load(self.preset, checkpoint=self.checkpoint, dtype=dtype,
                    activation_checkpointing=self.activation_checkpointing, device=self.device, seed=self.seed)


class _Given(Prior):
    """A prior that is already a `DiffusionModel` (the Python API)."""

    def __init__(self, model: DiffusionModel) -> None:
        self.model = model
        self.preset, self.checkpoint = "given", None

    def __repr__(self) -> str:
        return f"Prior(given {type(self.model).__name__}, image_shape={self.model.image_shape})"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.model.image_shape)

    @property
    def expected_checkpoint(self) -> str | None:
        return None

    def build(self) -> DiffusionModel:
        return self.model


def operator_mask(operator: Operator) -> Tensor | None:
    """The observation mask (B or 1, 1 or C, H, W) of a masking operator (1 = observed), else None."""
    mask = operator.observed()
    return mask if isinstance(mask, Tensor) and mask.dim() == 4 else None


def measurement_picture(y: Tensor, operator: Operator, image_shape: tuple[int, int, int]) -> Tensor | None:
    """y (B, ...) shown as images (B, C, H, W) in [-1, 1] at the prior's size, or None.

    Masked pixels are black (inpainting); a smaller image is upsampled (bicubic: super-resolution);
    a measurement that is not a picture of the scene (e.g. Fourier magnitudes) is shown as its
    log-magnitude scaled per image.
    """
    c, h, w = image_shape
    if y.dim() != 4:
        return None
    y = y.detach().float()
    if y.shape[1] not in (1, c):
        return None
    mask = operator_mask(operator)
    if y.shape[-2:] == (h, w):
        picture = y
        if mask is not None and mask.shape[-2:] == (h, w):
            picture = torch.where(mask.to(y.device).expand_as(picture) > 0, picture, torch.full_like(picture, -1))
    elif y.shape[-2] <= h and y.shape[-1] <= w:
        picture = F.interpolate(y, size=(h, w), mode="bicubic", align_corners=False)
    else:
        mag = torch.log1p(y.abs())
        lo = mag.flatten(1).min(1).values.view(-1, 1, 1, 1)
        hi = mag.flatten(1).max(1).values.view(-1, 1, 1, 1)
        picture = F.interpolate((mag - lo) / (hi - lo).clamp_min(1e-12) * 2 - 1, size=(h, w), mode="area")
    if picture.shape[1] == 1 and c == 3:
        picture = picture.expand(-1, 3, -1, -1)
    return picture.clamp(-1, 1)


class RestorationModule(pl.LightningModule):
    """Restore images with a diffusion prior, a task and a solver; run by `Trainer.predict`.

    Args:
        prior: the diffusion prior (`Prior`: a preset and its checkpoint), or a `DiffusionModel`.
        operator: the forward model A, e.g. `dpgkit.operators.SuperResolution(4)` or the template
            `dpgkit.operators.Inpainting.box()` (drawn per item from (seed, index)).
        noise: the measurement noise, e.g. `dpgkit.noise.Gaussian(0.05)`.
        solver: e.g. `dpgkit.solvers.DPG(scale=160, num_samples=500)`.
        seed: the run seed; item i's randomness comes from (seed, i).
        lpips: LPIPS backbone for the per-image metric ("vgg" as the paper, "alex"), or None.
            Reported as unavailable (with the file it needs) when its weights are not on disk.
        lpips_weights: path of the backbone weights (default: the torch hub cache).
        step_progress: also show the solver's per-step bar (default: only the bar over images).
        labels: {"dataset": NAME} for `dpgkit evaluate`'s table; its task and method labels come
            from the operator and solver that run (`Operator.label`, `Solver.label`).
        noisy_unobserved: add measurement noise at entries the operator does not observe
            (inpainting's missing pixels) too, as the DPS/DPG authors' code does (`dpgkit.Task`).

    The Trainer must be built with `inference_mode=False`: guidance differentiates through the
    prior. `predict_step` returns a dict that `PredictionWriter` writes (CPU tensors).
    """

    def __init__(self, prior: Prior, operator: Operator, noise: NoiseModel, solver: Solver, seed: int = 0,
                 lpips: str | None = "vgg", lpips_weights: str | None = None, step_progress: bool = False,
                 labels: dict[str, str] | None = None, noisy_unobserved: bool = False) -> None:
        super().__init__()
        if isinstance(prior, DiffusionModel):
            prior = _Given(prior)
        if not isinstance(prior, Prior):
            raise TypeError(f"prior must be a dpgkit.lightning.Prior or a DiffusionModel, got {type(prior).__name__}")
        for value, kind, name in ((operator, Operator, "operator"), (noise, NoiseModel, "noise"),
                                  (solver, Solver, "solver")):
            if not isinstance(value, kind):
                raise TypeError(f"{name} must be a {kind.__module__}.{kind.__name__}, got {type(value).__name__}")
        self.prior = prior
        self.task = Task(operator, noise, noisy_unobserved)
        self.solver = solver
        self.seed = int(seed)
        self.lpips_net, self.lpips_weights = lpips, lpips_weights
        self.step_progress = step_progress
        unknown = sorted(set(labels or {}) - {"dataset"})
        if unknown:
            raise ValueError(f"labels may name the dataset only (the task and method labels come from the operator "
                             f"and solver that run); got {unknown}")
        task_label = operator.label + (f" ({type(noise).__name__})" if not isinstance(noise, Gaussian) else "")
        self.labels = {"dataset": "", **(labels or {}), "task": task_label, "method": solver.label}
        self.diffusion: DiffusionModel | None = None
        self.lpips_metric: metrics.LPIPS | None = None
        self.lpips_status = "disabled (model.lpips is null)" if lpips is None else "not checked yet"
        self._expected_y: tuple[int, ...] | None = None
        self.reset_running()

    # ------------------------------------------------------------------ set-up

    def build_prior(self) -> None:
        """Build the prior once. Called from `setup`, before Lightning moves the module to its device
        (not from `configure_model`, whose default-device context would put the CPU-seeded random
        init and the checkpoint loading on the accelerator)."""
        if self.diffusion is None:
            self.diffusion = self.prior.build()

    def setup(self, stage: str) -> None:
        self.build_prior()
        if self.lpips_net is not None and self.lpips_metric is None:
            ok, reason = metrics.lpips_available(self.lpips_net, self.lpips_weights)
            if ok:
                self.lpips_metric = metrics.LPIPS(self.lpips_net, self.lpips_weights)
            self.lpips_status = reason
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        mode = getattr(datamodule, "mode", "simulate")
        size = getattr(datamodule, "image_size", None)
        c, h, w = self.prior.image_shape
        if mode == "simulate" and size is not None and (size, size) != (h, w):
            raise ValueError(f"data.image_size is {size} but the prior {self.prior!r} generates {h}x{w} images: "
                             f"set data.image_size {h}")
        channels = getattr(datamodule, "channels", c)
        if channels != c:
            raise ValueError(f"data.channels is {channels} but the prior {self.prior!r} generates {c}-channel "
                             f"images: set data.channels {c}")
        if mode == "measured":
            self._check_measured_operator(getattr(datamodule, "mask_root", None) is not None)
        if datamodule is not None and hasattr(datamodule, "expected_shape"):
            # the data module then lists an item of another size as bad, before any batch is formed
            if mode == "simulate" or getattr(datamodule, "mask_root", None) is not None:
                datamodule.expected_shape = tuple(self.prior.image_shape)
            else:
                datamodule.expected_shape = self._expected_y

    def _check_measured_operator(self, has_masks: bool) -> None:
        template = self.task.operator
        if has_masks:
            if not _is_inpainting(template):
                raise ValueError(f"data.mask_root gives masks, but the operator {template!r} is not inpainting")
            return
        if getattr(template, "is_random", False):
            raise ValueError(
                f"measured mode needs a fixed operator, but {template!r} draws per-item randomness (a mask, a "
                "kernel) that a measured image does not come with: give masks (data.mask_root) or a fixed operator"
            )
        with torch.no_grad():
            self._expected_y = tuple(template(torch.zeros(1, *self.prior.image_shape)).shape[1:])

    def on_predict_start(self) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("build the Trainer with inference_mode=False: guidance differentiates through the "
                               "prior (the dpgkit CLI does this)")
        self.build_prior()
        self.reset_running()

    def reset_running(self) -> None:
        self._psnr_sum, self._psnr_count, self._done = 0.0, 0, 0

    def progress_metrics(self) -> dict[str, float]:
        """What the progress bar shows: the running mean PSNR of the images restored so far."""
        return {"psnr": round(self._psnr_sum / self._psnr_count, 2)} if self._psnr_count else {}

    # ------------------------------------------------------------------ restoring

    def _measured_task(self, batch: Mapping[str, Any], y: Tensor) -> Task:
        """The task that made a measured batch: the masks that came with it, or the fixed operator."""
        if "mask" in batch:
            from ..operators.inpainting import Inpainting

            return self.task.with_operator(Inpainting(batch["mask"].to(y.device, y.dtype)))
        if self._expected_y is not None and tuple(y.shape[1:]) != self._expected_y:
            raise ImageError(
                f"measured images are {tuple(y.shape[1:])}, but {self.task.operator!r} on the prior's "
                f"{self.prior.image_shape} images gives {self._expected_y}: set data.image_size {self._expected_y[-1]}"
            )
        return self.task.with_operator(self.task.operator.to(y.device))

    def restore(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Restore the good items of a batch from the data module; see `predict_step`."""
        names, bad = list(batch["name"]), list(batch.get("bad", []))
        out: dict[str, Any] = {"name": names, "index": [], "path": list(batch.get("path", [])),
                               "notes": list(batch.get("notes", [[] for _ in names])), "bad": bad,
                               "original_size": list(batch.get("original_size", [None for _ in names]))}
        if not names:
            return out
        self.build_prior()
        indices = [int(i) for i in batch["index"]]
        start = time.perf_counter()
        x = batch.get("x")
        if x is not None:
            y, task = self.task.measure(x, seed=self.seed, indices=indices)
        else:
            y = batch["y"]
            task = self._measured_task(batch, y)
        recon = self.solver.restore(self.diffusion, task, y, seed=self.seed, indices=indices,
                                    progress=self.step_progress)
        if recon.is_cuda:
            torch.cuda.synchronize(recon.device)
        seconds = (time.perf_counter() - start) / len(names)
        operator = task.operator
        picture = measurement_picture(y, operator, tuple(recon.shape[1:]))
        mask = operator_mask(operator)
        if mask is not None and mask.shape[0] == 1 and len(names) > 1:
            mask = mask.expand(len(names), -1, -1, -1)
        rows: list[dict[str, Any]] = [{"seconds": seconds} for _ in names]
        if x is not None:
            self._metrics(x, recon, picture, rows)
        out.update(index=indices, recon=recon.detach().cpu(), metrics=rows,
                   input=picture.cpu() if picture is not None else None,
                   label=x.detach().cpu() if x is not None else None,
                   mask=mask.detach().float().cpu() if mask is not None else None)
        self._done += len(names)
        return out

    def _metrics(self, x: Tensor, recon: Tensor, picture: Tensor | None, rows: list[dict[str, Any]]) -> None:
        # on the 8-bit levels the PNGs store, so that `dpgkit evaluate` on the files agrees
        truth = metrics.to_unit_range(quantize(x.detach().float()))
        est = metrics.to_unit_range(quantize(recon.detach().float()))
        values: dict[str, Tensor] = {"psnr": metrics.psnr(est, truth)}
        if min(truth.shape[-2:]) >= 11:
            values["ssim"] = metrics.ssim(est, truth)
        if self.lpips_metric is not None:
            values["lpips"] = self.lpips_metric(est, truth)
        if picture is not None and picture.shape == truth.shape:
            values["input_psnr"] = metrics.psnr(metrics.to_unit_range(quantize(picture)), truth)
        for key, vals in values.items():
            for row, v in zip(rows, vals.double().cpu().tolist()):
                row[key] = v
        for v in values["psnr"].double().cpu().tolist():
            if v == v and abs(v) != float("inf"):
                self._psnr_sum += v
                self._psnr_count += 1

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Restore a batch: simulate y from x (or take the measured y), run the solver, score.

        Returns a dict: name, index, path, notes (per item), recon (B, C, H, W), input (y as a
        picture), label (x or None), mask (or None), metrics (one dict per item), bad (items the
        loader could not use).

        A batch that fails (a measurement of the wrong shape, an error in the operator or the
        solver) is not the end of the run: its items come back as bad items with the reason, and
        the run goes on with the next batch (Ctrl-C and out-of-memory on the host still stop it).
        """
        try:
            return self.restore(batch)
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as err:  # one item's failure must not end a long run: list it and go on
            reason = str(err) if isinstance(err, ImageError) else f"{type(err).__name__}: {err}"
            names, paths = list(batch["name"]), list(batch.get("path", []))
            failed = [{"index": int(i), "name": n, "path": paths[k] if k < len(paths) else n, "error": reason}
                      for k, (i, n) in enumerate(zip(batch["index"], names))]
            return {"name": [], "index": [], "path": [], "notes": [], "original_size": [],
                    "bad": list(batch.get("bad", [])) + failed}

    def pixel_settings(self) -> dict[str, Any]:
        """The module's settings that determine each item's pixels (the writer records them with
        each item, and refuses to mix items made with other settings in one folder)."""
        prior = repr(self.prior) + (f" dtype={self.prior.dtype}" if getattr(self.prior, "dtype", None) else "")
        if isinstance(getattr(self.prior, "preset", None), dict):  # a UNet config: its repr does not show it
            prior += " " + json.dumps(self.prior.preset, sort_keys=True)
        return {"prior": prior, "operator": repr(self.task.operator), "noise": repr(self.task.noise),
                "noisy_unobserved": bool(self.task.noisy_unobserved), "solver": _solver_arguments(self.solver),
                "seed": self.seed}

    def describe(self) -> dict[str, str]:
        """What ran, for the summary."""
        return {**self.labels, "prior": repr(self.prior), "operator": repr(self.task.operator),
                "noise": repr(self.task.noise), "solver": repr(self.solver), "seed": str(self.seed),
                "lpips": self.lpips_status, "threads": str(torch.get_num_threads())}


# solver arguments that choose how the same numbers are computed (the eager, chunked and fused
# paths draw the same Monte Carlo samples), not which pixels come out
_HOW_NOT_WHAT = ("backend", "chunk_size")


def _solver_arguments(solver: Solver) -> str:
    """The solver's repr, completed with the constructor arguments it leaves out (e.g. DPS's clip)."""
    text = repr(solver)
    try:
        names = [p for p in inspect.signature(type(solver)).parameters if p not in ("self", "args", "kwargs")]
    except (TypeError, ValueError):
        return text
    extra = [f"{n}={getattr(solver, n)!r}" for n in names
             if n not in _HOW_NOT_WHAT and f"{n}=" not in text and hasattr(solver, n)]
    return f"{text} [{', '.join(extra)}]" if extra else text


def _is_inpainting(operator: Operator) -> bool:
    from ..operators import inpainting

    return isinstance(operator, (inpainting.Inpainting, inpainting.InpaintingTemplate))
