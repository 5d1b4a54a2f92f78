"""Diffusion priors: the `DiffusionModel` wrapper, the guided-diffusion UNet, analytic priors."""

from .base import DiffusionModel
from .gmm import GaussianMixture, GaussianMixturePrior

__all__ = ["DiffusionModel"]
__all__ += ["GaussianMixture", "GaussianMixturePrior"]
