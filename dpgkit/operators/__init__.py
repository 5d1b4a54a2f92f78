"""Forward models A (dpgkit "physics")."""

from .base import BlackBox, LinearOperator, Operator, SVDView

__all__ = ["Operator", "LinearOperator", "SVDView", "BlackBox"]
