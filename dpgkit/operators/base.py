"""The operator interface: forward models A acting on NCHW batches in [-1, 1].

A *template* operator may be random (a box mask at a random place, a motion kernel): `draw`
turns it into a fixed operator, one draw per item from that item's seed. A fixed operator's
tensors have a leading dimension of the batch size B (one per item) or 1 (shared); `item(b)`
gives item b's operator, which applies to any number of images at once (the Monte Carlo states).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["Operator", "LinearOperator", "SVDView", "BlackBox", "MEASUREMENT_UNITS", "basis_row_space"]

# What y = A(x) holds when x is an image on the [-1, 1] scale; noise models read it (see
# `Operator.measurement_unit` and `dpgkit.noise.NoiseModel.check`).
MEASUREMENT_UNITS = ("picture", "magnitude", "real")


class Operator(nn.Module):
    """A forward model. Subclasses implement `forward`; random ones `is_random = True` and `draw`."""

    is_linear: bool = False
    differentiable: bool = True
    is_random: bool = False
    task_name: str = ""  # the task as papers' tables name it ("SR x4", "motion deblur")

    @property
    def label(self) -> str:
        """The task's name for summaries and `dpgkit evaluate` (default: the class name)."""
        return self.task_name or type(self).__name__
    #: What the measurement holds, for noise models whose statistics depend on it:
    #: "picture": an image on the [-1, 1] scale (pixel averages with non-negative weights summing
    #: to 1, masks, JPEG); "magnitude": non-negative values of any size (Fourier magnitudes);
    #: "real": any real values, nothing assumed (the default for operators that do not say).
    measurement_unit: str = "real"

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def draw(self, seeds: Sequence[int], image_shape: Sequence[int]) -> Operator:
        """A fixed operator for len(seeds) items (item b's randomness from seeds[b]); fixed ones return self."""
        return self

    def item(self, b: int) -> Operator:
        """Item b's operator; operators whose tensors are shared across items return self."""
        return self

    @property
    def batch_size(self) -> int | None:
        """How many items a drawn operator holds (None: shared by any number)."""
        return None

    def observed(self) -> Tensor | None:
        """Which measurement entries carry information: a 0/1 mask broadcastable to A(x), or None
        when all do. Inpainting's missing pixels are 0 here (their A(x) is 0 whatever x is)."""
        return None

    def gather_form(self, image_shape: Sequence[int]) -> tuple | None:
        """This item's operator as plain data for the fused kernels, or None when it has none.

        ("mask", m (1, 1 or C, H, W)), ("avgpool", factor), ("identity",) or ("channel_mean",):
        every output is a fixed weighted sum of a few input elements (see `dpgkit.kernels`).
        """
        return None

    def row_space(self, image_shape: Sequence[int]) -> dict | None:
        """The row space of this item-level operator as plain data, or None (not linear, or no
        cheap description): what the Rao-Blackwellized DPG estimator (`dpgkit.kernels.rao_blackwell`)
        draws its noise in. A dict with a "kind" and tensors, V (D x m) having orthonormal columns
        that span the row space of A on images `image_shape` (C, H, W), D = C*H*W:

        - {"kind": "identity"}: V = I (m = D);
        - {"kind": "select", "index": (m,) int64, "weight": (m,)}: V's columns are the unit vectors
          at the flattened positions `index`; A is diagonal with y laid out as x, so
          (A V a) = weight * a at the same positions of y and 0 elsewhere (masks);
        - {"kind": "avgpool", "factor": f}: column (c, i, j) is 1/f on the f x f block (c, i, j),
          A V a = a / f in y's layout (C, H/f, W/f);
        - {"kind": "channel_mean", "channels": C}: column p is 1/sqrt(C) at pixel p of every
          channel, A V a = a / sqrt(C) in y's layout (1, H, W);
        - {"kind": "basis", "rank": m, "v": (n, m) -> (n, D), "vt": (n, D) -> (n, m)}: V and V^T
          as functions (from an SVD view, restricted to its nonzero singular values).
        """
        return None


class LinearOperator(Operator):
    """A linear A with its adjoint A^T; `svd()` where SVD-based methods (DDRM, DDNM) need it."""

    is_linear = True

    def adjoint(self, y: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def svd(self, image_shape: Sequence[int] | None = None) -> SVDView:
        """The SVD view for images of shape `image_shape` (C, H, W); operators whose tensors fix
        the size (masks) may be called without it, the others (blur, pooling) need it."""
        raise NotImplementedError(
            f"{type(self).__name__} has no SVD view; DDRM and DDNM need one "
            "(inpainting, average-pool super-resolution, colorization, denoising and blur have it)"
        )

    def row_space(self, image_shape: Sequence[int]) -> dict | None:
        """From the SVD view (see `Operator.row_space`): V restricted to the singular values above
        1e-6 of the largest; None when there is no SVD view. Subclasses with a cheaper exact form
        (masks, average pooling, channel means) override it."""
        try:
            view = self.svd(image_shape)
        except NotImplementedError:
            return None
        return basis_row_space(view, math.prod(int(s) for s in image_shape))


class SVDView:
    """A = U diag(s) V^T, as DDRM's H_functions. Vectors are flattened per image: (B, D) or (B, M).

    `singulars()` has shape (R,) or (B, R) with R <= min(M, D); `vt(x)` (B, D) -> (B, D) in the
    spectral basis, the first R entries paired with the singular values; `v`, `u`, `ut` likewise.
    """

    def singulars(self) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def v(self, z: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def vt(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def u(self, z: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def ut(self, y: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def apply(self, x: Tensor) -> Tensor:
        """A x through the factors: U (s * (V^T x)[:R])."""
        s = self.singulars()
        z = self.vt(x)[:, : s.shape[-1]] * s
        return self.u(z)


def basis_row_space(view: SVDView, dim: int, rtol: float = 1e-6) -> dict:
    """{"kind": "basis", ...} (see `Operator.row_space`) from an item-level SVD view on D = `dim`.

    The view's coordinates are ordered by singular value, descending, so the row space is the span
    of its first `rank` columns of V, rank = #{s > rtol * max s}. A view holding several items'
    singulars (B, R) has no single row space: take the item's operator first (`item(b)`).
    """
    s = view.singulars()
    if s.dim() != 1:
        raise ValueError(f"a row space is per item: the SVD view holds singulars {tuple(s.shape)}; "
                         "call item(b) on the operator first")
    top = float(s.abs().max()) if s.numel() else 0.0
    rank = int((s.abs() > rtol * top).sum()) if top > 0 else 0
    if rank == dim:
        return {"kind": "identity"}

    def v(a: Tensor) -> Tensor:
        return view.v(a)

    def vt(x: Tensor) -> Tensor:
        return view.vt(x)[:, :rank]

    return {"kind": "basis", "rank": rank, "v": v, "vt": vt}


class BlackBox(Operator):
    """Any function as an operator that is never differentiated (numpy, PIL, a simulator).

    `fn` takes one image (C, H, W) as a float32 numpy array in [-1, 1] (``numpy=True``) or a
    tensor, and returns the measurement of that image. DPG works with it; DPS refuses it.
    `measurement_unit` says what the function returns (one of MEASUREMENT_UNITS; "real" assumes
    nothing, and noise models that need a picture or a magnitude refuse it).
    """

    differentiable = False

    def __init__(self, fn, linear: bool = False, numpy: bool = True, measurement_unit: str = "real") -> None:
        super().__init__()
        if measurement_unit not in MEASUREMENT_UNITS:
            raise ValueError(f"measurement_unit must be one of {MEASUREMENT_UNITS}, got {measurement_unit!r}")
        self.fn = fn
        self.is_linear = linear
        self.numpy = numpy
        self.measurement_unit = measurement_unit

    def forward(self, x: Tensor) -> Tensor:
        outs = []
        with torch.no_grad():
            for img in x.detach():
                if self.numpy:
                    out = torch.as_tensor(self.fn(img.float().cpu().numpy()))
                else:
                    out = torch.as_tensor(self.fn(img))
                outs.append(out.to(device=x.device, dtype=x.dtype))
        return torch.stack(outs)
