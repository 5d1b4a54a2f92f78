"""The Rao-Blackwellized DPG direction: the same expectation as DPG's, without its null-space noise.

For a linear A whose row space is spanned by the orthonormal columns of V (D x m), split each
Monte Carlo direction eps_i = V a_i + b_i with a_i = V^T eps_i ~ N(0, I_m) and b_i in the null
space, independent of a_i. The residual y - A(x0hat + r eps_i) = y - A(x0hat + r V a_i) depends on
eps_i through a_i alone, hence so do the rewards, the leave-one-out weights w_i and the temperature,
and E[sum_i w_i b_i | a_1..a_N] = 0. Conditioning DPG's v = -(1/(N r)) sum_i w_i eps_i on the a's
(Rao-Blackwell) gives

    v_RB = -(1 / (N r)) V sum_i w_i a_i,        a_i ~ N(0, I_m),

with exactly DPG's expectation and a smaller covariance (the null-space part of DPG's, which is
nearly all of it when m << D, is gone), from N x m normals instead of N x D. Rewards, leave-one-out
weights, Z and r are the published ones (`kernels.reference`, spec steps 1 to 6); only the draw
changes. The estimator is an addition of this package, not part of the DPG paper (Tang et al.,
AISTATS 2024); the identity is the Rao-Blackwell theorem applied to its score-function estimator.

The operator describes its row space as plain data, `operator.row_space(image_shape)` (read here by
duck typing, see `dpgkit.operators.Operator.row_space`): "select" (masks), "avgpool" (average-pool
super-resolution), "channel_mean" (colorization), "identity" (denoising) and "basis" (V and V^T as
functions, from any SVD view: bicubic SR, blur). For the first three A V is diagonal in a layout of
y, (A V a)_o = coef_o a_o at outputs `out_index`, so a state's measurement is A x0hat + r coef * a
and nothing of size D is formed per sample: memory O(chunk x m + D). "basis" forms the states
x0hat + r V a_i and applies the operator itself (O(chunk x D)). When V = I (m = D) the estimator is
the published one, and the published code is run (the same numbers).

Two implementations on the same noise stream (a[i, k] = stream(seed)[i, k], k < m): `rb_direction_eager`
(the readable definition) and `rb_direction_streamed` (one pass, blocks of STREAM_BLOCK samples, the
leave-one-out sum accumulated online relative to a running maximum in float64: the same result up to
float64 rounding, and bit for bit whatever the chunk size).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from .fusion import energy_kind
from .reference import (
    STREAM_BLOCK,
    NoiseStream,
    direction_from_energies,
    log_rewards,
    torch_normal,
    weighted_sum,
)

__all__ = ["RowSpace", "row_space_of", "rb_direction_eager", "rb_direction_streamed", "threaded_normal",
           "DIAGONAL_KINDS"]

DIAGONAL_KINDS = ("select", "avgpool", "channel_mean")
_KINDS = (*DIAGONAL_KINDS, "identity", "basis")


@dataclass(frozen=True)
class RowSpace:
    """A row space V (D x m) for images `image_shape`, checked against the operator.

    coef (m,) and out_index (m,) or None: for the diagonal kinds, A V a = coef * a at the
    flattened outputs out_index of y (None: all outputs, in order); None for "basis".
    """

    kind: str
    image_shape: tuple[int, int, int]
    rank: int
    coef: Tensor | None
    out_index: Tensor | None
    out_numel: int
    desc: dict

    @property
    def numel(self) -> int:
        return math.prod(self.image_shape)

    def lift(self, a: Tensor) -> Tensor:
        """V a: (n, m) -> (n, D), in a's dtype."""
        c, h, w = self.image_shape
        n = a.shape[0]
        if self.kind == "identity":
            return a
        if self.kind == "select":
            out = torch.zeros(n, self.numel, device=a.device, dtype=a.dtype)
            return out.index_copy_(1, self.desc["index"].to(a.device), a)
        if self.kind == "avgpool":
            f = int(self.desc["factor"])
            blocks = a.view(n, c, h // f, 1, w // f, 1) / f
            return blocks.expand(n, c, h // f, f, w // f, f).reshape(n, self.numel)
        if self.kind == "channel_mean":
            return (a.view(n, 1, h * w) / math.sqrt(c)).expand(n, c, h * w).reshape(n, self.numel)
        return self.desc["v"](a).reshape(n, self.numel)

    def project(self, x: Tensor) -> Tensor:
        """V^T x: (n, D) -> (n, m)."""
        c, h, w = self.image_shape
        n = x.shape[0]
        if self.kind == "identity":
            return x
        if self.kind == "select":
            return x[:, self.desc["index"].to(x.device)]
        if self.kind == "avgpool":
            f = int(self.desc["factor"])
            return x.view(n, c, h // f, f, w // f, f).sum((3, 5)).reshape(n, -1) / f
        if self.kind == "channel_mean":
            return x.view(n, c, h * w).sum(1) / math.sqrt(c)
        return self.desc["vt"](x).reshape(n, self.rank)


_POOL: ThreadPoolExecutor | None = None


def threaded_normal(seed: int, sample_start: int, num_samples: int, numel: int,
                    device: torch.device | str = "cpu", out: Tensor | None = None) -> Tensor:
    """`reference.torch_normal`, bit for bit, with its whole STREAM_BLOCK blocks drawn in parallel.

    torch draws from a seeded CPU generator on one thread; the stream's blocks have generators of
    their own, so threads (torch releases the GIL) may draw them at once, one per torch thread.
    `out` (num_samples, numel) float32: written in place and returned (a buffer reused across
    chunks is not faulted in afresh each time). On other devices, or with one thread, the blocks
    are drawn one after another.
    """
    global _POOL
    device = torch.device(device)
    if out is None:
        out = torch.empty(num_samples, numel, device=device)
    elif tuple(out.shape) != (num_samples, numel) or out.dtype != torch.float32:
        raise ValueError(f"out must be ({num_samples}, {numel}) float32, got {tuple(out.shape)} {out.dtype}")
    workers = torch.get_num_threads()
    first = -(-sample_start // STREAM_BLOCK) * STREAM_BLOCK
    last = (sample_start + num_samples) // STREAM_BLOCK * STREAM_BLOCK
    if last <= first:  # no whole block
        out.copy_(torch_normal(seed, sample_start, num_samples, numel, device))
        return out
    if first > sample_start:  # the head of a block begun earlier
        out[: first - sample_start] = torch_normal(seed, sample_start, first - sample_start, numel, device)
    if last < sample_start + num_samples:  # the head of a block that goes on
        out[last - sample_start :] = torch_normal(seed, last, sample_start + num_samples - last, numel, device)

    def draw(lo: int) -> None:
        with torch.no_grad():
            torch_normal_into(seed, lo, out[lo - sample_start : lo - sample_start + STREAM_BLOCK])

    blocks = range(first, last, STREAM_BLOCK)
    if device.type == "cpu" and workers >= 2 and len(blocks) >= 2:
        if _POOL is None or _POOL._max_workers != workers:
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dpg-normal")
        list(_POOL.map(draw, blocks))
    else:
        for lo in blocks:
            draw(lo)
    return out


def torch_normal_into(seed: int, block_start: int, out: Tensor) -> None:
    """One whole block of `torch_normal` (block_start a multiple of STREAM_BLOCK) drawn into `out`."""
    k = block_start // STREAM_BLOCK
    gen = torch.Generator(device=out.device).manual_seed((seed + k * 0x9E3779B97F4A7C15) % 2**63)
    torch.randn(STREAM_BLOCK, out.shape[1], generator=gen, device=out.device, out=out)


def _parse(desc: dict, shape: tuple[int, int, int], out_numel: int, device: torch.device) -> RowSpace:
    kind = desc.get("kind") if isinstance(desc, dict) else None
    if kind not in _KINDS:
        raise ValueError(f"a row space must be a dict with a 'kind' in {_KINDS}, got {desc!r}")
    c, h, w = shape
    d = c * h * w
    if kind == "identity":
        return RowSpace(kind, shape, d, None, None, out_numel, desc)
    if kind == "select":
        index = torch.as_tensor(desc["index"]).to(device=device, dtype=torch.int64).reshape(-1)
        weight = torch.as_tensor(desc["weight"]).to(device=device, dtype=torch.float32).reshape(-1)
        if index.shape != weight.shape or (index.numel() and (int(index.min()) < 0 or int(index.max()) >= d)):
            raise ValueError(f"a 'select' row space needs index and weight of one length with 0 <= index < {d}, "
                             f"got {tuple(index.shape)} and {tuple(weight.shape)}")
        desc = {**desc, "index": index}
        return RowSpace(kind, shape, index.numel(), weight, index, out_numel, desc)
    if kind == "avgpool":
        f = int(desc["factor"])
        if f < 1 or h % f or w % f:
            raise ValueError(f"average pooling by {f} needs the image size divisible by it, got {h}x{w}")
        m = c * (h // f) * (w // f)
        return RowSpace(kind, shape, m, torch.full((m,), 1.0 / f, device=device), None, out_numel, desc)
    if kind == "channel_mean":
        if int(desc["channels"]) != c:
            raise ValueError(f"a channel mean over {desc['channels']} channels for images with {c}")
        m = h * w
        return RowSpace(kind, shape, m, torch.full((m,), 1.0 / math.sqrt(c), device=device), None, out_numel, desc)
    rank = int(desc["rank"])
    if not 0 <= rank <= d:
        raise ValueError(f"a 'basis' row space needs 0 <= rank <= {d}, got {rank}")
    return RowSpace(kind, shape, rank, None, None, out_numel, desc)


def _check(space: RowSpace, operator, x0hat: Tensor) -> str | None:
    """Why the description does not describe this operator, or None.

    On one pseudo-random image u: the columns of V are orthonormal (V^T V a = a), A u = A V V^T u
    (the complement of V is in the null space), and for the diagonal kinds A V a = coef * a at
    out_index and 0 elsewhere.
    """
    g = torch.Generator(device="cpu").manual_seed(0x5EED)
    d, m = space.numel, space.rank
    u = torch.randn(1, d, generator=g).to(x0hat.device, x0hat.dtype)
    a = torch.randn(1, m, generator=g).to(x0hat.device, x0hat.dtype)
    shape = (1, *space.image_shape)

    def close(p: Tensor, q: Tensor, what: str) -> str | None:
        tol = 1e-4 * max(1.0, float(q.abs().max()) if q.numel() else 0.0)
        if p.shape != q.shape or not torch.allclose(p.float(), q.float(), rtol=1e-4, atol=tol):
            return f"{type(operator).__name__}.row_space ({space.kind}): {what}"
        return None

    va = space.lift(a)
    why = close(space.project(va), a, "V's columns are not orthonormal")
    if why is None:
        au = operator(u.view(shape)).reshape(-1)
        why = close(operator(space.lift(space.project(u)).view(shape)).reshape(-1), au,
                    "A (I - V V^T) is not zero: V does not span the row space")
    if why is None and space.coef is not None:
        expect = torch.zeros(space.out_numel, device=x0hat.device, dtype=torch.float32)
        pos = space.out_index if space.out_index is not None else torch.arange(m, device=x0hat.device)
        expect[pos] = space.coef * a[0].float()
        why = close(operator(va.view(shape)).reshape(-1), expect, "A V a is not coef * a at out_index")
    return why


def row_space_of(operator, x0hat: Tensor, ax0: Tensor | None = None) -> RowSpace | str:
    """The row space of an item-level operator at x0hat (C, H, W), checked, or why there is none.

    Reads `operator.row_space(image_shape)` by duck typing (None or no such method: none).
    """
    shape = tuple(int(s) for s in x0hat.shape)
    if len(shape) != 3:
        return f"images must be (C, H, W), got {shape}"
    get = getattr(operator, "row_space", None)
    if get is None or not getattr(operator, "is_linear", False):
        return f"{type(operator).__name__} is not a linear operator with a row space"
    desc = get(shape)
    if desc is None:
        return f"{type(operator).__name__} does not describe its row space"
    ax0 = operator(x0hat[None]) if ax0 is None else ax0
    space = _parse(desc, shape, ax0.numel(), x0hat.device)
    why = _check(space, operator, x0hat)
    return space if why is None else why


def _diagonal_parts(space: RowSpace, y: Tensor, ax0: Tensor, noise) -> tuple[Tensor, Tensor, Tensor]:
    """(y at the touched outputs, A x0hat there, the energy of the untouched outputs (float64)).

    The untouched outputs do not depend on the state: their energy is the same for every sample.
    Splitting the energy so needs it to add over outputs (true of every dpgkit noise model); when
    it does not on x0hat, the whole measurement is kept instead.
    """
    yf, af = y.reshape(1, -1), ax0.reshape(1, -1).to(y.dtype)
    if space.out_index is None:
        return yf, af, torch.zeros((), dtype=torch.float64, device=y.device)
    keep = torch.zeros(yf.shape[1], dtype=torch.bool, device=y.device).index_fill_(0, space.out_index, True)
    const = noise.energy(yf[:, ~keep], af[:, ~keep]).double()[0]
    whole = noise.energy(yf, af).double()[0]
    part = noise.energy(yf[:, space.out_index], af[:, space.out_index]).double()[0] + const
    if not torch.allclose(whole, part, rtol=1e-5, atol=1e-6):
        raise ValueError(f"{type(noise).__name__}'s energy does not add over measurement entries; "
                         "the Rao-Blackwellized estimator needs it to")
    return yf[:, space.out_index], af[:, space.out_index], const


def _energies(space: RowSpace, x0hat: Tensor, y: Tensor, operator, noise, r: float, a: Tensor,
              parts: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
    """E(y, A(x0hat + r V a_i)) for a (n, m): (n,) float64."""
    if parts is not None:  # diagonal: A x0hat + r coef * a at the touched outputs
        yk, ak, const = parts
        kind = energy_kind(noise)
        if kind is None:
            return noise.energy(yk, ak + (r * space.coef.to(a.dtype)) * a).double() + const
        e = (yk - ak).reshape(-1)
        rc = (r * space.coef).to(a.dtype)
        if kind == "l2":
            # ||e - r c a||^2 = ||e||^2 + (a^2) . (r c)^2 - 2 a . (r c e): two matrix-vector products,
            # and the part that differs between samples is not rounded against ||e||^2
            if rc.numel() and bool((rc == rc[0]).all()):  # one coefficient (pooling, channel means, binary masks)
                quad = torch.linalg.vector_norm(a, dim=1).square() * rc[0].square()
            else:
                quad = torch.mv(a.square(), rc.square())
            spread = quad - 2.0 * torch.mv(a, rc * e.to(a.dtype))
            return e.double().square().sum() + spread.double() + const
        return torch.addcmul(e.to(a.dtype), a, rc, value=-1.0).abs_().sum(1).double() + const
    # a general operator may round differently for another batch size: apply it to whole blocks
    # of STREAM_BLOCK samples, so that the energies do not depend on the chunking
    out = []
    for s in range(0, a.shape[0], STREAM_BLOCK):
        states = x0hat.reshape(1, -1) + r * space.lift(a[s : s + STREAM_BLOCK].to(x0hat.dtype))
        out.append(noise.energy(y.unsqueeze(0), operator(states.view(-1, *x0hat.shape))).double())
    return torch.cat(out)


def _setup(space: RowSpace, x0hat: Tensor, y: Tensor, operator, noise):
    if space.coef is None:
        return None
    return _diagonal_parts(space, y, operator(x0hat[None]), noise)


def rb_direction_eager(
    x0hat: Tensor, y: Tensor, operator, noise, r: Tensor, z: Tensor, z_raw: Tensor,
    num_samples: int, seed: int, space: RowSpace | None = None, stream: NoiseStream = torch_normal,
) -> tuple[Tensor, Tensor]:
    """The definition, holding all N x m coordinates: one image x0hat (C, H, W), its measurement y,
    an item-level operator, `space` its row space (from `row_space_of` when None).

    Returns (v_unit (C, H, W), m float64) with v_RB = exp(m) v_unit, as `reference.dpg_direction_eager`.
    Raises ValueError when the operator has no usable row space.
    """
    with torch.no_grad():
        space = _require(operator, x0hat) if space is None else space
        rr = float(r)
        a = stream(seed, 0, num_samples, space.rank, x0hat.device)
        energies = _energies(space, x0hat, y, operator, noise, rr, a, _setup(space, x0hat, y, operator, noise))
        w, m = direction_from_energies(energies, z, z_raw, noise.reward_shift_uses_z_raw)
        s = weighted_sum(w, a)
        return (-space.lift(s[None])[0] / rr).view_as(x0hat).to(x0hat.dtype), m


def rb_direction_streamed(
    x0hat: Tensor, y: Tensor, operator, noise, r: Tensor, z: Tensor, z_raw: Tensor,
    num_samples: int, seed: int, space: RowSpace | None = None, chunk_size: int = 256,
    stream: NoiseStream = threaded_normal,
) -> tuple[Tensor, Tensor]:
    """As `rb_direction_eager` in one pass over the samples, holding chunk_size x m coordinates.

    chunk_size is rounded up to a whole number of STREAM_BLOCK samples. With p_i = exp(log p_i - M)
    (M the largest log-reward), S = sum p_i and Q = sum a_i, the leave-one-out sum is

        sum_i w_i a_i = N / (N - 1) (sum_i (p_i - c) a_i - (S / N - c) Q)    for any constant c;

    c is the first block's mean reward, so that the float32 products of each block carry no
    cancellation when the rewards are nearly equal. The sums are kept in float64 relative to the
    running maximum, rescaled when it grows, block by block (so the result does not depend on
    chunk_size), each block's products taken in float32.
    """
    if num_samples < 2:
        raise ValueError(f"DPG needs at least 2 Monte Carlo samples for its baseline, got {num_samples}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    with torch.no_grad():
        space = _require(operator, x0hat) if space is None else space
        rr, dev, k = float(r), x0hat.device, space.rank
        parts = _setup(space, x0hat, y, operator, noise)
        shift = z_raw if noise.reward_shift_uses_z_raw else torch.zeros_like(z_raw)
        chunk = -(-chunk_size // STREAM_BLOCK) * STREAM_BLOCK
        f64 = dict(dtype=torch.float64, device=dev)
        top = torch.tensor(-math.inf, **f64)  # the running maximum M of the log-rewards
        log_c = None  # log c + M, fixed after the first block
        centred = torch.zeros(k, **f64)  # sum (p_i - c) a_i, relative to M
        total = torch.zeros((), **f64)  # S, relative to M
        plain = torch.zeros(k, **f64)  # Q
        buffer = torch.empty(min(chunk, num_samples), k, device=dev) if stream is threaded_normal else None
        for start in range(0, num_samples, chunk):
            n = min(chunk, num_samples - start)
            if buffer is not None:
                a = threaded_normal(seed, start, n, k, dev, out=buffer[:n])
            else:
                a = stream(seed, start, n, k, dev)
            lp = log_rewards(_energies(space, x0hat, y, operator, noise, rr, a, parts), z, shift)
            # per block of STREAM_BLOCK samples: its running maximum, then its float32 products
            # in one batched product, combined block by block in float64
            nb = -(-n // STREAM_BLOCK)
            pad = torch.full((nb * STREAM_BLOCK,), -math.inf, **f64)
            pad[:n] = lp
            block_top = pad.view(nb, STREAM_BLOCK).max(1).values
            if log_c is None:
                log_c = torch.logsumexp(lp[:STREAM_BLOCK], 0) - math.log(min(n, STREAM_BLOCK))
            tops = torch.cummax(torch.maximum(block_top, top), 0).values
            p = torch.exp(pad.view(nb, STREAM_BLOCK) - tops[:, None])  # 0 in the padding
            coeffs = torch.stack([p - torch.exp(log_c - tops)[:, None], torch.ones_like(p)], 1).to(a.dtype)
            full = n // STREAM_BLOCK
            sums = torch.bmm(coeffs[:full], a[: full * STREAM_BLOCK].view(full, STREAM_BLOCK, k)).double()
            if full < nb:  # a last, partial block
                tail = coeffs[full, :, : n - full * STREAM_BLOCK] @ a[full * STREAM_BLOCK :]
                sums = torch.cat([sums, tail.double()[None]])
            block_total = p.sum(1)
            for b in range(nb):
                rescale = torch.exp(top - tops[b])
                centred = centred * rescale + sums[b, 0]
                plain += sums[b, 1]
                total = total * rescale + block_total[b]
                top = tops[b]
        n_all = float(num_samples)
        mean_minus_c = total / n_all - torch.exp(log_c - top)
        s = (centred - mean_minus_c * plain) / (n_all - 1)  # (1/N) sum_i w_i a_i
        return (-space.lift(s[None])[0] / rr).view_as(x0hat).to(x0hat.dtype), top


def _require(operator, x0hat: Tensor) -> RowSpace:
    space = row_space_of(operator, x0hat)
    if isinstance(space, str):
        raise ValueError(f"the Rao-Blackwellized DPG estimator needs a linear operator with a row space: {space}")
    return space
