"""Blur kernel generators: Gaussian, and random camera-shake (motion) trajectories.

The motion generator follows the algorithm published with LeviBorodenko/motionblur (the one the
DPS and DPG experiments use): the camera takes a random walk whose total length, step sizes and
turning angles grow with an `intensity` in [0, 1] (0: a straight line, 1: a strongly curved and
often self-crossing path); the path is centred on its centre of mass, rotated at random, drawn as
a one-pixel line on a 2x supersampled canvas, blurred by a Gaussian of std int(1% of the canvas
diagonal) pixels (1 px for a 61 x 61 kernel), downsampled with a Lanczos-3 filter, stored at 8-bit
precision and normalised. The 8-bit step matters for the kernel's support: the reference keeps
its kernel as a grayscale image, so weights under half a grey level (about 0.5% of the line's
peak) are exactly zero. This is an independent torch implementation drawing from a
torch.Generator: its kernels are not bit-identical to that package's, but their statistics match
(tests/test_operators.py: mass concentration, support, spread, elongation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gaussian_kernel", "motion_kernel"]

_EPS = 0.1  # keeps the step and angle distributions non-degenerate at intensity 0 or 1


def gaussian_kernel(size: int = 61, std: float = 3.0) -> Tensor:
    """(size, size) isotropic Gaussian, non-negative, summing to 1 (paper: 61, std 3.0)."""
    if size < 1 or std <= 0:
        raise ValueError(f"need size >= 1 and std > 0, got size={size}, std={std}")
    c = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(c**2) / (2 * std**2))
    k = torch.outer(g, g)
    return (k / k.sum()).float()


def _uniform(gen: torch.Generator | None, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))


def _triangular(gen: torch.Generator | None, lo: float, mode: float, hi: float) -> float:
    """Inverse-CDF draw from the triangular distribution on [lo, hi] peaking at mode."""
    u, width = _uniform(gen), hi - lo
    if u < (mode - lo) / width:
        return lo + math.sqrt(u * width * (mode - lo))
    return hi - math.sqrt((1 - u) * width * (hi - mode))


def _trajectory(size: int, intensity: float, gen: torch.Generator | None) -> Tensor:
    """Camera positions (complex, canvas pixels) on a canvas of side `size`."""
    diagonal = math.sqrt(2) * size
    # longer paths, made of more and shorter steps, as the intensity grows
    path_len = 0.75 * diagonal * (_uniform(gen) + _uniform(gen, 0, intensity**2))
    step_scale = (1 - intensity + _EPS) * diagonal
    steps: list[float] = []
    total = 0.0
    for _ in range(100_000):  # a bound only: the walk ends after a few hundred steps at most
        if total >= path_len:
            break
        step = (1 - _uniform(gen) ** (1 / 30)) * step_scale  # Beta(1, 30) by inverse CDF
        if step < path_len:
            steps.append(step)
            total += step
    steps = steps or [path_len]
    # turning angles: bounded by a random maximum; the sign persists, flipping with a small
    # random "jitter" probability (Beta(2, 20): the 2nd smallest of 21 uniforms)
    max_angle = _uniform(gen, 0, intensity * math.pi)
    jitter = float(torch.rand(21, generator=gen, dtype=torch.float64).sort().values[1])
    angles = [_uniform(gen, -max_angle, max_angle)]
    for _ in steps[1:]:
        a = _triangular(gen, 0.0, intensity * max_angle, max_angle + _EPS)
        sign = 1.0 if angles[-1] >= 0 else -1.0
        angles.append(a * (-sign if _uniform(gen) < jitter else sign))
    inc = torch.tensor(steps, dtype=torch.float64) * torch.exp(1j * torch.tensor(angles, dtype=torch.float64))
    path = torch.cumsum(inc, 0)
    theta = _uniform(gen, 0, math.pi)  # a random orientation
    path = (path - path.mean()) * complex(math.cos(theta), math.sin(theta))
    return path + complex(size / 2, size / 2)


def _rasterise(path: Tensor, size: int, spacing: float = 0.25) -> Tensor:
    """A one-pixel-wide line along the polyline on a size x size canvas, ink in [0, 1].

    Points every `spacing` px along the path, each adding its length to the pixel it falls in
    (an aliased line, as the reference's one-pixel line drawing); a pixel the line crosses more
    than once saturates at full ink, as a drawn line does.
    """
    if path.numel() == 1:
        points, weight = path, 1.0
    else:
        seg = (path[1:] - path[:-1]).abs()
        cum = torch.cat([torch.zeros(1, dtype=seg.dtype), torch.cumsum(seg, 0)])
        total = float(cum[-1])
        n = max(1, math.ceil(total / spacing))
        s = (torch.arange(n, dtype=torch.float64) + 0.5) * (total / n)
        i = torch.searchsorted(cum, s, right=True).clamp(1, len(path) - 1) - 1
        frac = ((s - cum[i]) / seg[i].clamp_min(1e-12)).clamp(0, 1)
        points, weight = path[i] + frac * (path[i + 1] - path[i]), max(total / n, 1e-12)
    # pixel centres at integer + 0.5
    cols, rows = torch.floor(points.real).long(), torch.floor(points.imag).long()
    inside = (cols >= 0) & (cols < size) & (rows >= 0) & (rows < size)
    canvas = torch.zeros(size, size, dtype=torch.float64)
    ink = torch.full((int(inside.sum()),), min(weight, 1.0), dtype=torch.float64)
    canvas.index_put_((rows[inside], cols[inside]), ink, accumulate=True)
    return canvas.clamp(max=1.0)


def _gaussian_blur(img: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of a (H, W) image, zero outside, truncated at 3 sigma."""
    if sigma <= 0:
        return img
    radius = math.ceil(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = (g / g.sum()).to(img.dtype)
    out = F.conv2d(img[None, None], g.view(1, 1, -1, 1), padding=(radius, 0))
    return F.conv2d(out, g.view(1, 1, 1, -1), padding=(0, radius))[0, 0]


def _lanczos_matrix(n: int, factor: int, a: int = 3) -> Tensor:
    """(n // factor, n) float64: antialiased Lanczos-a downsampling, weights normalised per output
    pixel, taps outside the signal dropped before normalising (an image resampler's convention)."""
    m = n // factor
    centre = (torch.arange(m, dtype=torch.float64) + 0.5) * factor - 0.5  # in input pixels
    reach = a * factor
    j = torch.floor(centre)[:, None] + torch.arange(-reach, reach + 2, dtype=torch.float64)[None, :]
    t = (j - centre[:, None]) / factor
    w = torch.where(t.abs() < a, torch.sinc(t) * torch.sinc(t / a), torch.zeros_like(t))
    w = torch.where((j >= 0) & (j < n), w, torch.zeros_like(w))
    w = w / w.sum(1, keepdim=True)
    mat = torch.zeros(m, n, dtype=torch.float64)
    mat.scatter_add_(1, j.long().clamp(0, n - 1), w)
    return mat


def motion_kernel(size: int = 61, intensity: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """(size, size) random camera-shake kernel, non-negative, summing to 1 (paper: 61, 0.5).

    Drawn from `generator` (a CPU torch.Generator); the same generator state gives the same
    kernel. Convention: the kernel is applied as a correlation, like the DPS code's Conv2d.
    """
    if size < 1:
        raise ValueError(f"kernel size must be >= 1, got {size}")
    if not 0 <= intensity <= 1:
        raise ValueError(f"intensity must lie in [0, 1], got {intensity}")
    big = 2 * size  # supersampled canvas, for anti-aliasing
    canvas = _rasterise(_trajectory(big, float(intensity), generator), big)
    # soften the line by a Gaussian of std int(1% of the diagonal): the reference's blur radius
    img = _gaussian_blur(canvas, float(int(0.01 * math.sqrt(2) * big)))
    down = _lanczos_matrix(big, 2)
    k = (down @ img @ down.T).clamp_min(0)
    # 8-bit storage, as the reference's grayscale kernel image: weights under half a level vanish
    quantised = torch.round(k * 255)
    if float(quantised.sum()) > 0:
        k = quantised
    total = float(k.sum())
    if total <= 0:  # pragma: no cover - the path is centred on the canvas, so some ink lands
        k = torch.zeros(size, size, dtype=torch.float64)
        k[size // 2, size // 2] = 1.0
        total = 1.0
    return (k / total).float()
