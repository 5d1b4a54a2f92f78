"""The fused Rao-Blackwellized direction (kernels.triton_rb) against the torch reference on the
same Philox noise, under Triton's interpreter on the CPU (see conftest.py) or compiled on CUDA.
Awkward sizes: m not a multiple of any block, N not a multiple of any sample tile, batches of 2."""

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
from dpgkit.kernels import rao_blackwell as rb
from dpgkit.kernels import triton_dpg, triton_rb

N = 37
NOISES = [dk.noise.Gaussian(0.1), dk.noise.Poisson(1.0)]
SMALL = triton_dpg.FusedConfig(energy_block=(32, 16), combine_block=(16, 16), splits=2)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _operators(batch: int) -> dict[str, tuple[object, tuple[int, int, int]]]:
    g = torch.Generator().manual_seed(7)
    return {
        "inpainting": (dk.operators.Inpainting((torch.rand(batch, 1, 7, 9, generator=g) > 0.6).float()), (3, 7, 9)),
        "soft_mask": (dk.operators.Inpainting(torch.rand(1, 3, 7, 9, generator=g).clamp_min(0.3) - 0.3), (3, 7, 9)),
        "uncrop": (dk.operators.Inpainting.uncrop((7, 9), "center", 0.5), (3, 7, 9)),
        "sr3": (dk.operators.SuperResolution(3, "avgpool"), (3, 6, 9)),
        "sr2": (dk.operators.SuperResolution(2, "avgpool"), (3, 8, 6)),
        "colorization": (dk.operators.Colorization(), (3, 7, 9)),
    }


@pytest.mark.parametrize("noise", NOISES, ids=["gaussian", "poisson"])
@pytest.mark.parametrize("name", list(_operators(2)))
def test_fused_rb_equals_the_reference_on_the_same_noise(name, noise, device):
    operator, shape = _operators(2)[name]
    x0hat, y, op, r, z, z_raw = _problem(operator, noise, shape, 2, device)
    seeds = [11, 2**62 + 5]
    v, m = kernels.dpg_direction(x0hat, y, op, noise, r, z, z_raw, N, seeds, backend="triton",
                                 estimator="rao-blackwell")
    assert v.shape == x0hat.shape and v.dtype == x0hat.dtype and m.shape == (2,)
    for b in range(2):
        v_ref, m_ref = rb.rb_direction_eager(x0hat[b], y[b], op.item(b), noise, r[b], z[b], z_raw[b], N,
                                             seeds[b], stream=_kernel_noise)
        _close(v[b], v_ref, m[b], m_ref)
        # and the streamed torch path on the same stream
        v_s, m_s = rb.rb_direction_streamed(x0hat[b], y[b], op.item(b), noise, r[b], z[b], z_raw[b], N,
                                            seeds[b], chunk_size=16, stream=_kernel_noise)
        _close(v_s, v_ref, m_s, m_ref)
    assert not torch.allclose(v[0], v[1])


def test_launch_shapes_do_not_change_the_result(device):
    noise = dk.noise.Gaussian(0.1)
    operator, shape = _operators(1)["sr3"]
    x0hat, y, op, r, z, z_raw = _problem(operator, noise, shape, 1, device, seed=3)
    space = rb.row_space_of(op, x0hat[0])
    v, m = triton_rb.rb_direction_fused(x0hat[0], y[0], op, space, noise, r[0], z[0], z_raw[0], 70, 99,
                                        config=SMALL)
    v_ref, m_ref = rb.rb_direction_eager(x0hat[0], y[0], op, noise, r[0], z[0], z_raw[0], 70, 99,
                                         stream=functools.partial(_kernel_noise, config=SMALL))
    _close(v, v_ref, m, m_ref)


def test_same_seed_same_bits_and_an_empty_mask(device):
    noise = dk.noise.Poisson(1.0)
    operator, shape = _operators(2)["inpainting"]
    x0hat, y, op, r, z, z_raw = _problem(operator, noise, shape, 2, device)
    args = (x0hat, y, op, noise, r, z, z_raw, N, [3, 4])
    runs = [kernels.dpg_direction(*args, backend="triton", estimator="rao-blackwell") for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    empty = dk.operators.Inpainting(torch.zeros(1, 1, 7, 9)).to(device)
    space = rb.row_space_of(empty, x0hat[0])
    assert space.rank == 0
    v, _ = triton_rb.rb_direction_fused(x0hat[0], y[0], empty, space, noise, r[0], z[0], z_raw[0], 2, 5)
    assert torch.equal(v, torch.zeros_like(v))


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(kernels, "_logged", set())


def test_bicubic_is_not_fused_and_falls_back_to_streamed_logged_once(device, fresh_log, caplog):
    noise = dk.noise.Gaussian(0.1)
    x0hat, y, op, r, z, z_raw = _problem(dk.operators.SuperResolution(3, "bicubic"), noise, (3, 6, 9), 2, device)
    args = (x0hat, y, op, noise, r, z, z_raw, N, [1, 2])
    with caplog.at_level(logging.WARNING, logger="dpgkit.kernels"):
        v, m = kernels.dpg_direction(*args, backend="triton", chunk_size=10, estimator="rao-blackwell")
        kernels.dpg_direction(*args, backend="triton", chunk_size=10, estimator="rao-blackwell")
    v_c, m_c = kernels.dpg_direction(*args, backend="chunked", chunk_size=10, estimator="rao-blackwell")
    assert torch.equal(v, v_c) and torch.equal(m, m_c)
    records = [rec for rec in caplog.records if "falls back to 'chunked'" in rec.getMessage()]
    assert len(records) == 1 and "'basis'" in records[0].getMessage()


def test_auto_picks_the_fused_rb_only_on_cuda(device, fresh_log, caplog):
    noise = dk.noise.Gaussian(0.1)
    operator, shape = _operators(1)["sr2"]
    x0hat, y, op, r, z, z_raw = _problem(operator, noise, shape, 1, device)
    args = (x0hat, y, op, noise, r, z, z_raw, N, [8])
    with caplog.at_level(logging.WARNING, logger="dpgkit.kernels"):
        v_auto, _ = kernels.dpg_direction(*args, backend="auto", estimator="rao-blackwell")
    expected = "triton" if device.type == "cuda" else "chunked"
    assert torch.equal(v_auto, kernels.dpg_direction(*args, backend=expected, estimator="rao-blackwell")[0])
    assert not caplog.records
