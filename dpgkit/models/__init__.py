"""Diffusion priors: the `DiffusionModel` wrapper, the guided-diffusion UNet, analytic priors."""

from .base import DiffusionModel
from .diffusers import from_diffusers
from .gmm import GaussianMixture, GaussianMixturePrior
from .registry import PRESETS, CheckpointMismatchError, CheckpointReadError, build_unet, load, register_preset
from .sampling import sample_prior
from .unet import UNetModel

__all__ = ["DiffusionModel", "from_diffusers"]
__all__ += ["GaussianMixture", "GaussianMixturePrior"]
__all__ += ["PRESETS", "CheckpointMismatchError", "CheckpointReadError", "UNetModel", "build_unet", "load",
            "register_preset", "sample_prior"]
