"""The gather tables that tell the fused kernels what A is: each must compute the operator itself."""

from __future__ import annotations

import pytest
import torch

import dpgkit as dk
from dpgkit.kernels.fusion import apply_plan, energy_kind, plan_for


def _image(shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("operator,shape,fan_in", [
    (dk.operators.Denoising(), (3, 5, 7), 1),
    (dk.operators.Colorization(), (3, 5, 7), 3),
    (dk.operators.Colorization(), (4, 2, 3), 4),
    (dk.operators.SuperResolution(1), (3, 5, 7), 1),
    (dk.operators.SuperResolution(2), (3, 4, 6), 4),
    (dk.operators.SuperResolution(4), (2, 8, 12), 16),
    (dk.operators.SuperResolution(3), (1, 9, 6), 9),
], ids=["denoising", "colorization", "colorization_4ch", "sr1", "sr2", "sr4", "sr3_grey"])
def test_table_computes_the_operator(operator, shape, fan_in):
    plan = plan_for(operator, shape, "cpu")
    x = _image(shape)
    assert plan.fan_in == fan_in and plan.keep is None
    torch.testing.assert_close(apply_plan(plan, x), operator(x[None]).reshape(-1), rtol=1e-6, atol=1e-6)
    # every input element is gathered exactly once: A eps draws each eps once
    assert torch.equal(plan.idx.flatten().sort().values, torch.arange(x.numel(), dtype=torch.int32))


@pytest.mark.parametrize("mask_shape", [(1, 1, 5, 7), (1, 3, 5, 7)], ids=["shared", "per_channel"])
def test_mask_table_keeps_only_observed_outputs(mask_shape):
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(*mask_shape, generator=g) > 0.7).float() * torch.rand(*mask_shape, generator=g)
    op = dk.operators.Inpainting(mask)
    x = _image((3, 5, 7))
    plan = plan_for(op, (3, 5, 7), "cpu")
    observed = int((mask.expand(1, 3, 5, 7) != 0).sum())
    assert plan.kept == observed and 0 < observed < x.numel() and plan.out_numel == x.numel()
    torch.testing.assert_close(apply_plan(plan, x), op(x[None]).reshape(-1), rtol=0, atol=1e-7)


def test_per_item_masks_give_per_item_tables():
    masks = torch.zeros(2, 1, 4, 4)
    masks[0, :, :2] = 1
    masks[1, :, :, :1] = 1
    op = dk.operators.Inpainting(masks)
    plans = [plan_for(op.item(b), (3, 4, 4), "cpu") for b in range(2)]
    assert plans[0].kept == 3 * 8 and plans[1].kept == 3 * 4


@pytest.mark.parametrize("operator", [
    dk.operators.GaussianBlur(5, 1.0),
    dk.operators.SuperResolution(2, "bicubic"),
    dk.operators.BlackBox(lambda img: img[:1]),
], ids=["blur", "bicubic", "black_box"])
def test_other_operators_say_why_they_are_not_fused(operator):
    reason = plan_for(operator, (3, 8, 8), "cpu")
    assert isinstance(reason, str) and reason


def test_mask_that_does_not_fit_the_images_is_an_error():
    with pytest.raises(ValueError, match="mask"):
        plan_for(dk.operators.Inpainting(torch.ones(1, 1, 4, 4)), (3, 5, 5), "cpu")


def test_energy_kind_only_for_stock_energies():
    class Custom(dk.noise.Poisson):
        def energy(self, y, ax, batch_dims=1):
            return super().energy(y, ax, batch_dims) ** 2

    assert energy_kind(dk.noise.Gaussian(0.05)) == "l2"
    assert energy_kind(dk.noise.Noiseless()) == "l2"
    assert energy_kind(dk.noise.Poisson(1.0)) == "l1"
    assert energy_kind(Custom(1.0)) is None
