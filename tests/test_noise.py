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
