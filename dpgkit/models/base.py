"""`DiffusionModel`: an eps predictor together with its noise schedule and image shape."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..diffusion import Schedule

__all__ = ["DiffusionModel"]

EpsFn = Callable[[Tensor, Tensor], Tensor]


class DiffusionModel(nn.Module):
    """Wraps any eps predictor `fn(x_t, t) -> out`.

    `t` holds integer timesteps (0..T-1) of the original schedule, also when a solver runs a
    respaced chain; DAPS alone passes fractional ones (continuous VP time, as its authors feed ADM
    networks), which the guided-diffusion UNet and the Gaussian-mixture prior accept. `out` has C
    channels (eps) or 2C (eps, then the learned-range variance values in [-1, 1]); which one is
    detected from the output unless `learned_sigma` is given.

    Args:
        fn: an nn.Module or a plain callable.
        image_shape: (C, H, W) of the images the model generates.
        schedule: the training schedule (default: guided-diffusion's linear, T = 1000).
        dtype: compute dtype of the network (e.g. torch.bfloat16); inputs are cast to it and
            outputs back to float32.
    """

    def __init__(
        self,
        fn: EpsFn,
        image_shape: tuple[int, int, int],
        schedule: Schedule | None = None,
        learned_sigma: bool | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        if isinstance(fn, nn.Module):
            self.net = fn
        else:
            self.net = None
            self._fn = fn
        self.image_shape = tuple(int(s) for s in image_shape)
        self.schedule = schedule if schedule is not None else Schedule.linear(1000)
        self.learned_sigma = learned_sigma
        self.dtype = dtype

    @property
    def channels(self) -> int:
        return self.image_shape[0]

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The network's raw output, float32."""
        fn = self.net if self.net is not None else self._fn
        if t.dim() == 0:
            t = t.expand(x_t.shape[0])
        if self.dtype is not None and self.dtype != x_t.dtype:
            with torch.autocast(x_t.device.type, dtype=self.dtype):
                out = fn(x_t.to(self.dtype), t)
            return out.float()
        return fn(x_t, t)

    def eps_and_variance(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        """(eps, variance values in [-1, 1] or None when the model has fixed variance)."""
        out = self(x_t, t)
        c = x_t.shape[1]
        learned = self.learned_sigma if self.learned_sigma is not None else out.shape[1] == 2 * c
        if learned:
            if out.shape[1] != 2 * c:
                raise ValueError(f"learned sigma expects {2 * c} output channels, got {out.shape[1]}")
            return out[:, :c], out[:, c:]
        if out.shape[1] != c:
            raise ValueError(
                f"the model returned {out.shape[1]} channels for {c}-channel input: expected {c} "
                f"(eps) or {2 * c} (eps and learned variance)"
            )
        return out, None

    def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.eps_and_variance(x_t, t)[0]
