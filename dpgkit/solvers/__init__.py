"""Solvers: posterior samplers behind one `Solver.restore(model, task, y, seed)` interface."""

from .base import Solver, StepInfo
from .ddnm import DDNM
from .ddrm import DDRM
from .dpg import DPG
from .dps import DPS
from .reddiff import RedDiff

__all__ = ["Solver", "StepInfo", "DPG", "DPS"]
__all__ += ["DDRM", "DDNM", "RedDiff"]
