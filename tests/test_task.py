"""`Task` is a value: measuring and restoring never change it; the drawn task travels with y."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dpgkit as dk
from dpgkit.operators import Inpainting, MotionBlur


def _x(batch: int, shape=(1, 8, 8), seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, *shape, generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8


def test_restoring_with_a_drawn_task_leaves_the_original_task_unchanged():
    template = Inpainting.box(side=(3, 3), margin=1)
    task = dk.Task(template, dk.noise.Gaussian(0.05))
    x = _x(2)
    y, drawn = task.measure(x, seed=4, indices=[5, 9])
    assert task.operator is template and template.is_random and task.is_drawn is False
    assert drawn.is_drawn and drawn.operator.batch_size == 2 and drawn.noise is task.noise
    f64 = {"dtype": torch.float64}
    model = dk.models.GaussianMixturePrior(torch.zeros(1, 1, 8, 8, **f64), torch.tensor([0.5], **f64),
                                           torch.ones(1, **f64)).as_model()
    before = drawn.operator.mask.clone()
    solver = dk.solvers.DPG(scale=0.5, num_samples=8, sampler="ddim", steps=3)
    solver.restore(model, drawn, y, seed=4, indices=[5, 9])
    assert task.operator is template and template.is_random
    assert torch.equal(drawn.operator.mask, before)
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.operator = drawn.operator  # type: ignore[misc]
    # the template itself cannot be solved with: the error says to use the drawn task
    with pytest.raises(ValueError, match="task.measure"):
        solver.restore(model, task, y)
    with pytest.raises(TypeError, match="unpack"):
        solver.restore(model, task, (y, drawn))


def test_two_measurements_of_one_task_are_independent_values():
    task = dk.Task(MotionBlur(7, 0.5), dk.noise.Gaussian(0.05))
    x = _x(1, (3, 16, 16))
    _, first = task.measure(x, seed=0, indices=[0])
    _, second = task.measure(x, seed=0, indices=[1])
    assert not torch.equal(first.operator.kernel, second.operator.kernel)
    _, again = task.measure(x, seed=0, indices=[0])
    assert torch.equal(first.operator.kernel, again.operator.kernel)


@pytest.mark.parametrize("noise", [dk.noise.Gaussian(0.05), dk.noise.Poisson(1.0)])
def test_unobserved_pixels_are_zero_unless_noise_is_asked_for_there(noise):
    mask = (torch.arange(64).reshape(1, 1, 8, 8) % 3 != 0).float()
    x = _x(4)
    quiet, _ = dk.Task(Inpainting(mask), noise).measure(x, seed=1)
    noisy, _ = dk.Task(Inpainting(mask), noise, noisy_unobserved=True).measure(x, seed=1)
    missing = (mask == 0).expand_as(quiet)
    assert torch.count_nonzero(quiet[missing]) == 0
    # the authors' convention: noise everywhere, so the missing pixels hold pure noise around A(x) = 0
    expected_std = 0.05 if isinstance(noise, dk.noise.Gaussian) else 0.089
    assert float(noisy[missing].std()) == pytest.approx(expected_std, rel=0.25)
    assert torch.equal(quiet[~missing], noisy[~missing])  # the observed pixels are the same draw


def test_with_operator_returns_a_new_task():
    task = dk.Task(Inpainting(torch.ones(1, 1, 4, 4)), dk.noise.Gaussian(0.1), noisy_unobserved=True)
    other = task.with_operator(Inpainting(torch.zeros(1, 1, 4, 4)))
    assert other is not task and other.noise is task.noise and other.noisy_unobserved
    assert float(task.operator.mask.sum()) == 16
