"""The exact benchmark: solvers against true posteriors of Gaussian-mixture priors.

A `Problem` is a GMM prior, a linear operator, Gaussian noise and one measurement y; its exact
posterior p(x0 | y) and exact guidance score grad_{x_t} log p(y | x_t) come from
`GaussianMixturePrior`. Two questions are asked of each method:

1. `guidance_cosines`: at states x_t of the exact conditional chain (x0 ~ p(x0 | y), then
   diffused), how well does the method's guidance direction point along the exact score?
2. `sliced_wasserstein`: how far are the method's samples from exact posterior samples?
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .models.gmm import GaussianMixture, GaussianMixturePrior
from .noise import Gaussian
from .operators import GaussianBlur, Inpainting, LinearOperator, SuperResolution
from .seeding import derive_seed, generator
from .solvers.base import Denoised, Solver
from .task import Task

__all__ = ["Problem", "make_prior", "make_problem", "sliced_wasserstein", "guidance_cosines",
           "posterior_samples", "solver_samples", "denoised_state", "solver_direction", "PROBLEM_KINDS"]

PROBLEM_KINDS = ("inpainting", "sr", "blur")

Direction = Callable[["Problem", Tensor, int], Tensor]
"""A guidance direction at (problem, x_t (n, C, H, W), timestep t) -> (n, C, H, W)."""


@dataclass
class Problem:
    name: str
    prior: GaussianMixturePrior
    operator: LinearOperator
    sigma_y: float
    x_true: Tensor  # (1, C, H, W)
    y: Tensor  # (1, ...)
    posterior: GaussianMixture

    @property
    def task(self) -> Task:
        return Task(self.operator, Gaussian(self.sigma_y))


def make_prior(image_shape: Sequence[int], num_components: int = 4, seed: int = 0) -> GaussianMixturePrior:
    """K isotropic components: means uniform in [-0.5, 0.5], stds in [0.15, 0.3]."""
    g = generator(seed, "gmm-prior")
    k, shape = num_components, tuple(image_shape)
    means = torch.rand(k, *shape, generator=g, dtype=torch.float64) - 0.5
    stds = 0.15 + 0.15 * torch.rand(k, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
    return GaussianMixturePrior(means, stds, weights)


def make_operator(kind: str, image_shape: Sequence[int], seed: int = 0) -> LinearOperator:
    c, h, w = image_shape
    if kind == "inpainting":  # keep about a third of the pixels
        mask = (torch.rand(1, 1, h, w, generator=generator(seed, "mask")) < 1 / 3).float()
        return Inpainting(mask)
    if kind == "sr":
        return SuperResolution(factor=2, mode="avgpool")
    if kind == "blur":
        return GaussianBlur(kernel_size=3, std=0.8, padding="circular")
    raise ValueError(f"unknown problem kind {kind!r}: expected one of {PROBLEM_KINDS}")


def make_problem(kind: str, sigma_y: float, image_shape: Sequence[int] = (1, 8, 8), seed: int = 0,
                 num_components: int = 4) -> Problem:
    """A problem with x_true drawn from the prior and y = A x_true + sigma_y n."""
    prior = make_prior(image_shape, num_components, seed)
    operator = make_operator(kind, image_shape, seed)
    x_true = prior.sample(1, generator(seed, "x_true")).float().view(1, *image_shape)
    y, _ = Task(operator, Gaussian(sigma_y)).measure(x_true, seed=seed)
    posterior = prior.posterior(operator, y.double(), sigma_y)
    name = f"{kind} D={prior.dim} sigma_y={sigma_y}"
    return Problem(name, prior, operator, sigma_y, x_true, y, posterior)


def sliced_wasserstein(a: Tensor, b: Tensor, num_projections: int = 512, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between equal-size samples a, b (n, D): sqrt(E_theta W2^2)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    if a.shape != b.shape:
        raise ValueError(f"expected two samples of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    theta = torch.randn(a.shape[1], num_projections, generator=generator(seed, "swd"), dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa, pb = (a @ theta).sort(dim=0).values, (b @ theta).sort(dim=0).values
    return float((pa - pb).square().mean().sqrt())


def posterior_samples(problem: Problem, n: int, seed: int = 0) -> Tensor:
    return problem.posterior.sample(n, generator(seed, "posterior")).float().view(n, *problem.prior.image_shape)


def solver_samples(problem: Problem, solver: Solver, n: int, seed: int = 0) -> Tensor:
    """n posterior samples of `solver` for the one measurement (items 0..n-1 of a batch)."""
    y = problem.y.expand(n, *problem.y.shape[1:]).contiguous()
    return solver.restore(problem.prior.as_model(), problem.task, y, seed=seed, progress=False)


def _states(problem: Problem, t: int, n: int, seed: int) -> Tensor:
    """x_t of the exact conditional chain: x0 ~ p(x0 | y), x_t = sqrt(abar) x0 + sqrt(1 - abar) z."""
    abar = float(problem.prior.schedule.alphas_cumprod[t])
    x0 = posterior_samples(problem, n, derive_seed(seed, t))
    z = torch.randn(x0.shape, generator=generator(seed, t, "states"))
    return abar**0.5 * x0 + (1 - abar) ** 0.5 * z


def denoised_state(problem: Problem, x_t: Tensor, t: int) -> Denoised:
    """x_t with the prior's exact Tweedie estimate E[x0 | x_t] on its graph: where guidance is evaluated."""
    x = x_t.detach().requires_grad_(True)
    with torch.enable_grad():
        x0hat = problem.prior.x0_mean(x, t)
    abar = problem.prior.schedule.alphas_cumprod[t].to(x).expand(x.shape[0]).view(-1, 1, 1, 1)
    return Denoised(x, x0hat, abar)


def solver_direction(solver: Solver, seed: int = 0) -> Direction:
    """The shipped solver's guidance at (problem, x_t, t) as a direction: -grad of its data misfit,
    i.e. the solver's `guidance` (DPG, DPS, ...) evaluated as at a chain's first guided step."""
    if not callable(getattr(solver, "guidance", None)):
        raise TypeError(f"{type(solver).__name__} has no guidance(state, task, y, seeds) to evaluate")

    def direction(problem: Problem, x_t: Tensor, t: int) -> Tensor:
        state = denoised_state(problem, x_t, t)
        n = x_t.shape[0]
        y = problem.y.expand(n, *problem.y.shape[1:])
        seeds = [derive_seed(seed, t, i, "guidance") for i in range(n)]
        return -solver.guidance(state, problem.task, y, seeds).grad

    return direction


def guidance_cosines(problem: Problem, direction: Direction,
                     timesteps: Sequence[int], num_states: int = 64, seed: int = 0) -> list[float]:
    """Mean cosine similarity between `direction` and the exact grad_{x_t} log p(y | x_t), per t."""
    out = []
    A = problem.operator
    for t in timesteps:
        x_t = _states(problem, t, num_states, seed)
        exact = problem.prior.likelihood_score(x_t.double(), t, A, problem.y.double(), problem.sigma_y)
        est = direction(problem, x_t.float(), t).double()
        cos = torch.nn.functional.cosine_similarity(est.flatten(1), exact.flatten(1), dim=1)
        out.append(float(cos.mean()))
    return out
