"""What a solver needs of a task, checked up front with a message that names a method that can."""

from __future__ import annotations

from ..task import Task

__all__ = ["require_differentiable"]


def require_differentiable(task: Task, method: str) -> None:
    """Raise ValueError when `method` would have to differentiate a non-differentiable operator."""
    op = task.operator
    if not getattr(op, "differentiable", True):
        raise ValueError(
            f"{method} differentiates the operator, but {type(op).__name__} is not differentiable "
            "(a black box, JPEG, ...). Use dpgkit.solvers.DPG, which only evaluates A."
        )
