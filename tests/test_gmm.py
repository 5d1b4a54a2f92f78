"""The Gaussian-mixture prior against Monte Carlo, DDPM sampling and closed forms worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dpgkit.diffusion import Schedule, ddpm_step, tweedie_x0
from dpgkit.models import DiffusionModel, GaussianMixturePrior
from dpgkit.operators.base import LinearOperator

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normal_pdf(x, mean, var):
    return math.exp(-((x - mean) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)


@pytest.fixture(scope="module")
def prior2d() -> GaussianMixturePrior:
    """Two well separated modes in D = 2, one isotropic-looking, diagonal stds."""
    means = torch.tensor([[-0.6, 0.3], [0.5, -0.4]], dtype=F64)
    stds = torch.tensor([[0.15, 0.2], [0.25, 0.1]], dtype=F64)
    return GaussianMixturePrior(means, stds, torch.tensor([0.3, 0.7], dtype=F64))


@pytest.fixture(scope="module")
def prior4d() -> GaussianMixturePrior:
    g = gen(1)
    means = 0.5 * torch.randn(3, 1, 2, 2, generator=g, dtype=F64)
    return GaussianMixturePrior(means, torch.tensor([0.2, 0.35, 0.5]), torch.tensor([2.0, 1.0, 1.0]))


def abar_at(t: int) -> float:
    return float(Schedule.linear(1000).alphas_cumprod[t])


# --------------------------------------------------------------------------------------------
# E[x0 | x_t] and eps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [100, 400, 800])
def test_x0_mean_matches_self_normalised_monte_carlo(prior2d, t):
    a = abar_at(t)
    x0 = prior2d.sample(200_000, gen(t)).reshape(-1, 2)
    x_t = torch.tensor([[0.0, 0.0], [-0.5, 0.3], [0.6, -0.5], [0.2, 0.4]], dtype=F64)
    exact = prior2d.x0_mean(x_t, t)
    # weights N(x_t; sqrt(a) x0, (1 - a) I), normalised over the samples
    logw = -((x_t[:, None, :] - math.sqrt(a) * x0[None]) ** 2).sum(-1) / (2 * (1 - a))
    w = torch.softmax(logw, dim=1)  # (4, N)
    estimate = w @ x0
    ess = 1 / (w**2).sum(1)
    assert bool((ess > 500).all()), f"too few effective samples for a meaningful check: {ess}"
    # delta-method standard error of a self-normalised estimate
    se = ((w[:, :, None] ** 2) * (x0[None] - estimate[:, None]) ** 2).sum(1).sqrt()
    assert bool(((exact - estimate).abs() < 5 * se).all()), (exact, estimate, se)
    if t <= 400:
        # and the check could fail: the prior mean is far from the exact denoiser here
        assert float((exact - prior2d.mean().reshape(1, 2)).abs().max()) > 10 * float(se.max())


@pytest.mark.parametrize("t", [0, 1, 250, 600, 999])
def test_eps_and_x0_mean_agree_through_tweedie(prior4d, t):
    x_t = torch.randn(6, 1, 2, 2, generator=gen(t), dtype=F64)
    eps = prior4d.eps(x_t, t)
    abar = torch.tensor(abar_at(t), dtype=F64)
    x0 = tweedie_x0(x_t, eps, abar, clip=False)
    torch.testing.assert_close(x0, prior4d.x0_mean(x_t, t), rtol=1e-9, atol=1e-9)


def test_score_is_the_gradient_of_log_p_t(prior4d):
    x_t = torch.randn(5, 1, 2, 2, generator=gen(3), dtype=F64).requires_grad_(True)
    t = torch.tensor([0, 20, 300, 700, 999])
    (grad,) = torch.autograd.grad(prior4d.log_prob(x_t, t).sum(), x_t)
    torch.testing.assert_close(prior4d.score(x_t.detach(), t), grad, rtol=1e-10, atol=1e-10)


def test_log_prob_at_t_is_the_noised_mixture_density():
    # 1-D, two components: p_t(x) = sum_k pi_k N(x; sqrt(a) m_k, a s_k^2 + 1 - a) by hand
    prior = GaussianMixturePrior(
        torch.tensor([[-1.0], [0.5]], dtype=F64),
        torch.tensor([0.3, 0.6], dtype=F64),
        torch.tensor([0.25, 0.75], dtype=F64),
    )
    t, x = 350, 0.37
    a = abar_at(t)
    p = 0.25 * normal_pdf(x, -math.sqrt(a), a * 0.09 + 1 - a)
    p += 0.75 * normal_pdf(x, 0.5 * math.sqrt(a), a * 0.36 + 1 - a)
    got = prior.log_prob(torch.tensor([[x]], dtype=F64), t)
    assert math.isclose(float(got), math.log(p), rel_tol=1e-12)


def test_batched_timesteps_equal_one_at_a_time(prior4d):
    x_t = torch.randn(4, 1, 2, 2, generator=gen(4), dtype=F64)
    t = torch.tensor([5, 999, 123, 500])
    batched = prior4d.eps(x_t, t)
    single = torch.cat([prior4d.eps(x_t[b : b + 1], int(t[b])) for b in range(4)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-14)


def test_eps_is_differentiable_and_keeps_dtype(prior4d):
    x_t = torch.randn(3, 1, 2, 2, generator=gen(5), dtype=F64).requires_grad_(True)
    t = torch.tensor([10, 400, 900])
    assert torch.autograd.gradcheck(lambda x: prior4d.eps(x, t), (x_t,))
    x32 = x_t.detach().float().requires_grad_(True)
    out = prior4d.eps(x32, t)
    assert out.dtype == torch.float32 and out.shape == x32.shape
    (v,) = torch.autograd.grad(out.sum(), x32)  # a VJP in float32 works
    assert v.dtype == torch.float32 and bool(v.isfinite().all())


def test_as_model_is_a_diffusion_model_returning_exact_eps(prior4d):
    model = prior4d.as_model()
    assert isinstance(model, DiffusionModel)
    assert model.image_shape == (1, 2, 2) and len(model.schedule) == 1000
    x_t = torch.randn(2, 1, 2, 2, generator=gen(6))
    eps, var = model.eps_and_variance(x_t, torch.tensor(321))
    assert var is None
    torch.testing.assert_close(eps, prior4d.eps(x_t.double(), 321).float())


def test_flat_means_default_to_a_row_image():
    prior = GaussianMixturePrior(torch.zeros(2, 5), 1.0, torch.ones(2))
    assert prior.image_shape == (1, 1, 5)
    assert prior.sample(3, gen(0)).shape == (3, 1, 1, 5)
    # N(0, I) stays N(0, I) under VP diffusion: eps = sqrt(1 - a) x
    x = torch.randn(4, 5, generator=gen(1), dtype=F64)
    torch.testing.assert_close(prior.eps(x, 600), math.sqrt(1 - abar_at(600)) * x)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="means must be"):
        GaussianMixturePrior(torch.zeros(2, 3, 4), 1.0, torch.ones(2))
    with pytest.raises(ValueError, match="stds must be finite and > 0"):
        GaussianMixturePrior(torch.zeros(2, 3), torch.tensor([1.0, 0.0]), torch.ones(2))
    with pytest.raises(ValueError, match="stds must be"):
        GaussianMixturePrior(torch.zeros(2, 3), torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match="weights must be"):
        GaussianMixturePrior(torch.zeros(2, 3), 1.0, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="image_shape"):
        GaussianMixturePrior(torch.zeros(2, 6), 1.0, torch.ones(2), image_shape=(1, 2, 2))
    with pytest.raises(ValueError, match="training schedule"):
        GaussianMixturePrior(
            torch.zeros(2, 3), 1.0, torch.ones(2), schedule=Schedule.linear().respace("ddim50")
        )
    prior = GaussianMixturePrior(torch.zeros(2, 3), 1.0, torch.ones(2))
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        prior.eps(torch.zeros(1, 3), 1000)
    with pytest.raises(ValueError, match="expected x of shape"):
        prior.eps(torch.zeros(1, 4), 10)
    with pytest.raises(ValueError, match="one measurement of 2 values"):
        prior.posterior(torch.ones(2, 3), torch.zeros(3), 0.1)
    with pytest.raises(ValueError, match=r"matrix of shape \(M, 3\)"):
        prior.posterior(torch.ones(2, 4), torch.zeros(2), 0.1)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def _assert_moments(samples: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, k: float = 4.0):
    """Per-coordinate sample mean and variance within k Monte Carlo standard errors."""
    n = samples.shape[0]
    flat = samples.reshape(n, -1)
    centred = flat - flat.mean(0)
    m2 = centred.pow(2).mean(0)
    m4 = centred.pow(4).mean(0)
    se_mean = (m2 / n).sqrt()
    se_var = ((m4 - m2**2) / n).sqrt()
    assert bool(((flat.mean(0) - mean.reshape(-1)).abs() < k * se_mean).all()), (
        flat.mean(0), mean, se_mean
    )
    assert bool(((flat.var(0) - var.reshape(-1)).abs() < k * se_var).all()), (
        flat.var(0), var, se_var
    )


def test_prior_samples_have_the_prior_moments(prior2d):
    x = prior2d.sample(50_000, gen(7))
    _assert_moments(x, prior2d.mean(), prior2d.variance())
    # mean and variance by hand for the first coordinate
    m = 0.3 * -0.6 + 0.7 * 0.5
    v = 0.3 * (0.15**2 + 0.36) + 0.7 * (0.25**2 + 0.25) - m**2
    assert math.isclose(float(prior2d.mean().reshape(-1)[0]), m, rel_tol=1e-12)
    assert math.isclose(float(prior2d.variance().reshape(-1)[0]), v, rel_tol=1e-12)


def test_unguided_ddpm_with_exact_eps_reproduces_the_prior(prior2d):
    """1000 ancestral steps (fixed-small variance) from N(0, I) land on the prior's moments."""
    model = prior2d.as_model()
    schedule = model.schedule
    abar = schedule.alphas_cumprod
    n = 4000
    g = gen(8)
    x = torch.randn(n, *model.image_shape, generator=g, dtype=F64)
    for i in reversed(range(len(schedule))):
        step = torch.full((n,), i, dtype=torch.long)
        eps = model.eps(x, schedule.timesteps[step])
        x0 = tweedie_x0(x, eps, abar[i], clip=False)
        x = ddpm_step(schedule, step, x, x0, torch.randn(x.shape, generator=g, dtype=F64))
    _assert_moments(x, prior2d.mean(), prior2d.variance())
    # the modes are populated in the prior's proportions (0.3, 0.7)
    flat = x.reshape(n, 2)
    near_first = ((flat - prior2d.means[0]).norm(dim=1) < (flat - prior2d.means[1]).norm(dim=1))
    frac = float(near_first.double().mean())
    assert abs(frac - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n), frac


# --------------------------------------------------------------------------------------------
# The exact posterior p(x0 | y), worked by hand in 1-D
# --------------------------------------------------------------------------------------------


def test_posterior_one_component_1d_by_hand():
    # x0 ~ N(0.3, 0.5^2), y = 2 x0 + 0.4 n, y = 0.9
    m, s, a, sigma, y = 0.3, 0.5, 2.0, 0.4, 0.9
    var = 1 / (1 / s**2 + a**2 / sigma**2)  # = 1/29
    mean = var * (m / s**2 + a * y / sigma**2)  # = 12.45/29
    assert math.isclose(var, 1 / 29) and math.isclose(mean, 12.45 / 29)
    evidence = normal_pdf(y, a * m, a**2 * s**2 + sigma**2)  # N(0.9; 0.6, 1.16)

    prior = GaussianMixturePrior(
        torch.tensor([[m]], dtype=F64), torch.tensor([s], dtype=F64), torch.ones(1, dtype=F64)
    )
    post = prior.posterior(torch.tensor([[a]], dtype=F64), torch.tensor([y], dtype=F64), sigma)
    assert math.isclose(float(post.weights[0]), 1.0)
    assert math.isclose(float(post.means[0, 0]), mean, rel_tol=1e-12)
    assert math.isclose(float(post.covariances[0, 0, 0]), var, rel_tol=1e-12)
    assert math.isclose(float(post.log_evidence), math.log(evidence), rel_tol=1e-12)
    assert math.isclose(float(post.mean().reshape(())), mean, rel_tol=1e-12)
    _assert_moments(post.sample(40_000, gen(9)), torch.tensor(mean), torch.tensor(var))


def test_posterior_two_components_1d_by_hand():
    # x0 ~ 0.4 N(-1, 0.3^2) + 0.6 N(1.5, 0.6^2), y = 0.8 x0 + 0.5 n, y = 0.2
    pis, ms, ss = (0.4, 0.6), (-1.0, 1.5), (0.3, 0.6)
    a, sigma, y = 0.8, 0.5, 0.2
    vars_ = [1 / (1 / s**2 + a**2 / sigma**2) for s in ss]
    means = [v * (m / s**2 + a * y / sigma**2) for v, m, s in zip(vars_, ms, ss)]
    joint = [p * normal_pdf(y, a * m, a**2 * s**2 + sigma**2) for p, m, s in zip(pis, ms, ss)]
    weights = [j / sum(joint) for j in joint]
    total_mean = sum(w * m for w, m in zip(weights, means))
    total_var = sum(w * (v + m**2) for w, v, m in zip(weights, vars_, means)) - total_mean**2

    prior = GaussianMixturePrior(
        torch.tensor([[ms[0]], [ms[1]]], dtype=F64),
        torch.tensor(ss, dtype=F64),
        torch.tensor(pis, dtype=F64),
    )
    post = prior.posterior(torch.tensor([[a]], dtype=F64), torch.tensor([y], dtype=F64), sigma)
    torch.testing.assert_close(post.weights, torch.tensor(weights, dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(post.means[:, 0], torch.tensor(means, dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        post.covariances[:, 0, 0], torch.tensor(vars_, dtype=F64), rtol=1e-12, atol=0
    )
    assert math.isclose(float(post.log_evidence), math.log(sum(joint)), rel_tol=1e-12)
    assert math.isclose(float(post.mean().reshape(())), total_mean, rel_tol=1e-12)
    assert math.isclose(float(post.covariance()[0, 0]), total_var, rel_tol=1e-12)
    # the weights really moved: y = 0.2 favours neither mode a priori the same way
    assert abs(weights[0] - pis[0]) > 0.05

    # and the posterior mean by quadrature of prior(x) N(y; a x, sigma^2) on a grid
    grid = torch.linspace(-8, 8, 40_001, dtype=F64)
    dens = sum(
        p * torch.exp(-((grid - m) ** 2) / (2 * s**2)) / s for p, m, s in zip(pis, ms, ss)
    ) * torch.exp(-((y - a * grid) ** 2) / (2 * sigma**2))
    quad_mean = float(torch.trapezoid(grid * dens, grid) / torch.trapezoid(dens, grid))
    assert math.isclose(quad_mean, total_mean, rel_tol=1e-9)
    _assert_moments(post.sample(40_000, gen(10)), torch.tensor(total_mean), torch.tensor(total_var))


class _EveryOtherColumnTimesTwo(LinearOperator):
    """A small linear operator: keep columns 0 and 2 of a (C, H, 4) image, times 2."""

    def forward(self, x):
        return 2 * x[..., ::2]

    def adjoint(self, y):
        out = y.new_zeros(*y.shape[:-1], 2 * y.shape[-1])
        out[..., ::2] = 2 * y
        return out


def test_posterior_accepts_a_linear_operator(prior4d):
    means = prior4d.means.reshape(3, 1, 1, 4)
    prior = GaussianMixturePrior(means, prior4d.variances.sqrt(), prior4d.weights)
    matrix = torch.zeros(2, 4, dtype=F64)
    matrix[0, 0] = matrix[1, 2] = 2.0
    y = torch.tensor([[[[0.3, -0.2]]]], dtype=F64)  # as the operator returns it
    by_op = prior.posterior(_EveryOtherColumnTimesTwo(), y, 0.1)
    by_mat = prior.posterior(matrix, y.reshape(2), 0.1)
    torch.testing.assert_close(by_op.means, by_mat.means)
    torch.testing.assert_close(by_op.covariances, by_mat.covariances)
    torch.testing.assert_close(by_op.weights, by_mat.weights)
    assert by_op.mean().shape == (1, 1, 4)


def test_posterior_samples_match_its_mean_and_covariance(prior4d):
    A = torch.randn(2, 4, generator=gen(11), dtype=F64)
    post = prior4d.posterior(A, torch.tensor([0.4, -0.3], dtype=F64), 0.2)
    x = post.sample(40_000, gen(12))
    assert x.shape == (40_000, 1, 2, 2)
    _assert_moments(x, post.mean(), post.covariance().diagonal())
    cov = torch.cov(x.reshape(-1, 4).T)
    torch.testing.assert_close(cov, post.covariance(), rtol=0, atol=0.01)


# --------------------------------------------------------------------------------------------
# The exact guidance score grad_{x_t} log p(y | x_t)
# --------------------------------------------------------------------------------------------


def _log_lik_by_quadrature(x_t: float, a: float, A: float, y: float, sigma: float) -> float:
    """log p(y | x_t) = log [int N(y; A x0, s^2) p0(x0) N(x_t; sqrt(a) x0, 1 - a) dx0
    / int p0(x0) N(x_t; sqrt(a) x0, 1 - a) dx0], prior 0.35 N(-0.8, 0.3^2) + 0.65 N(0.7, 0.45^2)."""
    g = torch.linspace(-8, 8, 160_001, dtype=F64)
    p0 = 0.35 * torch.exp(-((g + 0.8) ** 2) / (2 * 0.09)) / 0.3
    p0 = p0 + 0.65 * torch.exp(-((g - 0.7) ** 2) / (2 * 0.45**2)) / 0.45
    trans = torch.exp(-((x_t - math.sqrt(a) * g) ** 2) / (2 * (1 - a)))
    lik = torch.exp(-((y - A * g) ** 2) / (2 * sigma**2)) / math.sqrt(2 * math.pi * sigma**2)
    return math.log(float(torch.trapezoid(lik * p0 * trans, g) / torch.trapezoid(p0 * trans, g)))


@pytest.mark.parametrize("t", [50, 300, 700])
def test_likelihood_score_1d_matches_finite_differences_of_quadrature(t):
    prior = GaussianMixturePrior(
        torch.tensor([[-0.8], [0.7]], dtype=F64),
        torch.tensor([0.3, 0.45], dtype=F64),
        torch.tensor([0.35, 0.65], dtype=F64),
    )
    A, y, sigma = 0.8, 0.4, 0.3
    a = abar_at(t)
    xs = [-0.9, 0.1, 0.8]
    h = 1e-4
    x_t = torch.tensor(xs, dtype=F64).reshape(3, 1)
    mat = torch.tensor([[A]], dtype=F64)
    y_t = torch.tensor([y], dtype=F64)
    value = prior.log_likelihood(x_t, t, mat, y_t, sigma)
    score = prior.likelihood_score(x_t, t, mat, y_t, sigma)
    for b, x in enumerate(xs):
        quad = _log_lik_by_quadrature(x, a, A, y, sigma)
        fd = (
            _log_lik_by_quadrature(x + h, a, A, y, sigma)
            - _log_lik_by_quadrature(x - h, a, A, y, sigma)
        ) / (2 * h)
        assert math.isclose(float(value[b]), quad, rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(float(score[b, 0]), fd, rel_tol=1e-5, abs_tol=1e-6), (x, score, fd)
    assert float(score.abs().max()) > 0.01  # the measurement pulls x_t


@pytest.mark.parametrize("t", [0, 200, 900])
def test_likelihood_score_one_component_matches_joint_gaussian_conditioning(t):
    """K = 1: (x_t, y) are jointly Gaussian, so y | x_t ~ N(mu(x_t), V) by conditioning."""
    m = torch.tensor([0.2, -0.5, 0.4], dtype=F64)
    S = torch.diag(torch.tensor([0.3, 0.6, 0.2], dtype=F64) ** 2)
    A = torch.tensor([[1.0, 0.5, 0.0], [0.0, -1.0, 2.0]], dtype=F64)
    y = torch.tensor([0.3, 0.1], dtype=F64)
    sigma = 0.15
    a = abar_at(t)
    cov_xt = a * S + (1 - a) * torch.eye(3, dtype=F64)
    cov_y_xt = math.sqrt(a) * A @ S
    V = A @ S @ A.T + sigma**2 * torch.eye(2, dtype=F64) - cov_y_xt @ torch.linalg.solve(
        cov_xt, cov_y_xt.T
    )

    def log_lik(x_t):
        mu = A @ m + cov_y_xt @ torch.linalg.solve(cov_xt, x_t - math.sqrt(a) * m)
        r = y - mu
        return -0.5 * (2 * math.log(2 * math.pi) + torch.logdet(V) + r @ torch.linalg.solve(V, r))

    prior = GaussianMixturePrior(m[None], S.diagonal().sqrt()[None], torch.ones(1))
    x_t = torch.randn(4, 3, generator=gen(t), dtype=F64)
    score = prior.likelihood_score(x_t, t, A, y, sigma)
    for b in range(4):
        xb = x_t[b].clone().requires_grad_(True)
        (want,) = torch.autograd.grad(log_lik(xb), xb)
        torch.testing.assert_close(score[b], want, rtol=1e-9, atol=1e-9)
        assert math.isclose(
            float(prior.log_likelihood(x_t[b : b + 1], t, A, y, sigma)),
            float(log_lik(x_t[b])), rel_tol=1e-10,
        )


def test_likelihood_score_equals_difference_of_posterior_and_prior_scores(prior4d):
    """Bayes: log p(y | x_t) = log p_t(x_t | y) + log p(y) - log p_t(x_t), where p_t(. | y) is the
    VP diffusion of the exact posterior mixture (full covariances)."""
    A = torch.randn(3, 4, generator=gen(13), dtype=F64)
    y = torch.tensor([0.5, -0.2, 0.1], dtype=F64)
    sigma = 0.1
    post = prior4d.posterior(A, y, sigma)
    t = torch.tensor([0, 30, 250, 600, 999])
    x_t = torch.randn(5, 1, 2, 2, generator=gen(14), dtype=F64)
    abar = Schedule.linear(1000).alphas_cumprod
    rows = []
    for b in range(5):
        xb = x_t[b : b + 1].clone().requires_grad_(True)
        val = post.noised(abar[t[b]]).log_prob(xb) + post.log_evidence - prior4d.log_prob(xb, t[b])
        (grad,) = torch.autograd.grad(val.sum(), xb)
        rows.append((val.detach(), grad))
    vals = torch.cat([r[0] for r in rows])
    grads = torch.cat([r[1] for r in rows])
    torch.testing.assert_close(prior4d.log_likelihood(x_t, t, A, y, sigma), vals)
    torch.testing.assert_close(prior4d.likelihood_score(x_t, t, A, y, sigma), grads)
    # one y per item gives the same as a shared y
    per_item = prior4d.likelihood_score(x_t, t, A, y.expand(5, 3), sigma)
    torch.testing.assert_close(per_item, grads)
    assert prior4d.likelihood_score(x_t.float(), t, A, y, sigma).dtype == torch.float32
