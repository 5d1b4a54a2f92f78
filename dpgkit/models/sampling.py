"""Unconditional samples of a diffusion prior (to look at it, or to score it with FID)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..diffusion import at_step, ddim_step, tweedie_x0
from ..seeding import generator
from .base import DiffusionModel

__all__ = ["sample_prior"]


@torch.no_grad()
def sample_prior(
    model: DiffusionModel, n: int, steps: int = 50, seed: int = 0, batch_size: int = 100,
    eta: float = 1.0, progress: bool = False,
) -> Tensor:
    """n unconditional samples (n, C, H, W) in [-1, 1].

    DDIM (Song et al. 2021, Eq. 12) over `steps` respaced steps; eta = 1 adds the ancestral noise
    of DDPM, eta = 0 is deterministic. Sample k draws from its own generator seeded by (seed, k),
    so it does not depend on `batch_size`.
    """
    from tqdm.auto import tqdm

    if n < 1 or steps < 1:
        raise ValueError(f"expected n >= 1 and steps >= 1, got n={n}, steps={steps}")
    sched = model.schedule.respace(f"ddim{steps}")
    out = []
    for start in tqdm(range(0, n, batch_size), disable=not progress, desc="sampling"):
        ks = list(range(start, min(n, start + batch_size)))
        gens = [generator(seed, k, "sample") for k in ks]

        def draw(gens=gens) -> Tensor:
            return torch.stack([torch.randn(model.image_shape, generator=g) for g in gens])

        x = draw()
        for i in reversed(range(len(sched))):
            i_vec = torch.full((len(ks),), i, dtype=torch.long)
            t_vec = sched.timesteps[i_vec]
            eps = model.eps(x, t_vec)
            x0 = tweedie_x0(x, eps, at_step(sched.alphas_cumprod, i_vec, x))
            x = ddim_step(sched, i_vec, x, x0, eta=eta, noise=draw() if eta > 0 else None)
        out.append(x.clamp(-1, 1))
    return torch.cat(out)
