"""RED-Diff (Mardani et al., ICLR 2024): variational posterior sampling, the denoiser as a regulariser.

The mean mu of q(x0 | y) = N(mu, ~0) is optimised by Adam over the timesteps, in descending order.
At timestep t, with x_t = sqrt(abar_t) mu + sqrt(1 - abar_t) eps, eps ~ N(0, I), the loss is

    obs_weight * ||y - A(mu)||^2 / (2 M) + lambda_t * sg(eps_theta(x_t, t) - eps)^T mu / D,

lambda_t = lambda * sigma_t / alpha_t = lambda * sqrt(1 - abar_t) / sqrt(abar_t) (the "linear" SNR
weighting of the authors' code). The terms are per-image means (M measurements, D pixels), as
in that code, so lambda keeps its meaning at any image size; sigma_y does not enter the loss (as
in that code: lambda is the knob that trades fit for prior, tuned there at sigma_y = 0.05). The network is never
differentiated (stop-gradient); A is, so it must be differentiable. Each image's loss is its own:
Adam's per-coordinate state keeps the images of a batch independent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..noise import Gaussian
from ..operators.base import LinearOperator
from ..seeding import randn_per_item
from ..task import Task
from .base import Callback, ReverseChain, Solver, StepInfo
from .params import choice, number
from .requirements import require_differentiable

__all__ = ["RedDiff", "RedDiffStepInfo"]

_INITS = ("auto", "pinv", "zeros", "noise")


@dataclass
class RedDiffStepInfo(StepInfo):
    """A `StepInfo` (x_t the noised mu, x0hat = mu before the update) and the objective per image.

    The regulariser is known only through its gradient: since eps_theta - eps =
    sqrt(abar) (mu - D_t(mu)) / sqrt(1 - abar), D_t(mu) the denoiser's x0 at x_t, the update follows
    c_t (mu - D_t(mu)) with c_t = lambda_t sqrt(abar) / sqrt(1 - abar) (= lambda for the published
    "linear" weighting), as RED does. `objective` is that RED energy:
    obs_weight ||y - A mu||^2 / (2 M) + c_t ||mu - D_t(mu)||^2 / (2 D).
    """

    objective: Tensor  # (B,)


class RedDiff(Solver):
    """RED-Diff.

    Args:
        steps: Adam iterations, one per timestep of an evenly strided schedule (published: 1000).
        lr: Adam's learning rate (betas (0.9, 0.99), as the authors' code).
        lambda_: weight of the denoising regulariser (the authors' configs: 0.25).
        obs_weight: weight of the data term (1).
        weighting: lambda_t = lambda * w(sigma_t / alpha_t): "linear" (published), "sqrt", "square",
            "log" (log(1 + snr^-1)), "const".
        init: mu at the start: "pinv" (A^+ y, through the SVD view), "zeros", "noise" (the x_T
            draw), or "auto" (pinv where the operator has an SVD view, else zeros). The pinv
            ignores singular values below 3e-2, as the DDRM H-functions the authors' code uses.
    """

    name = "reddiff"
    sampler = "ddim"

    @property
    def label(self) -> str:
        return "RED-Diff"

    def __init__(self, steps: int = 1000, lr: float = 0.1, lambda_: float = 0.25, obs_weight: float = 1.0,
                 weighting: str = "linear", init: str = "auto") -> None:
        self.steps = number("RED-Diff", "steps", steps, low=1, integer=True)
        self.lr = number("RED-Diff", "lr", lr, low=0, low_open=True)
        self.lambda_ = number("RED-Diff", "lambda_", lambda_, low=0)
        self.obs_weight = number("RED-Diff", "obs_weight", obs_weight, low=0, low_open=True)
        self.weighting = choice("RED-Diff", "weighting", weighting, tuple(_WEIGHTINGS))
        self.init = choice("RED-Diff", "init", init, _INITS)

    def __repr__(self) -> str:
        return (f"RedDiff(steps={self.steps}, lr={self.lr}, lambda_={self.lambda_}, "
                f"weighting={self.weighting!r}, init={self.init!r})")

    def check(self, task: Task) -> None:
        require_differentiable(task, "RED-Diff")
        if not isinstance(task.noise, Gaussian):
            raise ValueError(
                f"RED-Diff's data term is the Gaussian likelihood, got {task.noise!r}. "
                "Use dpgkit.solvers.DPG, which supports Poisson noise."
            )

    def sample(self, chain: ReverseChain, task: Task, y: Tensor, callback: Callback | None) -> Tensor:
        op, model = task.operator, chain.model
        mu = self._initial(chain, task, y).detach().requires_grad_(True)
        opt = torch.optim.Adam([mu], lr=self.lr, betas=(0.9, 0.99), weight_decay=0.0)
        num_meas = y[0].numel()
        dim = mu[0].numel()
        for step, _i, i_vec, t_vec in chain.steps():
            abar = chain.abar(i_vec, mu)
            lam = self.lambda_ * _WEIGHTINGS[self.weighting](((1 - abar) / abar).sqrt())
            noise = randn_per_item(model.image_shape, chain.seed, chain.indices, "reddiff", step, like=mu)
            with torch.no_grad():
                x_t = abar.sqrt() * mu + (1 - abar).sqrt() * noise
                score_gap = model.eps(x_t, t_vec) - noise  # held constant: no network backward
            with torch.enable_grad():
                fit = (y - op(mu)).flatten(1).square().sum(1) / (2 * num_meas)
                reg = (lam * score_gap * mu).flatten(1).sum(1) / dim
                loss = self.obs_weight * fit + reg  # (B,): each image's own loss
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
            with torch.no_grad():
                mu_before = mu.detach().clone()
                info = None
                if callback is not None:
                    # c_t ||mu - D_t(mu)||^2 = lambda_t sqrt((1 - abar) / abar) ||eps_theta - eps||^2
                    gap = lam * ((1 - abar) / abar).sqrt() * score_gap.square()
                    energy = self.obs_weight * fit.detach() + gap.flatten(1).sum(1) / (2 * dim)
                    info = RedDiffStepInfo(step, int(t_vec[0]), x_t, mu_before,
                                           (2 * num_meas * fit.detach()).sqrt(), energy)
                opt.step()
                mu.copy_(chain.finish(step, int(t_vec[0]), mu_before, mu, mu_before, y, callback, info=info))
        return chain.result(mu.detach())

    def _initial(self, chain: ReverseChain, task: Task, y: Tensor) -> Tensor:
        """mu at the start: A^+ y, zeros, or the x_T draw."""
        like = torch.empty(y.shape[0], *chain.model.image_shape, device=y.device, dtype=y.dtype)
        init = self.init
        op = task.operator
        if init == "auto":
            init = "pinv" if isinstance(op, LinearOperator) and _has_svd(op, chain.model.image_shape) else "zeros"
        if init == "noise":
            return chain.initial_state()
        if init == "zeros":
            return torch.zeros_like(like)
        from .spectral import spectral_problem  # A^+ y = V (y-bar)

        spec = spectral_problem("RED-Diff's pinv init", task, y, chain.model.image_shape, 3e-2)
        return spec.v(spec.ybar, like)


def _has_svd(op: LinearOperator, image_shape: Sequence[int]) -> bool:
    try:
        op.svd(tuple(image_shape))
    except NotImplementedError:
        return False
    return True


_WEIGHTINGS = {
    "linear": lambda r: r,
    "sqrt": lambda r: r.sqrt(),
    "square": lambda r: r.square(),
    "log": lambda r: torch.log1p(r),
    "const": lambda r: torch.ones_like(r),
}
