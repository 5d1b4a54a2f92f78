"""deepinv physics as dpgkit operators: `from_deepinv(physics)` and `noise_from_deepinv(physics)`.

The wrapped operator's forward is deepinv's noiseless `physics.A(x)`; a `LinearPhysics` adds
`adjoint` = `physics.A_adjoint`, and a `DecomposablePhysics` (A = U diag(s) V^T with real
factors) adds `svd()`, so DDRM and DDNM run on it as well as DPG, DPS, DDNM and RED-diff.

Value ranges. dpgkit hands every operator images in [-1, 1] and compares measurements on that
scale; the wrapped physics is applied to those tensors as they are. A linear A does not care
about the image range (only y and A must agree, and both come from the same A). deepinv's own
examples and datasets use images in [0, 1], so its noise levels are usually meant on that scale:
`noise_from_deepinv(..., scale=2.0)` (the default) doubles a Gaussian sigma to put it on dpgkit's
[-1, 1] scale; pass scale=1.0 when the noise levels were chosen for [-1, 1] images. A nonlinear
physics sees [-1, 1] images; wrap it in your own range map if it expects [0, 1].

Noise models: deepinv's ZeroNoise, GaussianNoise(sigma) and PoissonNoise(gain, normalize=True) map
to dpgkit's Noiseless, Gaussian(scale * sigma) and Poisson(rate = 1 / (255 gain)) (the latter
only for the [0, 1] convention, scale=2, where both are Poisson counts of the [0, 1] image);
anything else (PoissonGaussian, Gamma, Uniform, salt-and-pepper, per-item tensors of levels...)
is refused with a clear error, because dpgkit's guidance needs a likelihood it knows.

Source: deepinv (Tachella et al. 2025, "DeepInverse: a Python package for solving imaging
inverse problems with deep learning"), its `Physics`, `LinearPhysics` and `DecomposablePhysics`
interfaces.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..noise import Gaussian, Noiseless, NoiseModel, Poisson
from ._checks import check_images, image_shape3
from .base import MEASUREMENT_UNITS, LinearOperator, Operator, SVDView
from .svd_views import _gather, _scatter

__all__ = ["from_deepinv", "noise_from_deepinv", "DeepinvOperator", "DeepinvLinearOperator", "DeepinvSVD"]


def _import_deepinv():
    try:
        import deepinv
    except ImportError as err:
        raise ImportError(
            "dpgkit.operators.from_deepinv needs the deepinv package: pip install 'dpgkit[deepinv]'"
        ) from err
    return deepinv


def _tensor_out(out: Any, who: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"{who} returned a {type(out).__name__}; dpgkit operators return one tensor per batch "
                        "(stacked physics with TensorList measurements are not supported)")
    return out


class DeepinvOperator(Operator):
    """A deepinv `Physics` as a dpgkit operator: forward(x (B, C, H, W) in [-1, 1]) = physics.A(x)."""

    def __init__(self, physics: torch.nn.Module, measurement_unit: str = "real") -> None:
        super().__init__()
        self.physics = physics
        self.measurement_unit = _unit(measurement_unit)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.physics).__name__})"

    def forward(self, x: Tensor) -> Tensor:
        check_images(x, repr(self))
        return _tensor_out(self.physics.A(x), f"{type(self.physics).__name__}.A")


class DeepinvLinearOperator(DeepinvOperator, LinearOperator):
    """A deepinv `LinearPhysics`: forward = physics.A, adjoint = physics.A_adjoint; a
    `DecomposablePhysics` also gives `svd(image_shape)` (a `DeepinvSVD`)."""

    def adjoint(self, y: Tensor) -> Tensor:
        return _tensor_out(self.physics.A_adjoint(y), f"{type(self.physics).__name__}.A_adjoint")

    def observed(self) -> Tensor | None:
        """deepinv's Inpainting (and Demosaicing): its mask != 0, as dpgkit's Inpainting; else None."""
        deepinv = _import_deepinv()
        if isinstance(self.physics, deepinv.physics.Inpainting) and isinstance(self.physics.mask, Tensor):
            return (self.physics.mask != 0).to(self.physics.mask.dtype if self.physics.mask.is_floating_point()
                                               else torch.float32)
        return None

    def svd(self, image_shape: Sequence[int] | None = None) -> DeepinvSVD:
        deepinv = _import_deepinv()
        if not isinstance(self.physics, deepinv.physics.DecomposablePhysics):
            raise NotImplementedError(
                f"{type(self.physics).__name__} is a deepinv LinearPhysics without a decomposition; DDRM and DDNM "
                "need a DecomposablePhysics (Inpainting, Denoising, ...) or one of dpgkit's own operators"
            )
        return DeepinvSVD(self.physics, image_shape3(image_shape, f"{self!r}.svd"))


class DeepinvSVD(SVDView):
    """The SVD view of a deepinv `DecomposablePhysics` A = U diag(mask) V^T for images (C, H, W).

    deepinv keeps the spectral coefficients as a tensor shaped like V^T x; here they are flattened
    and ordered by descending singular value (a stable sort, per item when the mask holds one per
    item). Requires real factors, V square (as many coefficients as pixels) and U square (as many
    measurements as coefficients). Raises ValueError otherwise (e.g. BlurFFT's complex Fourier V:
    use dpgkit's `Blur(padding="circular")`, whose view is the real DFT basis).
    """

    def __init__(self, physics: torch.nn.Module, image_shape: tuple[int, int, int]) -> None:
        self.physics = physics
        self.image_shape = image_shape
        name = type(physics).__name__
        mask = physics.mask
        like = mask if isinstance(mask, Tensor) and mask.is_floating_point() else torch.zeros(())
        probe = torch.zeros(1, *image_shape, dtype=like.dtype, device=like.device)
        with torch.no_grad():
            spec = physics.V_adjoint(probe)
            y = physics.A(probe)
        if spec.is_complex() or (isinstance(mask, Tensor) and mask.is_complex()):
            raise ValueError(f"{name}'s decomposition has complex factors; dpgkit's SVD views are real "
                             "(for a circular blur use dpgkit.operators.Blur(kernel, padding='circular'))")
        self.spec_shape = tuple(spec.shape[1:])
        self.y_shape = tuple(y.shape[1:])
        d, k, m = math.prod(image_shape), math.prod(self.spec_shape), math.prod(self.y_shape)
        if not d == k == m:
            raise ValueError(f"{name}: the view needs as many spectral coefficients ({k}) as pixels ({d}) and "
                             f"measurements ({m})")
        s = torch.as_tensor(mask, dtype=spec.dtype, device=spec.device)
        s = torch.broadcast_to(s, torch.broadcast_shapes(s.shape, spec.shape))  # (1 or B, *spectral shape)
        s = s.reshape(s.shape[0], -1)
        if bool((s < 0).any()):
            raise ValueError(f"{name}'s singular values (mask) must be >= 0")
        order = torch.argsort(s, dim=1, descending=True, stable=True)
        self._s = torch.gather(s, 1, order)
        self._perm = order[0] if order.shape[0] == 1 else order
        if self._s.shape[0] == 1:
            self._s = self._s[0]

    def singulars(self) -> Tensor:
        return self._s

    def vt(self, x: Tensor) -> Tensor:
        spec = self.physics.V_adjoint(x.reshape(x.shape[0], *self.image_shape))
        return _gather(spec.reshape(x.shape[0], -1), self._perm.to(x.device))

    def v(self, z: Tensor) -> Tensor:
        spec = _scatter(z, self._perm.to(z.device)).reshape(z.shape[0], *self.spec_shape)
        return self.physics.V(spec).reshape(z.shape[0], -1)

    def ut(self, y: Tensor) -> Tensor:
        spec = self.physics.U_adjoint(y.reshape(y.shape[0], *self.y_shape))
        return _gather(spec.reshape(y.shape[0], -1), self._perm.to(y.device))

    def u(self, z: Tensor) -> Tensor:
        m = math.prod(self.y_shape)
        z = F.pad(z, (0, m - z.shape[1])) if z.shape[1] < m else z
        spec = _scatter(z, self._perm.to(z.device)).reshape(z.shape[0], *self.spec_shape)
        return self.physics.U(spec).reshape(z.shape[0], -1)


def _unit(measurement_unit: str) -> str:
    if measurement_unit not in MEASUREMENT_UNITS:
        raise ValueError(f"measurement_unit must be one of {MEASUREMENT_UNITS}, got {measurement_unit!r}")
    return measurement_unit


def from_deepinv(physics: torch.nn.Module, measurement_unit: str = "real") -> Operator:
    """A deepinv `Physics` as a dpgkit operator.

    Args:
        physics: any `deepinv.physics.Physics` (fixed parameters: the mask, kernel... it holds when
            wrapped; update them in deepinv before wrapping). Its noise model is not applied by the
            operator: give the task `noise_from_deepinv(physics)` (or any dpgkit noise model).
        measurement_unit: what physics.A returns (`Operator.measurement_unit`): "picture" when it
            keeps the image scale (blur, inpainting, downsampling), "magnitude" for non-negative
            values of any size, "real" (default) when nothing is known. Poisson noise needs
            "picture" or "magnitude" and refuses "real".

    Returns:
        `DeepinvLinearOperator` for a `LinearPhysics` (adjoint; `svd()` when it is a
        `DecomposablePhysics`), `DeepinvOperator` otherwise. Images (B, C, H, W) in [-1, 1] are
        passed to deepinv unchanged (see the module notes on value ranges).

    Raises:
        ImportError: deepinv is not installed (`pip install 'dpgkit[deepinv]'`).
        TypeError: `physics` is not a deepinv Physics.
        ValueError: an unknown `measurement_unit`.
    """
    deepinv = _import_deepinv()
    if not isinstance(physics, deepinv.physics.Physics):
        raise TypeError(f"from_deepinv expects a deepinv.physics.Physics, got {type(physics).__name__}")
    if isinstance(physics, deepinv.physics.LinearPhysics):
        return DeepinvLinearOperator(physics, measurement_unit)
    return DeepinvOperator(physics, measurement_unit)


def _scalar(value: Any, what: str) -> float:
    t = torch.as_tensor(value)
    if t.numel() != 1:
        raise ValueError(f"{what} holds {t.numel()} values (one per item); dpgkit noise models take one level")
    return float(t.reshape(()))


def noise_from_deepinv(physics_or_noise: Any, scale: float = 2.0) -> NoiseModel:
    """dpgkit's noise model for a deepinv physics' noise model (or a deepinv noise model).

    Args:
        physics_or_noise: a deepinv `Physics` (its `noise_model` is read) or a deepinv `NoiseModel`.
        scale: dpgkit units per deepinv unit: 2.0 when the deepinv noise level is meant for images
            in [0, 1] (deepinv's convention), 1.0 when it was set for [-1, 1] images.

    Returns:
        Noiseless for ZeroNoise, Gaussian(scale * sigma) for GaussianNoise, Poisson(1 / (255 gain))
        for PoissonNoise(gain, normalize=True) with scale=2.

    Raises:
        ValueError: a noise model with no dpgkit equivalent, per-item levels, or a Poisson model
            outside the [0, 1] convention.
    """
    deepinv = _import_deepinv()
    kinds = deepinv.physics
    if isinstance(physics_or_noise, kinds.Physics):
        noise = physics_or_noise.noise_model
    elif isinstance(physics_or_noise, kinds.NoiseModel):
        noise = physics_or_noise
    else:
        raise TypeError(f"expected a deepinv Physics or NoiseModel, got {type(physics_or_noise).__name__}")
    name = type(noise).__name__
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if isinstance(noise, kinds.ZeroNoise):
        return Noiseless()
    if type(noise) is kinds.GaussianNoise:
        return Gaussian(scale * _scalar(noise.sigma, "GaussianNoise.sigma"))
    if type(noise) is kinds.PoissonNoise:
        if not bool(torch.as_tensor(noise.normalize)):
            raise ValueError("PoissonNoise(normalize=False) returns raw counts; dpgkit's Poisson measures images "
                             "on the image scale: use normalize=True")
        if scale != 2.0:
            raise ValueError("deepinv's PoissonNoise counts the values it is given; it matches dpgkit's Poisson only "
                             "for images in [0, 1] (scale=2.0)")
        return Poisson(1.0 / (255.0 * _scalar(noise.gain, "PoissonNoise.gain")))
    raise ValueError(
        f"deepinv noise model {name} has no dpgkit equivalent: supported are ZeroNoise, GaussianNoise and "
        "PoissonNoise(normalize=True); give the task a dpgkit noise model (dpgkit.noise) instead"
    )
