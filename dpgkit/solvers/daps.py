"""Decoupled Annealing Posterior Sampling (Zhang et al., CVPR 2025): DAPS.

DAPS anneals a noise level sigma from sigma_max to 0 (variance-exploding, EDM notation:
x_sigma = x0 + sigma n). At each level sigma_k it decouples the chain in three moves
(paper, Algorithm 1):

1. x0hat(x_k): the probability-flow ODE from sigma_k down to sigma_min, a few Euler steps of
   dx/dsigma = (x - D(x, sigma)) / sigma (the authors' `DiffusionPFODE`, EDM's poly-7 spacing);
2. x0y ~ p(x0 | x_k, y), approximated by N(x0hat, r^2 I) times the likelihood, sampled by
   Langevin dynamics started at x0hat with the score
       -grad ||A(x) - y||^2 / tau^2 + (x0hat - x) / r^2,    r = sigma_k
   (the authors' "gaussian" prior solver), step size lr_k = lr (1 + k / (K + 1) (lr_min_ratio - 1));
3. x_{k+1} = x0y + sigma_{k+1} n (re-noise to the next level; sigma_K = 0 ends on x0y).

The annealing levels are EDM's poly-7 grid of K + 1 values from sigma_max to sigma_min with the
last replaced by 0, as the authors' `EDMScheduler` discretises them.

VP models (guided-diffusion/ADM checkpoints) are used through EDM's VP preconditioning, exactly as
the authors wrap them (`VPPrecond`, beta_min = 0.1, beta_d = 19.9, M = 1000):
    D(x, sigma) = x - sigma eps(x / sqrt(1 + sigma^2), t(sigma)),
    t(sigma) = (M - 1) (sqrt(beta_min^2 + 2 beta_d log(1 + sigma^2)) - beta_min) / beta_d,
a fractional timestep of the continuous VP-SDE (the network is fed it as a float). Models with
another schedule map sigma to t by inverting their own abar (log-linear between timesteps).

The likelihood weight tau is a hyper-parameter in the authors' code (0.01 for every pixel task at
sigma_y = 0.05): the Langevin target is then exp(-||A x - y||^2 / tau^2), i.e. a likelihood of std
tau / sqrt(2), much narrower than the measurement noise. `tau=None` uses tau = sqrt(2) sigma_y,
the Gaussian likelihood of the measured noise (what a calibrated posterior sampler needs).

Published settings ("DAPS-1K", the authors' configs for pixel-space FFHQ/ImageNet 256 at
sigma_y = 0.05): K = 200 annealing steps, sigma_max = 100, sigma_min = 0.1, 5 ODE steps to
sigma = 0.01, 100 Langevin steps, tau = 0.01, lr_min_ratio = 0.01, and lr = 1e-4 for SR x4,
Gaussian blur and random inpainting, 5e-5 for motion blur, box inpainting and phase retrieval
(phase retrieval: the authors report the best of 4 runs; one run here).
Cost per image: K x ode_steps network evaluations (1000), K x langevin_steps operator
gradients (20000; no network backward).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..models.base import DiffusionModel
from ..noise import Gaussian
from ..seeding import generator
from ..task import Task
from .base import Callback, ReverseChain, Solver
from .params import choice, number
from .requirements import require_differentiable

__all__ = ["DAPS", "edm_sigmas", "vp_timestep", "edm_denoise"]

# EDM's VP preconditioning constants (the continuous limit of guided-diffusion's linear schedule)
_BETA_MIN, _BETA_D, _M = 0.1, 19.9, 1000


def edm_sigmas(sigma_max: float, sigma_min: float, steps: int, rho: float = 7.0) -> list[float]:
    """EDM's poly-rho grid: steps + 1 noise levels from sigma_max down to sigma_min."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + k / steps * (b - a)) ** rho for k in range(steps + 1)]


def _is_linear_1000(model: DiffusionModel) -> bool:
    sched = model.schedule
    if sched.num_train_timesteps != 1000 or len(sched) != 1000:
        return False
    ref = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return bool(torch.allclose(sched.betas.double().cpu(), ref, rtol=0, atol=1e-6))


def vp_timestep(model: DiffusionModel, sigma: float, mapping: str = "auto") -> float:
    """The (fractional) network timestep at which the VP model denoises noise level sigma.

    mapping "vp": the authors' continuous VP-SDE map (EDM's VPPrecond, for guided-diffusion's linear
    schedule); "schedule": invert the model's own abar_t = 1 / (1 + sigma^2) (log-linear between
    timesteps); "auto": "vp" for the linear 1000-step schedule, else "schedule".
    """
    if mapping == "auto":
        mapping = "vp" if _is_linear_1000(model) else "schedule"
    if mapping == "vp":
        t = (math.sqrt(_BETA_MIN**2 + 2 * _BETA_D * math.log1p(sigma**2)) - _BETA_MIN) / _BETA_D
        return min(max((_M - 1) * t, 0.0), float(model.schedule.num_train_timesteps - 1))
    if mapping != "schedule":
        raise ValueError(f"mapping must be 'auto', 'vp' or 'schedule', got {mapping!r}")
    log_snr_inv = torch.log(1 / model.schedule.alphas_cumprod.double() - 1)  # log sigma_t^2, increasing
    target = 2 * math.log(max(sigma, 1e-12))
    j = int(torch.searchsorted(log_snr_inv, torch.tensor([target], dtype=torch.float64)))
    if j <= 0:
        return 0.0
    if j >= len(log_snr_inv):
        return float(len(log_snr_inv) - 1)
    lo, hi = float(log_snr_inv[j - 1]), float(log_snr_inv[j])
    return float(model.schedule.timesteps[j - 1]) + (target - lo) / (hi - lo) * float(
        model.schedule.timesteps[j] - model.schedule.timesteps[j - 1])


def edm_denoise(model: DiffusionModel, x: Tensor, sigma: float, mapping: str = "auto") -> Tensor:
    """D(x, sigma) = E[x0 | x0 + sigma n = x] from a VP eps model (EDM's VP preconditioning)."""
    t_vec = torch.full((x.shape[0],), vp_timestep(model, sigma, mapping), device=x.device)
    return x - sigma * model.eps(x / math.sqrt(1 + sigma**2), t_vec)


class DAPS(Solver):
    """DAPS with the authors' defaults for pixel-space SR x4 / Gaussian deblur / random inpainting.

    Args:
        annealing_steps: K noise levels (published: 200, "DAPS-1K").
        ode_steps: Euler steps of the PF-ODE per level (published: 5).
        langevin_steps: Langevin iterations per level (published: 100).
        lr: Langevin step size (published: 1e-4; 5e-5 for motion blur, box inpainting, phase retrieval).
        lr_min_ratio: the step size decays linearly to lr * lr_min_ratio over the levels (0.01).
        tau: likelihood weight (published 0.01; None: sqrt(2) sigma_y, the measured noise's likelihood).
        sigma_max, sigma_min: annealing range (100, 0.1); ode_sigma_min: where each ODE stops (0.01).
        timestep_map: sigma -> network timestep ("auto", "vp", "schedule"; see `vp_timestep`).

    Needs a differentiable operator (Langevin uses grad_x ||A(x) - y||^2) and Gaussian noise;
    no SVD. restore returns (B, C, H, W) in [-1, 1].
    """

    name = "daps"
    sampler = "ddpm"

    def __init__(self, annealing_steps: int = 200, ode_steps: int = 5, langevin_steps: int = 100,
                 lr: float = 1e-4, lr_min_ratio: float = 0.01, tau: float | None = 0.01,
                 sigma_max: float = 100.0, sigma_min: float = 0.1, ode_sigma_min: float = 0.01,
                 timestep_map: str = "auto") -> None:
        self.annealing_steps = number("DAPS", "annealing_steps", annealing_steps, low=1, integer=True)
        self.ode_steps = number("DAPS", "ode_steps", ode_steps, low=1, integer=True)
        self.langevin_steps = number("DAPS", "langevin_steps", langevin_steps, low=0, integer=True)
        self.lr = number("DAPS", "lr", lr, low=0, low_open=True)
        self.lr_min_ratio = number("DAPS", "lr_min_ratio", lr_min_ratio, low=0)
        self.tau = None if tau is None else number("DAPS", "tau", tau, low=0, low_open=True)
        self.ode_sigma_min = number("DAPS", "ode_sigma_min", ode_sigma_min, low=0, low_open=True)
        self.sigma_min = number("DAPS", "sigma_min", sigma_min, low=self.ode_sigma_min)
        self.sigma_max = number("DAPS", "sigma_max", sigma_max, low=self.sigma_min, low_open=True)
        self.timestep_map = choice("DAPS", "timestep_map", timestep_map, ("auto", "vp", "schedule"))

    def __repr__(self) -> str:
        return (f"DAPS(annealing_steps={self.annealing_steps}, ode_steps={self.ode_steps}, "
                f"langevin_steps={self.langevin_steps}, lr={self.lr}, lr_min_ratio={self.lr_min_ratio}, "
                f"tau={self.tau})")

    def sigmas(self) -> list[float]:
        """The K + 1 annealing levels: the poly-7 grid with its last value replaced by 0."""
        return edm_sigmas(self.sigma_max, self.sigma_min, self.annealing_steps)[:-1] + [0.0]

    def chain_timesteps(self, model: DiffusionModel) -> list[int]:
        # the chain's bookkeeping only (seeds, guard, progress): DAPS walks its own noise levels
        return list(range(len(model.schedule)))

    def check(self, task: Task) -> None:
        require_differentiable(task, "DAPS")
        if not isinstance(task.noise, Gaussian):
            raise ValueError(
                f"DAPS's Langevin step uses the Gaussian likelihood, got {task.noise!r}. "
                "Use dpgkit.solvers.DPG, which supports Poisson noise."
            )
        if self.tau is None and task.noise.sigma <= 0:
            raise ValueError("DAPS tau=None takes sqrt(2) sigma_y, but the task is noiseless: give tau")

    def sample(self, chain: ReverseChain, task: Task, y: Tensor, callback: Callback | None) -> Tensor:
        model = chain.model
        tau = self.tau if self.tau is not None else math.sqrt(2) * task.noise.sigma
        sigmas = self.sigmas()
        x = self.sigma_max * chain.initial_state()
        for step, _i, _j in chain.moves(list(range(self.annealing_steps - 1, -2, -1))):  # K moves, one per level
            sigma = sigmas[step]
            t = int(round(vp_timestep(model, sigma, self.timestep_map)))
            with torch.no_grad():
                x0hat = self._ode(model, x, sigma)
            x0y = self._langevin(chain, task, y, x0hat, sigma, tau, step)
            with torch.no_grad():
                x_next = x0y + sigmas[step + 1] * self._noise(chain, step, "renoise", x)
            x = chain.finish(step, t, x, x_next, x0y, y, callback)
        return chain.result(x)

    def _ode(self, model: DiffusionModel, x: Tensor, sigma: float) -> Tensor:
        """x at ode_sigma_min: Euler steps of the PF-ODE on the poly-7 grid from sigma."""
        grid = edm_sigmas(sigma, self.ode_sigma_min, self.ode_steps)
        for s, s_next in zip(grid[:-1], grid[1:]):
            d = (x - edm_denoise(model, x, s, self.timestep_map)) / s
            x = x + (s_next - s) * d
        return x

    def _langevin(self, chain: ReverseChain, task: Task, y: Tensor, x0hat: Tensor, sigma: float,
                  tau: float, step: int) -> Tensor:
        """x0y: Langevin on N(x0hat, sigma^2 I) exp(-||A x - y||^2 / tau^2), started at x0hat."""
        ratio = step / (self.annealing_steps + 1)  # the authors' scheduler counts K + 1 levels
        lr = self.lr * (1 + ratio * (self.lr_min_ratio - 1))
        gens = [generator(chain.seed, idx, step, "daps-langevin") for idx in chain.indices]
        x = x0hat.detach().clone()
        op = task.operator
        for _ in range(self.langevin_steps):
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                # summing per-image losses keeps each image's gradient its own
                loss = (op(x) - y).flatten(1).square().sum(1).sum()
                (grad,) = torch.autograd.grad(loss, x)
            with torch.no_grad():
                eps = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x)
                score = -grad / tau**2 + (x0hat - x) / sigma**2
                x = x + lr * score + math.sqrt(2 * lr) * eps
        return x.detach()

    @staticmethod
    def _noise(chain: ReverseChain, step: int, purpose: str, like: Tensor) -> Tensor:
        return torch.stack([torch.randn(like.shape[1:], generator=generator(chain.seed, idx, step, purpose))
                            for idx in chain.indices]).to(like)
