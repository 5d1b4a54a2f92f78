"""Diffusion Posterior Sampling (Chung et al., ICLR 2023), the published baseline.

x_{t-1} = x'_{t-1} - zeta * grad_{x_t} ||y - A(x0hat(x_t))||_2, per image. Needs A differentiable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..models.base import DiffusionModel
from ..task import Task
from .base import Callback, ReverseChain, Solver, StepInfo

__all__ = ["DPS", "require_differentiable"]


def require_differentiable(task: Task, method: str) -> None:
    op = task.operator
    if not getattr(op, "differentiable", True):
        raise ValueError(
            f"{method} differentiates the operator, but {type(op).__name__} is not differentiable "
            "(a black box, JPEG, ...). Use dpgkit.solvers.DPG, which only evaluates A."
        )


class DPS(Solver):
    """DPS with step size `scale` (zeta; the published per-task values are in the recipes)."""

    name = "dps"

    def __init__(self, scale: float = 1.0, sampler: str = "ddpm", steps: int | None = None,
                 clip: bool = True) -> None:
        self.scale, self.sampler, self.clip = float(scale), sampler, clip
        self.steps = steps if steps is not None else (1000 if sampler == "ddpm" else 200)

    def __repr__(self) -> str:
        return f"DPS(scale={self.scale}, sampler={self.sampler!r}, steps={self.steps})"

    def restore(
        self, model: DiffusionModel, task: Task, y: Tensor, seed: int = 0,
        indices: Sequence[int] | None = None, callback: Callback | None = None,
        progress: bool | None = None,
    ) -> Tensor:
        require_differentiable(task, "DPS")
        chain = ReverseChain(model, y, task, self.sampler, self.steps, seed, indices, progress, "DPS")
        x = chain.initial_state()
        for step, _i, i_vec, t_vec in chain.steps():
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                x0hat, log_var = chain.denoise(x, t_vec, i_vec, self.clip)
                fidelity = task.noise.fidelity(y, task.operator(x0hat))  # (B,)
                # summing per-image norms keeps each image's gradient its own
                (grad,) = torch.autograd.grad(fidelity.sum(), x)
            with torch.no_grad():
                x0 = x0hat.detach()
                x_next = chain.unguided_step(step, i_vec, x.detach(), x0, log_var) - self.scale * grad
                chain.remember(x0)
                if callback is not None:
                    callback(StepInfo(step, int(t_vec[0]), x.detach(), x0, fidelity.detach()))
                x = chain.guard(step, int(t_vec[0]), x_next, x.detach())
        return chain.result(x)
