"""Solvers: posterior samplers behind one `Solver.restore(model, task, y, seed)` interface."""

from .base import Solver, StepInfo
from .daps import DAPS
from .ddnm import DDNM
from .ddrm import DDRM
from .diffpir import DiffPIR
from .dpg import DPG
from .dps import DPS
from .pigdm import PiGDM
from .reddiff import RedDiff

__all__ = ["Solver", "StepInfo", "DPG", "DPS"]
__all__ += ["DDRM", "DDNM", "RedDiff"]
__all__ += ["DAPS", "PiGDM", "DiffPIR"]
