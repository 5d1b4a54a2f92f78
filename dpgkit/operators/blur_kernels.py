"""Blur kernel generators: Gaussian, and random camera-shake (motion) trajectories.

The motion generator follows the idea published with LeviBorodenko/motionblur (the one the DPS
and DPG experiments use): the camera takes a random walk whose total length, step sizes and
turning angles grow with an `intensity` in [0, 1] (0: a straight line, 1: a strongly curved and
often self-crossing path); the path is centred on its centre of mass, rotated at random,
rasterised on a 2x supersampled canvas, softened, downsampled and normalised. This is an
independent torch implementation drawing from a torch.Generator, so its kernels are not
bit-identical to that package's.
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
    """Equal mass per unit length along the polyline, splatted bilinearly on a size x size grid."""
    if path.numel() == 1:
        points = path
    else:
        seg = (path[1:] - path[:-1]).abs()
        cum = torch.cat([torch.zeros(1, dtype=seg.dtype), torch.cumsum(seg, 0)])
        total = float(cum[-1])
        n = max(1, math.ceil(total / spacing))
        s = (torch.arange(n, dtype=torch.float64) + 0.5) * (total / n)
        i = torch.searchsorted(cum, s, right=True).clamp(1, len(path) - 1) - 1
        frac = ((s - cum[i]) / seg[i].clamp_min(1e-12)).clamp(0, 1)
        points = path[i] + frac * (path[i + 1] - path[i])
    # pixel centres at integer + 0.5
    x, y = points.real - 0.5, points.imag - 0.5
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    canvas = torch.zeros(size, size, dtype=torch.float64)
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                      (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        cols, rows = (x0 + dx).long(), (y0 + dy).long()
        inside = (cols >= 0) & (cols < size) & (rows >= 0) & (rows < size)
        canvas.index_put_((rows[inside], cols[inside]), w[inside], accumulate=True)
    return canvas


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
    # soften the one-pixel line (the reference blurs it by about 1% of the diagonal)
    sigma = 0.01 * math.sqrt(2) * big
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    img = canvas[None, None]
    img = F.conv2d(img, g.view(1, 1, -1, 1), padding=(radius, 0))
    img = F.conv2d(img, g.view(1, 1, 1, -1), padding=(0, radius))
    k = F.avg_pool2d(img, 2)[0, 0].clamp_min(0)
    total = float(k.sum())
    if total <= 0:  # pragma: no cover - the path is centred on the canvas, so some mass lands
        k = torch.zeros(size, size, dtype=torch.float64)
        k[size // 2, size // 2] = 1.0
        total = 1.0
    return (k / total).float()
