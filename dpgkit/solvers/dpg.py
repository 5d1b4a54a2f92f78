"""Diffusion Policy Gradient (Tang et al., AISTATS 2024): guidance by Monte Carlo policy gradient.

The operator is only ever evaluated, never differentiated, so A may be a black box (JPEG, a
simulator, numpy code). Steps 1 to 9 of ../shared/spec/dpg-method.md, per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import kernels
from ..models.base import DiffusionModel
from ..seeding import derive_seed
from ..task import Task
from .base import Callback, ReverseChain, Solver, StepInfo, per_image_normalize

__all__ = ["DPG", "momentum_coefficient", "dpg_eta"]


def momentum_coefficient(beta_m: float, t: int, num_train_timesteps: int, sampler: str) -> float:
    """c of g~ = c g_prev + (1 - c) g: beta_m t / T under DDPM, beta_m under DDIM."""
    return beta_m * t / num_train_timesteps if sampler == "ddpm" else beta_m


def dpg_eta(beta: Tensor, abar: Tensor, i: int, sampler: str) -> Tensor:
    """Step size eta_t: beta / (sqrt(1 - beta) sqrt(1 - abar)) (DDPM) or 1 (DDIM); 0 at the last step."""
    if i == 0:
        return torch.zeros_like(abar)
    if sampler == "ddim":
        return torch.ones_like(abar)
    return beta / ((1 - beta).sqrt() * (1 - abar).sqrt())


class DPG(Solver):
    """DPG posterior sampling.

    Args:
        scale: guidance scale s (published: 160 for ImageNet SR x4 DDPM, see the spec's table).
        num_samples: Monte Carlo states N per step (500 to 11000 published).
        sampler: "ddpm" (steps=1000 published) or "ddim" (eta 0, steps=200 published).
        momentum: beta_m (0 or 0.1 published).
        r_min: lower bound of the policy width (0.05 in the recipes that use it).
        znorm: normaliser of the width; default C*H*W of the model's images (196608 at 256x256).
        r: "heuristic" (the published width from the residual) or "tweedie" (from a Hutchinson
            estimate of the posterior covariance trace, Cov[x0|x_t] = (1-abar)/sqrt(abar) dx0hat/dx_t).
        backend: "auto", "eager", "chunked" or "triton" for the Monte Carlo direction.
        chunk_size: samples per chunk of the chunked backend (does not change the result).
        clip: clip x0hat to [-1, 1] (published: yes).
    """

    name = "dpg"

    def __init__(
        self, scale: float, num_samples: int = 500, sampler: str = "ddpm", steps: int | None = None,
        momentum: float = 0.0, r_min: float = 0.0, znorm: float | None = None, r: str = "heuristic",
        backend: str = "auto", chunk_size: int = 256, clip: bool = True,
    ) -> None:
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 (leave-one-out baseline), got {num_samples}")
        if r not in ("heuristic", "tweedie"):
            raise ValueError(f"r must be 'heuristic' or 'tweedie', got {r!r}")
        if backend not in kernels.BACKENDS:
            raise ValueError(f"backend must be one of {kernels.BACKENDS}, got {backend!r}")
        self.scale, self.num_samples, self.sampler = float(scale), int(num_samples), sampler
        self.steps = steps if steps is not None else (1000 if sampler == "ddpm" else 200)
        self.momentum, self.r_min, self.znorm, self.r = float(momentum), float(r_min), znorm, r
        self.backend, self.chunk_size, self.clip = backend, int(chunk_size), clip

    def __repr__(self) -> str:
        return (f"DPG(scale={self.scale}, num_samples={self.num_samples}, sampler={self.sampler!r}, "
                f"steps={self.steps}, momentum={self.momentum}, r_min={self.r_min}, r={self.r!r})")

    def restore(
        self, model: DiffusionModel, task: Task, y: Tensor, seed: int = 0,
        indices: Sequence[int] | None = None, callback: Callback | None = None,
        progress: bool | None = None,
    ) -> Tensor:
        chain = ReverseChain(model, y, task, self.sampler, self.steps, seed, indices, progress, "DPG")
        noise, operator = task.noise, task.operator
        znorm = float(self.znorm) if self.znorm is not None else float(torch.Size(model.image_shape).numel())
        x = chain.initial_state()
        z_prev: Tensor | None = None
        g_prev: tuple[Tensor, Tensor] | None = None  # (g_unit, log scale): g = exp(log scale) g_unit

        for step, i, i_vec, t_vec in chain.steps():
            t = int(t_vec[0])
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                x0hat, log_var = chain.denoise(x, t_vec, i_vec, self.clip)
            with torch.no_grad():
                x0 = x0hat.detach()
                z_raw = noise.energy(y, operator(x0)).double()
                z = noise.temperature(z_raw, z_prev)
                z_prev = z
                r = self._width(x, x0hat, i_vec, chain, z, znorm, step) if self.r == "tweedie" \
                    else noise.width(z, znorm, self.r_min)
                seeds = [derive_seed(seed, idx, step, "dpg") for idx in chain.indices]
                v_unit, log_scale = kernels.dpg_direction(
                    x0, y, operator, noise, r, z, z_raw, self.num_samples, seeds,
                    backend=self.backend, chunk_size=self.chunk_size)
            (g_unit,) = torch.autograd.grad(x0hat, x, grad_outputs=v_unit.to(x0hat.dtype))
            g_hat, g_prev = self._momentum(g_unit.detach(), log_scale, g_prev, t, model)
            with torch.no_grad():
                x_prev = chain.unguided_step(step, i_vec, x.detach(), x0, log_var)
                beta = chain.schedule.betas[i].to(x_prev)
                eta = dpg_eta(beta, chain.schedule.alphas_cumprod[i].to(x_prev), i, self.sampler)
                x_next = x_prev - self.scale * eta * g_hat
                chain.remember(x0)
                if callback is not None:
                    callback(StepInfo(step, t, x.detach(), x0, chain.residual(y, x0)))
                x = chain.guard(step, t, x_next, x.detach())
        return chain.result(x)

    def _momentum(self, g_unit: Tensor, log_scale: Tensor, g_prev, t: int, model: DiffusionModel):
        """g~ = c g_prev + (1 - c) g on the published scale, combined in log space; returns g~/||g~||."""
        c = momentum_coefficient(self.momentum, t, model.schedule.num_train_timesteps, self.sampler)
        if g_prev is None or c == 0.0:
            return per_image_normalize(g_unit), (g_unit, log_scale)
        prev_unit, prev_log = g_prev
        top = torch.maximum(prev_log, log_scale)
        a = (c * torch.exp(prev_log - top)).to(g_unit.dtype).view(-1, 1, 1, 1)
        b = ((1 - c) * torch.exp(log_scale - top)).to(g_unit.dtype).view(-1, 1, 1, 1)
        # the spec keeps the previous *raw* g, not the mixed one
        return per_image_normalize(a * prev_unit + b * g_unit), (g_unit, log_scale)

    def _width(self, x: Tensor, x0hat: Tensor, i_vec: Tensor, chain: ReverseChain, z: Tensor,
               znorm: float, step: int) -> Tensor:
        """Policy width from Tweedie's covariance: r^2 = (1 - abar)/sqrt(abar) tr(J)/D, Hutchinson."""
        gens = [torch.Generator().manual_seed(derive_seed(chain.seed, idx, step, "hutchinson"))
                for idx in chain.indices]
        u = torch.stack([torch.randint(0, 2, x.shape[1:], generator=g) for g in gens]).to(x) * 2 - 1
        with torch.enable_grad():
            (ju,) = torch.autograd.grad(x0hat, x, grad_outputs=u, retain_graph=True)
        trace = (ju * u).flatten(1).sum(1).double()
        abar = chain.abar(i_vec, x).flatten().double()
        var = ((1 - abar) / abar.sqrt() * trace / x[0].numel()).clamp_min(0)
        return var.sqrt().clamp_min(self.r_min).to(torch.float64)
