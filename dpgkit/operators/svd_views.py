"""SVD views A = U diag(s) V^T of the linear operators that DDRM and DDNM use.

All act on vectors flattened per image: x (B, D) with D = C*H*W, y (B, M). `vt` and `v` map
(B, D) to (B, D); the first R = singulars().shape[-1] entries of `vt(x)` pair with the singular
values. `ut` maps (B, M) to (B, M) in the same order; `u` takes (B, R) or (B, M) and pads the
missing tail with zeros. Singular values are in descending order and may contain zeros (e.g. a
blur that kills a frequency, or a per-item mask that keeps fewer pixels than R). Where singulars
are per item, shape (B, R), the views apply to batches of exactly B images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import SVDView

__all__ = ["IdentitySVD", "MaskSVD", "ChannelMeanSVD", "SeparableSVD", "FourierSVD", "householder"]


def householder(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """An orthogonal, symmetric n x n matrix whose first column is ones / sqrt(n)."""
    q = torch.full((n,), 1.0 / math.sqrt(n), dtype=dtype)
    w = -q
    w[0] += 1.0
    if float(w.norm()) < 1e-12:  # n == 1: e1 already is the unit mean direction
        return torch.eye(n, dtype=dtype)
    return torch.eye(n, dtype=dtype) - 2.0 * torch.outer(w, w) / w.dot(w)


def _pad_to(z: Tensor, m: int) -> Tensor:
    if z.shape[1] > m:
        raise ValueError(f"expected at most {m} spectral coefficients per item, got {z.shape[1]}")
    return F.pad(z, (0, m - z.shape[1])) if z.shape[1] < m else z


def _gather(x: Tensor, perm: Tensor) -> Tensor:
    """x (B, D) permuted by perm (D,) or (B, D)."""
    if perm.dim() == 1:
        return x[:, perm]
    _check_per_item(x, perm.shape[0])
    return torch.gather(x, 1, perm.expand(x.shape[0], -1))


def _scatter(z: Tensor, perm: Tensor) -> Tensor:
    """The inverse of _gather: out[perm] = z."""
    out = torch.zeros_like(z)
    if perm.dim() == 1:
        out[:, perm] = z
        return out
    _check_per_item(z, perm.shape[0])
    return out.scatter(1, perm.expand(z.shape[0], -1), z)


def _check_per_item(x: Tensor, items: int) -> None:
    if items > 1 and x.shape[0] != items:
        raise ValueError(f"this SVD view holds {items} per-item operators, got a batch of {x.shape[0]}")


class IdentitySVD(SVDView):
    """A = I on D-vectors (denoising)."""

    def __init__(self, dim: int, like: Tensor) -> None:
        self.dim = dim
        self._s = torch.ones(dim, device=like.device, dtype=like.dtype)

    def singulars(self) -> Tensor:
        return self._s

    def vt(self, x: Tensor) -> Tensor:
        return x

    def v(self, z: Tensor) -> Tensor:
        return z

    def ut(self, y: Tensor) -> Tensor:
        return y

    def u(self, z: Tensor) -> Tensor:
        return _pad_to(z, self.dim)


class MaskSVD(SVDView):
    """A = diag(m) for a binary mask m (B or 1, D), y the masked image (M = D).

    V^T = U^T = the permutation that puts the kept entries first; s = 1 on them (then 0 up to R,
    R the most entries any item keeps).
    """

    def __init__(self, mask: Tensor) -> None:
        m = mask.reshape(mask.shape[0], -1)
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("the SVD view of inpainting needs a binary (0 or 1) mask")
        # stable sort: kept pixels first, each group in raster order
        order = torch.sort(-m, dim=1, stable=True).indices
        rank = int(m.sum(1).max())
        s = torch.gather(m, 1, order)[:, :rank]
        self.dim = m.shape[1]
        self._perm = order[0] if m.shape[0] == 1 else order
        self._s = s[0] if m.shape[0] == 1 else s

    def singulars(self) -> Tensor:
        return self._s

    def vt(self, x: Tensor) -> Tensor:
        return _gather(x, self._perm)

    def v(self, z: Tensor) -> Tensor:
        return _scatter(_pad_to(z, self.dim), self._perm)

    def ut(self, y: Tensor) -> Tensor:
        return _gather(y, self._perm)

    def u(self, z: Tensor) -> Tensor:
        return _scatter(_pad_to(z, self.dim), self._perm)


class ChannelMeanSVD(SVDView):
    """A = the mean over C channels at each pixel: x (C, H, W) -> y (1, H, W) (colorization).

    Per pixel A is the row ones/C = (1/sqrt C) * (ones/sqrt C)^T, so s = 1/sqrt(C), U = 1, and V
    is a Householder matrix whose first column is ones/sqrt(C). Order: first the mean components
    of all H*W pixels (R = H*W, in raster order, as y), then the other channels' components.
    """

    def __init__(self, channels: int, pixels: int, like: Tensor) -> None:
        self.c, self.p = channels, pixels
        self._q = householder(channels).to(device=like.device, dtype=like.dtype)
        self._s = torch.full((pixels,), 1.0 / math.sqrt(channels), device=like.device, dtype=like.dtype)

    def singulars(self) -> Tensor:
        return self._s

    def vt(self, x: Tensor) -> Tensor:
        z = torch.einsum("ck,bcp->bkp", self._q.to(x.dtype), x.reshape(x.shape[0], self.c, self.p))
        return z.reshape(x.shape[0], -1)

    def v(self, z: Tensor) -> Tensor:
        z = _pad_to(z, self.c * self.p).reshape(z.shape[0], self.c, self.p)
        return torch.einsum("ck,bkp->bcp", self._q.to(z.dtype), z).reshape(z.shape[0], -1)

    def ut(self, y: Tensor) -> Tensor:
        return y

    def u(self, z: Tensor) -> Tensor:
        return _pad_to(z, self.p)


class SeparableSVD(SVDView):
    """A x = Ah X Aw^T per channel, X (H, W) -> Y (h, w), from the SVDs Ah = Uh Sh Vh^T, Aw = ...

    The singulars sh[i] * sw[j] (i < h, j < w) are sorted in descending order, each repeated for
    the C channels (channel fastest); the remaining D - R coefficients follow in raster order.
    Used by super-resolution (average pooling and bicubic resizing).
    """

    def __init__(self, channels: int, uh: Tensor, sh: Tensor, vh: Tensor,
                 uw: Tensor, sw: Tensor, vw: Tensor) -> None:
        self.c = channels
        self.h, self.w = uh.shape[0], uw.shape[0]
        self.H, self.W = vh.shape[0], vw.shape[0]
        self._uh, self._vh, self._uw, self._vw = uh, vh, uw, vw
        s = (sh[:, None] * sw[None, :]).reshape(-1)
        s, self._perm = torch.sort(s, descending=True, stable=True)
        self._s = s.repeat_interleave(channels)
        top = torch.zeros(self.H, self.W, dtype=torch.bool)
        top[: self.h, : self.w] = True
        self._rest = torch.nonzero(~top.reshape(-1)).squeeze(1).to(uh.device)
        self._top = torch.nonzero(top.reshape(-1)).squeeze(1).to(uh.device)

    def singulars(self) -> Tensor:
        return self._s

    def _order(self, z: Tensor) -> Tensor:
        # (B, C, h*w) -> (B, h*w * C): sorted by singular value, channel fastest
        return z[:, :, self._perm].transpose(1, 2).reshape(z.shape[0], -1)

    def _unorder(self, z: Tensor) -> Tensor:
        z = z.reshape(z.shape[0], self.h * self.w, self.c).transpose(1, 2)
        out = torch.zeros_like(z)
        out[:, :, self._perm] = z
        return out

    def vt(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        vh, vw = self._vh.to(x.dtype), self._vw.to(x.dtype)
        z = torch.einsum("hi,bchw,wj->bcij", vh, x.reshape(b, self.c, self.H, self.W), vw)
        z = z.reshape(b, self.c, -1)
        return torch.cat([self._order(z[:, :, self._top]), z[:, :, self._rest].reshape(b, -1)], 1)

    def v(self, z: Tensor) -> Tensor:
        b, r = z.shape[0], self.c * self.h * self.w
        z = _pad_to(z, self.c * self.H * self.W)
        full = torch.zeros(b, self.c, self.H * self.W, device=z.device, dtype=z.dtype)
        full[:, :, self._top] = self._unorder(z[:, :r])
        full[:, :, self._rest] = z[:, r:].reshape(b, self.c, -1)
        vh, vw = self._vh.to(z.dtype), self._vw.to(z.dtype)
        x = torch.einsum("hi,bcij,wj->bchw", vh, full.reshape(b, self.c, self.H, self.W), vw)
        return x.reshape(b, -1)

    def ut(self, y: Tensor) -> Tensor:
        b = y.shape[0]
        uh, uw = self._uh.to(y.dtype), self._uw.to(y.dtype)
        z = torch.einsum("hi,bchw,wj->bcij", uh, y.reshape(b, self.c, self.h, self.w), uw)
        return self._order(z.reshape(b, self.c, -1))

    def u(self, z: Tensor) -> Tensor:
        b = z.shape[0]
        z = self._unorder(_pad_to(z, self.c * self.h * self.w)).reshape(b, self.c, self.h, self.w)
        uh, uw = self._uh.to(z.dtype), self._uw.to(z.dtype)
        return torch.einsum("hi,bcij,wj->bchw", uh, z, uw).reshape(b, -1)


class FourierSVD(SVDView):
    """A = circular correlation with a kernel, diagonal in the 2-D DFT: A x = F^-1 (lam * F x).

    lam (1 or B, H, W) is complex, Hermitian (the kernel is real). A real orthonormal basis of
    the H x W images: the DFT coefficient at each self-conjugate frequency (real), and the real
    and imaginary parts (times sqrt 2) of one of each pair (k, -k). In it A is block diagonal
    with blocks |lam| times a rotation, so V^T = that real DFT, s = |lam| (twice for each pair),
    U = V with each coefficient multiplied by the phase lam/|lam|. Entries are sorted by
    singular value, descending; R = D.
    """

    def __init__(self, channels: int, lam: Tensor) -> None:
        self.c = channels
        self.H, self.W = lam.shape[-2:]
        hw = self.H * self.W
        idx = torch.arange(hw, device=lam.device)
        conj = ((-(idx // self.W)) % self.H) * self.W + (-(idx % self.W)) % self.W
        self._self = idx[conj == idx]
        self._pair = idx[idx < conj]
        self._conj = conj[idx < conj]
        lam = lam.reshape(lam.shape[0], hw)
        # exact Hermitian symmetry (an FFT leaves round-off), so that U maps real to real
        lam = (lam + lam[:, conj].conj()) / 2
        mag = lam.abs()
        tiny = torch.finfo(mag.dtype).tiny
        phase = torch.where(mag > 0, lam / mag.clamp_min(tiny), torch.ones_like(lam))
        self._phase = phase[:, None]  # (1 or B, 1, HW) broadcast over channels
        s = torch.cat([mag[:, self._self], mag[:, self._pair], mag[:, self._pair]], 1)
        s = s[:, None].expand(-1, channels, -1).reshape(lam.shape[0], -1)
        s, order = torch.sort(s, dim=1, descending=True, stable=True)
        self._perm = order[0] if lam.shape[0] == 1 else order
        self._s = s[0] if lam.shape[0] == 1 else s

    def _coords(self, spec: Tensor) -> Tensor:
        """(.., HW) Hermitian complex coefficients -> (.., HW) real orthonormal coordinates."""
        r2 = math.sqrt(2.0)
        p = spec[..., self._pair]
        return torch.cat([spec[..., self._self].real, r2 * p.real, r2 * p.imag], -1)

    def _spectrum(self, c: Tensor) -> Tensor:
        """The inverse of _coords: real coordinates (.., HW) -> Hermitian coefficients."""
        ns, npair = self._self.numel(), self._pair.numel()
        a, re, im = c[..., :ns], c[..., ns : ns + npair], c[..., ns + npair :]
        r2 = math.sqrt(2.0)
        spec = torch.zeros(c.shape, dtype=torch.complex128 if c.dtype == torch.float64
                           else torch.complex64, device=c.device)
        spec[..., self._self] = a.to(spec.dtype)
        spec[..., self._pair] = torch.complex(re, im) / r2
        spec[..., self._conj] = torch.complex(re, -im) / r2
        return spec

    def singulars(self) -> Tensor:
        return self._s

    def _fwd(self, x: Tensor, phase: bool) -> Tensor:
        b = x.shape[0]
        spec = torch.fft.fft2(x.reshape(b, self.c, self.H, self.W), norm="ortho")
        spec = spec.reshape(b, self.c, -1)
        if phase:
            spec = spec * self._phase.conj().to(spec.dtype)
        return _gather(self._coords(spec).reshape(b, -1), self._perm)

    def _inv(self, z: Tensor, phase: bool) -> Tensor:
        b = z.shape[0]
        c = _scatter(_pad_to(z, self.c * self.H * self.W), self._perm).reshape(b, self.c, -1)
        spec = self._spectrum(c)
        if phase:
            spec = spec * self._phase.to(spec.dtype)
        x = torch.fft.ifft2(spec.reshape(b, self.c, self.H, self.W), norm="ortho").real
        return x.reshape(b, -1)

    def vt(self, x: Tensor) -> Tensor:
        return self._fwd(x, phase=False)

    def v(self, z: Tensor) -> Tensor:
        return self._inv(z, phase=False)

    def ut(self, y: Tensor) -> Tensor:
        return self._fwd(y, phase=True)

    def u(self, z: Tensor) -> Tensor:
        return self._inv(z, phase=True)
