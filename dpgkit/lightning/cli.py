"""The `dpgkit` command.

    dpgkit predict RECIPE.yaml [--out_dir DIR] [--trainer.devices 8] [--data.root /data/...] ...
    dpgkit evaluate RUN_DIR [RUN_DIR ...]         (dpgkit.evaluate)
    dpgkit fit RECIPE.yaml ...                     (dpgkit.lightning.training, when installed)

`predict` is Lightning's CLI (LightningCLI) over `RestorationModule` and `RestorationDataModule`:
the recipe is its config file (given positionally or with --config) and any key can be overridden
on the command line. Lightning 2.6 ships no `lightning` command, so `dpgkit predict` is the
spelling of `lightning run predict`. Distributed runs go through Lightning's DDP: pass
--trainer.devices / --trainer.num_nodes, or launch under torchrun or SLURM (srun), whose
environments Lightning detects.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .datamodule import RestorationDataModule
from .module import RestorationModule
from .writer import ImageProgressBar, PredictionWriter

__all__ = ["PredictCLI", "main"]

USAGE = """usage: dpgkit COMMAND ...

commands:
  predict RECIPE.yaml [--out_dir DIR] [--KEY VALUE ...]
                  restore a dataset as a recipe says (Lightning's CLI: `dpgkit predict --help`)
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


def _recipe_as_config(argv: list[str]) -> list[str]:
    """`predict RECIPE.yaml ...` -> `predict --config RECIPE.yaml ...` (a positional recipe)."""
    if len(argv) >= 2 and not argv[1].startswith("-"):
        recipe = argv[1]
        if not Path(recipe).is_file():
            raise SystemExit(f"dpgkit {argv[0]}: recipe file not found: {recipe}")
        return [argv[0], "--config", recipe, *argv[2:]]
    return argv


def _is_demo_recipe(args: list[str]) -> bool:
    """Whether `predict --config RECIPE` names the offline demo (a top-level `demo:` block)."""
    if "--config" not in args:
        return False
    import yaml

    with open(args[args.index("--config") + 1]) as f:
        recipe = yaml.safe_load(f)
    return isinstance(recipe, dict) and "demo" in recipe


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
    if command == "predict":
        args = _recipe_as_config(argv)
        if _is_demo_recipe(args):
            # the offline demo runs 3 tasks x 2 solvers over the shipped images: dpgkit.demo
            from ..demo import main as demo_main

            demo_main([a for a in args[1:] if a != "--config"])
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
