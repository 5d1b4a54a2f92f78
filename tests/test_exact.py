"""The exact benchmark at a small size: DPG against true posteriors of Gaussian-mixture priors."""

from __future__ import annotations

import pytest
import torch

from dpgkit import validation as V
from dpgkit.solvers import DPG, DPS


def test_sliced_wasserstein_separates_distributions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 6, generator=g), torch.randn(400, 6, generator=g)
    assert V.sliced_wasserstein(a, b) < 0.15
    assert V.sliced_wasserstein(a, b + 1.0) > 0.3  # a shift of 1 along (1,...,1): about 1 per unit direction


@pytest.mark.parametrize("sigma_y", [0.05, 0.2])
@pytest.mark.parametrize("kind", V.PROBLEM_KINDS)
def test_dpg_samples_are_closer_to_the_posterior_than_the_prior(kind, sigma_y):
    problem = V.make_problem(kind, sigma_y, (1, 4, 4), seed=0, num_components=3)
    n = 128
    exact = V.posterior_samples(problem, n, seed=0)
    prior = problem.prior.sample(n, torch.Generator().manual_seed(0)).float()
    # the guidance scale is a per-noise-level hyperparameter, as in the paper's table
    scale = {0.05: 0.2, 0.2: 0.06}[sigma_y]
    solver = DPG(scale=scale, num_samples=64, sampler="ddim", steps=20, clip=False)
    dpg = V.solver_samples(problem, solver, n, seed=0)
    d_dpg, d_prior = V.sliced_wasserstein(dpg, exact), V.sliced_wasserstein(prior, exact)
    assert d_dpg < 0.85 * d_prior, (d_dpg, d_prior)


def test_guidance_directions_point_along_the_exact_score():
    problem = V.make_problem("inpainting", 0.05, (1, 4, 4), seed=0, num_components=3)
    dps = V.guidance_cosines(problem, V.solver_direction(DPS()), [500, 50], num_states=16)
    dpg = V.guidance_cosines(problem, V.solver_direction(DPG(scale=1.0, num_samples=500)), [500, 50], num_states=16)
    assert min(dps) > 0.5 and min(dpg) > 0.5, (dps, dpg)


def test_the_benchmark_evaluates_the_shipped_guidance(monkeypatch):
    """validation runs the solvers' own `guidance`: changing it changes what the benchmark measures."""
    problem = V.make_problem("sr", 0.05, (1, 4, 4), seed=0, num_components=3)
    x_t = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for solver in (DPS(), DPG(scale=1.0, num_samples=64)):
        direction = V.solver_direction(solver)
        before = direction(problem, x_t, 300)
        original = type(solver).guidance

        def flipped(self, *args, _original=original, **kwargs):
            guide = _original(self, *args, **kwargs)
            guide.grad = -guide.grad
            return guide

        monkeypatch.setattr(type(solver), "guidance", flipped)
        assert torch.allclose(direction(problem, x_t, 300), -before)
        monkeypatch.undo()


def test_dps_direction_is_the_likelihood_gradient_of_the_norm():
    """DPS's guidance at x_t is -grad ||y - A x0hat(x_t)||: compared with autograd on the exact denoiser."""
    problem = V.make_problem("blur", 0.05, (1, 4, 4), seed=1, num_components=2)
    x_t = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    res = (problem.y - problem.operator(problem.prior.x0_mean(x_t, 200))).flatten(1).norm(dim=1)
    (expected,) = torch.autograd.grad(res.sum(), x_t)
    assert torch.allclose(V.solver_direction(DPS())(problem, x_t.detach(), 200), -expected, atol=1e-6)
