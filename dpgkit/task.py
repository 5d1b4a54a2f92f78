"""`Task`: an operator and a noise model, and the simulated measurement y = noise(A(x)).

A task is a value. Its operator is either fixed or a random template (a box mask at a random
place, a motion kernel); drawing the template for a batch returns a *new* task bound to the
drawn operator, so the link between a measurement and the operator that made it is explicit:

    y, drawn = task.measure(x, seed=0, indices=[3, 7])
    x_hat = solver.restore(model, drawn, y, seed=0, indices=[3, 7])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .noise import NoiseModel
from .operators.base import Operator
from .seeding import derive_seed, generator

__all__ = ["Task"]


@dataclass(frozen=True)
class Task:
    """A forward model A and its measurement noise: y = noise(A(x)).

    Attributes:
        operator: a fixed operator, or a random template (`operator.is_random`) that `draw` and
            `measure` turn into a fixed one per item (item b's draw seeded by (seed, indices[b])).
        noise: the measurement noise model.
        noisy_unobserved: whether entries that the operator does not observe (inpainting's
            missing pixels, `operator.observed()` = 0) carry noise too. False (default): they are
            exactly 0, as the operator's A(x) is there. True: noise is added everywhere, as the
            DPS and DPG authors' code does; their published step sizes were tuned that way, so the
            recipes that reproduce the paper set it (it raises DPG's temperature and width, and
            shrinks DPS's step, compared with zeros).
    """

    operator: Operator
    noise: NoiseModel
    noisy_unobserved: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.operator, Operator):
            raise TypeError(f"Task.operator must be a dpgkit Operator, got {type(self.operator).__name__}")
        if not isinstance(self.noise, NoiseModel):
            raise TypeError(f"Task.noise must be a dpgkit NoiseModel, got {type(self.noise).__name__}")

    @property
    def is_drawn(self) -> bool:
        """Whether the operator is fixed (ready for a solver), not a random template."""
        return not self.operator.is_random

    def with_operator(self, operator: Operator) -> Task:
        """The same noise with another operator (e.g. the mask that came with a measured image)."""
        return replace(self, operator=operator)

    def draw(self, image_shape: Sequence[int], seed: int = 0, indices: Sequence[int] | None = None,
             batch_size: int = 1) -> Task:
        """The task with its operator drawn for the items `indices` (default 0..batch_size-1).

        image_shape: (C, H, W) of the images. A fixed operator is kept as it is. `self` is unchanged.
        """
        indices = list(range(batch_size)) if indices is None else [int(i) for i in indices]
        if not self.operator.is_random:
            return self
        seeds = [derive_seed(seed, i, "operator") for i in indices]
        return self.with_operator(self.operator.draw(seeds, tuple(image_shape)))

    def measure(self, x: Tensor, seed: int = 0, indices: Sequence[int] | None = None) -> tuple[Tensor, Task]:
        """Simulate y = noise(A(x)) and return (y, the task drawn for these items).

        x: (B, C, H, W) in [-1, 1]. Item b's operator draw and its noise come from
        (seed, indices[b]) (default indices 0..B-1), so an item measures the same alone or in a batch.
        Raises ValueError on a wrongly shaped x or a wrong number of indices.
        """
        if x.dim() != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        indices = list(range(x.shape[0])) if indices is None else [int(i) for i in indices]
        if len(indices) != x.shape[0]:
            raise ValueError(f"got {len(indices)} item indices for a batch of {x.shape[0]}")
        drawn = self.draw(x.shape[1:], seed, indices)
        drawn = drawn.with_operator(drawn.operator.to(x.device))
        with torch.no_grad():
            ax = drawn.operator(x)
        gens = [generator(seed, i, "measurement") for i in indices]
        y = self.noise.simulate(ax, gens, unit=self.noise.check(drawn.operator))
        observed = drawn.operator.observed()
        if observed is not None and not self.noisy_unobserved:
            y = y * (observed.to(y) > 0)
        return y, drawn
