"""`Template`: a random family of linear operators, turned into a fixed one per item by `draw`."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .base import LinearOperator, Operator, SVDView

__all__ = ["Template"]


class Template(LinearOperator):
    """A random linear operator (box mask, motion kernel) before its draw.

    Subclasses implement `draw(seeds, image_shape)`, returning a fixed operator whose tensors hold
    one entry per seed. Applying a template raises: the measurement and the guidance must use the
    same drawn instance (task.measure draws it and keeps it in task.operator).
    """

    is_random = True

    def _undrawn(self) -> RuntimeError:
        return RuntimeError(
            f"{self!r} is a random template: draw it first "
            "(task.measure, task.draw or .draw(seeds, image_shape))"
        )

    def draw(self, seeds: Sequence[int], image_shape: Sequence[int]) -> Operator:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        raise self._undrawn()

    def adjoint(self, y: Tensor) -> Tensor:
        raise self._undrawn()

    def svd(self, image_shape: Sequence[int] | None = None) -> SVDView:
        raise self._undrawn()

    def item(self, b: int) -> Operator:
        raise self._undrawn()
