"""Denoising Diffusion Null-space Models (Wang et al., ICLR 2023): DDNM and DDNM+.

Each step refines Tweedie's estimate in A's range and keeps its null space,
    x0-hat = x0 - Sigma_t A^+ (A x0 - y),
then x_{t-1} = sqrt(abar_{t-1}) x0-hat + V (d1 z + d2 eps-bar) (a DDIM step, eta = 0.85).
Plain DDNM: Sigma_t = I, d1 = eta sigma, d2 = sqrt(1 - eta^2) sigma, sigma = sqrt(1 - abar_{t-1}).
DDNM+ (noise-aware, per singular value s_i, a = sqrt(abar_{t-1}), as the authors' SVD code):
    sigma >= a sigma_y / s_i:  lambda_i = 1,  d1 = sqrt(sigma^2 - (a sigma_y / s_i)^2),  d2 = 0
    sigma <  a sigma_y / s_i:  lambda_i = s_i sigma sqrt(1 - eta^2) / (a sigma_y),  d1 = eta sigma, d2 = 0
    s_i = 0:                   lambda_i = 1 (no effect),  d1, d2 as in plain DDNM
and time travel (RePaint's schedule): every `travel_length` steps, `travel_repeat - 1` times, the
chain jumps back `travel_length` steps by re-noising the last x0 and denoises again.
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

__all__ = ["DDNM", "travel_schedule"]


def travel_schedule(steps: int, length: int, repeat: int) -> list[int]:
    """Chain indices visited from steps - 1 down to -1 (x0), with jumps back (RePaint's schedule).

    After reaching index j (a multiple of `length`, j < steps - length), the chain climbs back
    `length` indices one at a time, `repeat - 1` times per such j. length = 1, repeat = 1: no travel.
    """
    if length < 1 or repeat < 1:
        raise ValueError(f"travel_length and travel_repeat must be >= 1, got {length} and {repeat}")
    if length >= steps and repeat > 1:
        raise ValueError(f"travel_length ({length}) must be shorter than the chain ({steps} steps)")
    left = {j: repeat - 1 for j in range(0, steps - length, length)}
    order, i = [], steps
    while i >= 1:
        i -= 1
        order.append(i)
        if left.get(i, 0) > 0:
            left[i] -= 1
            for _ in range(length):
                i += 1
                order.append(i)
    order.append(-1)
    return order


class DDNM(Solver):
    """DDNM+ (`plus=True`, noise-aware, with time travel) or plain DDNM (`plus=False`).

    Args:
        plus: the noise-aware DDNM+ (the paper's baseline); plain DDNM ignores sigma_y (the DPG
            paper ran it for deblurring).
        steps: evenly strided DDIM steps (published: 100).
        eta: the DDIM noise fraction (published: 0.85).
        travel_length, travel_repeat: time travel (default 10 and 3 for DDNM+ with more than 10
            steps, none for DDNM).
        s_min: singular values below it are treated as 0, so A^+ leaves those directions alone
            (3e-2, as the DDRM H-functions that DDNM's code uses for deblurring).
        clip: clip x0 to [-1, 1] inside the chain (the DDNM code does not; the output is clipped).
    """

    name = "ddnm"
    sampler = "ddim"

    @property
    def label(self) -> str:
        return "DDNM+" if self.plus else "DDNM"

    def __init__(self, plus: bool = True, steps: int = 100, eta: float = 0.85,
                 travel_length: int | None = None, travel_repeat: int | None = None,
                 s_min: float = 3e-2, clip: bool = False) -> None:
        self.plus, self.clip = bool(plus), bool(clip)
        self.steps = number("DDNM", "steps", steps, low=1, integer=True)
        self.eta = number("DDNM", "eta", eta, low=0, high=1)
        self.s_min = number("DDNM", "s_min", s_min, low=0)
        # DDNM+'s default travel needs a chain longer than its jump; a short chain runs without it
        travel = plus and travel_length is None and travel_repeat is None and self.steps > 10
        self.travel_length = int(travel_length if travel_length is not None else (10 if travel else 1))
        self.travel_repeat = int(travel_repeat if travel_repeat is not None else (3 if travel else 1))
        travel_schedule(self.steps, self.travel_length, self.travel_repeat)  # validates

    def __repr__(self) -> str:
        return (f"DDNM(plus={self.plus}, steps={self.steps}, eta={self.eta}, "
                f"travel_length={self.travel_length}, travel_repeat={self.travel_repeat}, s_min={self.s_min})")

    def sample(self, chain: ReverseChain, task: Task, y: Tensor, callback: Callback | None) -> Tensor:
        spec = spectral_problem(self.label, task, y, chain.model.image_shape, self.s_min)
        abar = chain.schedule.alphas_cumprod.tolist() + [1.0]  # index -1: x0 itself
        order = travel_schedule(chain.num_steps, self.travel_length, self.travel_repeat)
        x = chain.initial_state()
        x0 = torch.zeros_like(x)
        step = 0  # counts the denoising moves (what callbacks see), not the jumps back
        for move, i, j in chain.moves(order):
            z = randn_per_item(chain.model.image_shape, chain.seed, chain.indices, "ddnm", move, like=x)
            with torch.no_grad():
                if j > i:  # time travel: re-noise the last estimate to the later step
                    x_next = abar[j] ** 0.5 * x0 + (1 - abar[j]) ** 0.5 * z
                    x = chain.guard(step, int(chain.schedule.timesteps[j]), x_next, x)
                    continue
                i_vec, t_vec = chain.at(i)
                x0, _ = chain.denoise(x, t_vec, i_vec, self.clip)
                eps = dm.eps_from_x0(x, x0, chain.abar(i_vec, x))
                x_next = self._step(spec, x0, eps, z, abar[j])
            x = chain.finish(step, int(t_vec[0]), x, x_next, x0, y, callback)
            step += 1
        return chain.result(x)

    def _step(self, spec: Spectral, x0: Tensor, eps: Tensor, z: Tensor, abar_next: float) -> Tensor:
        """x_{t-1} from x0, the model's eps and the noise z (NCHW), in A's spectral basis."""
        a, sigma = abar_next**0.5, (1 - abar_next) ** 0.5
        eta, keep = self.eta, (1 - self.eta**2) ** 0.5
        x0_s, obs = spec.vt(x0), spec.observed
        # V^T A^+ (A x0 - y): x0-bar - y-bar where s > 0, nothing in the null space
        resid = torch.where(obs, x0_s - spec.ybar, torch.zeros_like(x0_s))
        d1 = torch.full_like(x0_s, eta * sigma)
        d2 = torch.full_like(x0_s, keep * sigma)
        lam = torch.ones_like(x0_s)
        sy = spec.sigma_y if self.plus else 0.0
        if sy > 0 and a > 0:
            limit = a * sy / spec.safe_s()  # the noise level y carries on coordinate i, at this step
            below = obs & (sigma < limit)
            above = obs & ~below
            lam = torch.where(below, spec.s * sigma * keep / (a * sy), lam)
            d1 = torch.where(above, (sigma**2 - limit**2).clamp_min(0).sqrt(), d1)
            d2 = torch.where(obs, torch.zeros_like(d2), d2)
        # subtracting the correction from x0 keeps the null-space part of x0 bit for bit
        x0_hat = x0 - spec.v(lam * resid, x0)
        return a * x0_hat + spec.v(d1 * z.flatten(1) + d2 * spec.vt(eps), x0)
