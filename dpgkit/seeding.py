"""Seeds derived from (run seed, item index, step, purpose): no global RNG state is read or changed.

The same item gets the same draws whether it is restored alone, in a batch, or on another rank.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

__all__ = ["derive_seed", "generator", "randn_per_item"]


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed that depends on every key (ints and short strings), stable across runs."""
    text = "/".join(str(k) for k in keys).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def generator(*keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded by `derive_seed(*keys)`."""
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))


def randn_per_item(
    shape: Sequence[int], seed: int, indices: Sequence[int], *keys: int | str, like: torch.Tensor | None = None
) -> torch.Tensor:
    """Standard normals of shape (len(indices), *shape), item b drawn from (seed, indices[b], *keys).

    Drawn on the CPU so that the bits do not depend on the device, then moved to `like`'s device.
    """
    out = torch.stack(
        [torch.randn(tuple(shape), generator=generator(seed, int(idx), *keys)) for idx in indices]
    )
    if like is not None:
        out = out.to(device=like.device, dtype=like.dtype)
    return out
