"""Diffusion Posterior Sampling (Chung et al., ICLR 2023), the published baseline.

x_{t-1} = x'_{t-1} - zeta * grad_{x_t} ||y - A(x0hat(x_t))||_2 per image (paper, Algorithm 1);
with Poisson noise the authors' code differentiates the norm times mean(1 / |y|) instead
(`NoiseModel.fidelity`). Needs A differentiable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..task import Task
from .base import Callback, Denoised, Guidance, ReverseChain, Solver
from .params import choice, number
from .requirements import require_differentiable

__all__ = ["DPS", "require_differentiable"]


class DPS(Solver):
    """DPS with step size `scale` (zeta > 0; the published per-task values are in the recipes).

    sampler: "ddpm" (published, 1000 steps) or "ddim"; DPS needs the stochastic DDPM sampler to
    work well. clip: clip x0hat to [-1, 1] (the DPS code does).
    """

    name = "dps"

    def __init__(self, scale: float = 1.0, sampler: str = "ddpm", steps: int | None = None,
                 clip: bool = True) -> None:
        self.scale = number("DPS", "scale", scale, low=0, low_open=True)
        self.sampler = choice("DPS", "sampler", sampler, ("ddpm", "ddim"))
        self.steps = number("DPS", "steps", steps if steps is not None else (1000 if sampler == "ddpm" else 200),
                            low=1, integer=True)
        self.clip = bool(clip)

    @property
    def label(self) -> str:
        # DPS is published with DDPM: the table names the sampler only when it is another
        return "DPS" if self.sampler == "ddpm" else f"DPS {self.sampler.upper()}"

    def __repr__(self) -> str:
        return f"DPS(scale={self.scale}, sampler={self.sampler!r}, steps={self.steps})"

    def check(self, task: Task) -> None:
        require_differentiable(task, "DPS")

    def guidance(self, state: Denoised, task: Task, y: Tensor, seeds: Sequence[int] | None = None) -> Guidance:
        """grad_{x_t} of the data fidelity ||y - A(x0hat)||_2 per image (the noise model's
        `fidelity`), at a state whose x0hat is on x_t's graph. One VJP through A and the network.
        `seeds` is accepted for the common guidance signature; DPS draws nothing."""
        with torch.enable_grad():
            fidelity = task.noise.fidelity(y, task.operator(state.x0hat))  # (B,)
            # summing per-image terms keeps each image's gradient its own
            (grad,) = torch.autograd.grad(fidelity.sum(), state.x_t)
        zeros = torch.zeros(grad.shape[0], dtype=torch.float64, device=grad.device)
        return Guidance(grad.detach(), zeros, state.x0hat.detach())

    def sample(self, chain: ReverseChain, task: Task, y: Tensor, callback: Callback | None) -> Tensor:
        x = chain.initial_state()
        for step, _i, i_vec, t_vec in chain.steps():
            state, log_var = chain.denoised(x, t_vec, i_vec, self.clip)
            guide = self.guidance(state, task, y)
            with torch.no_grad():
                x_next = chain.unguided_step(step, i_vec, state.x_t.detach(), guide.x0hat, log_var) \
                    - self.scale * guide.grad
            x = chain.finish(step, int(t_vec[0]), state.x_t, x_next, guide.x0hat, y, callback, guide.residual)
        return chain.result(x)
