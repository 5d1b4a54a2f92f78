"""DPG and DPS: determinism, batch invariance, backends, black boxes, numerical safety."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dpgkit as dk
from dpgkit.kernels.reference import dpg_direction_chunked, dpg_direction_eager, loo_weights
from dpgkit.operators.base import BlackBox, LinearOperator
from dpgkit.solvers.dpg import DPG

SHAPE = (1, 4, 4)


class ItemMask(LinearOperator):
    """A per-item pixel mask: the smallest operator with per-item state."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x):
        return x * self.mask

    def adjoint(self, y):
        return y * self.mask

    def item(self, b):
        return ItemMask(self.mask[b : b + 1]) if self.mask.shape[0] > 1 else self

    @property
    def batch_size(self):
        return self.mask.shape[0]


def gaussian_model(std: float = 0.5) -> dk.models.DiffusionModel:
    """The exact eps of the prior N(0, std^2 I) under the VP diffusion."""
    schedule = dk.diffusion.Schedule.linear(1000)
    abar_all = schedule.alphas_cumprod

    def eps(x_t, t):
        abar = abar_all.to(x_t)[t].view(-1, 1, 1, 1)
        return (1 - abar).sqrt() * x_t / (abar * std**2 + 1 - abar)

    return dk.models.DiffusionModel(eps, SHAPE, schedule)


def _unguided(solver):
    """The same solver and draws with the guided update switched off (a zero scale is refused when
    a solver is built, so tests set it afterwards)."""
    solver.scale = 0.0
    return solver


def make_task(batch: int, seed: int = 0) -> tuple[dk.Task, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, *SHAPE, generator=g) * 1.6 - 0.8
    mask = (torch.rand(batch, 1, 4, 4, generator=g) > 0.4).float()
    task = dk.Task(ItemMask(mask), dk.noise.Gaussian(0.05))
    y, drawn = task.measure(x, seed=seed)
    return drawn, x, y


FAST = dict(scale=2.0, num_samples=24, sampler="ddim", steps=15)


@pytest.mark.parametrize("momentum", [0.0, 0.1])
def test_batch_invariance(momentum):
    task, _, y = make_task(4)
    model = gaussian_model()
    solver = DPG(momentum=momentum, chunk_size=5, **FAST)
    batch = solver.restore(model, task, y, seed=3, indices=[10, 11, 12, 13])
    for b in range(4):
        alone_task = dk.Task(ItemMask(task.operator.mask[b : b + 1]), task.noise)
        alone = DPG(momentum=momentum, chunk_size=24, **FAST).restore(
            model, alone_task, y[b : b + 1], seed=3, indices=[10 + b])
        torch.testing.assert_close(alone[0], batch[b], atol=1e-5, rtol=0)


def test_items_differ_and_seed_matters():
    task, _, y = make_task(2)
    y = y[:1].expand(2, -1, -1, -1).contiguous()
    task = dk.Task(ItemMask(task.operator.mask[:1]), task.noise)
    out = DPG(**FAST).restore(gaussian_model(), task, y, seed=0)
    assert (out[0] - out[1]).abs().max() > 1e-3  # different indices, different draws
    other = DPG(**FAST).restore(gaussian_model(), task, y, seed=1)
    assert (out - other).abs().max() > 1e-3


def test_no_state_between_calls():
    task, _, y = make_task(2)
    model = gaussian_model()
    solver = DPG(momentum=0.1, **FAST)
    first = solver.restore(model, task, y, seed=0)
    solver.restore(model, task, -y, seed=5)  # a different problem in between
    again = solver.restore(model, task, y, seed=0)
    assert torch.equal(first, again)


@pytest.mark.parametrize("noise", [dk.noise.Gaussian(0.1), dk.noise.Poisson(1.0)])
def test_eager_equals_chunked_on_the_same_noise(noise):
    g = torch.Generator().manual_seed(0)
    x0hat = torch.rand(3, 5, 7, generator=g) * 2 - 1
    op = ItemMask((torch.rand(1, 1, 5, 7, generator=g) > 0.5).float())
    y = op(x0hat[None])[0] + 0.1 * torch.randn(3, 5, 7, generator=g)
    z_raw = noise.energy(y[None], op(x0hat[None])).double()[0]
    args = (x0hat, y, op, noise, torch.tensor(0.2), z_raw * 1.3, z_raw, 37, 1234)
    v_e, m_e = dpg_direction_eager(*args)
    for chunk in (1, 7, 37, 100):
        v_c, m_c = dpg_direction_chunked(*args, chunk_size=chunk)
        torch.testing.assert_close(v_c, v_e, atol=1e-5, rtol=1e-5)
        assert float(m_c) == pytest.approx(float(m_e))
    assert v_e.abs().sum() > 0


def test_solver_backends_agree():
    task, _, y = make_task(2)
    model = gaussian_model()
    eager = DPG(backend="eager", **FAST).restore(model, task, y)
    chunked = DPG(backend="chunked", chunk_size=7, **FAST).restore(model, task, y)
    torch.testing.assert_close(eager, chunked, atol=1e-5, rtol=0)


def test_rewards_do_not_overflow():
    # energies far apart: exp(-(E - Z_raw)/Z) overflows float64 for the smallest E
    energies = torch.tensor([0.0, 1e5, 2e5, 3e5], dtype=torch.float64)
    w, m = loo_weights(-(energies - 3e5) / 1.0)
    assert torch.isfinite(w).all() and torch.isfinite(m)
    assert float(m) == pytest.approx(3e5)
    # relative to the best sample: its weight is 1 - mean of the others, the rest about -1/3
    assert float(w[0]) == pytest.approx(1.0)
    assert float(w[1]) == pytest.approx(-1 / 3)


def test_momentum_keeps_the_published_scale():
    """Combining in log space equals the naive c g_prev + (1 - c) g when nothing overflows."""
    from dpgkit.solvers.base import Guidance
    from dpgkit.solvers.dpg import _momentum

    g = torch.Generator().manual_seed(1)
    prev, cur = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    prev_log, cur_log = torch.tensor([0.5, -2.0], dtype=torch.float64), torch.tensor([1.5, 3.0], dtype=torch.float64)
    ghat = _momentum(Guidance(cur, cur_log, cur), Guidance(prev, prev_log, prev), 0.5)
    naive = 0.5 * prev * prev_log.exp().float().view(-1, 1, 1, 1) + 0.5 * cur * cur_log.exp().float().view(-1, 1, 1, 1)
    naive = naive / naive.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(ghat, naive, atol=1e-5, rtol=1e-5)


def test_ddpm_guidance_stops_two_steps_before_the_end():
    """The authors' loop guides chain index i > 1 only (eta = 0 at i = 1 and 0); DDIM guides i > 0."""
    from dpgkit.solvers.dpg import dpg_eta

    beta, abar = torch.tensor(0.02), torch.tensor(0.5)
    assert float(dpg_eta(beta, abar, 1, "ddpm")) == 0.0 and float(dpg_eta(beta, abar, 0, "ddpm")) == 0.0
    expected = 0.02 / ((1 - 0.02) ** 0.5 * 0.5**0.5)
    assert float(dpg_eta(beta, abar, 2, "ddpm")) == pytest.approx(expected, rel=1e-6)
    assert float(dpg_eta(beta, abar, 1, "ddim")) == 1.0 and float(dpg_eta(beta, abar, 0, "ddim")) == 0.0


def test_momentum_coefficient_follows_the_chain_index():
    """c = beta_m * (i / S) on the chain being run (respaced or not), beta_m under DDIM."""
    from dpgkit.solvers.dpg import momentum_coefficient

    assert momentum_coefficient(0.1, 50, 100, "ddpm") == pytest.approx(0.05)  # a respaced 100-step chain
    assert momentum_coefficient(0.1, 500, 1000, "ddpm") == pytest.approx(0.05)  # = t / 1000 on the full chain
    assert momentum_coefficient(0.1, 3, 200, "ddim") == 0.1


def test_dps_poisson_step_is_the_norm_times_mean_inverse_y():
    """The DPS authors' Poisson guidance differentiates (||y - A x0hat|| / |y|).mean(): the plain
    gradient times mean(1 / |y|) on a fixed y."""
    from dpgkit.solvers.base import Denoised

    g = torch.Generator().manual_seed(0)
    y = torch.rand(1, 1, 4, 4, generator=g) * 1.6 - 0.8 + 0.1
    x_t = torch.randn(1, 1, 4, 4, generator=g).requires_grad_(True)
    state = lambda: Denoised(x_t, 0.5 * x_t, torch.full((1, 1, 1, 1), 0.5))  # noqa: E731
    op = dk.operators.Denoising()
    poisson = dk.solvers.DPS().guidance(state(), dk.Task(op, dk.noise.Poisson(1.0)), y).grad
    gauss = dk.solvers.DPS().guidance(state(), dk.Task(op, dk.noise.Gaussian(0.05)), y).grad
    ratio = (poisson.flatten() / gauss.flatten())
    torch.testing.assert_close(ratio, torch.full_like(ratio, float((1 / y.abs()).mean())), rtol=1e-5, atol=0)


def _numpy_downsample(img: np.ndarray) -> np.ndarray:
    """A non-differentiable measurement: 2x2 block means, rounded to 1/64 (quantised)."""
    c, h, w = img.shape
    blocks = img.reshape(c, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    return np.round(blocks * 64) / 64


def test_dpg_with_a_numpy_black_box_reduces_the_residual():
    op = BlackBox(_numpy_downsample)
    task = dk.Task(op, dk.noise.Gaussian(0.02))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, *SHAPE, generator=g) * 1.6 - 0.8
    y, task = task.measure(x, seed=0)
    model = gaussian_model()
    kwargs = dict(num_samples=64, sampler="ddim", steps=30)
    unguided = _unguided(DPG(scale=0.2, **kwargs)).restore(model, task, y, seed=0)
    guided = DPG(scale=0.2, **kwargs).restore(model, task, y, seed=0)

    def residual(out):
        return (op(out) - y).flatten(1).norm(dim=1)

    assert (residual(guided) < 0.25 * residual(unguided)).all(), (residual(guided), residual(unguided))


def test_dps_refuses_a_black_box():
    task = dk.Task(BlackBox(_numpy_downsample), dk.noise.Gaussian(0.02))
    y, task = task.measure(torch.zeros(1, *SHAPE))
    with pytest.raises(ValueError, match="DPG"):
        dk.solvers.DPS(scale=1.0, steps=5).restore(gaussian_model(), task, y)


def test_dps_reduces_the_residual():
    task, _, y = make_task(2)
    model = gaussian_model()
    kwargs = dict(sampler="ddim", steps=30)
    unguided = _unguided(dk.solvers.DPS(scale=0.5, **kwargs)).restore(model, task, y)
    guided = dk.solvers.DPS(scale=0.5, **kwargs).restore(model, task, y)
    res = lambda out: (task.operator(out) - y).flatten(1).norm(dim=1)  # noqa: E731
    assert (res(guided) < res(unguided)).all()


def test_non_finite_trajectory_is_stopped_with_the_step_named():
    base = gaussian_model()
    calls = {"n": 0}

    def eps(x_t, t):
        calls["n"] += 1
        out = base.eps(x_t, t)
        if calls["n"] >= 6:  # item 1 breaks from the 6th network call on
            out = out.clone()
            out[1] = float("nan")
        return out

    model = dk.models.DiffusionModel(eps, SHAPE)
    task, _, y = make_task(2)
    with pytest.warns(RuntimeWarning, match=r"item 1 turned non-finite at step 5"):
        out = DPG(**FAST).restore(model, task, y)
    assert torch.isfinite(out).all()


def test_callback_sees_every_step():
    task, _, y = make_task(1)
    seen = []
    DPG(**FAST).restore(gaussian_model(), task, y, callback=seen.append)
    assert [s.step for s in seen] == list(range(FAST["steps"]))
    assert seen[0].t > seen[-1].t == 0
    assert seen[-1].residual.shape == (1,)


def test_tweedie_width_runs_and_guides():
    task, _, y = make_task(2)
    model = gaussian_model()
    unguided = _unguided(DPG(r="tweedie", **FAST)).restore(model, task, y)
    guided = DPG(r="tweedie", **FAST).restore(model, task, y)
    res = lambda out: (task.operator(out) - y).flatten(1).norm(dim=1)  # noqa: E731
    assert (res(guided) < res(unguided)).all()


def test_random_template_must_be_drawn_first():
    class RandomOp(ItemMask):
        is_random = True

    task = dk.Task(RandomOp(torch.ones(1, 1, 4, 4)), dk.noise.Gaussian(0.05))
    with pytest.raises(ValueError, match="task.measure"):
        DPG(**FAST).restore(gaussian_model(), task, torch.zeros(1, *SHAPE))


def test_noise_stream_does_not_depend_on_chunking():
    from dpgkit.kernels.reference import torch_normal, weighted_sum

    whole = torch_normal(7, 0, 200, 33)
    for size in (1, 13, 64, 100):
        parts = torch.cat([torch_normal(7, s, min(size, 200 - s), 33) for s in range(0, 200, size)])
        assert torch.equal(parts, whole)
    w = torch.randn(200, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(weighted_sum(w, whole), w @ whole.double(), rtol=1e-12, atol=1e-12)
