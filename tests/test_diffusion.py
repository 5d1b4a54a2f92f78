"""dpgkit.diffusion against closed forms: schedules, respacing, posteriors, DDPM and DDIM steps."""

from __future__ import annotations

import math

import pytest
import torch

from dpgkit.diffusion import (
    Schedule,
    at_step,
    cosine_betas,
    ddim_step,
    ddpm_step,
    eps_from_x0,
    linear_betas,
    model_log_variance,
    predict_eps,
    predict_x0,
    q_posterior,
    q_sample,
    space_timesteps,
    tweedie_x0,
)

F64 = torch.float64
SCHEDULES = {
    "linear": Schedule.linear(1000),
    "ddim50": Schedule.linear(1000).respace("ddim50"),
    "10,10,10": Schedule.linear(1000).respace("10,10,10"),
    "cosine250": Schedule.cosine(1000).respace("250"),
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def steps(schedule: Schedule) -> torch.Tensor:
    """A batch of step indices: both ends and a few in between."""
    n = len(schedule)
    return torch.tensor(sorted({0, 1, 2, n // 3, n // 2, n - 2, n - 1}))


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


def test_linear_betas_endpoints_and_scaling():
    betas = linear_betas(1000)
    assert betas.dtype == F64 and betas.shape == (1000,)
    assert math.isclose(float(betas[0]), 1e-4, rel_tol=1e-12)
    assert math.isclose(float(betas[-1]), 0.02, rel_tol=1e-12)
    diffs = betas.diff()
    torch.testing.assert_close(diffs, torch.full_like(diffs, (0.02 - 1e-4) / 999))
    # other T: both ends scaled by 1000 / T
    short = linear_betas(250)
    assert math.isclose(float(short[0]), 4e-4, rel_tol=1e-12)
    assert math.isclose(float(short[-1]), 0.08, rel_tol=1e-12)
    abar = Schedule.linear(1000).alphas_cumprod
    assert math.isclose(float(abar[0]), 1 - 1e-4, rel_tol=1e-15)
    assert float(abar[-1]) < 1e-4  # nearly pure noise at the end


def test_cosine_betas_follow_the_cosine_abar():
    T, s = 1000, 0.008

    def f(t: float) -> float:
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    abar = Schedule.cosine(T).alphas_cumprod
    for t in [0, 1, 100, 500, 900, 980]:  # betas below the 0.999 clip here
        assert math.isclose(float(abar[t]), f(t + 1) / f(0), rel_tol=1e-9)
    assert float(cosine_betas(T).max()) <= 0.999


def test_posterior_variance_and_clipped_log():
    sched = Schedule.linear(1000)
    b, abar = sched.betas, sched.alphas_cumprod
    for i in [1, 2, 500, 999]:
        want = float(b[i]) * (1 - float(abar[i - 1])) / (1 - float(abar[i]))
        assert math.isclose(float(sched.posterior_variance[i]), want, rel_tol=1e-12)
    assert float(sched.posterior_variance[0]) == 0.0
    clipped = sched.posterior_log_variance_clipped
    assert float(clipped[0]) == float(clipped[1]) == math.log(float(sched.posterior_variance[1]))


# --------------------------------------------------------------------------------------------
# Respacing
# --------------------------------------------------------------------------------------------


def test_space_timesteps_hand_worked_small_cases():
    # ddimN: the integer stride giving exactly N steps
    assert space_timesteps(10, "ddim5") == [0, 2, 4, 6, 8]
    assert space_timesteps(10, "ddim4") == [0, 3, 6, 9]
    # one section of 10, 3 steps: stride 4.5 -> 0, 4.5, 9 -> round half to even: 0, 4, 9
    assert space_timesteps(10, "3") == [0, 4, 9]
    assert space_timesteps(10, 3) == [0, 4, 9]
    # two sections of 5: 2 steps (stride 4) then 3 steps (stride 2) from 5
    assert space_timesteps(10, "2,3") == [0, 4, 5, 7, 9]
    assert space_timesteps(10, [2, 3]) == [0, 4, 5, 7, 9]
    # 9 = 5 + 4: the first section takes the extra step; 2 and 2 steps (strides 4 and 3)
    assert space_timesteps(9, "2,2") == [0, 4, 5, 8]
    # 15 of 30, stride 29/14: 14.5 at j = 7 -> 14 (not 15)
    assert space_timesteps(30, "15") == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert space_timesteps(10, "10") == list(range(10))
    assert space_timesteps(10, "1") == [0]


def test_space_timesteps_at_1000():
    assert space_timesteps(1000, "ddim200") == list(range(0, 1000, 5))
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    # sections of 334, 333, 333: strides 333/9 = 37, then 332/9 (ninths: no ties)
    first = [37 * j for j in range(10)]
    second = [334 + round(332 * j / 9) for j in range(10)]
    third = [667 + round(332 * j / 9) for j in range(10)]
    assert second == [334, 371, 408, 445, 482, 518, 555, 592, 629, 666]
    assert space_timesteps(1000, "10,10,10") == first + second + third
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert set(torch.tensor(kept).diff().tolist()) == {4, 5}
    # guided-diffusion adds the stride 49.95 repeatedly: 10 additions give 499.4999..., so 499
    # is kept where stride * 10 = 499.5 would round to 500 (this is what its checkpoints used)
    kept21 = space_timesteps(1000, "21")
    assert kept21[10] == 499 and 500 not in kept21


@pytest.mark.parametrize("spec", ["ddim200", "ddim50", "250", "10,10,10", "100", "5,20,1"])
def test_respacing_keeps_abar_on_the_kept_steps(spec):
    base = Schedule.linear(1000)
    spaced = base.respace(spec)
    kept = space_timesteps(1000, spec)
    assert len(spaced) == len(kept)
    assert spaced.timesteps.tolist() == kept
    assert spaced.num_train_timesteps == 1000
    torch.testing.assert_close(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12, atol=0)
    assert bool(((spaced.betas > 0) & (spaced.betas < 1)).all())
    # respacing a respaced chain still keeps the original abar at its timesteps
    twice = spaced.respace(max(1, len(spaced) // 3))
    torch.testing.assert_close(
        twice.alphas_cumprod, base.alphas_cumprod[twice.timesteps], rtol=1e-12, atol=0
    )


def test_respacing_to_everything_is_the_identity():
    base = Schedule.linear(1000)
    assert base.respace(None) is base
    assert base.respace(1000) is base
    same = base.respace("1000")
    torch.testing.assert_close(same.betas, base.betas, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("ddim999", "cannot make 999 DDIM steps"),
        ("1001", "cannot take 1001 steps out of a section of 1000"),
        ("600,600", "cannot take 600 steps out of a section of 500"),
        ("0", "keeps no timesteps"),
        ("-3", "must be >= 0"),
    ],
)
def test_impossible_respacing_raises(spec, message):
    with pytest.raises(ValueError, match=message):
        Schedule.linear(1000).respace(spec)


# --------------------------------------------------------------------------------------------
# Tweedie, q_sample, q_posterior
# --------------------------------------------------------------------------------------------


def test_at_step_shapes_and_dtype():
    values = torch.arange(10, dtype=F64)
    like = torch.zeros(3, 2, 4, 4, dtype=torch.float32)
    out = at_step(values, torch.tensor([0, 9, 4]), like)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float32
    assert out.flatten().tolist() == [0.0, 9.0, 4.0]


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_tweedie_inverts_q_sample_with_the_true_noise(name):
    sched = SCHEDULES[name]
    i = steps(sched)
    g = gen(0)
    x0 = torch.rand(len(i), 3, 4, 4, generator=g, dtype=F64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    x_t = q_sample(sched, i, x0, noise)
    abar = at_step(sched.alphas_cumprod, i, x_t)
    # by hand: sqrt(abar) x0 + sqrt(1 - abar) n
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    torch.testing.assert_close(tweedie_x0(x_t, noise, abar, clip=False), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(tweedie_x0(x_t, noise, abar, clip=True), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(eps_from_x0(x_t, x0, abar), noise, rtol=0, atol=1e-9)


def test_tweedie_clips_only_when_asked():
    abar = torch.tensor(0.5, dtype=F64)
    x_t = torch.tensor([3.0, -3.0, 0.1], dtype=F64)
    eps = torch.zeros(3, dtype=F64)
    raw = tweedie_x0(x_t, eps, abar, clip=False)
    torch.testing.assert_close(raw, x_t / math.sqrt(0.5))
    torch.testing.assert_close(tweedie_x0(x_t, eps, abar), raw.clamp(-1, 1))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_q_posterior_is_gaussian_conditioning(name):
    """Given x0, (x_{i-1}, x_i) are jointly Gaussian:
    x_{i-1} = sqrt(abar') x0 + sqrt(1 - abar') e1, x_i = sqrt(alpha) x_{i-1} + sqrt(beta) e2,
    Cov = [[1 - abar', sqrt(alpha)(1 - abar')], [., 1 - abar]], so
    E[x_{i-1} | x_i] = sqrt(abar') x0 + sqrt(alpha)(1 - abar')/(1 - abar) (x_i - sqrt(abar) x0),
    Var = (1 - abar') - alpha (1 - abar')^2 / (1 - abar)."""
    sched = SCHEDULES[name]
    i = steps(sched)
    g = gen(1)
    x0 = torch.randn(len(i), 1, 2, 2, generator=g, dtype=F64)
    x_t = torch.randn(len(i), 1, 2, 2, generator=g, dtype=F64)
    mean, var = q_posterior(sched, i, x0, x_t)
    abar = sched.alphas_cumprod
    for row, step in enumerate(i.tolist()):
        a = float(abar[step])
        a_prev = float(abar[step - 1]) if step > 0 else 1.0
        alpha = a / a_prev
        want_mean = math.sqrt(a_prev) * x0[row] + math.sqrt(alpha) * (1 - a_prev) / (1 - a) * (
            x_t[row] - math.sqrt(a) * x0[row]
        )
        want_var = (1 - a_prev) - alpha * (1 - a_prev) ** 2 / (1 - a)
        torch.testing.assert_close(mean[row], want_mean, rtol=1e-10, atol=1e-12)
        assert math.isclose(float(var[row].flatten()[0]), want_var, rel_tol=1e-9, abs_tol=1e-15)
    # at i = 0 the chain ends: the posterior is x0 itself
    if int(i[0]) == 0:
        torch.testing.assert_close(mean[0], x0[0])
        assert float(var[0].flatten()[0]) == 0.0


# --------------------------------------------------------------------------------------------
# Reverse-step variances
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_learned_range_ends_are_the_fixed_variances(name):
    sched = SCHEDULES[name]
    i = steps(sched)
    like = torch.zeros(len(i), 2, 3, 3, dtype=F64)
    small = model_log_variance(sched, i, like, "fixed_small")
    large = model_log_variance(sched, i, like, "fixed_large")
    low = model_log_variance(sched, i, like, "learned_range", -torch.ones_like(like))
    high = model_log_variance(sched, i, like, "learned_range", torch.ones_like(like))
    mid = model_log_variance(sched, i, like, "learned_range", torch.zeros_like(like))
    log_beta = sched.betas.log()[i].reshape(-1, 1, 1, 1).expand_as(like)
    torch.testing.assert_close(low, small, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(high, log_beta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mid, (small + log_beta) / 2, rtol=1e-12, atol=1e-12)
    # fixed_small is the log posterior variance (its i = 0 entry clipped to i = 1's)
    post = sched.posterior_variance
    nz = i > 0
    torch.testing.assert_close(small[nz][:, 0, 0, 0], post[i[nz]].log())
    torch.testing.assert_close(small[~nz][:, 0, 0, 0], post[1].log().expand(int((~nz).sum())))
    # fixed_large is log beta except at i = 0, where it is the posterior variance at i = 1
    torch.testing.assert_close(large[nz], high[nz], rtol=1e-12, atol=1e-12)
    assert int(i[0]) == 0
    assert math.isclose(float(large[0, 0, 0, 0]), math.log(float(post[1])), rel_tol=1e-12)
    assert float(high[0, 0, 0, 0]) != float(large[0, 0, 0, 0])


def test_model_log_variance_errors():
    sched = Schedule.linear(10)
    like = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match="needs the network's variance channels"):
        model_log_variance(sched, torch.tensor([3]), like, "learned_range")
    with pytest.raises(ValueError, match="unknown variance kind"):
        model_log_variance(sched, torch.tensor([3]), like, "fixed_medium")


# --------------------------------------------------------------------------------------------
# DDPM and DDIM steps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_ddpm_step_is_posterior_mean_plus_sigma_noise_and_silent_at_zero(name):
    sched = SCHEDULES[name]
    i = steps(sched)
    g = gen(2)
    x0 = torch.randn(len(i), 1, 2, 2, generator=g, dtype=F64)
    x_t = torch.randn(len(i), 1, 2, 2, generator=g, dtype=F64)
    noise = torch.randn(len(i), 1, 2, 2, generator=g, dtype=F64)
    mean, var = q_posterior(sched, i, x0, x_t)
    out = ddpm_step(sched, i, x_t, x0, noise)
    last = (i == 0).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out, torch.where(last, mean, mean + var.sqrt() * noise))
    assert int(i[0]) == 0
    torch.testing.assert_close(out[0], mean[0], rtol=0, atol=0)  # no noise at i = 0
    # with an explicit log variance (fixed_large) too: still nothing added at i = 0
    logvar = model_log_variance(sched, i, x_t, "fixed_large")
    out_large = ddpm_step(sched, i, x_t, x0, noise, logvar)
    torch.testing.assert_close(out_large[0], mean[0], rtol=0, atol=0)
    torch.testing.assert_close(out_large[1:], mean[1:] + (0.5 * logvar[1:]).exp() * noise[1:])


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_ddim_with_eta_one_is_the_ddpm_posterior(name):
    sched = SCHEDULES[name]
    i = steps(sched)
    g = gen(3)
    x0 = torch.randn(len(i), 1, 2, 2, generator=g, dtype=F64)
    x_t = torch.randn(len(i), 1, 2, 2, generator=g, dtype=F64)
    mean, var = q_posterior(sched, i, x0, x_t)
    zero = ddim_step(sched, i, x_t, x0, eta=1.0, noise=torch.zeros_like(x_t))
    one = ddim_step(sched, i, x_t, x0, eta=1.0, noise=torch.ones_like(x_t))
    sigma = one - zero  # the step is affine in the noise
    torch.testing.assert_close(zero, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sigma**2, var.expand_as(sigma), rtol=1e-9, atol=1e-15)
    assert float(sigma[0].abs().max()) == 0.0  # no noise at i = 0


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_ddim_with_eta_zero_is_deterministic(name):
    """x_{i-1} = sqrt(abar') x0 + sqrt(1 - abar') epshat, epshat = (x_i - sqrt(abar) x0)/sqrt(1 - abar)."""
    sched = SCHEDULES[name]
    i = steps(sched)
    g = gen(4)
    x0 = torch.randn(len(i), 1, 2, 2, generator=g, dtype=F64)
    x_t = torch.randn(len(i), 1, 2, 2, generator=g, dtype=F64)
    out = ddim_step(sched, i, x_t, x0)
    abar = at_step(sched.alphas_cumprod, i, x_t)
    prev = at_step(sched.alphas_cumprod_prev, i, x_t)
    eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
    torch.testing.assert_close(out, prev.sqrt() * x0 + (1 - prev).sqrt() * eps)
    torch.testing.assert_close(out[0], x0[0])  # the last step lands on x0
    with pytest.raises(ValueError, match="needs noise"):
        ddim_step(sched, i, x_t, x0, eta=0.5)


# --------------------------------------------------------------------------------------------
# Precision: schedule coefficients formed in float64 and cast at the end (guided-diffusion)
# --------------------------------------------------------------------------------------------


def _reference_coefficients(sched: Schedule) -> dict[str, torch.Tensor]:
    """Every reverse-step coefficient from the float64 betas, written out independently."""
    b = sched.betas.to(F64)
    abar = torch.cumprod(1 - b, 0)
    prev = torch.cat([torch.ones(1, dtype=F64), abar[:-1]])
    return {
        "coef_x0": b * prev.sqrt() / (1 - abar),
        "coef_xt": (1 - prev) * (1 - b).sqrt() / (1 - abar),
        "recip": (1 / abar).sqrt(),
        "recipm1": (1 / abar - 1).sqrt(),
        "prev_sqrt": prev.sqrt(),
        "ddim_eps": (1 - prev).sqrt(),
    }


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_float32_coefficients_are_within_1e7_of_float64(name):
    sched = SCHEDULES[name]
    ref = _reference_coefficients(sched)
    i = torch.arange(len(sched))
    one = torch.ones(len(sched), 1, 1, 1)  # float32 images: each coefficient times 1 or 0
    zero = torch.zeros_like(one)
    got = {
        "coef_x0": q_posterior(sched, i, one, zero)[0],
        "coef_xt": q_posterior(sched, i, zero, one)[0],
        "recip": predict_x0(sched, i, one, zero, clip=False),
        "recipm1": -predict_x0(sched, i, zero, one, clip=False),
    }
    for key, value in got.items():
        assert value.dtype == torch.float32
        nonzero = ref[key] != 0  # coef_xt is exactly 0 at step 0
        assert torch.all(value.flatten()[~nonzero] == 0)
        rel = ((value.flatten().double() - ref[key]) / ref[key]).abs()[nonzero]
        assert float(rel.max()) <= 1e-7, (key, float(rel.max()))


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_float32_ddim_and_ddpm_steps_match_float64_to_rounding(name, eta):
    # The whole step on float32 images against the same step in float64: only the final
    # roundings remain (|x| up to ~4 here, so a few float32 ulps is ~1e-6). With abar and beta
    # cast to float32 first, the 1000-step chain is off by 5e-4 at its second-to-last step.
    sched = SCHEDULES[name]
    i = torch.arange(len(sched))
    x0 = torch.rand(len(sched), 3, 8, 8, generator=gen(0)) * 2 - 1
    x_t = torch.randn(len(sched), 3, 8, 8, generator=gen(1))
    z = torch.randn(len(sched), 3, 8, 8, generator=gen(2))
    ref = ddim_step(sched, i, x_t.double(), x0.double(), eta=eta, noise=z.double())
    got = ddim_step(sched, i, x_t, x0, eta=eta, noise=z)
    assert got.dtype == torch.float32
    assert float((got.double() - ref).abs().max()) <= 2e-6
    ref = ddpm_step(sched, i, x_t.double(), x0.double(), z.double())
    assert float((ddpm_step(sched, i, x_t, x0, z).double() - ref).abs().max()) <= 2e-6


def test_casting_abar_first_would_fail_the_precision_test():
    # The comparison above can fail: the float32-first form (abar and beta cast, then combined)
    # is off by more than 1e-5 relative at the last steps of the 1000-step chain.
    sched = Schedule.linear(1000)
    ref = _reference_coefficients(sched)["coef_x0"]
    b32, abar32 = sched.betas.float(), sched.alphas_cumprod.float()
    prev32 = torch.cat([torch.ones(1), abar32[:-1]])
    naive = b32 * prev32.sqrt() / (1 - abar32)
    assert float(((naive.double() - ref) / ref).abs()[:3].max()) > 1e-5


def test_predict_x0_and_eps_invert_each_other_and_match_tweedie():
    sched = SCHEDULES["ddim50"]
    i = steps(sched)
    x_t = torch.randn(len(i), 3, 4, 4, generator=gen(0), dtype=F64)
    eps = torch.randn(len(i), 3, 4, 4, generator=gen(1), dtype=F64)
    x0 = predict_x0(sched, i, x_t, eps, clip=False)
    torch.testing.assert_close(x0, tweedie_x0(x_t, eps, at_step(sched.alphas_cumprod, i, x_t), clip=False))
    torch.testing.assert_close(predict_eps(sched, i, x_t, x0), eps)
    assert float(predict_x0(sched, i, x_t, eps).abs().max()) <= 1.0  # clipped by default
