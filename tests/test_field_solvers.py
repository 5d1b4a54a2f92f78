"""DAPS, PiGDM and DiffPIR: their pieces against dense linear algebra, the exact benchmark at D = 16
(sliced W2 to the exact posterior at most half the prior's), batch invariance, no state, refusals."""

from __future__ import annotations

import math

import pytest
import torch
from test_baselines import (
    SHAPE,
    _numpy_halve,
    assert_refuses_what_needs_an_svd_view,
    benchmark,
    gmm_prior,
    make_operator,
    per_item_task,
    sliced_w2,
)

import dpgkit as dk
from dpgkit.diffusion import Schedule
from dpgkit.models.gmm import operator_matrix
from dpgkit.operators.base import BlackBox
from dpgkit.solvers import DAPS, DiffPIR, PiGDM
from dpgkit.solvers.daps import edm_denoise, edm_sigmas, vp_timestep
from dpgkit.solvers.diffpir import quad_timesteps
from dpgkit.solvers.spectral import spectral_problem

# Reduced step counts for a 2-core test run; the settings that matter are named per method.
FAST = {
    # the image default lr = 1e-4 does not let 50 Langevin steps mix at these scales; tau=None is the
    # calibrated likelihood (tau = sqrt(2) sigma_y) a posterior sampler needs
    "daps": lambda: DAPS(annealing_steps=50, langevin_steps=50, lr=1e-3, tau=None),
    "pigdm": lambda: PiGDM(steps=50),  # the authors' eta = 0, weight 1
    "diffpir": lambda: DiffPIR(steps=50, lambda_=1.0, zeta=1.0),  # the authors' inpainting lambda, zeta
}


@pytest.mark.parametrize("problem", ["inpainting", "sr", "blur"])
@pytest.mark.parametrize("method", sorted(FAST))
def test_within_half_the_prior_distance_of_the_exact_posterior(problem, method):
    model, task, y, exact, prior_samples = benchmark(problem, 0.05)
    out = FAST[method]().restore(model, task, y, seed=0)
    assert out.shape == y.shape[:1] + SHAPE and torch.isfinite(out).all()
    d_method, d_prior = sliced_w2(out, exact), sliced_w2(prior_samples, exact)
    assert d_method <= 0.5 * d_prior, (problem, method, d_method, d_prior)


SMALL = {
    "daps": lambda: DAPS(annealing_steps=6, ode_steps=2, langevin_steps=3, lr=1e-3),
    "pigdm": lambda: PiGDM(steps=10, eta=0.5),
    "diffpir": lambda: DiffPIR(steps=10, zeta=0.5, eta=0.5),
}


@pytest.mark.parametrize("method", sorted(SMALL))
def test_batch_invariance_and_no_state(method):
    """Per-item masks (per-item singular values): an item alone equals it in a batch; a second call
    repeats the first bit for bit; another seed differs."""
    model = gmm_prior().as_model()
    task, y = per_item_task(3)
    solver = SMALL[method]()
    batch = solver.restore(model, task, y, seed=4, indices=[7, 8, 9])
    for b in range(3):
        alone_task = dk.Task(dk.operators.Inpainting(task.operator.mask[b : b + 1]), task.noise)
        alone = SMALL[method]().restore(model, alone_task, y[b : b + 1], seed=4, indices=[7 + b])
        torch.testing.assert_close(alone[0], batch[b], atol=1e-5, rtol=0)
    assert (batch[0] - batch[1]).abs().max() > 1e-3
    again = solver.restore(model, task, y, seed=4, indices=[7, 8, 9])
    assert torch.equal(batch, again)
    other = solver.restore(model, task, y, seed=5, indices=[7, 8, 9])
    assert (other - batch).abs().max() > 1e-4


@pytest.mark.parametrize("method", sorted(SMALL))
def test_callbacks_see_every_step_and_nonfinite_items_stop(method):
    model = gmm_prior().as_model()
    task, y = per_item_task(2)
    seen = []
    out = SMALL[method]().restore(model, task, y, callback=seen.append)
    assert [s.step for s in seen] == list(range(len(seen))) and len(seen) >= 6
    assert seen[0].t > seen[-1].t and torch.isfinite(out).all()
    bad = y.clone()
    bad[1] = float("nan")
    with pytest.warns(RuntimeWarning, match="item 1 turned non-finite"):
        out = SMALL[method]().restore(model, task, bad)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], SMALL[method]().restore(model, task, y)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("solver", [PiGDM(steps=2), DiffPIR(steps=2)], ids=["pigdm", "diffpir"])
def test_closed_form_methods_refuse_what_they_cannot_do(solver):
    assert_refuses_what_needs_an_svd_view(solver, svd_message="SVD view.*DPG")


def test_daps_refuses_what_it_cannot_do():
    model = gmm_prior().as_model()
    y = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="not differentiable.*DPG"):
        DAPS().restore(model, dk.Task(BlackBox(_numpy_halve), dk.noise.Gaussian(0.05)), y)
    with pytest.raises(ValueError, match="Poisson.*DPG"):
        DAPS().restore(model, dk.Task(make_operator("sr"), dk.noise.Poisson(1.0)), y)
    with pytest.raises(ValueError, match="noiseless"):
        DAPS(tau=None).restore(model, dk.Task(make_operator("sr"), dk.noise.Noiseless()), y)
    with pytest.raises(ValueError, match="timestep_map"):
        DAPS(timestep_map="nearest")


def test_daps_runs_on_phase_retrieval():
    """A non-linear operator needs no SVD: the samples fit y to within 1.6x the noise level, well
    below what draws from the prior give (about 2.7x here)."""
    prior = gmm_prior()
    task = dk.Task(dk.operators.PhaseRetrieval(oversample=2.0), dk.noise.Gaussian(0.05))
    x = prior.sample(2, torch.Generator().manual_seed(3)).float()
    y, task = task.measure(x, seed=0)
    seen = []
    out = DAPS(annealing_steps=20, langevin_steps=20, lr=1e-3, tau=None).restore(
        prior.as_model(), task, y, callback=seen.append)
    assert torch.isfinite(out).all() and len(seen) == 20
    residual = (y - task.operator(out)).flatten(1).norm(dim=1)
    noise_level = 0.05 * y[0].numel() ** 0.5  # E||y - A x|| at the true x
    others = prior.sample(16, torch.Generator().manual_seed(9)).float()
    prior_residual = torch.stack([(y[b] - task.operator(others)).flatten(1).norm(dim=1).mean() for b in range(2)])
    assert (residual < 1.6 * noise_level).all() and (residual < 0.6 * prior_residual).all(), (residual, prior_residual)


def test_pigdm_weighting_matches_dense_algebra():
    """A^T (r^2 A A^T + sigma_y^2 I)^{-1} (y - A x0) through the SVD equals the dense solve."""
    task = dk.Task(make_operator("blur"), dk.noise.Gaussian(0.1))
    x = gmm_prior().sample(2, torch.Generator().manual_seed(1)).float()
    y, task = task.measure(x, seed=0)
    spec = spectral_problem("PiGDM", task, y, SHAPE, s_min=0.0)
    x0 = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(2))
    r2 = 0.3
    got = PiGDM._weighted_residual(spec, x0, r2).flatten(1).double()
    A = operator_matrix(task.operator, SHAPE)
    cov = r2 * A @ A.T + 0.1**2 * torch.eye(A.shape[0], dtype=torch.float64)
    resid = y.flatten(1).double() - x0.flatten(1).double() @ A.T
    want = torch.linalg.solve(cov, resid.T).T @ A
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("problem", ["sr", "inpainting"])
def test_diffpir_data_step_is_the_ridge_solution(problem):
    task = dk.Task(make_operator(problem), dk.noise.Gaussian(0.05))
    x = gmm_prior().sample(2, torch.Generator().manual_seed(1)).float()
    y, task = task.measure(x, seed=0)
    spec = spectral_problem("DiffPIR", task, y, SHAPE, s_min=0.0)
    x0 = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(2))
    rho = 0.07
    got = DiffPIR._data_step(spec, x0, rho).flatten(1).double()
    A = operator_matrix(task.operator, SHAPE)
    lhs = A.T @ A + rho * torch.eye(A.shape[1], dtype=torch.float64)
    rhs = y.flatten(1).double() @ A + rho * x0.flatten(1).double()
    want = torch.linalg.solve(lhs, rhs.T).T
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_diffpir_quad_timesteps():
    """The authors' "quad" skipping: t_k = 999 - int(sqrt(k * 1000^2 / (S - 1))), the last 0."""
    ts = quad_timesteps(100)
    assert len(ts) == 100 and ts[0] == 0 and ts[-1] == 999 and ts == sorted(set(ts))
    assert ts[-2] == 999 - 100  # the first jump: sqrt(1e6 / 99) = 100.5
    assert quad_timesteps(20)[-2] == 999 - int(math.sqrt(1e6 / 19))
    with pytest.raises(ValueError, match="steps"):
        DiffPIR(steps=1)
    schedule = Schedule.linear(1000).subset(ts)
    torch.testing.assert_close(schedule.alphas_cumprod, Schedule.linear(1000).alphas_cumprod[ts])


def test_daps_noise_levels_and_vp_timestep():
    """EDM's poly-7 grid; sigma -> t by the authors' VP preconditioning, and by the model's schedule."""
    grid = edm_sigmas(100.0, 0.1, 200)
    assert len(grid) == 201 and grid[0] == pytest.approx(100) and grid[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(grid, grid[1:]))
    levels = DAPS().sigmas()
    assert len(levels) == 201 and levels[-1] == 0 and levels[:-1] == grid[:-1]
    model = gmm_prior().as_model()
    for t_cont in (0.05, 0.5, 1.0):
        sigma = math.sqrt(math.exp(0.5 * 19.9 * t_cont**2 + 0.1 * t_cont) - 1)  # EDM's VP sigma(t)
        assert vp_timestep(model, sigma, "vp") == pytest.approx(999 * t_cont, abs=1e-6)
    abar = model.schedule.alphas_cumprod
    for t in (3, 250, 998):
        sigma = math.sqrt(1 / float(abar[t]) - 1)
        assert vp_timestep(model, sigma, "schedule") == pytest.approx(t, abs=1e-6)
    # the two maps agree to within about a timestep on guided-diffusion's linear schedule
    assert abs(vp_timestep(model, 1.0, "vp") - vp_timestep(model, 1.0, "schedule")) < 1.5


def test_edm_denoiser_is_the_exact_posterior_mean():
    """D(x, sigma) of a VP model at sigma_t = sqrt(1/abar_t - 1) is E[x0 | x_t], x_t = sqrt(abar_t) x."""
    prior = gmm_prior()
    model = prior.as_model()
    t = 400
    abar = float(model.schedule.alphas_cumprod[t])
    sigma = math.sqrt(1 / abar - 1)
    x = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigma
    got = edm_denoise(model, x, sigma, "schedule")
    torch.testing.assert_close(got, prior.x0_mean(abar**0.5 * x, t), atol=1e-6, rtol=1e-6)


def test_gmm_accepts_fractional_timesteps():
    prior = gmm_prior()
    a = prior.abar(torch.tensor([10, 11]), 2, torch.device("cpu")).flatten()
    half = float(prior.abar(10.5, 1, torch.device("cpu")))
    assert float(a[1]) < half < float(a[0])
    assert half == pytest.approx(math.sqrt(float(a[0]) * float(a[1])), rel=1e-12)
    torch.testing.assert_close(prior.abar(torch.tensor([10.0, 11.0]), 2, torch.device("cpu")).flatten(), a)
    with pytest.raises(ValueError, match="lie in"):
        prior.abar(999.5, 1, torch.device("cpu"))


BAD = [
    (DAPS, {"lr": 0.0}, "DAPS lr must be a finite number > 0, got 0.0"),
    (DAPS, {"annealing_steps": 0}, "DAPS annealing_steps must be a whole number >= 1, got 0"),
    (DAPS, {"tau": -0.01}, "DAPS tau must be a finite number > 0, got -0.01"),
    (DAPS, {"sigma_min": 0.001}, "DAPS sigma_min must be a finite number >= 0.01, got 0.001"),
    (DAPS, {"timestep_map": "vpp"}, "(did you mean 'vp'?)"),
    (PiGDM, {"eta": 1.5}, "PiGDM eta must be a finite number >= 0 and <= 1, got 1.5"),
    (PiGDM, {"steps": 0}, "PiGDM steps must be a whole number >= 1, got 0"),
    (DiffPIR, {"zeta": 2.0}, "DiffPIR zeta must be a finite number >= 0 and <= 1, got 2.0"),
    (DiffPIR, {"lambda_": 0.0}, "DiffPIR lambda_ must be a finite number > 0, got 0.0"),
]


@pytest.mark.parametrize(("solver", "kwargs", "message"), BAD, ids=[f"{s.__name__}-{k}" for s, k, _ in BAD])
def test_invalid_parameters_are_refused_with_the_allowed_range(solver, kwargs, message):
    with pytest.raises(ValueError) as err:
        solver(**kwargs)
    assert message in str(err.value)


def test_labels():
    assert (DAPS().label, PiGDM().label, DiffPIR().label) == ("DAPS", "PiGDM", "DiffPIR")
