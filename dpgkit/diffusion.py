"""Variance-preserving diffusion math in guided-diffusion's conventions: pure functions over tensors.

A `Schedule` is a (possibly respaced) chain of S steps. Step index ``i`` (0..S-1) runs the chain;
``schedule.timesteps[i]`` is the timestep of the original T-step schedule that the network sees.
Every function is batched over ``i`` (a LongTensor of shape (B,)) and broadcasts over NCHW.

Precision: as guided-diffusion (Dhariwal & Nichol 2021, `gaussian_diffusion.py`), every coefficient
that combines schedule entries (posterior-mean coefficients, sqrt(1/abar), sigma of DDIM, ...) is
formed in float64 from the float64 schedule and cast to the images' dtype only at the end. Casting
abar and beta first and combining them in float32 loses up to 3e-4 relative at the last steps,
where 1 - abar and beta are ~1e-4 and cancel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Schedule",
    "at_step",
    "linear_betas",
    "cosine_betas",
    "space_timesteps",
    "tweedie_x0",
    "eps_from_x0",
    "predict_x0",
    "predict_eps",
    "q_sample",
    "q_posterior",
    "model_log_variance",
    "ddpm_step",
    "ddim_step",
]


def linear_betas(num_timesteps: int = 1000) -> Tensor:
    """guided-diffusion's linear schedule: 1e-4..0.02 at T=1000, scaled by 1000/T otherwise."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int = 1000, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal's cosine schedule, betas clipped at `max_beta`."""

    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def space_timesteps(num_timesteps: int, spec: str | int | list[int]) -> list[int]:
    """The kept timesteps, as guided-diffusion's `space_timesteps` chooses them.

    `spec` is "ddimN" (an even stride giving exactly N steps), "N" (N steps evenly spread), or
    "a,b,c" (the range split into equal sections, a steps in the first, b in the second, ...).
    """
    if isinstance(spec, str) and spec.startswith("ddim"):
        wanted = int(spec[len("ddim") :])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == wanted:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot make {wanted} DDIM steps with an integer stride out of {num_timesteps}")
    if isinstance(spec, int):
        counts = [spec]
    elif isinstance(spec, str):
        counts = [int(c) for c in spec.split(",")]
    else:
        counts = list(spec)
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for k, count in enumerate(counts):
        size = size_per + (1 if k < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps out of a section of {size} timesteps")
        if count < 0:
            raise ValueError(f"section step counts must be >= 0, got {count} in {spec!r}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the fractional stride (not stride * j): guided-diffusion does, and the two
        # round differently at .5 ties (e.g. 21 steps of 1000 keep 499, not 500).
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    if not kept:
        raise ValueError(f"respacing {spec!r} keeps no timesteps out of {num_timesteps}")
    return sorted(set(kept))


@dataclass(frozen=True)
class Schedule:
    """A diffusion chain: its betas (float64, shape (S,)) and the original timestep of each step."""

    betas: Tensor
    timesteps: Tensor
    num_train_timesteps: int

    @classmethod
    def from_betas(cls, betas: Tensor) -> Schedule:
        betas = betas.to(torch.float64)
        return cls(betas, torch.arange(len(betas)), len(betas))

    @classmethod
    def linear(cls, num_timesteps: int = 1000) -> Schedule:
        return cls.from_betas(linear_betas(num_timesteps))

    @classmethod
    def cosine(cls, num_timesteps: int = 1000) -> Schedule:
        return cls.from_betas(cosine_betas(num_timesteps))

    @classmethod
    def named(cls, name: str, num_timesteps: int = 1000) -> Schedule:
        if name not in ("linear", "cosine"):
            raise ValueError(f"unknown beta schedule {name!r}: expected 'linear' or 'cosine'")
        return cls.linear(num_timesteps) if name == "linear" else cls.cosine(num_timesteps)

    def respace(self, spec: str | int | list[int] | None) -> Schedule:
        """Keep a subset of the steps; betas recomputed so that abar is unchanged on them."""
        if spec is None or spec == "" or spec == len(self):
            return self
        return self.subset(space_timesteps(len(self), spec))

    def subset(self, keep: list[int]) -> Schedule:
        """Keep exactly the steps `keep` (indices into this chain, ascending, no repeats); betas
        recomputed so that abar is unchanged on them (a solver's own spacing, e.g. DiffPIR's)."""
        keep = [int(k) for k in keep]
        if not keep or keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= len(self):
            raise ValueError(f"expected ascending, distinct steps in [0, {len(self) - 1}], got {keep}")
        abar = self.alphas_cumprod[keep]
        prev = torch.cat([abar.new_ones(1), abar[:-1]])
        return Schedule(1 - abar / prev, self.timesteps[keep], self.num_train_timesteps)

    def __len__(self) -> int:
        return len(self.betas)

    @property
    def alphas(self) -> Tensor:
        return 1 - self.betas

    @property
    def alphas_cumprod(self) -> Tensor:
        return torch.cumprod(self.alphas, 0)

    @property
    def alphas_cumprod_prev(self) -> Tensor:
        abar = self.alphas_cumprod
        return torch.cat([abar.new_ones(1), abar[:-1]])

    @property
    def posterior_variance(self) -> Tensor:
        """Var q(x_{i-1} | x_i, x0) = beta_i (1 - abar_{i-1}) / (1 - abar_i)."""
        return self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)

    @property
    def posterior_mean_coef1(self) -> Tensor:
        """Coefficient of x0 in the posterior mean: beta_i sqrt(abar_{i-1}) / (1 - abar_i), float64."""
        return self.betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)

    @property
    def posterior_mean_coef2(self) -> Tensor:
        """Coefficient of x_i in the posterior mean: (1 - abar_{i-1}) sqrt(alpha_i) / (1 - abar_i), float64."""
        return (1 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1 - self.alphas_cumprod)

    @property
    def posterior_log_variance_clipped(self) -> Tensor:
        """log of the posterior variance with its first entry (0) replaced by the second."""
        var = self.posterior_variance
        return torch.log(torch.cat([var[1:2], var[1:]]))


def at_step(values: Tensor, i: Tensor, like: Tensor) -> Tensor:
    """values[i] shaped (B, 1, ..., 1) to broadcast against `like`, in its dtype and device.

    Indexes where `values` lives (the float64 schedule stays on the CPU: some devices have no
    float64) and casts only the B gathered entries.
    """
    out = values[i.to(values.device)].to(like.device, like.dtype)
    return out.reshape(-1, *([1] * (like.dim() - 1)))


def _at64(values: Tensor, i: Tensor, like: Tensor) -> Tensor:
    """values[i] in float64, on the CPU, shaped (B, 1, ..., 1) to broadcast against `like`."""
    out = values.to(torch.float64)[i.to(values.device)].cpu()
    return out.reshape(-1, *([1] * (like.dim() - 1)))


def _cast(coef: Tensor, like: Tensor) -> Tensor:
    return coef.to(like.device, like.dtype)


def tweedie_x0(x_t: Tensor, eps: Tensor, abar_t: Tensor, clip: bool = True) -> Tensor:
    """E[x0 | x_t] = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), clipped to [-1, 1] if `clip`."""
    x0 = (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    return x0.clamp(-1, 1) if clip else x0


def eps_from_x0(x_t: Tensor, x0: Tensor, abar_t: Tensor) -> Tensor:
    """The noise that maps x0 to x_t: (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
    return (x_t - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()


def predict_x0(schedule: Schedule, i: Tensor, x_t: Tensor, eps: Tensor, clip: bool = True) -> Tensor:
    """Tweedie's x0 at step i with float64 coefficients: sqrt(1/abar) x_t - sqrt(1/abar - 1) eps.

    The same value as `tweedie_x0`, in guided-diffusion's form (`_predict_xstart_from_eps`): both
    coefficients formed in float64 and cast to x_t's dtype. Clipped to [-1, 1] if `clip`.
    """
    abar = _at64(schedule.alphas_cumprod, i, x_t)
    x0 = _cast((1 / abar).sqrt(), x_t) * x_t - _cast((1 / abar - 1).sqrt(), x_t) * eps
    return x0.clamp(-1, 1) if clip else x0


def predict_eps(schedule: Schedule, i: Tensor, x_t: Tensor, x0: Tensor) -> Tensor:
    """The noise that maps x0 to x_t at step i, float64 coefficients (guided-diffusion's
    `_predict_eps_from_xstart`): (sqrt(1/abar) x_t - x0) / sqrt(1/abar - 1)."""
    abar = _at64(schedule.alphas_cumprod, i, x_t)
    return (_cast((1 / abar).sqrt(), x_t) * x_t - x0) / _cast((1 / abar - 1).sqrt(), x_t)


def q_sample(schedule: Schedule, i: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) noise (coefficients in float64, then cast)."""
    abar = _at64(schedule.alphas_cumprod, i, x0)
    return _cast(abar.sqrt(), x0) * x0 + _cast((1 - abar).sqrt(), x0) * noise


def q_posterior(schedule: Schedule, i: Tensor, x0: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of q(x_{i-1} | x_i, x0); coefficients formed in float64, then cast."""
    coef_x0 = at_step(schedule.posterior_mean_coef1, i, x_t)
    coef_xt = at_step(schedule.posterior_mean_coef2, i, x_t)
    return coef_x0 * x0 + coef_xt * x_t, at_step(schedule.posterior_variance, i, x_t)


def model_log_variance(
    schedule: Schedule, i: Tensor, like: Tensor, kind: str = "fixed_small", values: Tensor | None = None
) -> Tensor:
    """log sigma_i^2 of the reverse step.

    kind: "fixed_small" (the posterior variance, clipped at i=0), "fixed_large" (beta_i, with the
    posterior variance at i=0), or "learned_range" (`values` in [-1, 1] interpolate between the two
    in log space, as the guided-diffusion checkpoints with learned sigma do).
    """
    small = at_step(schedule.posterior_log_variance_clipped, i, like)
    if kind == "fixed_small":
        return small.expand_as(like)
    large_var = torch.cat([schedule.posterior_variance[1:2], schedule.betas[1:]])
    if kind == "fixed_large":
        return at_step(large_var.log(), i, like).expand_as(like)
    if kind == "learned_range":
        if values is None:
            raise ValueError("learned_range variance needs the network's variance channels")
        frac = (values + 1) / 2
        return frac * at_step(schedule.betas.log(), i, like) + (1 - frac) * small
    raise ValueError(f"unknown variance kind {kind!r}: fixed_small, fixed_large or learned_range")


def _not_last(i: Tensor, like: Tensor) -> Tensor:
    return (i != 0).to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def ddpm_step(
    schedule: Schedule, i: Tensor, x_t: Tensor, x0: Tensor, noise: Tensor, log_variance: Tensor | None = None
) -> Tensor:
    """Ancestral step: the posterior mean of q(x_{i-1} | x_i, x0) + sigma_i z, no noise at i = 0."""
    mean, _ = q_posterior(schedule, i, x0, x_t)
    if log_variance is not None:
        std = (0.5 * log_variance).exp()
    else:
        std = at_step(schedule.posterior_variance.sqrt(), i, x_t)
    return mean + _not_last(i, x_t) * std * noise


def ddim_step(
    schedule: Schedule, i: Tensor, x_t: Tensor, x0: Tensor, eta: float = 0.0, noise: Tensor | None = None
) -> Tensor:
    """DDIM step with epshat recomputed from (x_t, x0); eta = 1 gives the DDPM posterior variance.

    sqrt(abar_{i-1}), sigma_i and sqrt(1 - abar_{i-1} - sigma_i^2) are formed in float64, then cast.
    """
    abar = _at64(schedule.alphas_cumprod, i, x_t)
    abar_prev = _at64(schedule.alphas_cumprod_prev, i, x_t)
    eps = predict_eps(schedule, i, x_t, x0)
    sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
    c_eps = (1 - abar_prev - sigma**2).clamp_min(0).sqrt()
    out = _cast(abar_prev.sqrt(), x_t) * x0 + _cast(c_eps, x_t) * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        out = out + _not_last(i, x_t) * _cast(sigma, x_t) * noise
    return out
