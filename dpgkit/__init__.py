"""dpgkit: image restoration with pretrained diffusion models (DPG and its baselines)."""

from . import diffusion, models, noise, operators, seeding, solvers
from .task import Task

__version__ = "0.1.0"

__all__ = ["Task", "diffusion", "models", "noise", "operators", "seeding", "solvers"]
