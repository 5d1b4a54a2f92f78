"""Adapters: diffusers priors, deepinv physics, and the `lightning run predict` script."""

from __future__ import annotations

import contextlib
import io as stdio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dpgkit as dk
from dpgkit.diffusion import at_step, model_log_variance, tweedie_x0
from dpgkit.lightning.cli import main as dpgkit_main
from dpgkit.solvers.dpg import DPG

# ----------------------------------------------------------------------------------------- helpers


def _measure(task: dk.Task, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, dk.Task]:
    y, drawn = task.measure(x, seed=seed)
    return y, drawn


def _write_images(folder: Path, count: int = 2, size: int = 16) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(folder / f"img{i}.png")


def _run_in_process(*args: str) -> str:
    out = stdio.StringIO()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out):
            assert dpgkit_main(["predict", *args]) == 0
    finally:
        torch.set_num_threads(before)
    return out.getvalue()


SOLVER = """\
  operator:
    class_path: dpgkit.operators.SuperResolution
    init_args: {factor: 2}
  noise:
    class_path: dpgkit.noise.Gaussian
    init_args: {sigma: 0.05}
  solver:
    class_path: dpgkit.solvers.DPG
    init_args: {scale: 5.0, num_samples: 8, sampler: ddim, steps: 6}
  seed: 3
  lpips: null
data:
  root: IMAGES
  image_size: 16
  batch_size: 1
trainer:
  accelerator: cpu
  devices: 1
"""

# --------------------------------------------------------------------------------------- diffusers


def _need_diffusers():
    return pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'dpgkit[diffusers]')")


def _tiny_unet(out_channels: int = 3):
    d = _need_diffusers()
    torch.manual_seed(0)
    return d.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=out_channels, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
    )


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0hat_equals_the_schedulers_pred_original_sample(prediction_type, beta_schedule):
    d = _need_diffusers()
    unet = _tiny_unet(out_channels=6)  # with learned-range variance channels
    scheduler = d.DDPMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type,
                                variance_type="learned_range")
    model = dk.models.from_diffusers(unet, scheduler)
    assert model.learned_sigma is True and model.image_shape == (3, 16, 16)
    # the betas are diffusers' float32 table; dpgkit takes their cumulative product in float64
    assert torch.equal(model.schedule.betas.float(), scheduler.betas)
    torch.testing.assert_close(model.schedule.alphas_cumprod.float(), scheduler.alphas_cumprod, rtol=1e-5, atol=0)
    g = torch.Generator().manual_seed(1)
    for t in (0, 1, 250, 500, 999):
        tt = torch.full((2,), t)
        # float64 network and states: the conversion itself (what is left is diffusers' float32 abar)
        unet.double()
        x = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
        with torch.no_grad():
            ref = scheduler.step(unet(x, tt).sample, t, x).pred_original_sample
            eps, values = model.eps_and_variance(x, tt)
        mine = tweedie_x0(x, eps, at_step(model.schedule.alphas_cumprod, tt, x), clip=True)
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-5)
        if t > 0:  # diffusers does not clip the posterior variance at t = 0, guided-diffusion does
            ours = model_log_variance(model.schedule, tt, x, kind="learned_range", values=values)
            theirs = scheduler._get_variance(t, predicted_variance=values)
            torch.testing.assert_close(ours, theirs.to(ours.dtype).expand_as(ours), rtol=1e-4, atol=1e-5)
        # float32, as the solvers run: eps round trips lose a little where abar_t is ~1 or ~0
        unet.float()
        x32 = x.float()
        with torch.no_grad():
            ref32 = scheduler.step(unet(x32, tt).sample, t, x32).pred_original_sample
            eps32 = model.eps(x32, tt)
        mine32 = tweedie_x0(x32, eps32, at_step(model.schedule.alphas_cumprod, tt, x32), clip=True)
        torch.testing.assert_close(mine32, ref32, rtol=0, atol=5e-3)


def test_from_diffusers_reads_pipeline_and_unet_folders(tmp_path):
    d = _need_diffusers()
    unet = _tiny_unet()
    scheduler = d.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    d.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    unet.save_pretrained(tmp_path / "unet_only")
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([123])
    with torch.no_grad():
        expected = dk.models.from_diffusers(unet, scheduler).eps(x, t)
        from_pipe = dk.models.from_diffusers(tmp_path / "pipe")
        from_unet = dk.models.from_diffusers(tmp_path / "unet_only", scheduler=tmp_path / "pipe" / "scheduler")
        assert from_pipe.learned_sigma is False
        torch.testing.assert_close(from_pipe.eps(x, t), expected)
        torch.testing.assert_close(from_unet.eps(x, t), expected)
    # the UNet folder alone has no scheduler config: the error says what to give
    with pytest.raises(ValueError, match="scheduler_config.json"):
        dk.models.from_diffusers(tmp_path / "unet_only")


def test_from_diffusers_errors_name_what_is_expected(tmp_path):
    d = _need_diffusers()
    with pytest.raises(FileNotFoundError, match="model_index.json.*scheduler_config.json"):
        dk.models.from_diffusers(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither model_index.json nor config.json"):
        dk.models.from_diffusers(tmp_path / "empty")
    unet = _tiny_unet()
    unet.save_pretrained(tmp_path / "u")
    (tmp_path / "u" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        dk.models.from_diffusers(tmp_path / "u", scheduler={"beta_schedule": "linear"})
    with pytest.raises(ValueError, match="beta_schedule 'sigmoid'"):
        dk.models.from_diffusers(unet, {"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="variance_type"):
        dk.models.from_diffusers(_tiny_unet(out_channels=6), {"variance_type": "fixed_small"})
    # weights that do not fit the config are an error, not a silently random layer
    other = d.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                          down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                          norm_num_groups=8)
    other.save_pretrained(tmp_path / "mismatch")
    unet.save_pretrained(tmp_path / "right")
    (tmp_path / "mismatch" / "config.json").write_text((tmp_path / "right" / "config.json").read_text())
    with pytest.raises(ValueError, match="shape mismatch"):
        dk.models.from_diffusers(tmp_path / "mismatch", scheduler={})


def test_a_diffusers_prior_restores_through_dpgkit_predict(tmp_path):
    d = _need_diffusers()
    unet = _tiny_unet()
    d.DDPMPipeline(unet=unet, scheduler=d.DDPMScheduler(beta_schedule="linear")).save_pretrained(tmp_path / "pipe")
    _write_images(tmp_path / "images")
    recipe = tmp_path / "diffusers.yaml"
    recipe.write_text(f"model:\n  prior: {{diffusers: {tmp_path / 'pipe'}}}\n"
                      + SOLVER.replace("IMAGES", str(tmp_path / "images")))
    out = tmp_path / "out"
    _run_in_process(str(recipe), "--out_dir", str(out))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["img0", "img1"]
    for r in rows:
        assert np.isfinite(r["psnr"]) and r["psnr"] > 0
        assert Image.open(out / "recon" / f"{r['name']}.png").size == (16, 16)
    assert "diffusers" in json.loads((out / "summary.json").read_text())["run"]["prior"]


# ----------------------------------------------------------------------------------------- deepinv


def _need_deepinv():
    return pytest.importorskip("deepinv", reason="deepinv is not installed (pip install 'dpgkit[deepinv]')")


def _adjoint_gap(op, x, y) -> float:
    lhs = (op(x) * y).sum()
    rhs = (x * op.adjoint(y)).sum()
    return float((lhs - rhs).abs() / lhs.abs().clamp_min(1e-12))


@pytest.mark.parametrize("padding", ["circular", "reflect"])
def test_deepinv_blur_matches_dpgkit_blur(padding):
    dinv = _need_deepinv()
    g = torch.Generator().manual_seed(0)
    kernel = torch.rand(5, 5, generator=g)
    kernel /= kernel.sum()
    wrapped = dk.operators.from_deepinv(dinv.physics.Blur(filter=kernel[None, None], padding=padding))
    # deepinv convolves (flips the kernel), dpgkit correlates, as the DPS code does
    own = dk.operators.Blur(kernel.flip(0, 1), padding=padding)
    x, y = torch.randn(2, 3, 12, 12, generator=g), torch.randn(2, 3, 12, 12, generator=g)
    assert isinstance(wrapped, dk.operators.LinearOperator)
    torch.testing.assert_close(wrapped(x), own(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wrapped.adjoint(y), own.adjoint(y), rtol=1e-5, atol=1e-5)
    assert _adjoint_gap(wrapped, x, y) < 1e-5
    with pytest.raises(NotImplementedError, match="DecomposablePhysics"):
        wrapped.svd((3, 12, 12))


def test_deepinv_inpainting_matches_dpgkit_inpainting_and_has_an_svd_view():
    dinv = _need_deepinv()
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(1, 3, 8, 8, generator=g) > 0.5).float()
    wrapped = dk.operators.from_deepinv(dinv.physics.Inpainting(img_size=(3, 8, 8), mask=mask))
    own = dk.operators.Inpainting(mask)
    x, y = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    torch.testing.assert_close(wrapped(x), own(x))
    torch.testing.assert_close(wrapped.adjoint(y), own.adjoint(y))
    assert _adjoint_gap(wrapped, x, y) < 1e-6
    torch.testing.assert_close(wrapped.observed(), own.observed())
    view, own_view = wrapped.svd((3, 8, 8)), own.svd((3, 8, 8))
    # dpgkit's mask view lists the observed entries only; the generic view keeps the zeros after them
    r = own_view.singulars().shape[-1]
    torch.testing.assert_close(view.singulars()[:r], own_view.singulars())
    assert not view.singulars()[r:].any()
    torch.testing.assert_close(view.apply(x.flatten(1)), own(x).flatten(1))
    z = view.vt(x.flatten(1))
    torch.testing.assert_close(view.v(z), x.flatten(1))  # V orthogonal
    torch.testing.assert_close(view.u(view.ut(y.flatten(1))), y.flatten(1))


def test_deepinv_downsampling_matches_dpgkit_average_pooling():
    dinv = _need_deepinv()
    # the 2 x 2 box placed in a 3 x 3 filter: deepinv 0.5.0's circular adjoint fails on even-sized filters
    box = torch.zeros(1, 1, 3, 3)
    box[..., :2, :2] = 0.25
    physics = dinv.physics.Downsampling(img_size=(3, 8, 8), filter=box, factor=2, padding="circular")
    wrapped = dk.operators.from_deepinv(physics)
    own = dk.operators.SuperResolution(2, mode="avgpool")
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    torch.testing.assert_close(wrapped(x), own(x))
    torch.testing.assert_close(wrapped.adjoint(y), own.adjoint(y))
    assert _adjoint_gap(wrapped, x, y) < 1e-6


def test_deepinv_noise_models_map_or_are_refused():
    dinv = _need_deepinv()
    phys = dinv.physics
    assert isinstance(dk.operators.noise_from_deepinv(phys.Inpainting(img_size=(1, 4, 4), mask=0.5)),
                      dk.noise.Noiseless)
    gauss = dk.operators.noise_from_deepinv(phys.Denoising(noise_model=phys.GaussianNoise(0.1)))
    assert isinstance(gauss, dk.noise.Gaussian) and gauss.sigma == pytest.approx(0.2)  # [0, 1] -> [-1, 1]
    assert dk.operators.noise_from_deepinv(phys.GaussianNoise(0.1), scale=1.0).sigma == pytest.approx(0.1)
    poisson = dk.operators.noise_from_deepinv(phys.PoissonNoise(gain=1 / 255))
    assert isinstance(poisson, dk.noise.Poisson) and poisson.rate == pytest.approx(1.0)
    with pytest.raises(ValueError, match="PoissonGaussianNoise has no dpgkit equivalent"):
        dk.operators.noise_from_deepinv(phys.PoissonGaussianNoise())
    with pytest.raises(ValueError, match="normalize=True"):
        dk.operators.noise_from_deepinv(phys.PoissonNoise(normalize=False))
    with pytest.raises(TypeError, match="deepinv.physics.Physics"):
        dk.operators.from_deepinv(dk.operators.Inpainting(torch.ones(4, 4)))


SHAPE = (3, 8, 8)


def _gaussian_model(std: float = 0.5) -> dk.models.DiffusionModel:
    """The exact eps of the prior N(0, std^2 I) under the VP diffusion."""
    schedule = dk.diffusion.Schedule.linear(1000)
    abar_all = schedule.alphas_cumprod

    def eps(x_t, t):
        abar = abar_all.to(x_t)[t].view(-1, 1, 1, 1)
        return (1 - abar).sqrt() * x_t / (abar * std**2 + 1 - abar)

    return dk.models.DiffusionModel(eps, SHAPE, schedule)


def test_dpg_restores_with_a_wrapped_deepinv_physics():
    dinv = _need_deepinv()
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(1, 3, 8, 8, generator=g) > 0.3).float()
    physics = dinv.physics.Inpainting(img_size=SHAPE, mask=mask, noise_model=dinv.physics.GaussianNoise(0.01))
    task = dk.Task(dk.operators.from_deepinv(physics), dk.operators.noise_from_deepinv(physics))
    assert task.noise.sigma == pytest.approx(0.02)
    x = torch.rand(2, *SHAPE, generator=g) * 1.6 - 0.8
    y, task = _measure(task, x)
    model = _gaussian_model()
    kwargs = dict(num_samples=32, sampler="ddim", steps=20)
    unguided = DPG(scale=1e-9, **kwargs).restore(model, task, y, seed=0)  # scale 0 is refused
    guided = DPG(scale=2.0, **kwargs).restore(model, task, y, seed=0)

    def residual(out):
        return (task.operator(out) - y).flatten(1).norm(dim=1)

    assert (residual(guided) < 0.5 * residual(unguided)).all(), (residual(guided), residual(unguided))
    # and exactly what DPG gives on dpgkit's own operator with the same mask
    own = dk.Task(dk.operators.Inpainting(mask), dk.noise.Gaussian(0.02))
    own_y, own = _measure(own, x)
    torch.testing.assert_close(own_y, y)  # missing pixels are exactly 0 in both (observed() is the mask)
    torch.testing.assert_close(DPG(scale=2.0, **kwargs).restore(model, own, y, seed=0), guided)


def test_ddrm_runs_on_a_wrapped_decomposable_physics():
    dinv = _need_deepinv()
    g = torch.Generator().manual_seed(4)
    mask = (torch.rand(1, 1, 8, 8, generator=g) > 0.5).float().expand(1, 3, 8, 8)
    wrapped = dk.Task(dk.operators.from_deepinv(dinv.physics.Inpainting(img_size=SHAPE, mask=mask.clone())),
                      dk.noise.Gaussian(0.05))
    own = dk.Task(dk.operators.Inpainting(mask.clone()), dk.noise.Gaussian(0.05))
    x = torch.rand(1, *SHAPE, generator=g) * 1.6 - 0.8
    y, own = _measure(own, x)
    solver = dk.solvers.DDRM(steps=10)
    torch.testing.assert_close(solver.restore(_gaussian_model(), wrapped, y, seed=0),
                               solver.restore(_gaussian_model(), own, y, seed=0), rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------- lightning script


def _script(name: str) -> Path:
    path = Path(sys.executable).parent / name
    if not path.is_file():
        pytest.skip(f"the `{name}` console script is not installed next to {sys.executable} (pip install -e .)")
    return path


def test_lightning_run_predict_writes_what_dpgkit_predict_writes(tmp_path):
    lightning_script, dpgkit_script = _script("lightning"), _script("dpgkit")
    assert "dpgkit.lightning.lightning_command" in lightning_script.read_text()  # ours, not Lightning's
    _write_images(tmp_path / "images")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "model:\n  prior:\n    preset: {image_size: 16, num_channels: 32, num_res_blocks: 1, channel_mult: \"1\",\n"
        "             attention_resolutions: \"\", learn_sigma: false}\n"
        + SOLVER.replace("IMAGES", str(tmp_path / "images"))
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = {}
    for name, cmd in (("lightning", [str(lightning_script), "run", "predict"]),
                      ("dpgkit", [str(dpgkit_script), "predict"])):
        outs[name] = tmp_path / name
        proc = subprocess.run([*cmd, str(recipe), "--out_dir", str(outs[name]), "--data.limit", "2"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    assert files(outs["lightning"]) == files(outs["dpgkit"])
    for rel in files(outs["dpgkit"]):
        if rel.endswith(".png"):
            assert (outs["lightning"] / rel).read_bytes() == (outs["dpgkit"] / rel).read_bytes(), rel

    def rows(root: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (root / "metrics.jsonl").read_text().splitlines()]

    assert rows(outs["lightning"]) == rows(outs["dpgkit"])

    other = subprocess.run([str(lightning_script), "fit", "x.yaml"], capture_output=True, text=True, timeout=120)
    assert other.returncode == 2
    assert "lightning run predict" in other.stderr and "fabric" in other.stderr


def test_only_dpgkit_installs_a_lightning_script():
    from importlib.metadata import entry_points

    scripts = [ep for ep in entry_points(group="console_scripts") if ep.name == "lightning"]
    if not scripts:
        pytest.skip("dpgkit's entry points are not installed (pip install -e .)")
    assert [ep.value for ep in scripts] == ["dpgkit.lightning.lightning_command:main"], scripts
    assert all(ep.dist is None or ep.dist.name == "dpgkit" for ep in scripts)


def test_missing_optional_packages_name_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    monkeypatch.setitem(sys.modules, "deepinv", None)
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 8}))
    (tmp_path / "u" / "scheduler_config.json").write_text("{}")
    with pytest.raises(ImportError, match=r"dpgkit\[diffusers\]"):
        dk.models.from_diffusers(tmp_path / "u")
    with pytest.raises(ImportError, match=r"dpgkit\[deepinv\]"):
        dk.operators.from_deepinv(object())


def test_a_recipe_prior_names_one_source(tmp_path):
    from dpgkit.lightning.module import Prior

    with pytest.raises(ValueError, match="exactly one of preset"):
        Prior()
    with pytest.raises(ValueError, match="exactly one of preset"):
        Prior("adm-imagenet256", diffusers=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        Prior(diffusers=str(tmp_path / "absent")).image_shape  # noqa: B018 - the property reads the folder
