"""Gaussian-mixture priors with exact diffusion quantities: the ground truth for every solver.

For x0 ~ sum_k pi_k N(m_k, diag v_k) and the VP diffusion x_t = sqrt(abar) x0 + sqrt(1 - abar) n,
everything a solver needs has a closed form: the noised density p_t, its score (hence the exact
eps), E[x0 | x_t], and for a linear measurement y = A x0 + sigma_y n the exact posterior
p(x0 | y) (another Gaussian mixture) and the exact guidance score grad_{x_t} log p(y | x_t).

Vectors are flattened per item: x (B, D), means (K, D). Everything is computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..diffusion import Schedule
from .base import DiffusionModel

LinearMap = Callable[[Tensor], Tensor]
"""A linear map on image batches (N, C, H, W) -> (N, ...): a linear operator, or any callable."""

__all__ = [
    "GaussianMixturePrior",
    "GaussianMixture",
    "diffuse_diagonal",
    "diagonal_log_density",
    "x0_given_xt_diagonal",
    "gaussian_log_density",
    "condition_on_linear_measurement",
    "operator_matrix",
]

_LOG_2PI = math.log(2 * math.pi)
_F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Pure functions (float64 tensors; shapes broadcast over leading dimensions)
# ---------------------------------------------------------------------------------------------


def diffuse_diagonal(means: Tensor, variances: Tensor, abar: Tensor) -> tuple[Tensor, Tensor]:
    """The law of x_t when x0 ~ N(m, diag v): N(sqrt(abar) m, diag(abar v + 1 - abar)).

    means, variances: (K, D); abar: broadcastable against them, e.g. (B, 1, 1) for a batch.
    """
    return abar.sqrt() * means, abar * variances + (1 - abar)


def diagonal_log_density(x: Tensor, means: Tensor, variances: Tensor) -> Tensor:
    """log N(x; m_k, diag v_k) for every item and component: (B, K).

    log N = -1/2 sum_d [log(2 pi v_kd) + (x_d - m_kd)^2 / v_kd]. x: (B, D); means and
    variances: (K, D) or (B, K, D).
    """
    diff = x.unsqueeze(-2) - means
    return -0.5 * (_LOG_2PI + variances.log() + diff.square() / variances).sum(-1)


def x0_given_xt_diagonal(
    x_t: Tensor, means: Tensor, variances: Tensor, abar: Tensor
) -> tuple[Tensor, Tensor]:
    """Per component k, x0 | x_t, k ~ N(mu_k, diag P_k) with (u_k = abar v_k + 1 - abar):

    mu_k = m_k + sqrt(abar) v_k / u_k * (x_t - sqrt(abar) m_k)
         = ((1 - abar) m_k + sqrt(abar) v_k x_t) / u_k,
    P_k  = v_k (1 - abar) / u_k.

    x_t: (B, D); means, variances: (K, D); abar: (B, 1, 1). Returns (B, K, D) twice.
    """
    u = abar * variances + (1 - abar)
    mu = ((1 - abar) * means + abar.sqrt() * variances * x_t.unsqueeze(-2)) / u
    return mu, variances * (1 - abar) / u


def gaussian_log_density(x: Tensor, means: Tensor, covariances: Tensor) -> Tensor:
    """log N(x; m_k, S_k) with full covariances: (B, K).

    log N = -1/2 [D log(2 pi) + log det S_k + (x - m_k)^T S_k^{-1} (x - m_k)], via Cholesky.
    x: (B, D); means: (K, D) or (B, K, D); covariances: (K, D, D), positive definite.
    """
    chol, info = torch.linalg.cholesky_ex(covariances)
    if bool((info != 0).any()):
        bad = [int(k) for k in torch.nonzero(info).flatten()]
        raise ValueError(
            f"covariance of component(s) {bad} is singular: a density needs positive definite "
            "covariances (a noiseless measurement gives a degenerate posterior; use sigma_y > 0)"
        )
    diff = (x.unsqueeze(-2) - means).unsqueeze(-1)  # (B, K, D, 1)
    white = torch.linalg.solve_triangular(chol, diff, upper=False).squeeze(-1)
    logdet = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return -0.5 * (means.shape[-1] * _LOG_2PI + logdet + white.square().sum(-1))


def condition_on_linear_measurement(
    means: Tensor, covariances: Tensor, A: Tensor, y: Tensor, sigma_y: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Gaussian conditioning of x ~ N(m_k, S_k) on y = A x + sigma_y n, per component.

    G_k = A S_k A^T + sigma_y^2 I,  K_k = S_k A^T G_k^{-1},
    E[x | y, k]   = m_k + K_k (y - A m_k),
    Cov[x | y, k] = (I - K_k A) S_k (I - K_k A)^T + sigma_y^2 K_k K_k^T  (= S_k - K_k A S_k),
    log p(y | k)  = log N(y; A m_k, G_k).

    means (K, D), covariances (K, D, D), A (M, D), y (M,). Returns the posterior means (K, D),
    covariances (K, D, D) and log evidences (K,). sigma_y may be 0 if every G_k is invertible.
    """
    num_meas, dim = A.shape
    s2 = float(sigma_y) ** 2
    AS = A @ covariances  # (K, M, D)
    G = AS @ A.T + s2 * torch.eye(num_meas, dtype=A.dtype, device=A.device)
    chol, info = torch.linalg.cholesky_ex(G)
    if bool((info != 0).any()):
        raise ValueError(
            "A S A^T + sigma_y^2 I is singular: with sigma_y = 0 the operator must have full row "
            f"rank (A is {num_meas}x{dim}); use sigma_y > 0"
        )
    resid = y - means @ A.T  # (K, M)
    gain_t = torch.cholesky_solve(AS, chol)  # G^{-1} A S = K^T, (K, M, D)
    gain = gain_t.transpose(-1, -2)
    post_means = means + (gain @ resid.unsqueeze(-1)).squeeze(-1)
    # Joseph form: stays symmetric positive semi-definite when sigma_y is small.
    eye = torch.eye(dim, dtype=A.dtype, device=A.device)
    left = eye - gain @ A
    post_covs = left @ covariances @ left.transpose(-1, -2) + s2 * gain @ gain_t
    post_covs = 0.5 * (post_covs + post_covs.transpose(-1, -2))
    white = torch.linalg.solve_triangular(chol, resid.unsqueeze(-1), upper=False).squeeze(-1)
    logdet = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    log_evidence = -0.5 * (num_meas * _LOG_2PI + logdet + white.square().sum(-1))
    return post_means, post_covs, log_evidence


def operator_matrix(A: Tensor | LinearMap, image_shape: Sequence[int]) -> Tensor:
    """A dense (M, D) float64 matrix for A: a matrix as given, or a linear map (a callable on
    (N, *image_shape) batches, e.g. a linear dpgkit operator) applied to the D basis images of
    `image_shape` (only sensible for small D). A callable that says `is_linear = False` is refused."""
    dim = math.prod(image_shape)
    if isinstance(A, Tensor):
        if A.dim() != 2 or A.shape[1] != dim:
            raise ValueError(f"expected a matrix of shape (M, {dim}), got {tuple(A.shape)}")
        return A.to(_F64)
    if not callable(A) or not getattr(A, "is_linear", True):
        raise TypeError(
            f"expected a dense matrix (M, {dim}) or a linear map, got {type(A).__name__}"
        )
    if getattr(A, "batch_size", None) not in (None, 1):
        raise ValueError(f"the operator holds {A.batch_size} items; pass one with op.item(b)")
    basis = torch.eye(dim, dtype=_F64).reshape(dim, *image_shape)
    with torch.no_grad():
        try:
            out = A(basis)
        except RuntimeError:
            # Operators with float32 buffers (conv kernels, masks) may refuse float64 input.
            out = A(basis.float())
    return out.reshape(dim, -1).T.to(_F64).contiguous()


def _as_timesteps(t: Tensor | int, batch: int, num_timesteps: int, device: torch.device) -> Tensor:
    t = torch.as_tensor(t, device=device)
    if t.is_floating_point():
        if not bool((t == t.round()).all()):
            raise ValueError("t must hold integer timesteps of the training schedule")
        t = t.round()
    t = t.long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"got {t.numel()} timesteps for a batch of {batch}")
    if bool(((t < 0) | (t >= num_timesteps)).any()):
        raise ValueError(f"timesteps must lie in [0, {num_timesteps - 1}], got {t.tolist()}")
    return t


# ---------------------------------------------------------------------------------------------
# A Gaussian mixture with full covariances (the posterior)
# ---------------------------------------------------------------------------------------------


class GaussianMixture:
    """sum_k w_k N(mu_k, C_k) in float64: weights (K,), means (K, D), covariances (K, D, D).

    Samples and means come back shaped `event_shape` (default (D,)). `log_evidence` is
    log p(y) when the mixture is a posterior built by `GaussianMixturePrior.posterior`.
    """

    def __init__(
        self,
        weights: Tensor,
        means: Tensor,
        covariances: Tensor,
        event_shape: Sequence[int] | None = None,
        log_evidence: Tensor | None = None,
    ) -> None:
        k, d = means.shape
        if weights.shape != (k,) or covariances.shape != (k, d, d):
            raise ValueError(
                f"expected weights ({k},) and covariances ({k}, {d}, {d}) for means ({k}, {d}), "
                f"got {tuple(weights.shape)} and {tuple(covariances.shape)}"
            )
        self.weights = weights.to(_F64)
        self.means = means.to(_F64)
        self.covariances = covariances.to(_F64)
        self.event_shape = tuple(event_shape) if event_shape is not None else (d,)
        if math.prod(self.event_shape) != d:
            raise ValueError(f"event_shape {self.event_shape} does not hold {d} values")
        self.log_evidence = log_evidence
        self._factors: Tensor | None = None

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _factor(self) -> Tensor:
        """L_k with L_k L_k^T = C_k (from eigh, so singular covariances are fine)."""
        if self._factors is None:
            evals, evecs = torch.linalg.eigh(self.covariances)
            self._factors = evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)
        return self._factors

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n draws, shape (n, *event_shape), float64."""
        dev = self.means.device
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, 1, generator=generator, dtype=_F64, device=dev)
        x = self.means[comp] + (self._factor()[comp] @ z).squeeze(-1)
        return x.reshape(n, *self.event_shape)

    def mean(self) -> Tensor:
        """sum_k w_k mu_k, shape event_shape."""
        return (self.weights @ self.means).reshape(self.event_shape)

    def covariance(self) -> Tensor:
        """sum_k w_k (C_k + mu_k mu_k^T) - mean mean^T, shape (D, D)."""
        mean = self.weights @ self.means
        second = (self.weights[:, None, None] * (
            self.covariances + self.means.unsqueeze(-1) * self.means.unsqueeze(-2)
        )).sum(0)
        return second - torch.outer(mean, mean)

    def log_prob(self, x: Tensor) -> Tensor:
        """log density at x (B, *event_shape) or (B, D): (B,). Differentiable in x."""
        flat = x.reshape(x.shape[0], -1).to(_F64)
        comps = gaussian_log_density(flat, self.means, self.covariances)
        return torch.logsumexp(comps + self.weights.log(), dim=-1)

    def noised(self, abar: float | Tensor) -> GaussianMixture:
        """The law of sqrt(abar) X + sqrt(1 - abar) N: components N(sqrt(abar) mu_k,
        abar C_k + (1 - abar) I), same weights."""
        a = torch.as_tensor(abar, dtype=_F64, device=self.means.device)
        eye = torch.eye(self.dim, dtype=_F64, device=self.means.device)
        return GaussianMixture(
            self.weights, a.sqrt() * self.means, a * self.covariances + (1 - a) * eye,
            self.event_shape,
        )


# ---------------------------------------------------------------------------------------------
# The prior
# ---------------------------------------------------------------------------------------------


class GaussianMixturePrior:
    """x0 ~ sum_k pi_k N(m_k, diag s_k^2): a diffusion prior whose every quantity is exact.

    Args:
        means: (K, D) or (K, C, H, W).
        stds: (K,) isotropic, or (K, D) / (K, C, H, W) diagonal; all > 0.
        weights: (K,), >= 0, normalised here to sum to 1.
        image_shape: (C, H, W) that the flat D values form (default: the means' shape, or
            (1, 1, D) for flat means).
        schedule: the training schedule that t indexes (default: linear, T = 1000).

    Inputs x_t may be (B, *image_shape) or (B, D); outputs keep the input's shape and dtype.
    """

    def __init__(
        self,
        means: Tensor,
        stds: Tensor | float,
        weights: Tensor,
        image_shape: Sequence[int] | None = None,
        schedule: Schedule | None = None,
    ) -> None:
        means = torch.as_tensor(means).to(_F64)
        if means.dim() not in (2, 4):
            raise ValueError(f"means must be (K, D) or (K, C, H, W), got {tuple(means.shape)}")
        k = means.shape[0]
        dim = math.prod(means.shape[1:])
        if image_shape is None:
            image_shape = tuple(means.shape[1:]) if means.dim() == 4 else (1, 1, dim)
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) != 3 or math.prod(image_shape) != dim:
            raise ValueError(f"image_shape must be (C, H, W) with C*H*W = {dim}, got {image_shape}")
        if means.dim() == 4 and tuple(means.shape[1:]) != image_shape:
            raise ValueError(f"means have image shape {tuple(means.shape[1:])}, not {image_shape}")

        stds = torch.as_tensor(stds, device=means.device).to(_F64)
        if stds.dim() == 0:
            stds = stds.expand(k)
        if stds.shape == (k,):
            stds = stds[:, None].expand(k, dim)
        elif stds.shape[0] == k and math.prod(stds.shape[1:]) == dim:
            stds = stds.reshape(k, dim)
        else:
            raise ValueError(
                f"stds must be (K,) = ({k},) or (K, D) = ({k}, {dim}), got {tuple(stds.shape)}"
            )
        if not bool((stds > 0).all()) or not bool(stds.isfinite().all()):
            raise ValueError("stds must be finite and > 0")

        weights = torch.as_tensor(weights, device=means.device).to(_F64).reshape(-1)
        if weights.shape != (k,):
            raise ValueError(f"weights must be ({k},), got {tuple(weights.shape)}")
        if not bool((weights >= 0).all()) or not bool(weights.isfinite().all()) or weights.sum() <= 0:
            raise ValueError(f"weights must be finite, >= 0 and not all 0, got {weights.tolist()}")

        schedule = schedule if schedule is not None else Schedule.linear(1000)
        if not torch.equal(schedule.timesteps.cpu(), torch.arange(len(schedule))):
            raise ValueError("pass the training schedule (not a respaced one): t indexes it")

        self.means = means.reshape(k, dim).contiguous()
        self.variances = stds.square().contiguous()
        self.weights = weights / weights.sum()
        self.image_shape = image_shape
        self.schedule = schedule
        self._abar = schedule.alphas_cumprod.to(_F64)

    # -- basics ---------------------------------------------------------------------------

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def __repr__(self) -> str:
        return (
            f"GaussianMixturePrior(K={self.num_components}, image_shape={self.image_shape})"
        )

    def as_model(self) -> DiffusionModel:
        """A `DiffusionModel` whose fn(x_t, t) is the exact eps (fixed variance, C channels)."""
        return DiffusionModel(
            self.eps, image_shape=self.image_shape, schedule=self.schedule, learned_sigma=False
        )

    def as_mixture(self) -> GaussianMixture:
        """The prior as a full-covariance `GaussianMixture` of images."""
        return GaussianMixture(
            self.weights, self.means, torch.diag_embed(self.variances), self.image_shape
        )

    def _flat(self, x: Tensor) -> Tensor:
        if x.dim() < 1 or math.prod(x.shape[1:]) != self.dim:
            raise ValueError(
                f"expected x of shape (B, {', '.join(map(str, self.image_shape))}) or "
                f"(B, {self.dim}), got {tuple(x.shape)}"
            )
        return x.reshape(x.shape[0], self.dim).to(_F64)

    def _params(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dev = like.device
        return self.means.to(dev), self.variances.to(dev), self.weights.to(dev)

    def abar(self, t: Tensor | int | float, batch: int, device: torch.device) -> Tensor:
        """abar at timesteps t (scalar or (B,)), shape (B, 1, 1), float64.

        Integer t index the schedule. Fractional t (continuous-time samplers such as DAPS feed
        the network between training timesteps, as the guided-diffusion UNet accepts) interpolate
        log abar linearly between the two neighbouring timesteps.
        """
        table = self._abar.to(device)
        tt = torch.as_tensor(t, device=device)
        if not tt.is_floating_point() or bool((tt == tt.round()).all()):
            steps = _as_timesteps(t, batch, len(self._abar), device)
            return table[steps].reshape(batch, 1, 1)
        tt = tt.to(_F64).reshape(-1)
        tt = tt.expand(batch) if tt.numel() == 1 else tt
        if tt.numel() != batch:
            raise ValueError(f"got {tt.numel()} timesteps for a batch of {batch}")
        if bool(((tt < 0) | (tt > len(table) - 1)).any()) or not bool(tt.isfinite().all()):
            raise ValueError(f"timesteps must lie in [0, {len(table) - 1}], got {tt.tolist()}")
        lo = tt.floor().long()
        hi = (lo + 1).clamp_max(len(table) - 1)
        w = tt - lo
        log_abar = (1 - w) * table[lo].log() + w * table[hi].log()
        return log_abar.exp().reshape(batch, 1, 1)

    # -- the noised prior -----------------------------------------------------------------

    def _responsibilities(self, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(log p_t(x) (B,), log responsibilities (B, K), component variances u (B, K, D))."""
        means, variances, weights = self._params(x)
        means_t, var_t = diffuse_diagonal(means, variances, a)
        joint = diagonal_log_density(x, means_t, var_t) + weights.log()
        log_p = torch.logsumexp(joint, dim=-1)
        return log_p, joint - log_p.unsqueeze(-1), var_t

    def log_prob(self, x: Tensor, t: Tensor | int | None = None) -> Tensor:
        """log p0(x) (t None) or log p_t(x_t) at timestep t: (B,), float64, differentiable."""
        flat = self._flat(x)
        if t is None:
            a = torch.ones(flat.shape[0], 1, 1, dtype=_F64, device=flat.device)
        else:
            a = self.abar(t, flat.shape[0], flat.device)
        return self._responsibilities(flat, a)[0]

    def score(self, x_t: Tensor, t: Tensor | int) -> Tensor:
        """grad log p_t(x_t) = -sum_k r_k(x_t) (x_t - sqrt(abar) m_k) / u_k, float64, x_t's shape.

        r_k are the responsibilities of the noised components, u_k = abar v_k + 1 - abar.
        """
        flat = self._flat(x_t)
        a = self.abar(t, flat.shape[0], flat.device)
        means = self.means.to(flat.device)
        _, log_r, var_t = self._responsibilities(flat, a)
        per_comp = -(flat.unsqueeze(-2) - a.sqrt() * means) / var_t
        return (log_r.exp().unsqueeze(-1) * per_comp).sum(-2).reshape(x_t.shape)

    def eps(self, x_t: Tensor, t: Tensor | int) -> Tensor:
        """The exact eps(x_t, t) = -sqrt(1 - abar_t) grad log p_t(x_t), in x_t's dtype."""
        flat = self._flat(x_t)
        a = self.abar(t, flat.shape[0], flat.device).reshape(-1, 1)
        out = -(1 - a).sqrt() * self.score(flat, t)
        return out.reshape(x_t.shape).to(x_t.dtype)

    def x0_mean(self, x_t: Tensor, t: Tensor | int) -> Tensor:
        """The exact E[x0 | x_t] = sum_k r_k(x_t) mu_k(x_t) (no clipping), in x_t's dtype."""
        flat = self._flat(x_t)
        a = self.abar(t, flat.shape[0], flat.device)
        means, variances, _ = self._params(flat)
        _, log_r, _ = self._responsibilities(flat, a)
        mu, _ = x0_given_xt_diagonal(flat, means, variances, a)
        out = (log_r.exp().unsqueeze(-1) * mu).sum(-2)
        return out.reshape(x_t.shape).to(x_t.dtype)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n draws of x0, shape (n, *image_shape), float64."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=_F64, device=self.means.device)
        x = self.means[comp] + self.variances[comp].sqrt() * z
        return x.reshape(n, *self.image_shape)

    def mean(self) -> Tensor:
        """E[x0], shape image_shape."""
        return (self.weights @ self.means).reshape(self.image_shape)

    def variance(self) -> Tensor:
        """Var[x0] per coordinate: sum_k pi_k (v_k + m_k^2) - E[x0]^2, shape image_shape."""
        mean = self.weights @ self.means
        second = self.weights @ (self.variances + self.means.square())
        return (second - mean.square()).reshape(self.image_shape)

    # -- linear measurements y = A x0 + sigma_y n -------------------------------------------

    def posterior(self, A: Tensor | LinearMap, y: Tensor, sigma_y: float) -> GaussianMixture:
        """The exact p(x0 | y) for y = A x0 + sigma_y n: a mixture with weights
        w_k ∝ pi_k N(y; A m_k, A S_k A^T + sigma_y^2 I) and each component conditioned
        (see `condition_on_linear_measurement`). `log_evidence` holds log p(y)."""
        mat = operator_matrix(A, self.image_shape).to(self.means.device)
        y = self._one_measurement(y, mat.shape[0]).to(self.means.device)
        means, covs, log_ev = condition_on_linear_measurement(
            self.means, torch.diag_embed(self.variances), mat, y, sigma_y
        )
        joint = log_ev + self.weights.log()
        log_evidence = torch.logsumexp(joint, dim=0)
        return GaussianMixture(
            (joint - log_evidence).exp(), means, covs, self.image_shape, log_evidence
        )

    @staticmethod
    def _one_measurement(y: Tensor, num_meas: int) -> Tensor:
        y = torch.as_tensor(y)
        if y.numel() != num_meas:
            raise ValueError(f"expected one measurement of {num_meas} values, got {tuple(y.shape)}")
        return y.reshape(num_meas).to(_F64)

    def log_likelihood(
        self, x_t: Tensor, t: Tensor | int, A: Tensor | LinearMap, y: Tensor, sigma_y: float
    ) -> Tensor:
        """log p(y | x_t) (B,), float64, differentiable in x_t.

        x0 | x_t is the mixture sum_k r_k(x_t) N(mu_k(x_t), diag P_k) (`x0_given_xt_diagonal`),
        so p(y | x_t) = sum_k r_k(x_t) N(y; A mu_k(x_t), A diag(P_k) A^T + sigma_y^2 I).
        y: (M,) shared by the batch, or (B, M) / (B, *measurement_shape) one per item.
        """
        flat = self._flat(x_t)
        batch = flat.shape[0]
        mat = operator_matrix(A, self.image_shape).to(flat.device)
        num_meas = mat.shape[0]
        y = torch.as_tensor(y, device=flat.device).to(_F64)
        if y.numel() == num_meas:
            y = y.reshape(1, num_meas).expand(batch, num_meas)
        elif y.shape[0] == batch and y[0].numel() == num_meas:
            y = y.reshape(batch, num_meas)
        else:
            raise ValueError(
                f"expected y of {num_meas} values, shared or one per item of {batch}, "
                f"got {tuple(y.shape)}"
            )
        steps = _as_timesteps(t, batch, len(self._abar), flat.device)
        means, variances, _ = self._params(flat)
        out = flat.new_empty(batch)
        eye = torch.eye(num_meas, dtype=_F64, device=flat.device)
        # The measurement covariance depends on t only: factor it once per distinct timestep.
        for step in steps.unique().tolist():
            rows = (steps == step).nonzero().flatten()
            a = self._abar.to(flat.device)[step].reshape(1, 1, 1)
            xs = flat[rows]
            _, log_r, _ = self._responsibilities(xs, a.expand(len(rows), 1, 1))
            mu, p = x0_given_xt_diagonal(xs, means, variances, a)  # (R, K, D), (1, K, D)
            cov_y = (mat * p[0].unsqueeze(-2)) @ mat.T + float(sigma_y) ** 2 * eye  # (K, M, M)
            try:
                comps = gaussian_log_density(y[rows], mu @ mat.T, cov_y)
            except ValueError as err:
                raise ValueError(f"p(y | x_t) at t={step} is degenerate: {err}") from err
            out = out.index_put((rows,), torch.logsumexp(comps + log_r, dim=-1))
        return out

    def likelihood_score(
        self, x_t: Tensor, t: Tensor | int, A: Tensor | LinearMap, y: Tensor, sigma_y: float
    ) -> Tensor:
        """The exact guidance score grad_{x_t} log p(y | x_t), x_t's shape and dtype."""
        with torch.enable_grad():
            x = x_t.detach().to(_F64).requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_likelihood(x, t, A, y, sigma_y).sum(), x)
        return grad.to(x_t.dtype)
