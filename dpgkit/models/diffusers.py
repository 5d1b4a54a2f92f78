"""Hugging Face diffusers priors: a `UNet2DModel` and its scheduler config as a `DiffusionModel`.

What is carried over from the scheduler config (the fields every diffusers DDPM-family scheduler
shares): the training schedule (`num_train_timesteps`, `beta_schedule` among "linear",
"scaled_linear" and "squaredcos_cap_v2", `beta_start`/`beta_end`, or `trained_betas`), the
`prediction_type` ("epsilon", "v_prediction" or "sample"; the last two are turned into eps with the
schedule) and, for a UNet with 2C output channels, `variance_type` "learned_range" (the same
interpolation between log beta_t and the log posterior variance that guided-diffusion uses, so
dpgkit's `model_log_variance(kind="learned_range")` reads those channels unchanged).

Timesteps: diffusers' UNet2DModel is trained on integer timesteps 0..T-1 of the scheduler's
training schedule, with x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, which is dpgkit's convention
too (`DiffusionModel` calls `fn(x_t, t)` with the original schedule's integer timesteps), so `t`
passes through unchanged and dpgkit's own respacing chooses the steps. Sampler options of the
scheduler (`clip_sample`, `thresholding`, `timestep_spacing`, `steps_offset`) are not part of the
prior: dpgkit's solvers choose their steps and clip x0hat to [-1, 1] themselves.

Sources: Ho et al. 2020 (DDPM, eq. 4 and 15); Salimans & Ho 2022 (v-prediction, section 4,
v = sqrt(abar) eps - sqrt(1 - abar) x0); Nichol & Dhariwal 2021 (cosine schedule, eq. 17; learned
range variance, eq. 15); the diffusers `DDPMScheduler` for the config field names and the
float32 beta tables.

Nothing is downloaded: a path must be a local folder written by `save_pretrained`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..diffusion import Schedule
from .base import DiffusionModel

__all__ = ["from_diffusers", "DiffusersEps", "diffusers_schedule", "diffusers_image_shape"]

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_LAYOUT = (
    "a diffusers folder written by save_pretrained: either a pipeline folder (model_index.json, "
    "unet/config.json + unet/diffusion_pytorch_model.safetensors, scheduler/scheduler_config.json) or "
    "a UNet folder (config.json + diffusion_pytorch_model.safetensors, with scheduler_config.json "
    "beside them or the scheduler given separately)"
)


def _import_diffusers():
    try:
        import diffusers
    except ImportError as err:
        raise ImportError(
            "dpgkit.models.from_diffusers needs the diffusers package: pip install 'dpgkit[diffusers]'"
        ) from err
    return diffusers


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: expected {path} ({_LAYOUT})")
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _folders(path: str | Path) -> tuple[Path, Path | None]:
    """(the UNet's folder, the scheduler config file or None) of a pipeline or UNet folder."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"diffusers prior folder not found: {root} (expected {_LAYOUT})")
    index = root / "model_index.json"
    if index.is_file():
        components = _read_json(index, "model_index.json")
        latent = sorted(k for k in ("vae", "vqvae", "text_encoder") if components.get(k))
        if latent:
            raise ValueError(
                f"{root} is a latent or text-conditioned pipeline (it has {latent}); dpgkit's priors "
                "work in pixel space: give an unconditional pixel-space UNet2DModel pipeline (e.g. DDPMPipeline)"
            )
        scheduler = root / "scheduler" / "scheduler_config.json"
        return root / "unet", scheduler if scheduler.is_file() else None
    if (root / "config.json").is_file():
        scheduler = root / "scheduler_config.json"
        return root, scheduler if scheduler.is_file() else None
    raise FileNotFoundError(
        f"{root} has neither model_index.json nor config.json; expected {_LAYOUT}. Found: "
        f"{sorted(p.name for p in root.iterdir())[:20]}"
    )


def _unet_config(unet_dir: Path) -> dict[str, Any]:
    config = _read_json(unet_dir / "config.json", "the UNet's config.json")
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ValueError(
            f"{unet_dir / 'config.json'} describes a {name}; dpgkit reads diffusers' unconditional "
            "pixel-space UNet2DModel only"
        )
    return config


def diffusers_image_shape(path: str | Path) -> tuple[int, int, int]:
    """(C, H, W) of the images a diffusers UNet folder generates, read from its config.json alone
    (no diffusers import). Raises FileNotFoundError/ValueError as `from_diffusers` does."""
    unet_dir, _ = _folders(path)
    return _shape_from_config(_unet_config(unet_dir), unet_dir)


def _shape_from_config(config: Mapping[str, Any], where: Any) -> tuple[int, int, int]:
    size = config.get("sample_size")
    if size is None:
        raise ValueError(f"the UNet config of {where} has no sample_size: dpgkit needs the image size")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(config.get("in_channels", 3)), int(h), int(w)


def diffusers_schedule(config: Mapping[str, Any]) -> Schedule:
    """The training `Schedule` of a diffusers scheduler config (a dict or a scheduler's `.config`).

    The betas are computed in float32 as diffusers computes them (so abar matches the scheduler's
    `alphas_cumprod` bit for bit) and then held in float64 as dpgkit's schedules are.
    Raises ValueError for beta schedules other than linear, scaled_linear, squaredcos_cap_v2 (or
    `trained_betas`), and for `rescale_betas_zero_snr` (abar_T = 0 has no eps parametrisation).
    """
    t_count = int(config.get("num_train_timesteps", 1000))
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("rescale_betas_zero_snr=True gives abar_T = 0, where x0 and eps cannot be recovered "
                         "from each other; dpgkit does not support zero-terminal-SNR schedules")
    trained = config.get("trained_betas")
    if trained is not None:
        betas = torch.tensor(trained, dtype=torch.float32)
        if betas.shape != (t_count,):
            raise ValueError(f"trained_betas must have num_train_timesteps={t_count} entries, got {tuple(betas.shape)}")
        return Schedule.from_betas(betas.double())
    kind = config.get("beta_schedule", "linear")
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    if kind == "linear":
        betas = torch.linspace(start, end, t_count, dtype=torch.float32)
    elif kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, t_count, dtype=torch.float32) ** 2
    elif kind == "squaredcos_cap_v2":
        def abar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - abar((i + 1) / t_count) / abar(i / t_count), 0.999) for i in range(t_count)],
                             dtype=torch.float32)
    else:
        raise ValueError(f"unsupported diffusers beta_schedule {kind!r}: expected one of {_BETA_SCHEDULES} "
                         "or trained_betas")
    return Schedule.from_betas(betas.double())


class DiffusersEps(nn.Module):
    """A diffusers UNet2DModel as dpgkit's eps predictor: `forward(x_t, t)` -> (B, C or 2C, H, W).

    x_t (B, C, H, W) on the model's scale (images in [-1, 1]), t (B,) integer timesteps 0..T-1 of
    the training schedule. v and x0 predictions become eps with the schedule's abar_t:
    eps = sqrt(abar) v + sqrt(1 - abar) x_t (Salimans & Ho 2022, section 4), and
    eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar) (Ho et al. 2020, eq. 4). Learned-range variance
    channels (2C outputs) pass through unchanged.
    """

    def __init__(self, unet: nn.Module, schedule: Schedule, prediction_type: str = "epsilon") -> None:
        super().__init__()
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {prediction_type!r}: expected one of {_PREDICTION_TYPES}")
        self.unet = unet
        self.prediction_type = prediction_type
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod.clone(), persistent=False)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        out = self.unet(x_t, t).sample
        if self.prediction_type == "epsilon":
            return out
        c = x_t.shape[1]
        head, rest = out[:, :c], out[:, c:]
        # in float64: v -> eps cancels x_t against (1 - abar) x_t where abar_t is ~1e-5
        abar = self.alphas_cumprod.to(x_t.device)[t.to(x_t.device).long()].reshape(-1, 1, 1, 1)
        xt64, head64 = x_t.double(), head.double()
        if self.prediction_type == "v_prediction":
            eps = abar.sqrt() * head64 + (1 - abar).sqrt() * xt64
        else:  # sample: the network predicts x0
            eps = (xt64 - abar.sqrt() * head64) / (1 - abar).sqrt()
        return torch.cat([eps.to(out.dtype), rest], 1)


def _scheduler_config(scheduler: Any) -> dict[str, Any]:
    if scheduler is None:
        raise ValueError(f"no scheduler config: give scheduler= (a diffusers scheduler, its config dict, or the "
                         f"path of scheduler_config.json or its folder), or a folder laid out as {_LAYOUT}")
    if isinstance(scheduler, (str, Path)):
        path = Path(scheduler)
        if path.is_dir():
            path = path / "scheduler_config.json"
        return _read_json(path, "scheduler_config.json")
    if isinstance(scheduler, Mapping):
        return dict(scheduler)
    config = getattr(scheduler, "config", None)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"scheduler must be a diffusers scheduler, a config dict or a path, got {type(scheduler).__name__}")


def _load_unet(unet_dir: Path, config: dict[str, Any], device: str | torch.device) -> nn.Module:
    diffusers = _import_diffusers()
    weights = [unet_dir / name for name in _WEIGHT_FILES if (unet_dir / name).is_file()]
    if not weights:
        raise FileNotFoundError(
            f"no UNet weights in {unet_dir}: expected {' or '.join(_WEIGHT_FILES)} "
            f"(sharded or variant checkpoints are not read); found {sorted(p.name for p in unet_dir.iterdir())[:20]}"
        )
    unet = diffusers.UNet2DModel.from_config(config)
    if weights[0].suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights[0]))
    else:
        state = torch.load(weights[0], map_location="cpu", weights_only=True)
    # strict: a missing or misshapen tensor is an error here, not a silently random layer
    own = unet.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    misshapen = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or misshapen:
        raise ValueError(
            f"{weights[0]} does not match {unet_dir / 'config.json'}: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}), shape mismatch {misshapen[:5]} ({len(misshapen)})"
        )
    unet.load_state_dict(state, strict=True)
    return unet.to(device)


def from_diffusers(
    path_or_model: str | Path | nn.Module,
    scheduler: Any = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> DiffusionModel:
    """A diffusers `UNet2DModel` and its scheduler config as a dpgkit `DiffusionModel`.

    Args:
        path_or_model: a local folder written by `save_pretrained` (a pipeline folder with
            model_index.json, unet/ and scheduler/, or a UNet folder with config.json and
            diffusion_pytorch_model.safetensors, .bin read with weights_only=True), or a
            `diffusers.UNet2DModel` object. Never downloaded.
        scheduler: the scheduler config when the folder does not hold one or a model object is
            given: a diffusers scheduler, its config dict, or the path of scheduler_config.json (or
            its folder). Overrides the folder's own.
        dtype: compute dtype of the network (e.g. torch.bfloat16), see `DiffusionModel`.
        device: where the weights go.

    Returns:
        a `DiffusionModel` over images (C, H, W) = (in_channels, sample_size) in [-1, 1], whose
        `fn(x_t, t)` returns eps (C channels) or eps and learned-range variance values (2C), with
        the scheduler's training schedule.

    Raises:
        ImportError: diffusers is not installed (`pip install 'dpgkit[diffusers]'`).
        FileNotFoundError: the folder or one of its files is missing (the message lists what is
            expected).
        ValueError: a model or scheduler dpgkit cannot represent: not a UNet2DModel, latent or
            class-conditional, Fourier (continuous-sigma) time embedding, unknown prediction or
            beta schedule, 2C outputs without variance_type "learned_range", or weights that do not
            match the config (strict key and shape check).
    """
    if isinstance(path_or_model, (str, Path)):
        unet_dir, scheduler_file = _folders(path_or_model)
        config = _unet_config(unet_dir)
        _check_unet_config(config, unet_dir)
        sched_config = _scheduler_config(scheduler if scheduler is not None else scheduler_file)
        unet = _load_unet(unet_dir, config, device)
        where: Any = unet_dir
    elif isinstance(path_or_model, nn.Module):
        diffusers = _import_diffusers()
        if not isinstance(path_or_model, diffusers.UNet2DModel):
            raise TypeError(f"from_diffusers reads a diffusers UNet2DModel, got {type(path_or_model).__name__}")
        unet, where = path_or_model.to(device), type(path_or_model).__name__
        config = dict(unet.config)
        _check_unet_config(config, where)
        sched_config = _scheduler_config(scheduler)
    else:
        raise TypeError(f"from_diffusers takes a folder path or a UNet2DModel, got {type(path_or_model).__name__}")

    schedule = diffusers_schedule(sched_config)
    prediction = sched_config.get("prediction_type", "epsilon")
    c, h, w = _shape_from_config(config, where)
    out_channels = int(config.get("out_channels", c))
    variance = sched_config.get("variance_type", "fixed_small")
    if out_channels == 2 * c:
        if variance != "learned_range":
            raise ValueError(
                f"the UNet has {out_channels} = 2 x {c} output channels but the scheduler's variance_type is "
                f"{variance!r}; dpgkit reads a learned variance only as 'learned_range'"
            )
        learned = True
    elif out_channels == c:
        learned = False
    else:
        raise ValueError(f"the UNet maps {c} channels to {out_channels}: expected {c} (eps, v or x0) or {2 * c} "
                         "(and learned-range variance)")
    unet.eval().requires_grad_(False)
    fn = DiffusersEps(unet, schedule, prediction).to(device)
    return DiffusionModel(fn, (c, h, w), schedule=schedule, learned_sigma=learned, dtype=dtype)


def _check_unet_config(config: Mapping[str, Any], where: Any) -> None:
    if config.get("time_embedding_type", "positional") == "fourier":
        raise ValueError(f"{where}: a Fourier time embedding takes continuous noise levels (score-SDE VE models); "
                         "dpgkit's priors are variance-preserving with integer timesteps")
    if config.get("num_class_embeds") or config.get("class_embed_type"):
        raise ValueError(f"{where}: a class-conditional UNet2DModel needs class labels; dpgkit's priors are "
                         "unconditional")
