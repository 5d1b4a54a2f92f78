"""`KernelWizard`: the blur-kernel encoding network of Tran et al., CVPR 2021 (bkse).

"Explore Image Deblurring via Encoded Blur Kernel Space" (Tran, Tran, Nguyen, Nguyen, Tran, Hua,
CVPR 2021, Section 3) encodes a blur operator as a latent code k: F(x_sharp, x_blur) -> k (the
kernel extractor), and G(x_sharp, k) -> x_blur (the kernel adapter with the feature extractor
and the reconstruction trunk). DPS and DPG use G with a random code as their "non-linear blur".

This module writes the network from that description, with the tensor names of the published
checkpoints (GOPRO_wVAE.pth: 159 tensors, 115,265,475 parameters), and loads them strictly.
Images are in [0, 1] here; `NonlinearBlur` (nonlinear_blur.py) maps [-1, 1] images to them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "KernelWizardConfig", "KernelWizard", "KernelWizardCheckpointError", "GOPRO_WVAE",
    "CHECKPOINT_NAME", "CHECKPOINT_URL", "load_kernel_wizard", "random_kernel_wizard",
]

CHECKPOINT_NAME = "GOPRO_wVAE.pth"
CHECKPOINT_URL = (
    "the model zoo of https://github.com/VinAIResearch/blur-kernel-space-exploring "
    "(README, 'GOPRO wVAE'; bkse's experiments/pretrained/GOPRO_wVAE.pth)"
)

# Spatial reduction from an image to its kernel code: the feature extractor halves twice and the
# U-Net adapter five times, so the code of an H x W image is (8 nf, H / 128, W / 128).
CODE_STRIDE = 4 * 32


@dataclass(frozen=True)
class KernelWizardConfig:
    """The network's hyper-parameters; the defaults are the published GOPRO wVAE configuration
    (bkse's options/kernel_encoding/GOPRO/wVAE.yml, section KernelWizard).

    input_nc: image channels. nf: feature channels. front_RBs / back_RBs: residual blocks of the
    feature extractor / reconstruction trunk. kernel_dim: channels of the extractor's code
    (doubled when use_vae: mean and log variance). use_sharp: the extractor also sees the sharp
    image. n_blocks: residual blocks of the extractor; padding_type: their padding ("reflect",
    "replicate" or "zero"). Normalisation layers and dropout: only the published "none" / off.
    """

    input_nc: int = 3
    nf: int = 64
    front_RBs: int = 10  # noqa: N815 - bkse's option names, so configs read across
    back_RBs: int = 20  # noqa: N815
    kernel_dim: int = 512
    use_vae: bool = True
    use_sharp: bool = True
    n_blocks: int = 4
    padding_type: str = "reflect"

    def __post_init__(self) -> None:
        for name in ("input_nc", "nf", "kernel_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"KernelWizardConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("front_RBs", "back_RBs", "n_blocks"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"KernelWizardConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.padding_type not in ("reflect", "replicate", "zero"):
            raise ValueError(
                f"padding_type must be 'reflect', 'replicate' or 'zero', got {self.padding_type!r}")

    @property
    def code_channels(self) -> int:
        """Channels of the code the adapter takes: 8 nf (512 for GOPRO wVAE)."""
        return 8 * self.nf

    def code_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(8 nf, H / 128, W / 128), the kernel code of an H x W image; H, W multiples of 128."""
        if height % CODE_STRIDE or width % CODE_STRIDE or min(height, width) < CODE_STRIDE:
            raise ValueError(
                f"the bkse blur network needs images whose sides are multiples of {CODE_STRIDE} "
                f"(256 x 256 in the paper), got {height} x {width}")
        return self.code_channels, height // CODE_STRIDE, width // CODE_STRIDE

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> KernelWizardConfig:
        """From bkse's option dict (the KernelWizard section of its YAML files, nested
        KernelExtractor / Adapter included). Keys that do not shape the network (N_frames,
        img_size, pretrained) are accepted and ignored; unknown keys and unsupported
        normalisation or dropout raise ValueError."""
        opts = dict(options)
        extractor = dict(opts.pop("KernelExtractor", {}) or {})
        adapter = dict(opts.pop("Adapter", {}) or {})
        for part, section in (("KernelExtractor", extractor), ("Adapter", adapter)):
            if section.pop("norm", "none") != "none":
                raise ValueError(f"{part}.norm: only 'none' (the published GOPRO configs) is supported")
            if section.pop("use_dropout", False):
                raise ValueError(f"{part}.use_dropout: only false (the published GOPRO configs) is supported")
        for key in ("N_frames", "img_size", "pretrained"):
            opts.pop(key, None)
        for key in ("use_sharp", "n_blocks", "padding_type"):
            if key in extractor:
                opts[key] = extractor.pop(key)
        leftover = sorted(opts.keys() - {f.name for f in fields(cls)}) + [
            f"KernelExtractor.{k}" for k in extractor] + [f"Adapter.{k}" for k in adapter]
        if leftover:
            raise ValueError(f"unknown KernelWizard option(s): {', '.join(leftover)}")
        return cls(**opts)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def coerce(cls, config: KernelWizardConfig | Mapping[str, Any] | None) -> KernelWizardConfig:
        """A config from itself, bkse's option mapping (`from_options`) or None (GOPRO wVAE)."""
        if config is None:
            return cls()
        if isinstance(config, KernelWizardConfig):
            return config
        if isinstance(config, Mapping):
            return cls.from_options(config)
        raise TypeError(
            f"config must be a KernelWizardConfig, a bkse option mapping or None, got {type(config).__name__}")


GOPRO_WVAE = KernelWizardConfig()


class ResidualBlockNoBN(nn.Module):
    """x + conv2(relu(conv1(x))), 3x3 convolutions with bias, no normalisation (EDVR's block)."""

    def __init__(self, nf: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf, nf, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class _Padded3x3Block(nn.Module):
    """The extractor's residual block: x + [pad, conv, ReLU, pad, conv](x), convolutions without bias."""

    def __init__(self, dim: int, padding_type: str) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for second in (False, True):
            if padding_type == "reflect":
                layers.append(nn.ReflectionPad2d(1))
            elif padding_type == "replicate":
                layers.append(nn.ReplicationPad2d(1))
            layers.append(nn.Conv2d(dim, dim, 3, padding=1 if padding_type == "zero" else 0, bias=False))
            layers.append(nn.Identity())  # the normalisation slot ("none"), kept for the tensor names
            if not second:
                layers.append(nn.ReLU())
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv_block(x)


class KernelExtractor(nn.Module):
    """F: features of the sharp and the blurred image -> kernel code (mean, log variance).

    Input (B, 2 nf, h, w) (or nf without use_sharp); output (B, kernel_dim, h / 32, w / 32) twice.
    """

    def __init__(self, cfg: KernelWizardConfig) -> None:
        super().__init__()
        nf = cfg.nf
        self.kernel_dim, self.use_vae = cfg.kernel_dim, cfg.use_vae
        out_nc = cfg.kernel_dim * (2 if cfg.use_vae else 1)
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3), nn.Conv2d(2 * nf if cfg.use_sharp else nf, nf, 7, bias=False),
            nn.Identity(), nn.ReLU(),
        ]
        for i in range(5):  # five stride-2 stages, widths doubling up to the code's
            layers += [nn.Conv2d(min(nf * 2**i, out_nc), min(nf * 2 ** (i + 1), out_nc), 3, 2, 1, bias=False),
                       nn.Identity(), nn.ReLU()]
        layers += [_Padded3x3Block(out_nc, cfg.padding_type) for _ in range(cfg.n_blocks)]
        self.model = nn.Sequential(*layers)

    def forward(self, sharp: Tensor, blur: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(torch.cat((sharp, blur), dim=1))
        if self.use_vae:
            return out[:, : self.kernel_dim], out[:, self.kernel_dim :]
        return out, torch.zeros_like(out)


class UnetSkipBlock(nn.Module):
    """One level of G's U-Net (the pix2pix skip block): down 4x4/2, the inner levels, up 4x4/2.

    Levels other than the outermost leaky-ReLU (0.2) their input and carry *that* activated input
    in the skip connection (in the reference the activation is in place, so the skip sees it);
    the innermost level concatenates the kernel code to its bottleneck.
    """

    def __init__(self, outer_nc: int, inner_nc: int, input_nc: int | None = None,
                 submodule: UnetSkipBlock | None = None, outermost: bool = False) -> None:
        super().__init__()
        self.outermost, self.innermost = outermost, submodule is None
        input_nc = outer_nc if input_nc is None else input_nc
        down = nn.Conv2d(input_nc, inner_nc, 4, 2, 1, bias=False)
        up = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, 2, 1, bias=outermost)
        # registration order down, submodule, up: the checkpoint's tensor order
        if outermost:
            self.down = nn.Sequential(down)
        else:
            self.down = nn.Sequential(nn.LeakyReLU(0.2), down, *([] if self.innermost else [nn.Identity()]))
        if submodule is not None:
            self.submodule = submodule
        self.up = nn.Sequential(nn.ReLU(), up, nn.Tanh() if outermost else nn.Identity())

    def forward(self, x: Tensor, code: Tensor) -> Tensor:
        if self.outermost:
            return self.up(self.submodule(self.down(x), code))
        skip = F.leaky_relu(x, 0.2)
        h = self.down[1:](skip)
        h = torch.cat((h, code), dim=1) if self.innermost else self.submodule(h, code)
        return torch.cat((self.up(h), skip), dim=1)


class KernelAdapter(nn.Module):
    """G's U-Net: features (B, nf, h, w) and a code (B, 8 nf, h / 32, w / 32) -> (B, nf, h, w)."""

    def __init__(self, cfg: KernelWizardConfig) -> None:
        super().__init__()
        nf = cfg.nf
        block = UnetSkipBlock(nf * 8, nf * 8)
        block = UnetSkipBlock(nf * 4, nf * 8, submodule=block)
        block = UnetSkipBlock(nf * 2, nf * 4, submodule=block)
        block = UnetSkipBlock(nf, nf * 2, submodule=block)
        self.model = UnetSkipBlock(nf, nf, input_nc=nf, submodule=block, outermost=True)

    def forward(self, x: Tensor, code: Tensor) -> Tensor:
        return self.model(x, code)


class KernelWizard(nn.Module):
    """The bkse blur network (Tran et al., CVPR 2021, Fig. 2): F and G with shared features.

    `adapt_kernel(x, k)` (bkse's adaptKernel) blurs images x (B, input_nc, H, W) in [0, 1],
    H and W multiples of 128, with codes k (B, 8 nf, H / 128, W / 128); the output has x's shape
    (about [0, 1]; not clamped). `forward(sharp, blur)` encodes the blur that maps `sharp` to
    `blur` as (mean, log variance), each (B, kernel_dim, H / 128, W / 128).
    """

    def __init__(self, config: KernelWizardConfig | Mapping[str, Any] | None = None) -> None:
        super().__init__()
        cfg = KernelWizardConfig.coerce(config)
        self.config = cfg
        nf, lrelu = cfg.nf, nn.LeakyReLU(0.1)
        self.feature_extractor = nn.Sequential(
            nn.Conv2d(cfg.input_nc, nf, 3, 1, 1), lrelu,
            nn.Conv2d(nf, nf, 3, 2, 1), lrelu,
            nn.Conv2d(nf, nf, 3, 2, 1), lrelu,
            *[ResidualBlockNoBN(nf) for _ in range(cfg.front_RBs)],
        )
        self.kernel_extractor = KernelExtractor(cfg)
        self.adapter = KernelAdapter(cfg)
        # the trunk's last stages have 64 channels whatever nf is, as in the published network
        self.recon_trunk = nn.Sequential(
            *[ResidualBlockNoBN(nf) for _ in range(cfg.back_RBs)],
            nn.Conv2d(nf, nf * 4, 3, 1, 1), nn.PixelShuffle(2), lrelu,
            nn.Conv2d(nf, 64 * 4, 3, 1, 1), nn.PixelShuffle(2), lrelu,
            nn.Conv2d(64, 64, 3, 1, 1), lrelu,
            nn.Conv2d(64, cfg.input_nc, 3, 1, 1),
        )

    def _check(self, x: Tensor, who: str) -> None:
        if x.dim() != 4 or x.shape[1] != self.config.input_nc:
            raise ValueError(
                f"KernelWizard.{who} expects images (B, {self.config.input_nc}, H, W), got {tuple(x.shape)}")
        self.config.code_shape(*x.shape[-2:])

    def adapt_kernel(self, x: Tensor, code: Tensor) -> Tensor:
        """G(x, k): x (B, C, H, W) in [0, 1] blurred by the codes k (B, 8 nf, H / 128, W / 128)."""
        self._check(x, "adapt_kernel")
        expected = (x.shape[0], *self.config.code_shape(*x.shape[-2:]))
        if tuple(code.shape) != expected:
            raise ValueError(f"kernel codes for images {tuple(x.shape)} must be {expected}, got {tuple(code.shape)}")
        out = self.recon_trunk(self.adapter(self.feature_extractor(x), code))
        return out + x

    def forward(self, sharp: Tensor, blur: Tensor) -> tuple[Tensor, Tensor]:
        """F(sharp, blur): the code's mean and log variance (B, kernel_dim, H / 128, W / 128)."""
        self._check(sharp, "forward")
        if blur.shape != sharp.shape:
            raise ValueError(f"sharp and blurred images must have one shape, got {tuple(sharp.shape)} "
                             f"and {tuple(blur.shape)}")
        return self.kernel_extractor(self.feature_extractor(sharp), self.feature_extractor(blur))


class KernelWizardCheckpointError(ValueError):
    """A bkse checkpoint's tensors differ from the network's: names missing, unexpected or misshapen."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str],
                 wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> None:
        self.missing, self.unexpected, self.wrong_shape = missing, unexpected, wrong_shape

        def listing(items: list[str], limit: int = 20) -> str:
            more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
            return "".join(f"\n    {k}" for k in items[:limit]) + more

        parts = [f"{source} does not match the KernelWizard network:"]
        if missing:
            parts.append(f"  {len(missing)} missing key(s):" + listing(missing))
        if unexpected:
            parts.append(f"  {len(unexpected)} unexpected key(s):" + listing(unexpected))
        if wrong_shape:
            parts.append(f"  {len(wrong_shape)} wrongly shaped tensor(s):" + listing(
                [f"{k}: checkpoint {got}, network {want}" for k, got, want in wrong_shape]))
        super().__init__("\n".join(parts))


def _unwrap(obj: Any, source: str) -> dict[str, Tensor]:
    """The state dict inside a checkpoint: a plain one (as published, loaded by the DPS and DPG
    code with load_state_dict), one under "state_dict", or one saved through DataParallel
    ("module." prefixes, which bkse's own loader strips)."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{source} is not a state dict of tensors (got {type(obj).__name__})")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def check_state_dict(net: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Raise KernelWizardCheckpointError unless `state` has exactly the network's names and shapes."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()
             if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise KernelWizardCheckpointError(source, missing, unexpected, wrong)


def load_kernel_wizard(checkpoint: str | Path, config: KernelWizardConfig | Mapping[str, Any] | None = None,
                       device: torch.device | str = "cpu") -> KernelWizard:
    """The network with the weights of `checkpoint` (a file, or a folder holding GOPRO_wVAE.pth),
    loaded with torch.load(weights_only=True) and a strict check of names and shapes.

    Returns it in eval mode with requires_grad off (a fixed forward model; gradients still flow
    to its inputs). Raises FileNotFoundError naming the file and where it is published, and
    KernelWizardCheckpointError listing missing, unexpected and wrongly shaped tensors.
    """
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"bkse blur-network checkpoint not found: {path} (expected {CHECKPOINT_NAME}, published by "
            f"Tran et al. in {CHECKPOINT_URL})")
    state = _unwrap(torch.load(path, map_location="cpu", weights_only=True), str(path))
    with torch.device("meta"):
        net = KernelWizard(config)
    check_state_dict(net, state, str(path))
    net.load_state_dict(state, strict=True, assign=True)
    return net.to(device).eval().requires_grad_(False)


def random_kernel_wizard(seed: int, config: KernelWizardConfig | Mapping[str, Any] | None = None,
                         device: torch.device | str = "cpu") -> KernelWizard:
    """The network with random weights from `seed` (tests and smoke runs only: its blur means nothing).

    Every tensor is uniform with variance 1 / fan_in (bound sqrt(3 / fan_in); a bias takes its
    weight's), so that signals, the kernel code's included, keep their size through the layers
    (PyTorch's default, a third of that variance, all but erases the code's effect); drawn in
    state-dict order from one explicit generator, the global RNG untouched.
    """
    with torch.device("meta"):
        net = KernelWizard(config)
    gen = torch.Generator().manual_seed(int(seed))
    state = {}
    fan_in = 1
    for name, ref in net.state_dict().items():
        if ref.dim() > 1:  # dim 1 times the kernel, as PyTorch counts it (also for ConvTranspose2d)
            fan_in = ref.shape[1] * math.prod(ref.shape[2:])
        bound = math.sqrt(3.0 / fan_in)
        state[name] = (torch.rand(ref.shape, generator=gen) * 2 - 1) * bound
    net.load_state_dict(state, strict=True, assign=True)
    return net.to(device).eval().requires_grad_(False)
