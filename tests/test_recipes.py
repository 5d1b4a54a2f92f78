"""Every recipe parses, instantiates (with a tiny stand-in prior, no weights) and holds the published settings."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import yaml

from dpgkit.lightning import Prior, RestorationDataModule, RestorationModule
from dpgkit.lightning.cli import PredictCLI
from dpgkit.models import PRESETS
from dpgkit.noise import Gaussian, Poisson
from dpgkit.operators import GaussianBlur, MotionBlur, NonlinearBlur, SuperResolution
from dpgkit.operators.inpainting import BoxInpainting, RandomInpainting
from dpgkit.solvers import DPG, DPS

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
NOT_PAPER = {"demo.yaml", "train_demo_prior.yaml"}  # the offline demo and its training recipe
TINY = {"image_size": 16, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1",
        "attention_resolutions": "", "learn_sigma": False}

# The published table of ../shared/spec/dpg-method.md: (solver, sampler, steps, scale, N, beta_m, r_min).
# DPS: the step size of the DPS authors' public config for the task (configs/*.yaml of DPS2022).
EXPECTED = {
    "ffhq_sr": ("dpg", "ddpm", 1000, 2000, 500, 0.0, 0.05),
    "ffhq_gaussian_deblur_poisson": ("dpg", "ddpm", 1000, 1, 1000, 0.1, 0.0),
    "ffhq_gaussian_deblur": ("dpg", "ddpm", 1000, 1, 1000, 0.1, 0.0),
    "ffhq_motion_deblur": ("dpg", "ddpm", 1000, 200, 500, 0.0, 0.05),
    "ffhq_box_inpaint": ("dpg", "ddim", 200, 3, 11000, 0.1, 0.0),
    "ffhq_random_inpaint": ("dpg", "ddim", 200, 10, 5000, 0.1, 0.0),
    "imagenet_sr": ("dpg", "ddpm", 1000, 160, 500, 0.0, 0.05),
    "imagenet_sr_ddim": ("dpg", "ddim", 200, 80, 5000, 0.0, 0.05),
    "lsun_sr": ("dpg", "ddpm", 1000, 160, 500, 0.0, 0.05),
    "lsun_sr_ddim": ("dpg", "ddim", 200, 80, 5000, 0.0, 0.05),
    "imagenet_gaussian_deblur": ("dpg", "ddpm", 1000, 200, 500, 0.0, 0.0),
    "imagenet_gaussian_deblur_ddim": ("dpg", "ddim", 200, 150, 1500, 0.0, 0.0),
    "imagenet_motion_deblur": ("dpg", "ddpm", 1000, 200, 500, 0.0, 0.05),
    "imagenet_motion_deblur_ddim": ("dpg", "ddim", 200, 100, 4000, 0.0, 0.05),
    "imagenet_random_inpaint": ("dpg", "ddim", 200, 4, 9000, 0.0, 0.0),
    "imagenet_nonlinear_deblur": ("dpg", "ddpm", 1000, 250, 200, 0.0, 0.0),
    # not in the spec's table: the DPG authors' FFHQ block of their configs/nonlinear_deblur_config.yaml
    "ffhq_nonlinear_deblur": ("dpg", "ddpm", 1000, 150, 500, 0.0, 0.0),
    **{f"{s}_{t}_dps": ("dps", "ddpm", 1000, z, None, None, None)
       for s in ("ffhq", "imagenet")
       for t, z in (("sr", 0.3), ("gaussian_deblur", 0.3), ("motion_deblur", 0.3), ("random_inpaint", 0.5),
                    ("nonlinear_deblur", 0.3))},
    "ffhq_box_inpaint_dps": ("dps", "ddpm", 1000, 0.5, None, None, None),
}
OPERATORS = {"sr": SuperResolution, "gaussian_deblur": GaussianBlur, "motion_deblur": MotionBlur,
             "box_inpaint": BoxInpainting, "random_inpaint": RandomInpainting, "nonlinear_deblur": NonlinearBlur}
# the bkse blur network, small and with seeded random weights, in place of GOPRO_wVAE.pth
TINY_BKSE = ["--model.operator.init_args.checkpoint", "null", "--model.operator.init_args.init_seed", "0",
             "--model.operator.init_args.config", json.dumps({"nf": 8, "front_RBs": 1, "back_RBs": 1,
                                                             "kernel_dim": 64, "KernelExtractor": {"n_blocks": 1}})]
PRIORS = {"ffhq": "adm-ffhq256", "imagenet": "adm-imagenet256", "lsun": "adm-lsun-bedroom256"}


def paper_recipes() -> list[Path]:
    return sorted(p for p in RECIPES.glob("*.yaml") if p.name not in NOT_PAPER)


def test_every_experiment_has_a_recipe():
    names = {p.stem for p in paper_recipes()}
    assert names == set(EXPECTED), (names ^ set(EXPECTED))
    assert (RECIPES / "imagenet_sr.yaml").is_file()


def instantiate(recipe: Path, *overrides: str) -> PredictCLI:
    args = ["--config", str(recipe), "--model.prior.preset", json.dumps(TINY), "--model.prior.checkpoint", "null",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", *overrides]
    return PredictCLI(args=args, run=False)


@functools.cache
def measured_shape(operator_repr: str, operator) -> tuple[int, ...]:
    from dpgkit.task import Task

    y, _ = Task(operator, Gaussian(0.0)).measure(torch.zeros(1, 3, 256, 256), seed=0, indices=[0])
    return tuple(y.shape)


@pytest.mark.parametrize("recipe", paper_recipes(), ids=lambda p: p.stem)
def test_recipe_instantiates_with_published_settings(recipe):
    raw = yaml.safe_load(recipe.read_text())
    dataset, rest = recipe.stem.split("_", 1)
    task = next(t for t in OPERATORS if rest.startswith(t))

    # the checkpoint is a parameter, named as the preset expects it
    preset = raw["model"]["prior"]["preset"]
    assert preset == PRIORS[dataset]
    assert Path(raw["model"]["prior"]["checkpoint"]).name == PRESETS[preset].checkpoint_name
    assert raw["data"]["image_size"] == PRESETS[preset].image_shape[-1] == 256
    assert raw["out_dir"] == f"runs/{recipe.stem}"

    if task == "nonlinear_deblur":
        assert Path(raw["model"]["operator"]["init_args"]["checkpoint"]).name == "GOPRO_wVAE.pth"
    cli = instantiate(recipe, *(TINY_BKSE if task == "nonlinear_deblur" else ()))
    module, data = cli.model, cli.datamodule
    assert isinstance(module, RestorationModule) and isinstance(data, RestorationDataModule)
    assert cli.trainer.predict_loop.inference_mode is False

    kind, sampler, steps, scale, n, beta_m, r_min = EXPECTED[recipe.stem]
    solver = module.solver
    assert isinstance(solver, DPG if kind == "dpg" else DPS)
    assert (solver.sampler, solver.steps, solver.scale) == (sampler, steps, scale)
    if kind == "dpg":
        assert (solver.num_samples, solver.momentum, solver.r_min) == (n, beta_m, r_min)
        assert solver.znorm is None and solver.r == "heuristic" and solver.clip

    assert isinstance(module.task.operator, OPERATORS[task])
    if task == "sr":
        # the authors' configs: the DPS code's bicubic Resizer, x4 (not the paper text's pooling)
        op = module.task.operator
        assert (op.factor, op.mode) == (4, "bicubic")
    poisson = recipe.stem.endswith("_poisson")
    noise = module.task.noise
    assert isinstance(noise, Poisson if poisson else Gaussian)
    assert (noise.rate == 1.0) if poisson else (noise.sigma == 0.05)
    assert module.seed == 0
    # the authors' code adds noise at inpainting's missing pixels too; their step sizes assume it
    assert module.task.noisy_unobserved == ("inpaint" in task)
    # the labels `dpgkit evaluate` puts in its table
    method = "DPS" if kind == "dps" else f"DPG {sampler.upper()}"
    dataset_label = {"ffhq": "FFHQ", "imagenet": "ImageNet", "lsun": "LSUN bedroom"}[dataset]
    assert module.labels["method"] == method and module.labels["dataset"] == dataset_label
    assert module.labels["task"].endswith("(Poisson)") == poisson

    # the stand-in prior builds without weights; the operator works at the paper's image size
    module.build_prior()
    assert module.diffusion.image_shape == (3, 16, 16)
    shape = measured_shape(repr(module.task.operator), module.task.operator)
    assert shape == ((1, 3, 64, 64) if task == "sr" else (1, 3, 256, 256))


@pytest.mark.parametrize("preset", sorted(set(PRIORS.values())))
def test_recipe_priors_build_on_the_meta_device(preset):
    # the full networks the recipes name, without their weights: names and shapes only
    model = Prior(preset, device="meta").build()
    assert model.image_shape == (3, 256, 256)
    count = sum(p.numel() for p in model.parameters())
    assert count > 90e6 and all(p.is_meta for p in model.parameters())


def test_recipe_overrides_and_missing_checkpoint(tmp_path):
    cli = instantiate(RECIPES / "imagenet_sr.yaml", "--model.solver.init_args.scale", "40",
                      "--data.root", str(tmp_path), "--out_dir", str(tmp_path / "o"))
    assert cli.model.solver.scale == 40 and cli.datamodule.root == str(tmp_path)
    assert str(cli.trainer.default_root_dir) == str(tmp_path / "o")
    # with the real prior and no file, the error names the file and where it is published
    args = ["--config", str(RECIPES / "imagenet_sr.yaml"), "--model.prior.checkpoint", str(tmp_path / "x.pt"),
            "--trainer.accelerator", "cpu"]
    module = PredictCLI(args=args, run=False).model
    with pytest.raises(FileNotFoundError, match="256x256_diffusion_uncond.pt.*openaipublic"):
        module.build_prior()
