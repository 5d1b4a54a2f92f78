"""Denoising Diffusion Models for Plug-and-Play Image Restoration (Zhu et al., CVPRW 2023): DiffPIR.

Half-quadratic splitting with the diffusion model as the denoiser (paper, Algorithm 1). At each
timestep t of a quadratically spaced chain:

1. x0 = x0hat(x_t), the network's clipped Tweedie estimate (the prior sub-problem);
2. the data sub-problem, in closed form:
       x0_hat = argmin_x ||y - A x||^2 + rho_t ||x - x0||^2 = (A^T A + rho_t I)^{-1} (A^T y + rho_t x0),
   rho_t = lambda sigma_n^2 / sigma_bar_t^2, sigma_bar_t^2 = (1 - abar_t) / abar_t; in A's SVD basis
   coordinate i becomes (s_i (U^T y)_i + rho_t x0_i) / (s_i^2 + rho_t) and A's null space keeps x0;
3. x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - zeta) (sqrt(1 - abar_{t-1} - s_eta^2) eps_hat + s_eta z1)
             + sqrt(zeta) sqrt(1 - abar_{t-1}) z2,
   eps_hat = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t) the noise implied by the corrected estimate,
   s_eta = eta sqrt(1 - abar_{t-1}) / sqrt(1 - abar_t) sqrt(beta_t) (eta = 0 published).

At the last timestep (t = 0) the state is returned as it stands, as the authors' code does.

As the authors' code: the timesteps are t_k = T - 1 - floor(sqrt(k / (S - 1)) T), k = 0..S-1 ("quad"
skipping, the last one 0); sigma_n is the noise std on the [0, 1] pixel scale, max(0.001,
sigma_y / 2) for dpgkit's [-1, 1] scale, while sigma_bar_t lives on the model's [-1, 1] scale, so
lambda keeps the authors' published values; the chain starts from
x_T = sqrt(abar_T) A^+ y + sqrt(1 - abar_T) n (their SR script: the upsampled y).

Published settings (the authors' configs, FFHQ/ImageNet 256): deblurring (Gaussian, motion) at
sigma = 12.75/255 on [0, 1] (0.1 on [-1, 1]): 100 steps, lambda = 1, zeta = 0.1; SR x4: 100 steps,
lambda = 1, zeta = 0.25; inpainting (noiseless): 20 steps, lambda = 1, zeta = 1. Cost per step: one
network evaluation, no VJP; the data step is two SVD-basis transforms.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..models.base import DiffusionModel
from ..seeding import randn_per_item
from ..task import Task
from .base import Callback, ReverseChain, Solver
from .params import number
from .spectral import Spectral, spectral_problem

__all__ = ["DiffPIR", "quad_timesteps"]


def quad_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """DiffPIR's "quad" schedule: `steps` timesteps, dense near t = 0, ascending (0 first)."""
    if not 2 <= steps <= num_train_timesteps:
        raise ValueError(f"DiffPIR steps must lie in [2, {num_train_timesteps}], got {steps}")
    big = num_train_timesteps
    seq = [int(math.sqrt(k * (big**2 / (steps - 1)))) for k in range(steps)]  # numpy.linspace order
    seq[-1] -= 1
    out = sorted({big - 1 - s for s in seq})
    if len(out) != steps:
        raise ValueError(f"{steps} quadratically spaced steps repeat a timestep out of {big}")
    return out


class DiffPIR(Solver):
    """DiffPIR with the closed-form data step (SVD view) and the authors' per-task defaults.

    Args:
        steps: number of timesteps S (published: 100 for deblurring and SR, 20 for inpainting).
        lambda_: the data-step weight lambda (published: 1).
        zeta: fraction of fresh noise in the step (published: 0.1 deblur, 0.25 SR, 1.0 inpainting).
        eta: DDIM-style noise inside the deterministic part (published: 0).
        s_min: singular values below it count as 0 (0: the ridge term rho_t already bounds the solve).

    restore returns (B, C, H, W) in [-1, 1]. Raises ValueError for a non-linear operator, one
    without an SVD view, or non-Gaussian noise, naming DPG / DPS instead.
    """

    name = "diffpir"
    sampler = "ddim"

    def __init__(self, steps: int = 100, lambda_: float = 1.0, zeta: float = 0.1, eta: float = 0.0,
                 s_min: float = 0.0) -> None:
        self.steps = number("DiffPIR", "steps", steps, low=2, integer=True)
        self.lambda_ = number("DiffPIR", "lambda_", lambda_, low=0, low_open=True)
        self.zeta = number("DiffPIR", "zeta", zeta, low=0, high=1)
        self.eta = number("DiffPIR", "eta", eta, low=0, high=1)
        self.s_min = number("DiffPIR", "s_min", s_min, low=0)

    def __repr__(self) -> str:
        return f"DiffPIR(steps={self.steps}, lambda_={self.lambda_}, zeta={self.zeta}, eta={self.eta})"

    def chain_timesteps(self, model: DiffusionModel) -> list[int]:
        return quad_timesteps(self.steps, len(model.schedule))

    def sample(self, chain: ReverseChain, task: Task, y: Tensor, callback: Callback | None) -> Tensor:
        model = chain.model
        spec = spectral_problem(self.label, task, y, model.image_shape, self.s_min)
        abar, abar_prev = chain.schedule.alphas_cumprod, chain.schedule.alphas_cumprod_prev
        betas = model.schedule.betas
        sigma_n = max(1e-3, spec.sigma_y / 2)  # the authors' [0, 1]-scale noise level
        like = torch.empty(y.shape[0], *model.image_shape, device=y.device, dtype=y.dtype)
        a_T = float(abar[-1])
        x = a_T**0.5 * spec.v(spec.ybar, like) + (1 - a_T) ** 0.5 * chain.initial_state()
        for step, i, i_vec, t_vec in chain.steps():
            t = int(t_vec[0])
            with torch.no_grad():
                x0, _ = chain.denoise(x, t_vec, i_vec, clip=True)
                if i == 0:  # the authors stop here and return x_t itself
                    x_next = x
                else:
                    a_t, a_prev = float(abar[i]), float(abar_prev[i])
                    rho = self.lambda_ * sigma_n**2 * a_t / (1 - a_t)
                    x0 = self._data_step(spec, x0, rho)
                    eps = (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
                    s_eta = self.eta * ((1 - a_prev) / (1 - a_t)) ** 0.5 * float(betas[t]) ** 0.5
                    z1 = randn_per_item(model.image_shape, chain.seed, chain.indices, "diffpir-eta", step, like=x)
                    z2 = randn_per_item(model.image_shape, chain.seed, chain.indices, "diffpir", step, like=x)
                    keep = max(1 - a_prev - s_eta**2, 0.0) ** 0.5
                    x_next = (a_prev**0.5 * x0 + (1 - self.zeta) ** 0.5 * (keep * eps + s_eta * z1)
                              + self.zeta**0.5 * (1 - a_prev) ** 0.5 * z2)
            x = chain.finish(step, t, x, x_next, x0, y, callback)
        return chain.result(x)

    @staticmethod
    def _data_step(spec: Spectral, x0: Tensor, rho: float) -> Tensor:
        """argmin_x ||y - A x||^2 + rho ||x - x0||^2; x0's null-space part is kept bit for bit."""
        x0_s, s, obs = spec.vt(x0), spec.s, spec.observed
        solved = (s * spec.uty + rho * x0_s) / (s.square() + rho)
        delta = torch.where(obs, solved - x0_s, torch.zeros_like(x0_s))
        return x0 + spec.v(delta, x0)
