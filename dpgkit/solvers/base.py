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
from ..seeding import derive_seed, randn_per_item
from ..task import Task

__all__ = ["Solver", "StepInfo", "Callback", "ReverseChain", "Denoised", "Guidance", "per_image_normalize"]


@dataclass
class StepInfo:
    """What a callback sees after each step: x_t is the state the step started from."""

    step: int  # 0 .. num_steps - 1, in the order the chain runs
    t: int  # timestep of the original schedule
    x_t: Tensor  # (B, C, H, W)
    x0hat: Tensor  # (B, C, H, W), Tweedie estimate at x_t
    residual: Tensor  # (B,), ||y - A(x0hat)||_2


Callback = Callable[[StepInfo], None]


@dataclass
class Denoised:
    """A state with its Tweedie estimate: where guidance is evaluated.

    x_t (B, C, H, W) requires grad; x0hat (B, C, H, W) = E[x0 | x_t] is a function of x_t on its
    autograd graph (Tweedie's formula, clipped to [-1, 1] when the solver clips); abar (B, 1, 1, 1)
    is alpha-bar at x_t's timestep.
    """

    x_t: Tensor
    x0hat: Tensor
    abar: Tensor


@dataclass
class Guidance:
    """A guidance method's answer at a state: the gradient of its data misfit w.r.t. x_t.

    grad (B, C, H, W): grad_{x_t} of the misfit, up to the positive per-item factor exp(log_scale)
    (B,) float64, kept apart so that tiny or huge published scales stay finite; -grad points
    towards higher likelihood p(y | x_t). x0hat (B, C, H, W) is detached. residual (B,) is
    ||y - A(x0hat)||_2 where the method computed it (None: not computed). temperature (B,) is DPG's
    Z, to pass back at the next step.
    """

    grad: Tensor
    log_scale: Tensor
    x0hat: Tensor
    residual: Tensor | None = None
    temperature: Tensor | None = None


class Solver(ABC):
    """restore(model, task, y) -> x0, a posterior sample for each measurement in the batch.

    A solver says which chain it runs (`sampler`, `steps`) and implements `sample`, the loop over
    that chain; `restore` builds the chain (schedule, per-item seeds, progress) and runs it.
    """

    name: str = "solver"
    sampler: str = "ddpm"
    steps: int = 1000

    @property
    def label(self) -> str:
        """The method's name as the field writes it (progress bars, warnings, summaries)."""
        return type(self).__name__

    def restore(
        self, model: DiffusionModel, task: Task, y: Tensor, seed: int = 0,
        indices: Sequence[int] | None = None, callback: Callback | None = None,
        progress: bool | None = None,
    ) -> Tensor:
        """Restore a batch: x0 (B, C, H, W) in [-1, 1] from y (B, ...).

        task: the task `task.measure` (or `task.draw`) returned for these items: its operator is
            drawn, never a random template. indices: the dataset index of each item (default
            0..B-1), which seeds all of its randomness. callback: called with a `StepInfo` after
            each step. progress: a per-step bar (default: when stderr is a terminal).
        Raises ValueError when the solver cannot solve the task (it names the method that can).
        """
        self.check(task)
        chain = ReverseChain(model, y, task, self.sampler, self.steps, seed, indices, progress, self.label,
                             timesteps=self.chain_timesteps(model))
        return self.sample(chain, task, y, callback)

    def chain_timesteps(self, model: DiffusionModel) -> Sequence[int] | None:
        """The model's timesteps the chain runs, ascending, when a method spaces them its own way
        (None: `steps` evenly strided ones, as `sampler` respaces them)."""
        return None

    def check(self, task: Task) -> None:
        """Raise ValueError (naming a method that can) when this solver cannot solve `task`."""
        return None

    @abstractmethod
    def sample(self, chain: ReverseChain, task: Task, y: Tensor, callback: Callback | None) -> Tensor:
        """Run the reverse chain from `chain.initial_state()`; return `chain.result(x)`."""


class ReverseChain:
    """The bookkeeping of one reverse run: schedule, per-item noise, the non-finite guard."""

    def __init__(self, model: DiffusionModel, y: Tensor, task: Task, sampler: str, steps: int,
                 seed: int, indices: Sequence[int] | None, progress: bool | None, name: str,
                 timesteps: Sequence[int] | None = None) -> None:
        """timesteps: run exactly these steps of the model's schedule (ascending) instead of
        `steps` evenly spaced ones (a method's own spacing, e.g. DiffPIR's quadratic one)."""
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a tensor (B, ...), got {type(y).__name__}: task.measure returns a pair, "
                            "unpack it as `y, drawn = task.measure(x, seed)` and restore with `drawn`")
        self.model, self.task, self.sampler, self.seed = model, task, sampler, seed
        self.batch = y.shape[0]
        self.indices = list(range(self.batch)) if indices is None else [int(i) for i in indices]
        if len(self.indices) != self.batch:
            raise ValueError(f"got {len(self.indices)} item indices for a batch of {self.batch}")
        op_batch = task.operator.batch_size
        if op_batch is not None and op_batch not in (1, self.batch):
            raise ValueError(
                f"the task's operator was drawn for {op_batch} items but y holds {self.batch}: "
                "restore with the task that task.measure (or task.draw) returned for this batch"
            )
        if task.operator.is_random:
            raise ValueError("the task's operator is a random template: restore with the task that "
                             "task.measure (or task.draw) returned for these items")
        total = len(model.schedule)
        spec = None if sampler == "ddpm" and steps == total else (f"ddim{steps}" if sampler == "ddim" else steps)
        self.schedule = model.schedule.respace(spec) if timesteps is None else model.schedule.subset(list(timesteps))
        self.num_steps = len(self.schedule)
        self.device = y.device
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.name = name
        self.alive = torch.ones(self.batch, dtype=torch.bool, device=self.device)
        self.last_x0: Tensor | None = None

    def initial_state(self) -> Tensor:
        return randn_per_item(self.model.image_shape, self.seed, self.indices, "x_T",
                              like=torch.empty(0, device=self.device))

    def moves(self, order: Sequence[int] | None = None):
        """Yields (step, i, j): the chain moves from index i to index j (-1 is x0).

        order: the chain indices visited, ending at -1 (default S-1, ..., 0, -1: one move down per
        step; a schedule with jumps back, j > i, is DDNM's time travel). `step` counts the moves.
        """
        order = list(range(self.num_steps - 1, -2, -1)) if order is None else list(order)
        moves = list(zip(order[:-1], order[1:]))
        if self.progress:
            from tqdm.auto import tqdm

            moves = tqdm(moves, desc=self.name, leave=False)
        for step, (i, j) in enumerate(moves):
            yield step, i, j

    def steps(self):
        """Yields (step, i, i_vec, t_vec): chain index i from S-1 down to 0, one step each."""
        for step, i, _j in self.moves():
            yield step, i, *self.at(i)

    def at(self, i: int) -> tuple[Tensor, Tensor]:
        """(i_vec, t_vec) (B,): chain index i and its timestep of the original schedule, per item."""
        i_vec = torch.full((self.batch,), i, dtype=torch.long, device=self.device)
        return i_vec, self.schedule.timesteps[i_vec.cpu()].to(self.device)

    def seeds(self, step: int, purpose: str) -> list[int]:
        """One seed per item for a draw at `step`: from (run seed, item index, step, purpose)."""
        return [derive_seed(self.seed, idx, step, purpose) for idx in self.indices]

    def abar(self, i_vec: Tensor, like: Tensor) -> Tensor:
        return dm.at_step(self.schedule.alphas_cumprod, i_vec, like)

    def denoise(self, x_t: Tensor, t_vec: Tensor, i_vec: Tensor, clip: bool) -> tuple[Tensor, Tensor | None]:
        """(x0hat, log variance of the reverse step or None for the fixed-small default)."""
        eps, var_values = self.model.eps_and_variance(x_t, t_vec)
        x0hat = dm.predict_x0(self.schedule, i_vec, x_t, eps, clip=clip)  # float64 coefficients
        log_var = None
        if var_values is not None:
            log_var = dm.model_log_variance(self.schedule, i_vec, x_t, "learned_range", var_values.detach())
        return x0hat, log_var

    def denoised(self, x_t: Tensor, t_vec: Tensor, i_vec: Tensor, clip: bool) -> tuple[Denoised, Tensor | None]:
        """x_t made a leaf that requires grad, with its Tweedie estimate on x_t's graph (for guidance)."""
        x = x_t.detach().requires_grad_(True)
        with torch.enable_grad():
            x0hat, log_var = self.denoise(x, t_vec, i_vec, clip)
        return Denoised(x, x0hat, self.abar(i_vec, x).detach()), log_var

    def unguided_step(self, step: int, i_vec: Tensor, x_t: Tensor, x0hat: Tensor, log_var: Tensor | None) -> Tensor:
        """x'_{t-1}: the DDPM ancestral step (noise from (seed, item, step)) or deterministic DDIM."""
        if self.sampler == "ddim":
            return dm.ddim_step(self.schedule, i_vec, x_t, x0hat, eta=0.0)
        z = randn_per_item(self.model.image_shape, self.seed, self.indices, "ddpm", step, like=x_t)
        return dm.ddpm_step(self.schedule, i_vec, x_t, x0hat, z, log_var)

    def finish(self, step: int, t: int, x_t: Tensor, x_next: Tensor, x0hat: Tensor, y: Tensor,
               callback: Callback | None, residual: Tensor | None = None, info: StepInfo | None = None) -> Tensor:
        """The ending every step shares: keep x0hat for stopped items, tell the callback, guard.

        x_t: the state the step started from; x_next: the proposed next state; returns the state
        to continue from (items that turned non-finite keep x_t and are stopped). The callback gets
        `info` when given (a solver's richer StepInfo), else a StepInfo built here.
        """
        x_t, x0hat = x_t.detach(), x0hat.detach()
        self.remember(x0hat)
        if callback is not None:
            if info is None:
                res = self.residual(y, x0hat) if residual is None else residual.detach()
                info = StepInfo(step, t, x_t, x0hat, res)
            callback(info)
        return self.guard(step, t, x_next.detach(), x_t)

    def guard(self, step: int, t: int, x_next: Tensor, x_keep: Tensor) -> Tensor:
        """Stop items whose state turned non-finite: warn naming the step, keep their last state."""
        finite = torch.isfinite(x_next.flatten(1)).all(1)
        newly = self.alive & ~finite
        for b in torch.nonzero(newly).flatten().tolist():
            warnings.warn(
                f"{self.name}: item {self.indices[b]} turned non-finite at step {step} (t={t}); "
                "it is stopped and its last finite estimate is returned",
                RuntimeWarning, stacklevel=4,
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
