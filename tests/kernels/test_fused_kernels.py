"""The fused Triton DPG kernels against the torch reference, on the CPU through Triton's
interpreter (see conftest.py) or on CUDA when present. Tiny odd sizes: D not a multiple of any
block, N not a multiple of any sample tile, batches of 2."""

from __future__ import annotations

import functools
import logging

import pytest
import torch
from kernel_cases import assert_close as _close
from kernel_cases import kernel_noise as _kernel_noise
from kernel_cases import problem as _problem

import dpgkit as dk
from dpgkit import kernels
from dpgkit.kernels import reference, triton_dpg
from dpgkit.kernels.fusion import plan_for
from dpgkit.kernels.philox import philox_normal
from dpgkit.solvers.dpg import DPG

N = 37
SHAPE = (3, 7, 9)  # D = 189
NOISES = [dk.noise.Gaussian(0.1), dk.noise.Poisson(1.0)]
# several output and element blocks, ragged sample tiles, pass-2 splits of 2 and 1 tiles (the
# interpreter's default config runs these sizes in one block)
SMALL = triton_dpg.FusedConfig(energy_block=(32, 64), combine_block=(16, 64), splits=2)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _operators(batch: int) -> dict[str, tuple[object, tuple[int, int, int]]]:
    g = torch.Generator().manual_seed(7)
    return {
        "denoising": (dk.operators.Denoising(), SHAPE),
        "colorization": (dk.operators.Colorization(), SHAPE),
        "sr3": (dk.operators.SuperResolution(3, "avgpool"), (3, 6, 9)),
        "sr2": (dk.operators.SuperResolution(2, "avgpool"), (3, 8, 6)),
        # one random mask per item, shared by the channels
        "inpainting": (dk.operators.Inpainting((torch.rand(batch, 1, 7, 9, generator=g) > 0.6).float()), SHAPE),
        # per-channel soft mask: weights other than 0 and 1
        "soft_mask": (dk.operators.Inpainting(torch.rand(1, 3, 7, 9, generator=g).clamp_min(0.3) - 0.3), SHAPE),
        "uncrop": (dk.operators.Inpainting.uncrop((7, 9), "center", 0.5), SHAPE),
    }


@pytest.mark.parametrize("seed", [0, 2**63 + 12345, 2**64 - 1])
def test_kernel_noise_is_the_philox_definition(seed, device):
    ref = philox_normal(seed, 5, N, 189, device)
    eps = triton_dpg.philox_normal_triton(seed, 5, N, 189, device, triton_dpg.FusedConfig(fast_math=False))
    torch.testing.assert_close(eps, ref, rtol=0, atol=2e-6)
    # a stream, not a constant: the samples differ and look standard normal
    assert eps.std() > 0.8 and abs(float(eps.mean())) < 0.1
    if device.type == "cuda":
        # lg2.approx and cos.approx: a few ulp off, more only where u1 is within ~1e-3 of 1 (sqrt(-2 ln u1) ~ 0)
        fast = triton_dpg.philox_normal_triton(seed, 5, N, 189, device, triton_dpg.FusedConfig(fast_math=True))
        torch.testing.assert_close(fast, ref, rtol=0, atol=1e-3)
        assert float((fast - ref).abs().mean()) < 5e-6


@pytest.mark.parametrize("noise", NOISES, ids=["gaussian", "poisson"])
@pytest.mark.parametrize("name", list(_operators(2)))
def test_fused_equals_reference_on_the_same_noise(name, noise, device):
    operator, shape = _operators(2)[name]
    x0hat, y, op, r, z, z_raw = _problem(operator, noise, shape, 2, device)
    seeds = [11, 2**62 + 5]
    v, m = kernels.dpg_direction(x0hat, y, op, noise, r, z, z_raw, N, seeds, backend="triton")
    assert v.shape == x0hat.shape and v.dtype == x0hat.dtype and m.shape == (2,)
    for b in range(2):
        # the reference, fed the kernels' own stream: only the summation order differs
        v_ref, m_ref = reference.dpg_direction_eager(x0hat[b], y[b], op.item(b), noise, r[b], z[b], z_raw[b],
                                                     N, seeds[b], stream=_kernel_noise)
        _close(v[b], v_ref, m[b], m_ref)
    assert not torch.allclose(v[0], v[1])  # each item its own noise and problem


def test_launch_shapes_do_not_change_the_result(device):
    noise, config = dk.noise.Gaussian(0.1), SMALL
    operator, shape = _operators(1)["sr3"]
    x0hat, y, op, r, z, z_raw = _problem(operator, noise, shape, 1, device, seed=3)
    plan = plan_for(op, shape, device)
    v, m = triton_dpg.dpg_direction_fused(x0hat[0], y[0], plan, noise, r[0], z[0], z_raw[0], N, 99, config=config)
    v_ref, m_ref = reference.dpg_direction_eager(x0hat[0], y[0], op, noise, r[0], z[0], z_raw[0], N, 99,
                                                 stream=functools.partial(_kernel_noise, config=config))
    _close(v, v_ref, m, m_ref)


def test_two_samples_and_an_empty_mask(device):
    noise = dk.noise.Gaussian(0.1)
    empty = dk.operators.Inpainting(torch.zeros(1, 1, 7, 9))
    x0hat, y, op, r, z, z_raw = _problem(empty, noise, SHAPE, 1, device)
    plan = plan_for(op, SHAPE, device)
    assert plan.kept == 0
    v, m = triton_dpg.dpg_direction_fused(x0hat[0], y[0], plan, noise, r[0], z[0], z_raw[0], 2, 5)
    v_ref, m_ref = reference.dpg_direction_eager(x0hat[0], y[0], op, noise, r[0], z[0], z_raw[0], 2, 5)
    # nothing observed: every reward is equal, so the leave-one-out weights vanish
    assert torch.equal(v, torch.zeros_like(v)) and torch.equal(v_ref, torch.zeros_like(v_ref))
    torch.testing.assert_close(m, m_ref, rtol=0, atol=1e-6)


def test_same_seed_same_bits(device):
    noise = dk.noise.Poisson(1.0)
    operator, shape = _operators(2)["inpainting"]
    x0hat, y, op, r, z, z_raw = _problem(operator, noise, shape, 2, device)
    runs = [kernels.dpg_direction(x0hat, y, op, noise, r, z, z_raw, N, [3, 4], backend="triton") for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    other = kernels.dpg_direction(x0hat, y, op, noise, r, z, z_raw, N, [3, 5], backend="triton")
    assert torch.equal(other[0][0], runs[0][0][0]) and not torch.allclose(other[0][1], runs[0][0][1])


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(kernels, "_logged", set())
    monkeypatch.setattr(kernels, "_checked", {})


def test_a_kernel_that_disagrees_with_the_reference_falls_back_once(device, fresh_log, caplog, monkeypatch):
    """The self-check before a fused kind first runs on a device: a kernel forced to be wrong (or to
    fail) is not used; the chunked path runs instead, with one logged reason."""
    from dpgkit.kernels import triton_dpg

    noise = dk.noise.Gaussian(0.1)
    operator, shape = _operators(2)["inpainting"]
    x0hat, y, op, r, z, z_raw = _problem(operator, noise, shape, 2, device)
    args = (x0hat, y, op, noise, r, z, z_raw, N, [3, 4])
    good = kernels.dpg_direction(*args, backend="triton")
    assert kernels._checked and all(v is None for v in kernels._checked.values())  # the real kernel passed
    honest = triton_dpg.dpg_direction_fused

    def wrong(*a, **k):
        v, m = honest(*a, **k)
        return v.flip(-1), m

    for broken in (wrong, lambda *a, **k: 1 / 0):
        monkeypatch.setattr(kernels, "_checked", {})
        monkeypatch.setattr(kernels, "_logged", set())
        monkeypatch.setattr(triton_dpg, "dpg_direction_fused", broken)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dpgkit.kernels"):
            v, m = kernels.dpg_direction(*args, backend="triton")
            kernels.dpg_direction(*args, backend="triton")
        chunked = kernels.dpg_direction(*args, backend="chunked")
        assert torch.equal(v, chunked[0]) and torch.equal(m, chunked[1])
        assert not torch.equal(v, good[0])
        records = [rec.getMessage() for rec in caplog.records]
        assert len(records) == 1 and "self-check" in records[0], records


@pytest.mark.parametrize("operator", [
    dk.operators.GaussianBlur(5, 1.0),
    dk.operators.SuperResolution(3, "bicubic"),
], ids=["blur", "bicubic"])
def test_unsupported_operator_falls_back_to_chunked_logged_once(operator, device, fresh_log, caplog):
    noise = dk.noise.Gaussian(0.1)
    x0hat, y, op, r, z, z_raw = _problem(operator, noise, (3, 6, 9), 2, device)
    args = (x0hat, y, op, noise, r, z, z_raw, N, [1, 2])
    with caplog.at_level(logging.WARNING, logger="dpgkit.kernels"):
        v, m = kernels.dpg_direction(*args, backend="triton", chunk_size=10)
        kernels.dpg_direction(*args, backend="triton", chunk_size=10)
    v_c, m_c = kernels.dpg_direction(*args, backend="chunked", chunk_size=10)
    assert torch.equal(v, v_c) and torch.equal(m, m_c)
    records = [rec for rec in caplog.records if "falls back to 'chunked'" in rec.getMessage()]
    assert len(records) == 1 and type(operator).__name__ in records[0].getMessage()


class _Doubled(dk.operators.Denoising):
    """Claims to be denoising, computes something else: must not be fused."""

    def forward(self, x):
        return 2 * x


class _Huber(dk.noise.Gaussian):
    def energy(self, y, ax, batch_dims=1):
        d = y - ax
        d = d.reshape(*d.shape[:batch_dims], -1)
        return torch.where(d.abs() < 1, d.square(), 2 * d.abs() - 1).sum(-1)


@pytest.mark.parametrize("case", ["operator_mismatch", "custom_energy"])
def test_what_the_kernels_would_get_wrong_is_not_fused(case, device, fresh_log, caplog):
    op, noise = (_Doubled(), dk.noise.Gaussian(0.1)) if case == "operator_mismatch" else \
        (dk.operators.Denoising(), _Huber(0.1))
    x0hat, y, op, r, z, z_raw = _problem(op, noise, SHAPE, 1, device)
    args = (x0hat, y, op, noise, r, z, z_raw, N, [8])
    with caplog.at_level(logging.WARNING, logger="dpgkit.kernels"):
        v, _ = kernels.dpg_direction(*args, backend="triton", chunk_size=16)
    assert torch.equal(v, kernels.dpg_direction(*args, backend="chunked", chunk_size=16)[0])
    assert len(caplog.records) == 1


def test_auto_picks_triton_only_on_cuda(device, fresh_log, caplog):
    noise = dk.noise.Gaussian(0.1)
    x0hat, y, op, r, z, z_raw = _problem(dk.operators.Denoising(), noise, SHAPE, 1, device)
    args = (x0hat, y, op, noise, r, z, z_raw, N, [8])
    with caplog.at_level(logging.WARNING, logger="dpgkit.kernels"):
        v_auto, _ = kernels.dpg_direction(*args, backend="auto")
    expected = "triton" if device.type == "cuda" else "chunked"
    assert torch.equal(v_auto, kernels.dpg_direction(*args, backend=expected)[0])
    assert not caplog.records


def test_dpg_runs_on_the_triton_backend(device, monkeypatch):
    shape = (3, 6, 6)

    def eps(x_t, t):  # the exact eps of a N(0, 0.25 I) prior
        abar = dk.diffusion.Schedule.linear(1000).alphas_cumprod.to(x_t)[t].view(-1, 1, 1, 1)
        return (1 - abar).sqrt() * x_t / (abar * 0.25 + 1 - abar)

    model = dk.models.DiffusionModel(eps, shape)
    x = (torch.rand(2, *shape, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8).to(device)
    task = dk.Task(dk.operators.SuperResolution(2), dk.noise.Gaussian(0.05))
    y, task = task.measure(x, seed=0)
    # the eager backend drawing the kernels' Philox stream instead of torch's generator
    monkeypatch.setattr(kernels, "dpg_direction_eager",
                        functools.partial(reference.dpg_direction_eager, stream=philox_normal))
    out = {b: DPG(scale=2.0, num_samples=9, sampler="ddim", steps=4, backend=b).restore(model, task, y, seed=1)
           for b in ("triton", "eager")}
    assert out["triton"].device.type == device.type
    torch.testing.assert_close(out["triton"], out["eager"], rtol=0, atol=1e-4)


def test_chunked_batch_with_a_shared_operator_matches_item_by_item(device):
    noise = dk.noise.Poisson(1.0)
    x0hat, y, op, r, z, z_raw = _problem(dk.operators.Colorization(), noise, SHAPE, 3, device)
    v, m = kernels.dpg_direction(x0hat, y, op, noise, r, z, z_raw, N, [5, 6, 7], backend="chunked", chunk_size=16)
    for b in range(3):
        v_b, m_b = reference.dpg_direction_chunked(x0hat[b], y[b], op, noise, r[b], z[b], z_raw[b], N, 5 + b,
                                                   chunk_size=16)
        torch.testing.assert_close(v[b], v_b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(m[b], m_b, rtol=0, atol=1e-12)


def test_which_backends_share_a_monte_carlo_stream_as_the_readme_says(device):
    # README, Determinism: eager and chunked draw torch_normal (the same samples whatever the chunk
    # size); triton draws Philox, other samples of the same distribution
    noise = dk.noise.Gaussian(0.1)
    x0hat, y, op, r, z, z_raw = _problem(dk.operators.SuperResolution(2, "avgpool"), noise, (3, 8, 6), 1, device)
    args = (x0hat, y, op, noise, r, z, z_raw, N, [21])
    v_eager, _ = kernels.dpg_direction(*args, backend="eager")
    v_chunked, _ = kernels.dpg_direction(*args, backend="chunked", chunk_size=16)
    v_triton, _ = kernels.dpg_direction(*args, backend="triton")
    item = (x0hat[0], y[0], op, noise, r[0], z[0], z_raw[0], N, 21)
    v_torch, _ = reference.dpg_direction_eager(*item, stream=reference.torch_normal)
    v_philox, _ = reference.dpg_direction_eager(*item, stream=_kernel_noise)
    assert torch.equal(v_eager[0], v_torch)  # the default stream is torch_normal
    torch.testing.assert_close(v_chunked[0], v_torch, rtol=1e-5, atol=1e-6)
    _close(v_triton[0], v_philox, torch.zeros(()), torch.zeros(()))
    # other samples: the two estimates differ by Monte Carlo error, not by rounding
    assert float((v_triton[0] - v_torch).abs().max()) > 100 * float((v_chunked[0] - v_torch).abs().max() + 1e-7)
