"""Diffusion Policy Gradient (Tang et al., AISTATS 2024): guidance by Monte Carlo policy gradient.

The operator is only ever evaluated, never differentiated, so A may be a black box (JPEG, a
simulator, numpy code). Per step (paper, Section 2.2 and Algorithm 1; the defaults follow the
authors' implementation):

    Z  = EMA of ||y - A(x0hat)||^2 (Gaussian) or ||y - A(x0hat)||_1 (Poisson)      temperature
    r  = max(sqrt(Z / Znorm) / 2, r_min) (Gaussian) or max(Z / Znorm, r_min)      policy width
    x0_i = x0hat + r eps_i,  p_i = exp(-(E(y, A x0_i) - shift) / Z),  w_i = p_i - mean_{j != i} p_j
    g  = J^T v,  v = -(1 / (N r)) sum_i w_i eps_i,  J = d x0hat / d x_t               policy gradient
    x_{t-1} = x'_{t-1} - s eta_t (c g_prev + (1 - c) g) / ||.||                      guided step
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels
from ..seeding import derive_seed
from ..task import Task
from .base import Callback, Denoised, Guidance, ReverseChain, Solver, per_image_normalize
from .params import choice, number

__all__ = ["DPG", "momentum_coefficient", "dpg_eta"]


def momentum_coefficient(beta_m: float, i: int, num_steps: int, sampler: str) -> float:
    """c of g~ = c g_prev + (1 - c) g: beta_m i / S under DDPM (i the chain index, S the chain's
    length, as the authors' loop), beta_m under DDIM."""
    return beta_m * i / num_steps if sampler == "ddpm" else beta_m


def dpg_eta(beta: Tensor, abar: Tensor, i: int, sampler: str) -> Tensor:
    """Step size eta_t of the guided update at chain index i.

    DDPM: beta / (sqrt(1 - beta) sqrt(1 - abar)) for i > 1, else 0 (the authors' loop leaves the
    last two steps unguided). DDIM: 1 for i > 0, else 0.
    """
    if sampler == "ddim":
        return torch.ones_like(abar) if i > 0 else torch.zeros_like(abar)
    if i <= 1:
        return torch.zeros_like(abar)
    return beta / ((1 - beta).sqrt() * (1 - abar).sqrt())


class DPG(Solver):
    """DPG posterior sampling.

    Args:
        scale: guidance scale s > 0 (published: 160 for ImageNet SR x4 DDPM; the paper's Table 4).
        num_samples: Monte Carlo states N per step, >= 2 (500 to 11000 published).
        sampler: "ddpm" (steps=1000 published) or "ddim" (eta 0, steps=200 published).
        momentum: beta_m in [0, 1) (0 or 0.1 published).
        r_min: lower bound of the policy width, >= 0 (0.05 in the recipes that use it).
        znorm: normaliser of the width, > 0; default C*H*W of the model's images (196608 at 256x256).
        r: "heuristic" (the published width from the residual) or "tweedie" (from a Hutchinson
            estimate of the posterior covariance trace, Cov[x0|x_t] = (1-abar)/sqrt(abar) dx0hat/dx_t).
        backend: "auto", "eager", "chunked" or "triton" for the Monte Carlo direction.
        chunk_size: samples per chunk of the chunked backend (does not change the result).
        clip: clip x0hat to [-1, 1] (published: yes).
        estimator: "published" (the paper's Monte Carlo direction; the paper's recipes) or
            "rao-blackwell" (the same expectation with the null-space noise integrated out, drawn in
            the operator's row space: see `dpgkit.kernels.rao_blackwell`; operators without a row
            space get the published one, logged once).
    """

    name = "dpg"

    def __init__(
        self, scale: float, num_samples: int = 500, sampler: str = "ddpm", steps: int | None = None,
        momentum: float = 0.0, r_min: float = 0.0, znorm: float | None = None, r: str = "heuristic",
        backend: str = "auto", chunk_size: int = 256, clip: bool = True, estimator: str = "published",
    ) -> None:
        self.scale = number("DPG", "scale", scale, low=0, low_open=True)
        # the leave-one-out baseline needs two samples
        self.num_samples = number("DPG", "num_samples", num_samples, low=2, integer=True)
        self.sampler = choice("DPG", "sampler", sampler, ("ddpm", "ddim"))
        self.steps = number("DPG", "steps", steps if steps is not None else (1000 if sampler == "ddpm" else 200),
                            low=1, integer=True)
        self.momentum = number("DPG", "momentum", momentum, low=0, high=1, high_open=True)
        self.r_min = number("DPG", "r_min", r_min, low=0)
        self.znorm = None if znorm is None else number("DPG", "znorm", znorm, low=0, low_open=True)
        self.r = choice("DPG", "r", r, ("heuristic", "tweedie"))
        self.backend = choice("DPG", "backend", backend, kernels.BACKENDS)
        self.chunk_size = number("DPG", "chunk_size", chunk_size, low=1, integer=True)
        self.clip = bool(clip)
        self.estimator = choice("DPG", "estimator", estimator, kernels.ESTIMATORS)

    @property
    def label(self) -> str:
        return f"DPG {self.sampler.upper()}"

    def __repr__(self) -> str:
        return (f"DPG(scale={self.scale}, num_samples={self.num_samples}, sampler={self.sampler!r}, "
                f"steps={self.steps}, momentum={self.momentum}, r_min={self.r_min}, r={self.r!r}, "
                f"estimator={self.estimator!r})")

    def guidance(self, state: Denoised, task: Task, y: Tensor, seeds: list[int],
                 z_prev: Tensor | None = None) -> Guidance:
        """DPG's policy gradient g = J^T v at a state (spec steps 1 to 6), one item per seed.

        state: x_t and x0hat(x_t) on one graph; y (B, ...) measured through task.operator;
        seeds[b]: item b's Monte Carlo seed; z_prev (B,): the previous step's temperature (None at
        the first step). Returns `Guidance` with grad = exp(log_scale) grad_unit = J^T v and the
        temperature Z to pass back next step. One VJP through the network; A only evaluated.
        """
        noise, operator = task.noise, task.operator
        znorm = float(self.znorm) if self.znorm is not None else float(state.x_t[0].numel())
        with torch.no_grad():
            x0 = state.x0hat.detach()
            z_raw = noise.energy(y, operator(x0)).double()
            z = noise.temperature(z_raw, z_prev)
            r = self._tweedie_width(state, seeds) if self.r == "tweedie" else noise.width(z, znorm, self.r_min)
            v_unit, log_scale = kernels.dpg_direction(
                x0, y, operator, noise, r, z, z_raw, self.num_samples, seeds,
                backend=self.backend, chunk_size=self.chunk_size, estimator=self.estimator)
        (g_unit,) = torch.autograd.grad(state.x0hat, state.x_t, grad_outputs=v_unit.to(state.x0hat.dtype))
        residual = z_raw.sqrt() if noise.reward_shift_uses_z_raw else None
        return Guidance(g_unit.detach(), log_scale, x0, residual, z)

    def sample(self, chain: ReverseChain, task: Task, y: Tensor, callback: Callback | None) -> Tensor:
        x = chain.initial_state()
        z_prev: Tensor | None = None
        g_prev: Guidance | None = None
        for step, i, i_vec, t_vec in chain.steps():
            state, log_var = chain.denoised(x, t_vec, i_vec, self.clip)
            guide = self.guidance(state, task, y, chain.seeds(step, "dpg"), z_prev)
            z_prev = guide.temperature
            c = momentum_coefficient(self.momentum, i, chain.num_steps, self.sampler)
            g_hat = _momentum(guide, g_prev, c)
            g_prev = guide  # the spec keeps the previous *raw* g, not the mixed one
            with torch.no_grad():
                x_prev = chain.unguided_step(step, i_vec, state.x_t.detach(), guide.x0hat, log_var)
                # in float64 like every schedule coefficient, cast at the end (guided-diffusion)
                beta, abar = chain.schedule.betas[i].double(), chain.schedule.alphas_cumprod[i].double()
                eta = dpg_eta(beta, abar, i, self.sampler).to(x_prev)
                x_next = x_prev - self.scale * eta * g_hat
            x = chain.finish(step, int(t_vec[0]), state.x_t, x_next, guide.x0hat, y, callback, guide.residual)
        return chain.result(x)

    def _tweedie_width(self, state: Denoised, seeds: list[int]) -> Tensor:
        """Policy width from Tweedie's covariance: r^2 = (1 - abar)/sqrt(abar) tr(J)/D, Hutchinson."""
        x = state.x_t
        gens = [torch.Generator().manual_seed(derive_seed(s, "hutchinson")) for s in seeds]
        u = torch.stack([torch.randint(0, 2, x.shape[1:], generator=g) for g in gens]).to(x) * 2 - 1
        with torch.enable_grad():
            (ju,) = torch.autograd.grad(state.x0hat, x, grad_outputs=u, retain_graph=True)
        trace = (ju * u).flatten(1).sum(1).double()
        abar = state.abar.flatten().double()
        var = ((1 - abar) / abar.sqrt() * trace / x[0].numel()).clamp_min(0)
        return var.sqrt().clamp_min(self.r_min)


def _momentum(guide: Guidance, prev: Guidance | None, c: float) -> Tensor:
    """(c g_prev + (1 - c) g) / ||.|| per image, combined in log space so the published scales of
    g and g_prev (exp(log_scale) each) are kept exactly without overflow."""
    if prev is None or c == 0.0:
        return per_image_normalize(guide.grad)
    top = torch.maximum(prev.log_scale, guide.log_scale)
    a = (c * torch.exp(prev.log_scale - top)).to(guide.grad.dtype).view(-1, 1, 1, 1)
    b = ((1 - c) * torch.exp(guide.log_scale - top)).to(guide.grad.dtype).view(-1, 1, 1, 1)
    return per_image_normalize(a * prev.grad + b * guide.grad)
