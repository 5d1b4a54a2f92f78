"""Diffusion priors: the `DiffusionModel` wrapper, the guided-diffusion UNet, analytic priors."""

from .base import DiffusionModel

__all__ = ["DiffusionModel"]
