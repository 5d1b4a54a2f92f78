"""Named diffusion priors (presets) and the checkpoint loader that turns one into a `DiffusionModel`.

A preset is a guided-diffusion UNet config plus the checkpoint file it expects and where that file
is published. `load` builds the network on the meta device, checks the checkpoint's tensor names
and shapes against it strictly, then fills it from the file (no throw-away random init).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..diffusion import Schedule
from .base import DiffusionModel
from .unet import UNET_DEFAULTS, UNetModel, random_init_, unet_from_config

__all__ = [
    "PRESETS",
    "CheckpointMismatchError",
    "CheckpointReadError",
    "Preset",
    "build_unet",
    "check_state_dict",
    "load",
    "read_checkpoint",
    "register_preset",
]

# Where bare checkpoint names are also looked for: files shipped inside the package.
WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class Preset:
    """A named prior: guided-diffusion UNet config, expected checkpoint file name and its source."""

    name: str
    config: Mapping[str, Any]
    checkpoint_name: str | None = None
    url: str | None = None
    description: str = ""
    image_shape: tuple[int, int, int] = field(init=False)

    def __post_init__(self) -> None:
        size = int(self.config["image_size"])
        channels = int(self.config.get("in_channels", 3))
        object.__setattr__(self, "image_shape", (channels, size, size))


PRESETS: dict[str, Preset] = {}


def register_preset(
    name: str,
    config: Mapping[str, Any],
    checkpoint_name: str | None = None,
    url: str | None = None,
    description: str = "",
    overwrite: bool = False,
) -> Preset:
    """Add a preset to `PRESETS` (guided-diffusion argument names; missing ones take its defaults).

    The config is checked by building the network on the meta device, so a bad one fails here.
    `checkpoint_name` is the file `load` looks for (also inside the package's `models/weights/`
    folder); `url` is where to get it, quoted when it is missing.
    """
    if name in PRESETS and not overwrite:
        raise ValueError(f"preset {name!r} is already registered (pass overwrite=True to replace)")
    full = {**UNET_DEFAULTS, **dict(config)}
    with torch.device("meta"):
        unet_from_config(full)
    preset = Preset(name, full, checkpoint_name, url, description)
    PRESETS[name] = preset
    return preset


_OPENAI = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"
_ADM256_UNCOND = {
    "image_size": 256,
    "num_channels": 256,
    "num_res_blocks": 2,
    "channel_mult": "",
    "learn_sigma": True,
    "class_cond": False,
    "use_checkpoint": False,
    "attention_resolutions": "32,16,8",
    "num_heads": 4,
    "num_head_channels": 64,
    "num_heads_upsample": -1,
    "use_scale_shift_norm": True,
    "dropout": 0.0,
    "resblock_updown": True,
    "use_fp16": False,
    "use_new_attention_order": False,
}
register_preset(
    "adm-imagenet256",
    _ADM256_UNCOND,
    checkpoint_name="256x256_diffusion_uncond.pt",
    url=_OPENAI + "256x256_diffusion_uncond.pt",
    description="OpenAI guided-diffusion, ImageNet 256x256 unconditional (552.8M parameters)",
)
register_preset(
    "adm-lsun-bedroom256",
    # same network; trained with dropout 0.1, which does nothing in eval mode
    {**_ADM256_UNCOND, "dropout": 0.1},
    checkpoint_name="lsun_bedroom.pt",
    url=_OPENAI + "lsun_bedroom.pt",
    description="OpenAI guided-diffusion, LSUN bedroom 256x256 (same architecture as ImageNet)",
)
register_preset(
    "adm-ffhq256",
    {
        **_ADM256_UNCOND,
        "num_channels": 128,
        "num_res_blocks": 1,
        "attention_resolutions": "16",
    },
    checkpoint_name="ffhq_10m.pt",
    url="https://drive.google.com/drive/folders/1jElnRoFv7b31fG0v6pTSQkelbSX3xGZh?usp=sharing "
    "(linked from https://github.com/DPS2022/diffusion-posterior-sampling)",
    description="DPS (Chung et al. 2023) FFHQ 256x256 unconditional (93.6M parameters)",
)

# The embedded prior: trained by `dpgkit fit --config recipes/train_demo_prior.yaml` (see its
# model card, dpgkit/models/cards/demo-fashion32.md); the weights ship in models/weights/.
register_preset(
    "demo-fashion32",
    {
        "image_size": 32,
        "in_channels": 1,
        "num_channels": 32,
        "channel_mult": "1,2,2",
        "num_res_blocks": 1,
        "attention_resolutions": "",
        "learn_sigma": False,
        "use_scale_shift_norm": True,
        "dropout": 0.0,
    },
    checkpoint_name="demo-fashion32.safetensors",
    description="dpgkit's embedded demo prior: Fashion-MNIST padded to 32x32, 1 channel (1.1M parameters)",
)


def _resolve(preset_or_config: str | Mapping[str, Any]) -> tuple[dict[str, Any], Preset | None]:
    if isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise KeyError(
                f"unknown preset {preset_or_config!r}; registered: {sorted(PRESETS)} "
                "(or pass a dict of guided-diffusion UNet arguments)"
            )
        preset = PRESETS[preset_or_config]
        return dict(preset.config), preset
    if isinstance(preset_or_config, Mapping):
        return {**UNET_DEFAULTS, **dict(preset_or_config)}, None
    raise TypeError(
        f"expected a preset name or a config dict, got {type(preset_or_config).__name__}"
    )


def build_unet(
    config: str | Mapping[str, Any], device: str | torch.device = "cpu", seed: int = 0
) -> UNetModel:
    """The UNet of a preset name or guided-diffusion config, with seeded random weights.

    The weights are not a trained prior: every tensor is drawn from a generator seeded with
    `seed` (nothing zero, see `random_init_`), for tests and benchmarks; the global RNG is left
    alone. `device="meta"` gives the bare structure (names and shapes, no storage).
    """
    cfg, _ = _resolve(config)
    with torch.device("meta"):
        net = unet_from_config(cfg)
    if torch.device(device).type == "meta":
        return net
    net.to_empty(device=device)
    return random_init_(net, torch.Generator().manual_seed(seed))


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors differ from the network's: names missing, unexpected or misshapen."""

    def __init__(
        self,
        source: str,
        missing: list[str],
        unexpected: list[str],
        wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        self.missing, self.unexpected, self.wrong_shape = missing, unexpected, wrong_shape

        def listing(items: list[str], limit: int = 20) -> str:
            more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
            return "\n    " + "\n    ".join(items[:limit]) + more

        parts = [f"checkpoint {source} does not match the network:"]
        if missing:
            parts.append(f"  {len(missing)} missing key(s):" + listing(missing))
        if unexpected:
            parts.append(f"  {len(unexpected)} unexpected key(s):" + listing(unexpected))
        if wrong_shape:
            rows = [f"{k}: expected {tuple(e)} vs found {tuple(f)}" for k, e, f in wrong_shape]
            parts.append(f"  {len(wrong_shape)} wrongly shaped key(s):" + listing(rows))
        super().__init__("\n".join(parts))


def check_state_dict(net: nn.Module, state: Mapping[str, Tensor], source: str = "") -> None:
    """Raise `CheckpointMismatchError` unless `state` has exactly the names and shapes of `net`."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        (k, tuple(v.shape), tuple(state[k].shape))
        for k, v in expected.items()
        if k in state and tuple(v.shape) != tuple(state[k].shape)
    ]
    if missing or unexpected or wrong:
        raise CheckpointMismatchError(source or "state dict", missing, unexpected, wrong)


class CheckpointReadError(ValueError):
    """A checkpoint file that cannot be read as tensors: names the file and what is wrong with it."""

    def __init__(self, path: Path, err: BaseException) -> None:
        if isinstance(err, pickle.UnpicklingError):
            why = ("it holds Python objects besides tensors, which dpgkit does not unpickle (only tensors are "
                   "loaded, for safety); save the model's state_dict() (or a .safetensors file) and load that")
        else:
            size = path.stat().st_size if path.exists() else 0
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            why = (f"it is not a readable checkpoint ({first}; {size:,} bytes): a truncated or corrupted "
                   "download? Fetch the file again")
        super().__init__(f"checkpoint {path}: {why}")


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """A flat {name: tensor} state dict on the CPU from a .pt / .pth or .safetensors file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pt", ".pth"):
        raise ValueError(f"checkpoint {path}: expected a .pt, .pth or .safetensors file")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointReadError(path, err) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        keys = list(state)[:10] if isinstance(state, Mapping) else []
        raise TypeError(
            f"checkpoint {path}: expected a flat state dict of tensors, found "
            f"{type(state).__name__}" + (f" with keys {keys}" if keys else "")
        )
    return dict(state)


def _find_checkpoint(checkpoint: str | Path, preset: Preset | None) -> Path:
    path = Path(checkpoint)
    if path.is_dir() and preset is not None and preset.checkpoint_name:
        path = path / preset.checkpoint_name
    if not path.is_file() and len(Path(checkpoint).parts) == 1 and (WEIGHTS_DIR / path).is_file():
        path = WEIGHTS_DIR / path
    if path.is_file():
        return path
    msg = f"checkpoint file not found: {path}"
    if preset is not None and preset.checkpoint_name:
        msg += f"; preset {preset.name!r} expects the file {preset.checkpoint_name!r}"
        if preset.url:
            msg += f", published at {preset.url}"
        msg += " (download it and pass its path, or the folder holding it)"
    raise FileNotFoundError(msg)


def load(
    preset_or_config: str | Mapping[str, Any],
    checkpoint: str | Path | None = None,
    dtype: torch.dtype | None = None,
    activation_checkpointing: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> DiffusionModel:
    """A guided-diffusion prior as a `DiffusionModel` (linear schedule, T = 1000), in eval mode.

    Args:
        preset_or_config: a name in `PRESETS` or a dict of guided-diffusion UNet arguments.
        checkpoint: a .pt / .pth / .safetensors state dict, or a folder holding the preset's file.
            Its tensor names and shapes must match exactly (`CheckpointMismatchError` lists the
            missing, unexpected and wrongly shaped ones); a missing file raises
            FileNotFoundError naming the expected file and where it is published.
            None builds RANDOM weights (seeded by `seed`): for tests and benchmarks only, not a
            prior of anything.
        dtype: compute dtype (e.g. torch.bfloat16), applied with autocast; weights stay float32.
        activation_checkpointing: recompute block activations in the backward pass (less memory
            for the VJP through the network, about one extra forward); also on if the config says
            `use_checkpoint`.
        device: where the weights go; "meta" with no checkpoint gives the bare structure.

    The parameters are frozen (requires_grad False): guidance differentiates w.r.t. x_t only.
    """
    cfg, preset = _resolve(preset_or_config)
    if checkpoint is None:
        net = build_unet(cfg, device=device, seed=seed)
    else:
        path = _find_checkpoint(checkpoint, preset)
        state = read_checkpoint(path)
        with torch.device("meta"):
            net = unet_from_config(cfg)
        check_state_dict(net, state, source=str(path))
        # checkpoints saved in half precision still give float32 weights (autocast does the rest)
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        net.load_state_dict(state, strict=True, assign=True)
        net.to(device)
    net.use_checkpoint = bool(activation_checkpointing or cfg["use_checkpoint"])
    net.eval().requires_grad_(False)
    size = int(cfg["image_size"])
    return DiffusionModel(
        net,
        image_shape=(int(cfg["in_channels"]), size, size),
        schedule=Schedule.linear(1000),
        learned_sigma=bool(cfg["learn_sigma"]),
        dtype=dtype,
    )
