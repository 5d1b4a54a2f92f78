"""The bkse blur network against reference numerics and the GOPRO checkpoint layout; the loader's
checks; the NonlinearBlur operator's draws; DPG and DPS restoring through it."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

import dpgkit as dk
from dpgkit.models.gmm import GaussianMixturePrior
from dpgkit.operators import EncodedBlur, NonlinearBlur
from dpgkit.operators.bkse import (
    KernelWizard,
    KernelWizardCheckpointError,
    KernelWizardConfig,
    load_kernel_wizard,
    random_kernel_wizard,
)

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "bkse"
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"bkse reference fixtures not found at {FIXTURES}"
)

# The fixture's small configuration (same code paths as GOPRO wVAE), usable without the fixture.
TINY = {"nf": 8, "front_RBs": 1, "back_RBs": 1, "kernel_dim": 64, "KernelExtractor": {"n_blocks": 1}}
SHAPE = (3, 128, 128)  # the smallest image the network takes: a 1 x 1 code


def _images(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, 8, 8, generator=g) * 1.6 - 0.8
    return torch.nn.functional.interpolate(low, size=SHAPE[1:], mode="bilinear")


# -- the network ---------------------------------------------------------------------------------

@needs_fixtures
def test_matches_reference_numerics(tmp_path):
    ref = torch.load(FIXTURES / "bkse_tiny.pt", weights_only=True)
    assert KernelWizardConfig.from_options(ref["config"]) == KernelWizardConfig.from_options(TINY)
    with torch.device("meta"):
        net = KernelWizard(ref["config"])
    assert list(net.state_dict()) == list(ref["state_dict"])
    net.load_state_dict(ref["state_dict"], strict=True, assign=True)
    with torch.no_grad():
        for i in range(2):  # the reference ran each item alone
            out = net.eval().adapt_kernel(ref["x01"][i : i + 1], ref["kernel"][i : i + 1])
            err = (out - ref["out01"][i : i + 1]).abs().max().item()
            assert err < 1e-4, f"item {i}: max abs error {err:.3g} vs the reference"
        batch = net.adapt_kernel(ref["x01"], ref["kernel"])
    assert (batch - ref["out01"]).abs().max().item() < 1e-4

    # the same through the checkpoint loader and the operator on [-1, 1] images
    torch.save(ref["state_dict"], tmp_path / "tiny.pth")
    op = EncodedBlur(load_kernel_wizard(tmp_path / "tiny.pth", ref["config"]), ref["kernel"])
    with torch.no_grad():
        y = op(2 * ref["x01"] - 1)
    expected = (2 * ref["out01"] - 1).clamp(-1, 1)
    assert (y - expected).abs().max().item() < 2e-4
    assert y.min() >= -1 and y.max() <= 1 and (expected == 1).any()  # the clamp acts on these outputs


def test_gopro_configuration_on_the_meta_device():
    with torch.device("meta"):
        net = KernelWizard()  # the published GOPRO wVAE configuration
    state = net.state_dict()
    assert len(state) == 159
    assert sum(v.numel() for v in state.values()) == 115_265_475
    assert all(v.is_meta for v in state.values())
    if FIXTURES.is_dir():
        layout = json.loads((FIXTURES / "bkse_gopro_layout.json").read_text())
        assert KernelWizardConfig.from_options(layout["config"]) == KernelWizardConfig()
        assert [[k, list(v.shape)] for k, v in state.items()] == layout["tensors"]
        assert (layout["num_tensors"], layout["num_parameters"]) == (159, 115_265_475)


def test_encoder_shapes():
    # F's reflect-padded blocks need a code of at least 2 x 2: 256 x 256 images, as published
    net = random_kernel_wizard(0, TINY)
    x = torch.nn.functional.interpolate(_images(2), size=(256, 256), mode="bilinear")
    with torch.no_grad():
        mean, log_var = net((x + 1) / 2, (x + 1) / 2)
    assert mean.shape == log_var.shape == (2, 64, 2, 2)
    assert not torch.equal(mean, log_var)


def test_random_weights_are_seeded_and_leave_the_global_rng_alone():
    before = torch.random.get_rng_state()
    a, b, c = (random_kernel_wizard(s, TINY).state_dict() for s in (3, 3, 4))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["recon_trunk.0.conv1.weight"], c["recon_trunk.0.conv1.weight"])
    assert not any(p.requires_grad for p in random_kernel_wizard(3, TINY).parameters())


def test_checkpoint_checks(tmp_path):
    state = random_kernel_wizard(0, TINY).state_dict()

    renamed = dict(state)
    renamed["adapter.model.up.1.bias_renamed"] = renamed.pop("adapter.model.up.1.bias")
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(KernelWizardCheckpointError) as info:
        load_kernel_wizard(tmp_path / "renamed.pth", TINY)
    message = str(info.value)
    assert "missing" in message and "adapter.model.up.1.bias\n" in message + "\n"
    assert "unexpected" in message and "adapter.model.up.1.bias_renamed" in message
    assert info.value.missing == ["adapter.model.up.1.bias"]

    misshapen = dict(state)
    misshapen["recon_trunk.1.weight"] = torch.zeros(16, 8, 3, 3)
    torch.save(misshapen, tmp_path / "misshapen.pth")
    with pytest.raises(KernelWizardCheckpointError, match=r"recon_trunk\.1\.weight: checkpoint \(16, 8, 3, 3\)"):
        load_kernel_wizard(tmp_path / "misshapen.pth", TINY)

    # the full network refuses the small one's tensors, naming what differs
    torch.save(state, tmp_path / "small.pth")
    with pytest.raises(KernelWizardCheckpointError, match="wrongly shaped"):
        load_kernel_wizard(tmp_path / "small.pth")

    # wrappings: DataParallel's "module." prefix and a {"state_dict": ...} dict load the same
    x = _images(1)
    code = torch.randn(1, 64, 1, 1, generator=torch.Generator().manual_seed(0))
    reference = random_kernel_wizard(0, TINY).adapt_kernel((x + 1) / 2, code)
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "dp.pth")
    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")
    for name in ("dp.pth", "wrapped.pth"):
        net = load_kernel_wizard(tmp_path / name, TINY)
        torch.testing.assert_close(net.adapt_kernel((x + 1) / 2, code), reference, rtol=0, atol=0)


def test_missing_checkpoint_names_the_file_and_where_it_is_published(tmp_path):
    op = NonlinearBlur(checkpoint=tmp_path / "nowhere.pth")  # reads nothing yet: recipes build without it
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth.*blur-kernel-space-exploring"):
        op.draw([0], (3, 256, 256))
    with pytest.raises(FileNotFoundError, match=r"GOPRO_wVAE\.pth.*GOPRO wVAE"):
        load_kernel_wizard(tmp_path)  # a folder: the published file name inside it


def test_no_weights_refuses_clearly():
    with pytest.raises(ValueError, match=r"GOPRO_wVAE\.pth.*init_seed"):
        NonlinearBlur()
    with pytest.raises(ValueError, match="exactly one source"):
        NonlinearBlur(checkpoint="x.pth", init_seed=0)
    with pytest.raises(ValueError, match="unknown KernelWizard option"):
        NonlinearBlur(init_seed=0, config={"nf": 8, "front_RB": 1})
    with pytest.raises(ValueError, match="only 'none'"):
        NonlinearBlur(init_seed=0, config={"KernelExtractor": {"norm": "instance"}})


# -- the operator --------------------------------------------------------------------------------

def test_codes_are_drawn_per_item_with_the_published_law():
    op = NonlinearBlur(init_seed=0)  # GOPRO configuration; drawing codes needs no weights
    codes = op.draw_codes([11, 12, 11], (3, 256, 256))
    assert codes.shape == (3, 512, 2, 2)
    assert torch.equal(codes[0], codes[2]) and not torch.equal(codes[0], codes[1])
    assert abs(codes.std().item() - 1.2) < 0.05 and abs(codes.mean().item()) < 0.05
    assert op._network is None  # still not built
    with pytest.raises(ValueError, match="multiples of 128"):
        op.draw_codes([0], (3, 200, 256))
    with pytest.raises(ValueError, match="3-channel"):
        op.draw_codes([0], (1, 256, 256))


def test_same_item_same_blur_alone_or_in_a_batch():
    op = NonlinearBlur(init_seed=0, config=TINY)
    x = _images(3)
    task = dk.Task(op, dk.noise.Gaussian(0.0))
    batch, drawn_task = task.measure(x, seed=5, indices=[7, 8, 9])
    drawn = drawn_task.operator
    assert isinstance(drawn, EncodedBlur) and drawn.batch_size == 3 and drawn.network is op.network
    for b, idx in enumerate([7, 8, 9]):
        alone, _ = dk.Task(op, dk.noise.Gaussian(0.0)).measure(x[b : b + 1], seed=5, indices=[idx])
        torch.testing.assert_close(alone[0], batch[b], rtol=0, atol=1e-6)
        with torch.no_grad():  # item b's operator on any number of images (the Monte Carlo states)
            torch.testing.assert_close(drawn.item(b)(x[b : b + 1].expand(2, -1, -1, -1))[1], batch[b],
                                       rtol=0, atol=1e-6)
    # different items, different blurs: the same image under items 7 and 8's codes
    with torch.no_grad():
        same = x[:1].expand(2, -1, -1, -1)
        y7, y8 = drawn.item(0)(same), drawn.item(1)(same)
    assert (y7 - y8).abs().max() > 1e-3
    # the code is fixed once drawn (the DPS code redraws it at every call)
    with torch.no_grad():
        torch.testing.assert_close(drawn(x), drawn(x), rtol=0, atol=0)
    other, _ = dk.Task(op, dk.noise.Gaussian(0.0)).measure(x, seed=6, indices=[7, 8, 9])
    assert (other - batch).abs().max() > 1e-3


def test_operator_contract():
    op = NonlinearBlur(init_seed=0, config=TINY)
    assert op.is_random and not op.is_linear and op.differentiable
    with pytest.raises(RuntimeError, match="draw it first"):
        op(_images(1))
    drawn = op.draw([1, 2], SHAPE)
    with pytest.raises(ValueError, match="holds 2 per-item operators"):
        drawn(_images(3))
    with pytest.raises(ValueError, match="128 x 128"):
        drawn(torch.zeros(2, 3, 256, 256))
    # shapes and range; float64 images come back as float64
    x = _images(2).double()
    y = drawn(x)
    assert y.shape == x.shape and y.dtype == torch.float64 and y.min() >= -1 and y.max() <= 1
    # differentiable in x (DPS), the network's weights stay fixed
    x = _images(2).requires_grad_(True)
    (grad,) = torch.autograd.grad(drawn(x).square().sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert not any(p.requires_grad for p in drawn.network.parameters())
    # a template pickles without its network (worker processes)
    clone = pickle.loads(pickle.dumps(NonlinearBlur(checkpoint="GOPRO_wVAE.pth")))
    assert clone.checkpoint == "GOPRO_wVAE.pth" and clone._network is None


# -- solvers through it --------------------------------------------------------------------------

def _two_mode_problem():
    """A prior with two well-separated modes (weights 0.1 / 0.9) and images from the rare one,
    blurred by the small network: the unguided chain lands in the common mode, far from y."""
    g = torch.Generator().manual_seed(0)
    means = torch.nn.functional.interpolate(torch.rand(2, 3, 4, 4, generator=g) * 1.2 - 0.6,
                                            size=SHAPE[1:], mode="bilinear")
    prior = GaussianMixturePrior(means, torch.tensor([0.05, 0.05]), torch.tensor([0.1, 0.9]))
    x = (means[0] + 0.05 * torch.randn(2, *SHAPE, generator=g)).float()
    task = dk.Task(NonlinearBlur(init_seed=0, config=TINY), dk.noise.Gaussian(0.05))
    y, drawn = task.measure(x, seed=0, indices=[2, 3])
    return prior.as_model(), drawn, y


def _unguided(steps: dict) -> dk.solvers.DPS:
    """The same chain and draws without guidance (a zero scale is refused when a solver is built)."""
    solver = dk.solvers.DPS(scale=1.0, **steps)
    solver.scale = 0.0
    return solver


def test_dpg_conditions_on_a_nonlinear_blur():
    model, task, y = _two_mode_problem()
    steps, indices = dict(sampler="ddpm", steps=10), [2, 3]
    unguided = _unguided(steps).restore(model, task, y, seed=0, indices=indices)
    guided = dk.solvers.DPG(scale=10.0, num_samples=6, **steps).restore(model, task, y, seed=0, indices=indices)

    def residual(out):
        with torch.no_grad():
            return (task.operator(out) - y).flatten(1).norm(dim=1)

    # the noise alone gives ||y - A(x)|| about 0.05 sqrt(3 * 128 * 128) = 11
    assert (residual(guided) < 0.5 * residual(unguided)).all(), (residual(guided), residual(unguided))


def test_dps_differentiates_through_it():
    model, task, y = _two_mode_problem()
    steps, indices = dict(sampler="ddpm", steps=10), [2, 3]
    unguided = _unguided(steps).restore(model, task, y, seed=0, indices=indices)
    guided = dk.solvers.DPS(scale=0.3, **steps).restore(model, task, y, seed=0, indices=indices)
    res = lambda out: (task.operator(out) - y).flatten(1).norm(dim=1)  # noqa: E731
    with torch.no_grad():
        assert (res(guided) < 0.5 * res(unguided)).all(), (res(guided), res(unguided))


def test_recipe_reads_the_checkpoint_only_when_drawing(tmp_path):
    from dpgkit.lightning.cli import PredictCLI

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "imagenet_nonlinear_deblur.yaml"
    args = ["--config", str(recipe), "--model.prior.checkpoint", "null", "--trainer.accelerator", "cpu",
            "--model.operator.init_args.checkpoint", str(tmp_path / "GOPRO_wVAE.pth")]
    template = PredictCLI(args=args, run=False).model.task.operator
    assert isinstance(template, NonlinearBlur) and template._network is None
    with pytest.raises(FileNotFoundError, match=r"GOPRO_wVAE\.pth.*VinAIResearch"):
        dk.Task(template, dk.noise.Gaussian(0.05)).measure(torch.zeros(1, 3, 256, 256))
