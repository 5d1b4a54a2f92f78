"""What the kernel tests share: a guidance problem, the fused kernels' noise as a stream, the tolerance.

Imported by the test modules beside it (pytest puts this folder on sys.path); the conftest here has
already set TRITON_INTERPRET before anything imports triton.
"""

from __future__ import annotations

import torch

from dpgkit.kernels import triton_dpg


def problem(operator, noise, shape, batch: int, device, seed: int = 0):
    """x0hat (B, C, H, W) in [-1, 1], a measurement of a nearby image, and r, Z, Z_raw as DPG's."""
    g = torch.Generator().manual_seed(seed)
    x0hat = (torch.rand(batch, *shape, generator=g) * 2 - 1).to(device)
    x = (x0hat + 0.3 * torch.randn(batch, *shape, generator=g).to(device)).clamp(-1, 1)
    op = operator.to(device)
    y = noise.simulate(op(x), [torch.Generator().manual_seed(seed + b) for b in range(batch)])
    z_raw = noise.energy(y, op(x0hat)).double()
    z = 1.3 * z_raw
    r = noise.width(z, float(x0hat[0].numel()) / 4, 0.05)
    return x0hat, y, op, r, z, z_raw


def kernel_noise(seed, start, num, numel, device="cpu", config=triton_dpg.DEFAULT_CONFIG):
    """The fused kernels' noise (as drawn under `config`), as a stream for the torch reference."""
    return triton_dpg.philox_normal_triton(seed, start, num, numel, device, config)


def assert_close(v, v_ref, m, m_ref):
    """A fused direction (v_unit, m) equals the reference's to float32 accuracy."""
    scale = float(v_ref.abs().max())
    assert scale > 0
    torch.testing.assert_close(v, v_ref, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(m, m_ref, rtol=0, atol=1e-6)
