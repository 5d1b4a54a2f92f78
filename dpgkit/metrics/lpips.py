"""LPIPS (Zhang et al., CVPR 2018) per image, VGG16 backbone as the paper, or AlexNet.

The ``lpips`` package's v0.1 linear layers (shipped inside that package) on torchvision's
ImageNet backbone weights, read from the torch hub cache or a path you give; nothing is ever
downloaded. Without the file the metric is unavailable (:func:`lpips_available` says which file
and where it comes from); it is never computed with random weights outside tests.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .common import MetricUnavailable, check_pair, hub_checkpoints

__all__ = ["LPIPS", "lpips_available"]

# torchvision's ImageNet weights of the LPIPS backbones: hub-cache file name and source.
_LPIPS_BACKBONES = {
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": (
        "alexnet-owt-7be5be79.pth",
        "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    ),
}
# below these sizes the backbones' pooling runs out of pixels
_LPIPS_MIN_SIZE = {"vgg": 16, "alex": 31}
_LPIPS_ALIASES = {"vgg": "vgg", "vgg16": "vgg", "alex": "alex", "alexnet": "alex"}


def _lpips_net_name(net: str) -> str:
    if net not in _LPIPS_ALIASES:
        raise ValueError(f"LPIPS net must be one of {sorted(_LPIPS_ALIASES)}, found {net!r}")
    return _LPIPS_ALIASES[net]


def _lpips_backbone_path(net: str, weights: str | Path | None) -> Path:
    name = _lpips_net_name(net)
    return Path(weights) if weights is not None else hub_checkpoints() / _LPIPS_BACKBONES[name][0]


def lpips_available(net: str = "vgg", weights: str | Path | None = None) -> tuple[bool, str]:
    """Whether LPIPS on ``net`` ('vgg' or 'alex') can run offline; the reason says which file is used
    or which file is needed and where it comes from."""
    name = _lpips_net_name(net)
    path = _lpips_backbone_path(name, weights)
    if path.is_file():
        return True, f"LPIPS-{name}: backbone weights {path}"
    file_name, url = _LPIPS_BACKBONES[name]
    where = f"the file given, {path}," if weights is not None else f"{path}"
    return False, (
        f"LPIPS-{name} unavailable: needs torchvision's ImageNet backbone weights {file_name} "
        f"({url}) at {where} (the torch hub cache, or pass its path); not found"
    )


class LPIPS(nn.Module):
    """LPIPS distance per image (lpips v0.1), VGG16 backbone by default as in the paper.

    forward(x, y): x, y (N, 3, H, W) in [0, 1] -> (N,). Lower is closer.
    ``weights``: the torchvision backbone file (default: the torch hub cache). Raises
    :class:`MetricUnavailable` when it is missing. ``allow_random_backbone`` is for tests only:
    it keeps the random backbone so the plumbing can run; its values mean nothing.
    """

    def __init__(
        self,
        net: str = "vgg",
        weights: str | Path | None = None,
        *,
        allow_random_backbone: bool = False,
    ) -> None:
        super().__init__()
        import lpips  # heavy import, only when the metric is built

        self.net_name = _lpips_net_name(net)
        ok, reason = lpips_available(self.net_name, weights)
        if not ok and not allow_random_backbone:
            raise MetricUnavailable(reason)
        # fork_rng: the random init that the loaded weights replace must not move the global RNG
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # lpips builds torchvision nets with the deprecated `pretrained=False` argument
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            # pnet_rand=True: no download of the backbone; the linear layers ship with lpips
            self.model = lpips.LPIPS(
                pretrained=True, net=self.net_name, version="0.1", pnet_rand=True, verbose=False
            )
        self.random_backbone = not ok
        if ok:
            self._load_backbone(_lpips_backbone_path(self.net_name, weights))
        self.model.eval().requires_grad_(False)

    def _load_backbone(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        # lpips keeps torchvision's `features.<i>` modules under slices named by the same <i>
        mapped = {}
        for key in self.model.net.state_dict():
            slice_name, index, param = key.split(".")
            source = f"features.{index}.{param}"
            if source not in state:
                raise ValueError(f"{path}: expected key {source!r} of torchvision's {self.net_name}")
            mapped[key] = state[source]
        self.model.net.load_state_dict(mapped, strict=True)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        check_pair(x, y)
        if x.shape[1] != 3:
            raise ValueError(f"LPIPS expects RGB images (3 channels), found {x.shape[1]}")
        smallest = _LPIPS_MIN_SIZE[self.net_name]
        if min(x.shape[-2:]) < smallest:
            raise ValueError(
                f"LPIPS-{self.net_name} needs images of at least {smallest} x {smallest} pixels, "
                f"found {tuple(x.shape[-2:])}"
            )
        with torch.no_grad():
            return self.model(x, y, normalize=True).flatten()
