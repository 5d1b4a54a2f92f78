"""Solvers: posterior samplers behind one `Solver.restore(model, task, y, seed)` interface."""

from .base import Solver, StepInfo
from .dpg import DPG
from .dps import DPS

__all__ = ["Solver", "StepInfo", "DPG", "DPS"]
