"""Denoising Diffusion Restoration Models (Kawar et al., NeurIPS 2022): SVD-based posterior sampling.

In the spectral basis of A = U diag(s) V^T, with x-bar = V^T x / sqrt(abar) (the variance-exploding
view, sigma_t = sqrt(1 - abar_t) / sqrt(abar_t)) and y-bar_i = (U^T y)_i / s_i, every coordinate i
steps on its own (paper, eq. 7-8):

- s_i = 0 (nothing observed):  x0-bar_i + sqrt(1 - eta^2) sigma' eps-bar_i + eta sigma' z_i
- sigma' < sigma_y / s_i (the measurement is noisier than the state):
      x0-bar_i + sqrt(1 - eta^2) sigma' (U^T y - s x0-bar)_i / sigma_y + eta sigma' z_i
- sigma' >= sigma_y / s_i (the state is noisier than the measurement):
      (1 - eta_b) x0-bar_i + eta_b y-bar_i + sqrt(sigma'^2 - eta_b^2 sigma_y^2 / s_i^2) z_i

sigma' is the next step's sigma; x_{t-1} = sqrt(abar_{t-1}) V x-bar'. Needs a linear operator with
an SVD view and Gaussian (or no) noise.
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

__all__ = ["DDRM"]


class DDRM(Solver):
    """DDRM with `steps` evenly strided steps (published: 20 for SR and deblurring, 100 for
    inpainting), eta = 0.85 and eta_b = 1 (the paper's settings).

    s_min: singular values below it are treated as 0 (3e-2, as DDRM's deblurring H-functions).
    clip: clip x0hat to [-1, 1] inside the chain (the DDRM code does not; the output is clipped).
    """

    name = "ddrm"
    sampler = "ddim"

    def __init__(self, steps: int = 20, eta: float = 0.85, eta_b: float = 1.0, s_min: float = 3e-2,
                 clip: bool = False) -> None:
        self.steps = number("DDRM", "steps", steps, low=1, integer=True)
        self.eta = number("DDRM", "eta", eta, low=0, high=1)
        self.eta_b = number("DDRM", "eta_b", eta_b, low=0, high=1)
        self.s_min = number("DDRM", "s_min", s_min, low=0)
        self.clip = bool(clip)

    def __repr__(self) -> str:
        return f"DDRM(steps={self.steps}, eta={self.eta}, eta_b={self.eta_b}, s_min={self.s_min})"

    def sample(self, chain: ReverseChain, task: Task, y: Tensor, callback: Callback | None) -> Tensor:
        spec = spectral_problem("DDRM", task, y, chain.model.image_shape, self.s_min)
        abar = chain.schedule.alphas_cumprod
        abar_prev = chain.schedule.alphas_cumprod_prev
        x = self._initial(chain, spec, float(abar[-1]), y)
        for step, i, i_vec, t_vec in chain.steps():
            with torch.no_grad():
                x0, _ = chain.denoise(x, t_vec, i_vec, self.clip)
                eps = dm.eps_from_x0(x, x0, chain.abar(i_vec, x))
                z = randn_per_item(chain.model.image_shape, chain.seed, chain.indices, "ddrm", step, like=x).flatten(1)
                xbar_next = self._spectral_step(spec, spec.vt(x0), spec.vt(eps), z, float(abar_prev[i]))
                x_next = float(abar_prev[i]) ** 0.5 * spec.v(xbar_next, x)
            x = chain.finish(step, int(t_vec[0]), x, x_next, x0, y, callback)
        return chain.result(x)

    def _initial(self, chain: ReverseChain, spec: Spectral, abar_T: float, y: Tensor) -> Tensor:
        """x_T from p(x_T | y): y-bar_i + noise where the state is noisier than y, else N(0, sigma_T^2)."""
        n = chain.initial_state().flatten(1)
        sigma_T = ((1 - abar_T) / abar_T) ** 0.5
        big = spec.observed & (spec.s * sigma_T > spec.sigma_y)
        rest = (sigma_T**2 - (spec.sigma_y / spec.safe_s()) ** 2).clamp_min(0).sqrt()
        xbar = torch.where(big, spec.ybar + rest * n, sigma_T * n)
        like = torch.empty(y.shape[0], *chain.model.image_shape, device=y.device, dtype=y.dtype)
        return abar_T**0.5 * spec.v(xbar, like)

    def _spectral_step(self, spec: Spectral, x0: Tensor, eps: Tensor, z: Tensor, abar_next: float) -> Tensor:
        """x-bar at the next step from x0-bar, eps-bar and the noise z, all (B, D) in V's basis."""
        sig = ((1 - abar_next) / abar_next) ** 0.5  # sigma of the next step (0 at the end)
        eta, eta_b, sy = self.eta, self.eta_b, spec.sigma_y
        s, safe = spec.s, spec.safe_s()
        keep = (1 - eta**2) ** 0.5
        unobserved = x0 + keep * sig * eps + eta * sig * z
        # noisy side: the state is already cleaner than y, y only nudges it
        pull = (spec.uty - s * x0) / max(sy, torch.finfo(x0.dtype).tiny)
        cleaner = x0 + keep * sig * pull + eta * sig * z
        # y is cleaner than the state: move onto y-bar and keep the remaining noise
        rest = (sig**2 - (eta_b * sy / safe) ** 2).clamp_min(0).sqrt()
        noisier = (1 - eta_b) * x0 + eta_b * spec.ybar + rest * z
        state_noisier = spec.observed & (s * sig >= sy)
        state_cleaner = spec.observed & ~state_noisier
        out = torch.where(state_cleaner, cleaner, unobserved)
        return torch.where(state_noisier, noisier, out)
