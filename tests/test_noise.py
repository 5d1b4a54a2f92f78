"""Measurement noise: simulated statistics, reproducibility, and the spec's likelihood terms."""

from __future__ import annotations

import math

import pytest
import torch

import dpgkit as dk
from dpgkit.noise import Gaussian, Noiseless, Poisson
from dpgkit.operators import Denoising
from dpgkit.seeding import generator

SHAPE = (3, 64, 64)  # 12288 pixels per image


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [generator(seed, i, "test") for i in range(n)]


@pytest.mark.parametrize("sigma", [0.05, 0.3])
def test_gaussian_noise_has_the_requested_std(sigma):
    ax = torch.linspace(-0.9, 0.9, math.prod(SHAPE)).reshape(1, *SHAPE).repeat(2, 1, 1, 1)
    y = Gaussian(sigma).simulate(ax, _gens(2))
    n = y - ax
    count = n.numel()
    assert abs(float(n.mean())) < 5 * sigma / math.sqrt(count)
    # the sample std of `count` normals is within a few times sigma / sqrt(2 count)
    assert abs(float(n.std()) - sigma) < 5 * sigma / math.sqrt(2 * count)
    assert y.dtype == ax.dtype and y.shape == ax.shape


@pytest.mark.parametrize("rate", [1.0, 0.1])
@pytest.mark.parametrize("level", [0.5, 0.2])
def test_poisson_noise_has_the_right_mean_and_variance_on_a_flat_image(rate, level):
    # x01 = level everywhere: counts ~ Poisson(255 rate level), y01 = counts / (255 rate),
    # so on the [-1, 1] scale E[y] = 2 level - 1 and Var[y] = 4 level / (255 rate)
    x = torch.full((2, *SHAPE), 2 * level - 1)
    y = Poisson(rate).simulate(x, _gens(2, seed=3))
    count = y.numel()
    mean, var = 2 * level - 1, 4 * level / (255 * rate)
    assert abs(float(y.mean()) - mean) < 5 * math.sqrt(var / count)
    # the variance of a sample variance is about 2 var^2 / count (plus a small kurtosis term)
    assert abs(float(y.var()) - var) < 6 * var * math.sqrt(2 / count)
    # counts are integers: y01 * 255 rate is whole (except where y01 > 1 was clamped)
    counts = ((y + 1) / 2 * 255 * rate)[y < 1]
    assert counts.numel() > 0.99 * count
    assert torch.allclose(counts, counts.round(), atol=1e-3)


def test_poisson_clamps_to_the_image_range():
    x = torch.tensor([-1.5, -1.0, 1.0, 1.5]).reshape(1, 1, 1, 4)
    y = Poisson(1.0).simulate(x, _gens(1))
    assert float(y[0, 0, 0, 0]) == -1.0 and float(y[0, 0, 0, 1]) == -1.0  # zero counts
    assert float(y.max()) <= 1.0


@pytest.mark.parametrize("noise", [Gaussian(0.1), Poisson(1.0)])
def test_same_seed_same_noise_other_item_other_noise(noise):
    x = torch.zeros(3, 1, 8, 8)
    task = dk.Task(Denoising(), noise)
    (y1, _), (y2, _) = task.measure(x, seed=5), task.measure(x, seed=5)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1[0], y1[1]) and not torch.equal(y1[1], y1[2])
    # item 2 measured alone with its own index gets the same noise as in the batch
    assert torch.equal(task.measure(x[2:], seed=5, indices=[2])[0][0], y1[2])
    assert not torch.equal(task.measure(x, seed=6)[0], y1)


def test_noiseless_returns_the_clean_measurement():
    ax = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(Noiseless().simulate(ax, _gens(2)), ax)


def test_simulation_needs_one_generator_per_item():
    with pytest.raises(ValueError, match=r"one generator per item \(2\), got 1"):
        Gaussian(0.1).simulate(torch.zeros(2, 1, 4, 4), _gens(1))
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        Gaussian(-1.0)
    with pytest.raises(ValueError, match="rate must be > 0"):
        Poisson(0.0)


def test_likelihood_terms_follow_the_spec():
    y = torch.zeros(2, 1, 2, 2)
    ax = torch.tensor([1.0, -2.0, 0.0, 0.5]).reshape(1, 1, 2, 2).repeat(2, 1, 1, 1)
    g, p = Gaussian(0.05), Poisson(1.0)
    assert torch.allclose(g.energy(y, ax), torch.full((2,), 5.25))  # squared L2
    assert torch.allclose(p.energy(y, ax), torch.full((2,), 3.5))  # L1
    # energies of N Monte Carlo states per item: reduce over all but the leading 2 dims
    states = ax[:, None].repeat(1, 4, 1, 1, 1)
    assert g.energy(y[:, None], states, batch_dims=2).shape == (2, 4)
    # Z: an EMA (0.9, 0.1) for Gaussian, the raw energy for Poisson
    z_prev, z_raw = torch.tensor(10.0), torch.tensor(20.0)
    assert float(g.temperature(z_raw, None)) == 20.0
    assert float(g.temperature(z_raw, z_prev)) == pytest.approx(11.0)
    assert float(p.temperature(z_raw, z_prev)) == 20.0
    # r: sqrt(Z / Znorm) / 2 (Gaussian), Z / Znorm (Poisson), both floored at r_min
    assert float(g.width(torch.tensor(196608.0 * 4), 196608, 0.0)) == pytest.approx(1.0)
    assert float(g.width(torch.tensor(0.0), 196608, 0.05)) == pytest.approx(0.05)
    assert float(p.width(torch.tensor(98304.0), 196608, 0.0)) == pytest.approx(0.5)
    assert g.reward_shift_uses_z_raw and not p.reward_shift_uses_z_raw
    assert torch.allclose(g.fidelity(y, ax), torch.full((2,), math.sqrt(5.25)))


# -- units: every noise model x every operator, E[y] = A(x) or a refusal ----------------------
def _operators() -> dict[str, dk.operators.Operator]:
    from dpgkit.operators import (
        JPEG,
        BlackBox,
        Colorization,
        GaussianBlur,
        Inpainting,
        MotionBlur,
        PhaseRetrieval,
        SuperResolution,
    )

    return {
        "denoising": Denoising(),
        "colorization": Colorization(),
        "sr-avgpool": SuperResolution(2, "avgpool"),
        "sr-bicubic": SuperResolution(2, "bicubic"),
        "gaussian-blur": GaussianBlur(5, 1.0),
        "motion-blur": MotionBlur(7, 0.5),
        "box-inpainting": Inpainting.box(side=4, margin=2),
        "random-inpainting": Inpainting.random(0.5),
        "jpeg": JPEG(50),
        "phase-retrieval": PhaseRetrieval(2.0),
        "blackbox-real": BlackBox(lambda a: 3 * a - 1),
        "blackbox-picture": BlackBox(lambda a: a[::-1].copy(), measurement_unit="picture"),
    }


NOISES = {"gaussian": Gaussian(0.05), "noiseless": Noiseless(), "poisson": Poisson(1.0), "poisson-0.1": Poisson(0.1)}
# what each model refuses; everything else must be simulated with E[y] = A(x)
REFUSED = {("poisson", "blackbox-real"), ("poisson-0.1", "blackbox-real")}


@pytest.mark.parametrize("op_name", list(_operators()))
@pytest.mark.parametrize("noise_name", list(NOISES))
def test_expected_measurement_is_the_clean_one_in_the_operators_units(noise_name, op_name):
    noise, template = NOISES[noise_name], _operators()[op_name]
    # an image in [-0.8, 0.2]: the picture convention's clamps at -1 and +1 do not bite (at
    # rate 0.1 a white pixel is 25.5 expected counts, so the top clamp bites from x01 ~ 0.7)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) - 0.8
    # one fixed operator for all the draws (a random template would draw one per seed)
    fixed = template.draw([0], x.shape[1:]) if template.is_random else template
    task = dk.Task(fixed, noise)
    if (noise_name, op_name) in REFUSED:
        with pytest.raises(ValueError, match="measurement_unit='real'"):
            task.measure(x, seed=0)
        return
    draws = 400
    ys = torch.cat([task.measure(x, seed=s)[0].double() for s in range(draws)])
    ax = fixed.double()(x.double()) if not isinstance(template, dk.operators.BlackBox) else fixed(x).double()
    mean, sd = ys.mean(0), ys.std(0)
    if noise_name == "noiseless":
        torch.testing.assert_close(ys, ax.expand_as(ys), atol=1e-6, rtol=1e-6)
        return
    # per measurement entry, the mean of 400 draws is within 5.5 standard errors of A(x)
    # (about 1e-7 per entry under the null; at most ~2500 entries here); entries whose draws
    # do not vary (Poisson at A(x) = 0 in magnitude units) must equal A(x) exactly
    se = sd / draws**0.5
    varies = sd > 0
    z = (mean - ax[0]).abs()[varies] / se[varies]
    assert float(z.max()) < 5.5, float(z.max())
    torch.testing.assert_close(mean[~varies], ax[0][~varies], atol=1e-6, rtol=0)


def test_poisson_on_phase_retrieval_counts_the_magnitude_itself():
    # the failing report: with the picture convention every y was <= 1 and E[y] at DC was 0.95
    # instead of 6.73 (32 x 32 px). In magnitude units E[y] = A(x) and Var[y] = A(x) / (255 rate).
    from dpgkit.operators import PhaseRetrieval

    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x = 0.3 + 0.5 * x  # mean 0.3: DC terms 0.3 * 1024 / 48 = 6.4, far above 1
    task = dk.Task(PhaseRetrieval(2.0), Poisson(1.0))
    ys = torch.cat([task.measure(x, seed=s)[0].double() for s in range(300)])
    ax = PhaseRetrieval(2.0).double()(x.double())[0]
    h, w = ax.shape[-2:]
    dc = ax[:, h // 2, w // 2]
    assert float(dc.min()) > 6.0 and float(ys.max()) > 1.0
    torch.testing.assert_close(ys.mean(0)[:, h // 2, w // 2], dc, rtol=0.003, atol=0)
    # Var[y] = A(x) / 255 at the DC terms: the sample variance of 300 draws within 25%
    torch.testing.assert_close(ys.var(0)[:, h // 2, w // 2], dc / 255, rtol=0.25, atol=0)


def test_noise_models_refuse_what_they_cannot_simulate_by_name():
    from dpgkit.operators import BlackBox, PhaseRetrieval

    assert Poisson(1.0).check(PhaseRetrieval()) == "magnitude"
    assert Poisson(1.0).check(Denoising()) == "picture"
    assert Gaussian(0.1).check(BlackBox(lambda a: a)) == "real"
    with pytest.raises(ValueError, match=r"Poisson\(rate=1.0\) needs a measurement in one of the units"):
        Poisson(1.0).check(BlackBox(lambda a: a))
    with pytest.raises(ValueError, match="got unit='real'"):
        Poisson(1.0).simulate(torch.zeros(1, 1, 2, 2), _gens(1), unit="real")
    with pytest.raises(ValueError, match="measurement_unit must be one of"):
        BlackBox(lambda a: a, measurement_unit="photons")
    # a blur whose kernel is not an average (negative weights) is not a picture any more
    sharpen = dk.operators.Blur(torch.tensor([[0.0, -1, 0], [-1, 5, -1], [0, -1, 0]]))
    assert sharpen.measurement_unit == "real"
    assert dk.operators.GaussianBlur(5, 1.0).measurement_unit == "picture"
