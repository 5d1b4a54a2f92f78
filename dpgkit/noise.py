"""Measurement noise: simulation, and the likelihood terms that guidance uses.

Images are on the [-1, 1] scale; measurements are in the operator's own units, which the operator
declares as `measurement_unit` ("picture": the [-1, 1] image scale; "magnitude": non-negative
values of any size; "real": anything). A noise model either simulates y with E[y] = A(x) in those
units or refuses the operator (`check`, which `Task.measure` calls) with an error naming the unit
it needs. Each noise model gives DPG its residual energy (squared L2 for Gaussian, L1 for Poisson),
its temperature Z and its policy width r (spec, steps 1 and 2), and DPS its data-fidelity term.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["NoiseModel", "Gaussian", "Poisson", "Noiseless"]


def _flat(x: Tensor, keep: int) -> Tensor:
    return x.reshape(*x.shape[:keep], -1)


class NoiseModel(ABC):
    """y = noise(A(x)). Energies reduce over all but the leading `batch_dims` dimensions.

    `energy_kind` names the energy for the fused kernels as plain data: "l2" (squared L2),
    "l1", or None (not fused). A subclass that overrides `energy` without naming its kind again
    gets None, so a custom energy is never fused as a stock one.
    """

    energy_kind: str | None = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "energy" in cls.__dict__ and "energy_kind" not in cls.__dict__:
            cls.energy_kind = None

    #: the operators' measurement units this model simulates (`Operator.measurement_unit`)
    units: tuple[str, ...] = ("picture", "magnitude", "real")

    def check(self, operator) -> str:
        """The operator's measurement unit if this model can simulate it; ValueError otherwise.

        Reads `operator.measurement_unit` (operators that do not declare one count as "real").
        Pass the result to `simulate(..., unit=...)`.
        """
        unit = getattr(operator, "measurement_unit", "real")
        if unit not in self.units:
            raise ValueError(
                f"{self!r} needs a measurement in one of the units {self.units}, but {operator!r} "
                f"declares measurement_unit={unit!r}; use Gaussian noise, or an operator that "
                "declares its unit (e.g. BlackBox(fn, measurement_unit='picture'))"
            )
        return unit

    @abstractmethod
    def simulate(self, ax: Tensor, generators: Sequence[torch.Generator], unit: str = "picture") -> Tensor:
        """Noisy measurement of `ax` (B, ...), item b drawn from generators[b] (CPU generators).

        `unit`: the operator's measurement unit (from `check`); E[y] = ax in that unit.
        """

    @abstractmethod
    def energy(self, y: Tensor, ax: Tensor, batch_dims: int = 1) -> Tensor:
        """DPG's residual energy per sample: ||y - ax||^2 (Gaussian) or ||y - ax||_1 (Poisson)."""

    @abstractmethod
    def temperature(self, z_raw: Tensor, z_prev: Tensor | None) -> Tensor:
        """Z from this step's energy of x0hat and the previous Z (None at the first step)."""

    @abstractmethod
    def width(self, z: Tensor, znorm: float, r_min: float) -> Tensor:
        """The policy's standard deviation r from the temperature Z."""

    @property
    def reward_shift_uses_z_raw(self) -> bool:
        """Whether log-rewards are -(E_i - Z_raw) / Z (Gaussian) rather than -E_i / Z."""
        return False

    def fidelity(self, y: Tensor, ax: Tensor) -> Tensor:
        """DPS's data term per image (B,): ||y - A(x0hat)||_2 (Chung et al. 2023, Algorithm 1)."""
        return _flat(y - ax, 1).norm(dim=-1)


class Gaussian(NoiseModel):
    """Additive white Gaussian noise of std `sigma` on the [-1, 1] scale (paper: 0.05)."""

    energy_kind = "l2"

    def __init__(self, sigma: float = 0.05) -> None:
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.sigma = float(sigma)

    def __repr__(self) -> str:
        return f"Gaussian(sigma={self.sigma})"

    def simulate(self, ax: Tensor, generators: Sequence[torch.Generator], unit: str = "picture") -> Tensor:
        """ax + sigma z, z ~ N(0, I): any unit (sigma is in the measurement's own units)."""
        _check_unit(self, unit)
        _check_generators(ax, generators)
        z = torch.stack([torch.randn(ax.shape[1:], generator=g) for g in generators])
        return ax + self.sigma * z.to(ax.device, ax.dtype)

    def energy(self, y: Tensor, ax: Tensor, batch_dims: int = 1) -> Tensor:
        return _flat(y - ax, batch_dims).square().sum(-1)

    def temperature(self, z_raw: Tensor, z_prev: Tensor | None) -> Tensor:
        return z_raw if z_prev is None else 0.9 * z_prev + 0.1 * z_raw

    def width(self, z: Tensor, znorm: float, r_min: float) -> Tensor:
        return ((z / znorm).sqrt() / 2).clamp_min(r_min)

    @property
    def reward_shift_uses_z_raw(self) -> bool:
        return True


class Poisson(NoiseModel):
    """Poisson (shot) noise of rate `rate` (paper: 1.0), counted in the operator's units.

    "picture" measurements (the DPS code's convention, which the published Poisson runs used):
    y01 = Poisson(255 rate x01) / (255 rate) with x01 = (A(x) + 1) / 2 clamped to [0, 1], and y
    clamped back to [-1, 1]. E[y] = A(x) wherever the clamps do not bite (A(x) in [-1, 1] and
    255 rate x01 well below 255 rate: the top clamp lowers E[y] near white, by half a standard
    deviation at x01 = 1).
    "magnitude" measurements (non-negative, unbounded, e.g. phase retrieval's Fourier magnitudes):
    y = Poisson(255 rate A(x)) / (255 rate), no clamp, so E[y] = A(x) and Var[y] = A(x) / (255
    rate): one unit of the measurement is 255 rate expected counts, the same exposure as a white
    pixel in the picture convention.
    "real" measurements (signed values of any size) are refused: a Poisson mean cannot be negative.
    """

    units = ("picture", "magnitude")

    energy_kind = "l1"

    def __init__(self, rate: float = 1.0) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.rate = float(rate)

    def __repr__(self) -> str:
        return f"Poisson(rate={self.rate})"

    def simulate(self, ax: Tensor, generators: Sequence[torch.Generator], unit: str = "picture") -> Tensor:
        _check_unit(self, unit)
        _check_generators(ax, generators)
        scale = 255.0 * self.rate
        if unit == "magnitude":
            mean = ax.detach().cpu().double().clamp_min(0)  # rounding can leave -0 or -1e-17
            counts = torch.stack([torch.poisson(mean[b] * scale, generator=g) for b, g in enumerate(generators)])
            return (counts / scale).to(ax.device, ax.dtype)
        x01 = ((ax.detach().cpu().float() + 1) / 2).clamp(0, 1)
        counts = torch.stack([torch.poisson(x01[b] * scale, generator=g) for b, g in enumerate(generators)])
        return ((counts / scale) * 2 - 1).clamp(-1, 1).to(ax.device, ax.dtype)

    def energy(self, y: Tensor, ax: Tensor, batch_dims: int = 1) -> Tensor:
        return _flat(y - ax, batch_dims).abs().sum(-1)

    def temperature(self, z_raw: Tensor, z_prev: Tensor | None) -> Tensor:
        return z_raw

    def width(self, z: Tensor, znorm: float, r_min: float) -> Tensor:
        return (z / znorm).clamp_min(r_min)

    def fidelity(self, y: Tensor, ax: Tensor) -> Tensor:
        """DPS's Poisson data term per image (B,): mean(||y - A(x0hat)||_2 / |y|) over y's entries,
        i.e. the norm times mean(1 / |y|), as the DPS authors' code differentiates it (their
        Poisson step sizes assume it). |y| is floored at half a count, 1 / (255 rate), where that
        code would divide by zero."""
        floor = 1.0 / (255.0 * self.rate)
        inv = 1.0 / _flat(y, 1).abs().clamp_min(floor)
        return _flat(y - ax, 1).norm(dim=-1) * inv.mean(dim=-1)


class Noiseless(Gaussian):
    """No noise: y = A(x). Guidance uses the Gaussian terms."""

    def __init__(self) -> None:
        super().__init__(0.0)

    def __repr__(self) -> str:
        return "Noiseless()"


def _check_unit(model: NoiseModel, unit: str) -> None:
    if unit not in model.units:
        raise ValueError(f"{model!r} simulates measurements in the units {model.units}, got unit={unit!r}")


def _check_generators(ax: Tensor, generators: Sequence[torch.Generator]) -> None:
    if len(generators) != ax.shape[0]:
        raise ValueError(f"expected one generator per item ({ax.shape[0]}), got {len(generators)}")
