"""The `dpgkit` command.

    dpgkit predict RECIPE.yaml [--out_dir DIR] [--trainer.devices 8] [--data.root /data/...] ...
    dpgkit compare RUN_DIR [RUN_DIR ...] --out grid.png   (dpgkit.compare)
    dpgkit evaluate RUN_DIR [RUN_DIR ...]                   (dpgkit.evaluate)
    dpgkit fit RECIPE.yaml ...                               (dpgkit.lightning.training)

`predict` is Lightning's CLI (LightningCLI) over `RestorationModule` and `RestorationDataModule`:
the recipe is its config file (given positionally or with --config) and any key can be overridden
on the command line. Lightning 2.6 ships no `lightning` command, so `dpgkit predict` is the
spelling of `lightning run predict`. A recipe with a `runs:` mapping is several such runs sharing
a base config (`dpgkit.lightning.runs`). Distributed runs go through Lightning's DDP: pass
--trainer.devices / --trainer.num_nodes, or launch under torchrun or SLURM (srun), whose
environments Lightning detects.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .datamodule import RestorationDataModule
from .module import RestorationModule
from .writer import ImageProgressBar, PredictionWriter

__all__ = ["SMALL_IMAGE_PIXELS", "PredictCLI", "cpu_threads", "main"]

# Up to this many values per image (C x H x W) a CPU run uses 1 intra-op thread by default: the
# operations on such images are too small to split, and spare threads spin on cores other jobs
# need. Measured with the demo's 1x32x32 runs on a shared 2-core CPU (load average about 5):
# sr_x4-dps 18 s wall with 1 thread, 105 s with 2; deblur_gauss-dpg 22 s and 217 s (README).
# Larger images keep torch's default.
SMALL_IMAGE_PIXELS = 3 * 64 * 64

USAGE = """usage: dpgkit COMMAND ...

commands:
  predict RECIPE.yaml [--out_dir DIR] [--KEY VALUE ...]
                  restore a dataset as a recipe says (Lightning's CLI: `dpgkit predict --help`);
                  a recipe with `runs:` runs several configs (e.g. recipes/demo.yaml)
  compare RUN_DIR [RUN_DIR ...] [--out FILE.png] [--table FILE.md]
                  picture runs side by side (input | methods | truth) with a PSNR table
  evaluate RUN_DIR [RUN_DIR ...]
                  recompute the metrics of run folders and print the paper's table
  fit RECIPE.yaml [--KEY VALUE ...]
                  train a diffusion prior (Lightning's CLI: `dpgkit fit --help`)
"""


class PredictCLI(LightningCLI):
    """LightningCLI for `dpgkit predict`: adds --out_dir and the PredictionWriter (`writer.*`)."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        with warnings.catch_warnings():
            # `main` passes the console script's (rewritten) argv as args, which LightningCLI flags
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().__init__(
                RestorationModule,
                RestorationDataModule,
                args=list(args) if args is not None else None,
                run=run,
                seed_everything_default=False,  # every draw is seeded from (seed, item index): no global seed
                auto_configure_optimizers=False,
                trainer_defaults={"inference_mode": False, "logger": False},
                save_config_kwargs={"overwrite": True},  # a resumed run rewrites its config.yaml
            )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"predict": {"model", "dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--out_dir", type=str | None, default=None,
                            help="the run folder: recon/, input/, label/, mask/, metrics.jsonl, summary.json")
        parser.add_argument("--threads", type=int | None, default=None,
                            help="torch's intra-op threads for a CPU run (default: 1 for images of at most "
                                 f"{SMALL_IMAGE_PIXELS} values, else torch's default); ignored on GPUs")
        parser.add_lightning_class_args(PredictionWriter, "writer")
        parser.link_arguments("out_dir", "writer.out_dir")
        parser.link_arguments("out_dir", "trainer.default_root_dir")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if not config.get("out_dir"):
            self.parser.error("an output folder is needed: --out_dir DIR (or out_dir: in the recipe)")
        if config.get("trainer.inference_mode"):
            self.parser.error("trainer.inference_mode must be false: guidance differentiates through the prior")
        if self.subcommand and config.get("return_predictions") is None:
            config["return_predictions"] = False  # outputs go to disk; keeping them would grow without bound

    def predict(self, **kwargs: Any) -> Any:
        """`Trainer.predict`, with the intra-op threads of `cpu_threads` for its duration."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        on_cpu = isinstance(self.trainer.accelerator, CPUAccelerator)
        threads = cpu_threads(config.get("threads"), self.model.prior.image_shape, on_cpu)
        before = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            return self.trainer.predict(**kwargs)
        finally:
            torch.set_num_threads(before)

    def instantiate_trainer(self, **kwargs: Any):
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = config.get("trainer", {})
        callbacks = trainer_config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if trainer_config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            callbacks.append(ImageProgressBar())
        return super().instantiate_trainer(callbacks=callbacks, **kwargs)


def cpu_threads(requested: int | None, image_shape: Sequence[int], on_cpu: bool) -> int | None:
    """The intra-op threads a predict run uses: `requested` if given (>= 1), else 1 on a CPU for
    images of at most `SMALL_IMAGE_PIXELS` values, else None (torch's default)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        return requested if on_cpu else None
    c, h, w = image_shape
    return 1 if on_cpu and c * h * w <= SMALL_IMAGE_PIXELS else None


def _recipe_as_config(argv: list[str]) -> list[str]:
    """`predict RECIPE.yaml ...` -> `predict --config RECIPE.yaml ...` (a positional recipe)."""
    if len(argv) >= 2 and not argv[1].startswith("-"):
        recipe = argv[1]
        if not Path(recipe).is_file():
            raise SystemExit(f"dpgkit {argv[0]}: recipe file not found: {recipe}")
        return [argv[0], "--config", recipe, *argv[2:]]
    return argv


def _multi_run_recipe(args: list[str]) -> tuple[str, list[str]] | None:
    """(recipe, the other options) of `predict ... --config RECIPE ...` when the recipe describes
    several runs (`runs:`), else None."""
    from .runs import is_multi_run, read_recipe

    if "--config" not in args or args.index("--config") + 1 >= len(args):
        return None
    k = args.index("--config")
    recipe = args[k + 1]
    if not Path(recipe).is_file() or not is_multi_run(read_recipe(recipe)):
        return None
    return recipe, args[1:k] + args[k + 2 :]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dpgkit` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command = argv[0]
    if command == "evaluate":
        from .. import evaluate

        return int(evaluate.main(argv[1:]) or 0)
    if command == "compare":
        from .. import compare

        return int(compare.main(argv[1:]) or 0)
    if command == "predict":
        args = _recipe_as_config(argv)
        multi = _multi_run_recipe(args)
        if multi is not None:
            from .runs import run_recipe

            run_recipe(*multi)
            return 0
        PredictCLI(args=args)
        return 0
    if command == "fit":
        try:
            from .training import fit_main
        except ImportError as err:
            print(f"dpgkit fit is not available in this installation ({err})", file=sys.stderr)
            return 2
        fit_main(_recipe_as_config(argv))
        return 0
    print(f"dpgkit: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
