"""`Task`: an operator and a noise model, and the simulated measurement y = noise(A(x))."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .noise import NoiseModel
from .operators.base import Operator
from .seeding import derive_seed, generator

__all__ = ["Task"]


class Task:
    """A forward model and its noise.

    `measure(x, seed)` draws the operator's per-item randomness (mask, kernel) from
    (seed, item index), keeps the drawn operator in `task.operator` for the solver, and returns
    y. For measured data, build the task with a fixed operator and pass y to the solver directly.
    """

    def __init__(self, operator: Operator, noise: NoiseModel) -> None:
        self.template = operator
        self.operator = operator
        self.noise = noise

    def __repr__(self) -> str:
        return f"Task(operator={self.operator!r}, noise={self.noise!r})"

    def draw(self, image_shape: Sequence[int], seed: int = 0, indices: Sequence[int] | None = None,
             batch_size: int = 1) -> Operator:
        """Draw (and keep) the operator for the items `indices` (default 0..batch_size-1)."""
        indices = list(range(batch_size)) if indices is None else [int(i) for i in indices]
        if self.template.is_random:
            seeds = [derive_seed(seed, i, "operator") for i in indices]
            self.operator = self.template.draw(seeds, tuple(image_shape))
        return self.operator

    def measure(self, x: Tensor, seed: int = 0, indices: Sequence[int] | None = None) -> Tensor:
        """y = noise(A(x)) for x (B, C, H, W) in [-1, 1]; item b seeded by (seed, indices[b])."""
        if x.dim() != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        indices = list(range(x.shape[0])) if indices is None else [int(i) for i in indices]
        if len(indices) != x.shape[0]:
            raise ValueError(f"got {len(indices)} item indices for a batch of {x.shape[0]}")
        operator = self.draw(x.shape[1:], seed, indices).to(x.device)
        self.operator = operator
        with torch.no_grad():
            ax = operator(x)
        gens = [generator(seed, i, "measurement") for i in indices]
        return self.noise.simulate(ax, gens)
