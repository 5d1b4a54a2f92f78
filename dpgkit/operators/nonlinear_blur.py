"""Non-linear blur: the bkse network G(x, k) with a random kernel code k per item.

The "non-linear deblurring" task of DPS (Chung et al., ICLR 2023, Section 4) and DPG (Tang et al.,
AISTATS 2024, Table 2) blurs with the GOPRO-trained kernel adapter of Tran et al., CVPR 2021
(`bkse.KernelWizard`), under a code k ~ 1.2 N(0, I) of shape (8 nf, H / 128, W / 128), 512 x 2 x 2
at 256 x 256. Images in [-1, 1] are mapped to [0, 1] for the network and back with 2 y - 1,
clamped to [-1, 1], as the DPS and DPG code do.

The DPS and DPG code draw a fresh code at every call of the operator, so the measurement, every
guidance step and every Monte Carlo state see a different blur. Here the code is drawn once per
item from that item's seed (`NonlinearBlur.draw`), and the drawn `EncodedBlur` is what both the
measurement and the solver apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._checks import check_images, check_items, generator_from_seed, image_shape3, item_slice
from .base import Operator
from .bkse import (
    CHECKPOINT_NAME,
    CHECKPOINT_URL,
    KernelWizard,
    KernelWizardConfig,
    load_kernel_wizard,
    random_kernel_wizard,
)

__all__ = ["NonlinearBlur", "EncodedBlur"]


class EncodedBlur(Operator):
    """y = clamp(2 G((x + 1) / 2, k) - 1, -1, 1): the bkse blur with fixed kernel codes.

    network: a `KernelWizard` (shared, not copied). codes: (B, 8 nf, H / 128, W / 128), one per
    item, or with B = 1 shared by any number of images. Images (N, C, H, W) in [-1, 1]; a
    per-item code needs N = B (or `item(b)`, whose code applies to any number of images).
    Differentiable in x (DPS); the network's own weights are not trained.
    """

    differentiable = True
    task_name = "non-linear deblur"
    measurement_unit = "picture"  # the blurred image, clamped to [-1, 1]

    def __init__(self, network: KernelWizard, codes: Tensor) -> None:
        super().__init__()
        if not isinstance(network, KernelWizard):
            raise TypeError(f"network must be a KernelWizard, got {type(network).__name__}")
        codes = torch.as_tensor(codes)
        if codes.dim() == 3:
            codes = codes[None]
        if codes.dim() != 4 or codes.shape[1] != network.config.code_channels:
            raise ValueError(
                f"kernel codes must be (B, {network.config.code_channels}, H / 128, W / 128), got {tuple(codes.shape)}")
        self.network = network
        self.register_buffer("codes", codes.float() if not codes.is_floating_point() else codes)

    def __repr__(self) -> str:
        b, c, h, w = self.codes.shape
        return f"EncodedBlur(codes={b}x{c}x{h}x{w}, nf={self.network.config.nf})"

    @property
    def batch_size(self) -> int | None:
        return self.codes.shape[0] if self.codes.shape[0] > 1 else None

    def item(self, b: int) -> EncodedBlur:
        if self.codes.shape[0] == 1:
            return self
        return EncodedBlur(self.network, self.codes[item_slice(b, self.codes.shape[0], "EncodedBlur")])

    def forward(self, x: Tensor) -> Tensor:
        check_images(x, "EncodedBlur")
        check_items(x, self.codes.shape[0], "EncodedBlur")
        expected = self.network.config.code_shape(*x.shape[-2:])
        if tuple(self.codes.shape[1:]) != expected:
            raise ValueError(
                f"EncodedBlur holds codes {tuple(self.codes.shape[1:])}, which blur images of "
                f"{self.codes.shape[-2] * 128} x {self.codes.shape[-1] * 128}; got images {tuple(x.shape)}")
        weight = next(self.network.parameters())
        codes = self.codes.to(device=weight.device, dtype=weight.dtype).expand(x.shape[0], -1, -1, -1)
        out = self.network.adapt_kernel((x.to(weight.dtype) + 1) / 2, codes)
        return (2 * out - 1).clamp(-1, 1).to(x.dtype)


class NonlinearBlur(Operator):
    """The random non-linear blur of DPS / DPG: bkse's GOPRO network under a code drawn per item.

    Args:
        checkpoint: GOPRO_wVAE.pth (a file, or the folder holding it), published by Tran et al.
            in the model zoo of github.com/VinAIResearch/blur-kernel-space-exploring. Read at
            the first draw, not here, so recipes instantiate without it.
        code_scale: k = code_scale * N(0, I) (1.2 in the DPS and DPG code).
        config: the network's hyper-parameters as bkse's option mapping (the KernelWizard section
            of its YAML; a `KernelWizardConfig` also works), default the published GOPRO wVAE one.
        init_seed: with checkpoint=None only, random weights from this seed: for tests and smoke
            runs, where the blur means nothing.
        network: a ready `KernelWizard` instead of checkpoint / init_seed.

    A random template (`is_random`): `draw(seeds, image_shape)` returns an `EncodedBlur` whose
    item b has the code drawn from seeds[b] (CPU generator, so any device gives the same code).
    Raises ValueError when no weights are named (checkpoint=None without init_seed), and at the
    draw FileNotFoundError (checkpoint missing, naming where it is published) or
    `KernelWizardCheckpointError` (tensors missing, unexpected or misshapen).
    """

    is_random = True
    differentiable = True
    task_name = "non-linear deblur"
    measurement_unit = "picture"  # the blurred image, clamped to [-1, 1]

    def __init__(self, checkpoint: str | Path | None = None, code_scale: float = 1.2,
                 config: dict[str, Any] | None = None, init_seed: int | None = None,
                 network: KernelWizard | None = None) -> None:
        super().__init__()
        sources = sum(v is not None for v in (checkpoint, init_seed, network))
        if sources != 1:
            raise ValueError(
                f"NonlinearBlur needs exactly one source of weights, got {sources}: checkpoint=PATH to "
                f"{CHECKPOINT_NAME} (published in {CHECKPOINT_URL}), or init_seed=N for random weights "
                "(tests only), or network=KernelWizard")
        if not code_scale > 0:
            raise ValueError(f"code_scale must be > 0, got {code_scale}")
        if network is not None and config is not None:
            raise ValueError("give config or network, not both (a network carries its config)")
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.code_scale, self.init_seed = float(code_scale), init_seed
        self.config = network.config if network is not None else KernelWizardConfig.coerce(config)
        self._network = network

    def __repr__(self) -> str:
        source = f"checkpoint={self.checkpoint!r}" if self.checkpoint is not None else (
            f"init_seed={self.init_seed}" if self.init_seed is not None else "network=...")
        custom = "" if self.config == KernelWizardConfig() else f", nf={self.config.nf}"
        return f"NonlinearBlur({source}, code_scale={self.code_scale}{custom})"

    @property
    def network(self) -> KernelWizard:
        """The network, loaded (or built from init_seed) on first use and shared by every draw."""
        if self._network is None:
            if self.checkpoint is not None:
                self._network = load_kernel_wizard(self.checkpoint, self.config)
            else:
                self._network = random_kernel_wizard(int(self.init_seed), self.config)
        return self._network

    def load(self) -> NonlinearBlur:
        """Read the weights now (they are otherwise read at the first draw); returns self."""
        _ = self.network
        return self

    def draw_codes(self, seeds: Sequence[int], image_shape: Sequence[int]) -> Tensor:
        """(len(seeds), 8 nf, H / 128, W / 128) codes, code_scale * N(0, I), item b from seeds[b]."""
        c, h, w = image_shape3(image_shape, repr(self))
        if c != self.config.input_nc:
            raise ValueError(f"{self!r} blurs {self.config.input_nc}-channel images, got image shape {(c, h, w)}")
        shape = self.config.code_shape(h, w)
        if len(seeds) == 0:
            raise ValueError("draw needs at least one seed")
        return torch.stack([self.code_scale * torch.randn(shape, generator=generator_from_seed(s)) for s in seeds])

    def draw(self, seeds: Sequence[int], image_shape: Sequence[int]) -> EncodedBlur:
        codes = self.draw_codes(seeds, image_shape)
        network = self.network
        return EncodedBlur(network, codes.to(next(network.parameters()).device))

    def _undrawn(self) -> RuntimeError:
        return RuntimeError(f"{self!r} is a random template: draw it first "
                            "(task.measure, task.draw or .draw(seeds, image_shape))")

    def forward(self, x: Tensor) -> Tensor:
        raise self._undrawn()

    def item(self, b: int) -> Operator:
        raise self._undrawn()

