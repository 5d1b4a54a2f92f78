"""Pseudoinverse-guided diffusion models (Song, Vahdat, Mardani, Kautz, ICLR 2023): PiGDM.

p_t(x0 | x_t) is approximated by N(x0hat, r_t^2 I), so for y = A x0 + sigma_y n
    p_t(y | x_t) ~= N(A x0hat, r_t^2 A A^T + sigma_y^2 I)
and its score (paper, eq. 8) is one vector-Jacobian product through the denoiser,
    s_y = (d x0hat / d x_t)^T A^T (r_t^2 A A^T + sigma_y^2 I)^{-1} (y - A x0hat),
with r_t^2 = sigma_t^2 / (1 + sigma_t^2) in the paper's VE notation (sigma_t^2 = (1 - abar_t) /
abar_t), i.e. r_t^2 = 1 - abar_t for the VP chain. For sigma_y = 0 the weight is the
pseudo-inverse: A^T (r_t^2 A A^T)^{-1} = A^+ / r_t^2 (eq. 7). In A's SVD basis
A = U diag(s) V^T every coordinate is weighted by s_i / (r_t^2 s_i^2 + sigma_y^2).

The step is DDIM with the guidance entering through Tweedie's estimate of the conditional mean,
    x0hat_y = x0hat + w (1 - abar_t) / sqrt(abar_t) s_y,
    x_{t-1} = sqrt(abar_{t-1}) x0hat_y + c1 z + c2 eps_theta(x_t),
c1 = eta sqrt((1 - abar_t / abar_{t-1}) (1 - abar_{t-1}) / (1 - abar_t)), c2 = sqrt(1 - abar_{t-1} - c1^2):
the network's eps is kept (the authors' "adaptive weight", `awd` in the RED-Diff repository's
implementation, which also starts from x_T = sqrt(abar_T) A^+ y + sqrt(1 - abar_T) n).

Settings: 100 DDIM steps, w = 1 and eta = 0 (the RED-Diff repository's pgdm defaults). That code
implements the noiseless case only and weights the pseudo-inverse term by sqrt(abar_{t-1} abar_t),
which is the paper's weight above times abar_t; the paper's r_t^2 is used here. Cost per step:
one network evaluation and one VJP through it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import diffusion as dm
from ..seeding import randn_per_item
from ..task import Task
from .base import Callback, ReverseChain, Solver
from .params import number
from .spectral import Spectral, spectral_problem

__all__ = ["PiGDM"]


class PiGDM(Solver):
    """PiGDM for linear operators with an SVD view and Gaussian (or no) noise.

    Args:
        steps: evenly strided DDIM steps (published: 100).
        eta: DDIM noise fraction (0 in the authors' code).
        scale: guidance weight w (1).
        s_min: singular values below it count as 0 (3e-2, as the DDRM H-functions the authors'
            code uses, so that A^+ does not amplify noise on nearly lost frequencies).
        clip: clip x0hat to [-1, 1] inside the chain (clipping zeroes the VJP where it acts; off).

    restore returns (B, C, H, W) in [-1, 1]. Raises ValueError for a non-linear operator, one
    without an SVD view, or non-Gaussian noise, naming DPG / DPS instead.
    """

    name = "pigdm"
    sampler = "ddim"

    def __init__(self, steps: int = 100, eta: float = 0.0, scale: float = 1.0, s_min: float = 3e-2,
                 clip: bool = False) -> None:
        self.steps = number("PiGDM", "steps", steps, low=1, integer=True)
        self.eta = number("PiGDM", "eta", eta, low=0, high=1)
        self.scale = number("PiGDM", "scale", scale, low=0)
        self.s_min = number("PiGDM", "s_min", s_min, low=0)
        self.clip = bool(clip)

    def __repr__(self) -> str:
        return f"PiGDM(steps={self.steps}, eta={self.eta}, scale={self.scale}, s_min={self.s_min})"

    def sample(self, chain: ReverseChain, task: Task, y: Tensor, callback: Callback | None) -> Tensor:
        model = chain.model
        spec = spectral_problem(self.label, task, y, model.image_shape, self.s_min)
        abar_all, abar_prev_all = chain.schedule.alphas_cumprod, chain.schedule.alphas_cumprod_prev
        like = torch.empty(y.shape[0], *model.image_shape, device=y.device, dtype=y.dtype)
        a_T = float(abar_all[-1])
        x = a_T**0.5 * spec.v(spec.ybar, like) + (1 - a_T) ** 0.5 * chain.initial_state()
        for step, i, i_vec, t_vec in chain.steps():
            a_t, a_prev = float(abar_all[i]), float(abar_prev_all[i])
            state, _ = chain.denoised(x, t_vec, i_vec, self.clip)
            with torch.no_grad():
                x0 = state.x0hat.detach()
                v = self._weighted_residual(spec, x0, 1 - a_t)
            (score_y,) = torch.autograd.grad(state.x0hat, state.x_t, grad_outputs=v)
            with torch.no_grad():
                eps = dm.eps_from_x0(x, x0, chain.abar(i_vec, x0))
                x0_y = x0 + self.scale * (1 - a_t) / a_t**0.5 * score_y
                c1 = self.eta * ((1 - a_t / a_prev) * (1 - a_prev) / (1 - a_t)) ** 0.5
                c2 = max(1 - a_prev - c1**2, 0.0) ** 0.5
                z = randn_per_item(model.image_shape, chain.seed, chain.indices, "pigdm", step, like=x0)
                x_next = a_prev**0.5 * x0_y + c1 * z + c2 * eps
            x = chain.finish(step, int(t_vec[0]), x, x_next, x0_y, y, callback)
        return chain.result(x)

    @staticmethod
    def _weighted_residual(spec: Spectral, x0: Tensor, r2: float) -> Tensor:
        """A^T (r^2 A A^T + sigma_y^2 I)^{-1} (y - A x0), through the SVD (NCHW like x0)."""
        s, obs = spec.s, spec.observed
        resid = spec.uty - s * spec.vt(x0)  # U^T (y - A x0) on the first R coordinates
        weight = torch.where(obs, s / (r2 * s.square() + spec.sigma_y**2).clamp_min(1e-30), torch.zeros_like(s))
        return spec.v(weight * resid, x0)
