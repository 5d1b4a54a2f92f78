"""The `Solver` interface and the pieces every diffusion sampler shares.

A solver runs the reverse chain of a `DiffusionModel` from pure noise to x0, steered by the
measurement y of a `Task`. Item b of a batch draws all of its randomness from
(seed, indices[b], step), so it comes out the same alone, in a batch, or on another process.
"""

from __future__ import annotations

import sys
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import diffusion as dm
from ..models.base import DiffusionModel
from ..seeding import randn_per_item
from ..task import Task

__all__ = ["Solver", "StepInfo", "Callback", "ReverseChain"]


@dataclass
class StepInfo:
    """What a callback sees after each step: x_t is the state the step started from."""

    step: int  # 0 .. num_steps - 1, in the order the chain runs
    t: int  # timestep of the original schedule
    x_t: Tensor  # (B, C, H, W)
    x0hat: Tensor  # (B, C, H, W), Tweedie estimate at x_t
    residual: Tensor  # (B,), ||y - A(x0hat)||_2


Callback = Callable[[StepInfo], None]


class Solver(ABC):
    """restore(model, task, y) -> x0, a posterior sample for each measurement in the batch."""

    name: str = "solver"

    @abstractmethod
    def restore(
        self, model: DiffusionModel, task: Task, y: Tensor, seed: int = 0,
        indices: Sequence[int] | None = None, callback: Callback | None = None,
        progress: bool | None = None,
    ) -> Tensor:
        """Restore a batch. y (B, ...) measured through task.operator (drawn for these items).

        indices: the dataset index of each item (default 0..B-1), which seeds its randomness.
        progress: a per-step bar (default: when stderr is a terminal).
        """


class ReverseChain:
    """The bookkeeping of one reverse run: schedule, per-item noise, the non-finite guard."""

    def __init__(self, model: DiffusionModel, y: Tensor, task: Task, sampler: str, steps: int,
                 seed: int, indices: Sequence[int] | None, progress: bool | None, name: str) -> None:
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        self.model, self.task, self.sampler, self.seed = model, task, sampler, seed
        self.batch = y.shape[0]
        self.indices = list(range(self.batch)) if indices is None else [int(i) for i in indices]
        if len(self.indices) != self.batch:
            raise ValueError(f"got {len(self.indices)} item indices for a batch of {self.batch}")
        op_batch = task.operator.batch_size
        if op_batch is not None and op_batch not in (1, self.batch):
            raise ValueError(
                f"the task's operator was drawn for {op_batch} items but y holds {self.batch}: "
                "call task.measure (or task.draw) for this batch first"
            )
        if getattr(task.operator, "is_random", False):
            raise ValueError("the task's operator is a random template: call task.measure or task.draw first")
        total = len(model.schedule)
        spec = None if sampler == "ddpm" and steps == total else (f"ddim{steps}" if sampler == "ddim" else steps)
        self.schedule = model.schedule.respace(spec)
        self.num_steps = len(self.schedule)
        self.device = y.device
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.name = name
        self.alive = torch.ones(self.batch, dtype=torch.bool, device=self.device)
        self.last_x0: Tensor | None = None

    def initial_state(self) -> Tensor:
        return randn_per_item(self.model.image_shape, self.seed, self.indices, "x_T",
                              like=torch.empty(0, device=self.device))

    def steps(self):
        """Yields (step, i, i_vec, t_vec): chain index i from S-1 down to 0."""
        order = list(reversed(range(self.num_steps)))
        if self.progress:
            from tqdm.auto import tqdm

            order = tqdm(order, desc=self.name, leave=False)
        for step, i in enumerate(order):
            i_vec = torch.full((self.batch,), i, dtype=torch.long, device=self.device)
            t_vec = self.schedule.timesteps[i_vec.cpu()].to(self.device)
            yield step, i, i_vec, t_vec

    def abar(self, i_vec: Tensor, like: Tensor) -> Tensor:
        return dm.at_step(self.schedule.alphas_cumprod, i_vec, like)

    def denoise(self, x_t: Tensor, t_vec: Tensor, i_vec: Tensor, clip: bool) -> tuple[Tensor, Tensor | None]:
        """(x0hat, log variance of the reverse step or None for the fixed-small default)."""
        eps, var_values = self.model.eps_and_variance(x_t, t_vec)
        x0hat = dm.tweedie_x0(x_t, eps, self.abar(i_vec, x_t), clip=clip)
        log_var = None
        if var_values is not None:
            log_var = dm.model_log_variance(self.schedule, i_vec, x_t, "learned_range", var_values.detach())
        return x0hat, log_var

    def unguided_step(self, step: int, i_vec: Tensor, x_t: Tensor, x0hat: Tensor, log_var: Tensor | None) -> Tensor:
        """x'_{t-1}: the DDPM ancestral step (noise from (seed, item, step)) or deterministic DDIM."""
        if self.sampler == "ddim":
            return dm.ddim_step(self.schedule, i_vec, x_t, x0hat, eta=0.0)
        z = randn_per_item(self.model.image_shape, self.seed, self.indices, "ddpm", step, like=x_t)
        return dm.ddpm_step(self.schedule, i_vec, x_t, x0hat, z, log_var)

    def guard(self, step: int, t: int, x_next: Tensor, x_keep: Tensor) -> Tensor:
        """Stop items whose state turned non-finite: warn naming the step, keep their last state."""
        finite = torch.isfinite(x_next.flatten(1)).all(1)
        newly = self.alive & ~finite
        for b in torch.nonzero(newly).flatten().tolist():
            warnings.warn(
                f"{self.name}: item {self.indices[b]} turned non-finite at step {step} (t={t}); "
                "it is stopped and its last finite estimate is returned",
                RuntimeWarning, stacklevel=3,
            )
        self.alive &= finite
        keep = (~self.alive).view(-1, *([1] * (x_next.dim() - 1)))
        return torch.where(keep, x_keep, x_next)

    def remember(self, x0hat: Tensor) -> None:
        """Keep each live item's latest finite x0hat: what a stopped item returns."""
        ok = (self.alive & torch.isfinite(x0hat.flatten(1)).all(1)).view(-1, *([1] * (x0hat.dim() - 1)))
        self.last_x0 = torch.where(ok, x0hat, x0hat.new_zeros(()) if self.last_x0 is None else self.last_x0)

    def result(self, x: Tensor) -> Tensor:
        """The final sample in [-1, 1]; stopped items get their last finite estimate."""
        alive = self.alive.view(-1, *([1] * (x.dim() - 1)))
        return torch.where(alive, x.detach().clamp(-1, 1), self.last_x0)

    def residual(self, y: Tensor, x0hat: Tensor) -> Tensor:
        with torch.no_grad():
            return (y - self.task.operator(x0hat)).flatten(1).norm(dim=1)


def per_image_normalize(g: Tensor) -> Tensor:
    """g / ||g|| per image; an all-zero g stays zero."""
    norm = g.flatten(1).norm(dim=1).view(-1, *([1] * (g.dim() - 1)))
    return torch.where(norm > 0, g / norm.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(g))
