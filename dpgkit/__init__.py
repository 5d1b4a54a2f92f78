"""dpgkit: image restoration with pretrained diffusion models (DPG and its baselines)."""

from __future__ import annotations

import importlib
from types import ModuleType

from . import diffusion, models, noise, operators, seeding, solvers
from .task import Task

__version__ = "0.1.0"

__all__ = ["Task", "diffusion", "metrics", "models", "noise", "operators", "seeding", "solvers"]

# imported on first use: torchmetrics and lpips take seconds to import, and restoring needs neither
_LAZY = ("metrics", "evaluate", "compare", "io")


def __getattr__(name: str) -> ModuleType:
    """`dk.metrics` (and the other heavy submodules) imported on first access (PEP 562)."""
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
