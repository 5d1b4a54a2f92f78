"""The `dpgkit` command.

    dpgkit predict RECIPE.yaml [--out_dir DIR] [--trainer.devices 8] [--data.root /data/...] ...
    dpgkit compare RUN_DIR [RUN_DIR ...] --out grid.png   (dpgkit.compare)
    dpgkit evaluate RUN_DIR [RUN_DIR ...]                   (dpgkit.evaluate)
    dpgkit fit RECIPE.yaml ...                               (dpgkit.lightning.training)

`predict` is Lightning's CLI (LightningCLI) over `RestorationModule` and `RestorationDataModule`:
the recipe is its config file (given positionally or with --config) and any key can be overridden
on the command line. dpgkit also installs a `lightning` command (`dpgkit.lightning.lightning_command`)
so that `lightning run predict RECIPE` is this same command. A recipe with a `runs:` mapping is
several such runs sharing a base config (`dpgkit.lightning.runs`). Distributed runs go through Lightning's DDP: pass
--trainer.devices / --trainer.num_nodes, or launch under torchrun or SLURM (srun), whose
environments Lightning detects.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import inspect
import logging
import os
import re
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.trainer.states import TrainerStatus

from ..io import ImageError
from .datamodule import RestorationDataModule
from .module import RestorationModule
from .recipe_overrides import CLASS_KEYS, apply_overrides
from .writer import FolderInUseError, ImageProgressBar, PredictionWriter

__all__ = ["SMALL_IMAGE_PIXELS", "Interrupted", "PredictCLI", "UserError", "cpu_threads", "main"]

# the errors a user's input causes (a recipe, an option, a path, a file): one line, no traceback
USER_ERRORS = (argparse.ArgumentError, ValueError, FileNotFoundError, NotADirectoryError, KeyError, ImageError,
               FolderInUseError)
DEBUG_ENV = "DPGKIT_DEBUG"

HELP_HEADER = """usage: dpgkit predict RECIPE.yaml [--out_dir DIR] [--KEY VALUE ...]

Restore the images a recipe names; any key of the recipe can be given on the command line.
dpgkit's own options first, then the keys most runs change (the full list follows):
  --out_dir DIR                   the run folder (recon/, input/, label/, metrics.jsonl, summary.json)
  --threads N                     intra-op threads of a CPU run
  --writer.on_change {refuse,recompute}
                                  when the folder holds images made with other settings (default: refuse)
  --debug                         show the full traceback of an error (or DPGKIT_DEBUG=1)
  --data.root DIR                 your images (a folder, searched recursively); the recipe's list file is kept
                                  only when it names files in that folder (--data.files null: the whole folder)
  --data.files FILE | --data.glob PATTERN
                                  a list file (paths relative to data.root) or a glob, instead of a folder
  --data.mode {simulate,measured} simulate y from ground truth, or restore your own degraded images
  --data.image_size N|null        the side files are brought to (null: as they are, with --data.preprocess none)
  --data.preprocess {resize_center_crop,center_crop,none}
  --data.limit N                  the first N images only
  --model.prior.checkpoint PATH   the prior's weights (a file, or the folder holding the preset's file)
  --model.solver NAME             another solver (DPG, DPS, DDRM, ...), from its own defaults
  --model.solver.init_args.KEY V  a solver parameter (scale, steps, sampler, num_samples, ...)
  --trainer.devices N             GPUs (or processes); --trainer.num_nodes N for several nodes

"""

# Lightning's advertising, printed on every run (2.6): not dpgkit's business
_TIP_PREFIX = "\N{ELECTRIC LIGHT BULB} Tip:"


class UserError(Exception):
    """A problem with what the user gave (recipe, options, files), said in one line."""


class Interrupted(Exception):
    """Ctrl-C during a predict run: `done` of `total` images are finished (resumable)."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"interrupted: {done} of {total} done; rerun the same command to resume")
        self.done, self.total = done, total


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_TIP_PREFIX)


_TIPS_FILTER = _NoTips()


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's advertising tips and the deprecation warning of its `_pytree` helper
    (torch 2.9 deprecates what Lightning 2.6 calls) for the duration of a dpgkit run."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addFilter(_TIPS_FILTER)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
            # a resumed run with nothing left to do is not a mistake
            warnings.filterwarnings("ignore", message="Total length of `DataLoader` across ranks is zero")
            yield
    finally:
        logger.removeFilter(_TIPS_FILTER)


class DpgkitParser(LightningArgumentParser):
    """Lightning's parser, raising errors (to be said in one line) and leading its help with dpgkit's keys."""

    def error(self, message: str, ex: Exception | None = None) -> Any:
        # where jsonargparse would print its usage and exit; `main` prints the one line
        if os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        raise UserError(one_line(argparse.ArgumentError(None, message), self)) from ex

    def format_help(self) -> str:
        return HELP_HEADER + super().format_help()


def _option_names(parser: argparse.ArgumentParser) -> list[str]:
    names = []
    for action in parser._actions:
        names += [o for o in action.option_strings if o.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names += _option_names(sub)
    return names


def _class_parameters(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    except (ImportError, AttributeError, ValueError, TypeError):
        return []


def _known_classes(key: str) -> list[str]:
    from .. import noise, operators, solvers

    package, base = {"model.solver": (solvers, solvers.Solver), "model.operator": (operators, operators.Operator),
                     "model.noise": (noise, noise.NoiseModel)}.get(key, (None, None))
    if package is None:
        return []
    classes = [getattr(package, n, None) for n in getattr(package, "__all__", [])]
    return [f"{package.__name__}.{c.__name__}" for c in classes
            if inspect.isclass(c) and issubclass(c, base) and not inspect.isabstract(c)]


def one_line(err: BaseException, parser: argparse.ArgumentParser | None = None) -> str:
    """An exception from parsing or set-up as one line, with "did you mean" for a close name."""
    message = " ".join(part.strip() for part in str(err).strip().splitlines() if part.strip())
    if isinstance(err, KeyError) and message.startswith(("'", '"')):
        message = message[1:-1]
    hint = ""
    option = re.search(r"Option '([\w.]+)' is not accepted", message)
    if option:
        class_path = re.search(r"class_path '([\w.]+)'", message)
        accepted = (_class_parameters(class_path.group(1)) if class_path
                    else sorted({p for k in CLASS_KEYS for c in _known_classes(k) for p in _class_parameters(c)}))
        close = difflib.get_close_matches(option.group(1), accepted, n=1)
        if close:
            hint = f"; did you mean '{close[0]}'?"
        elif class_path and accepted:
            hint = f"; {class_path.group(1)} takes {', '.join(accepted)}"
    unknown = re.search(r"unrecognized arguments: (--[\w.]+)", message, re.IGNORECASE)
    if unknown and parser is not None:
        close = difflib.get_close_matches(unknown.group(1), _option_names(parser), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
    in_recipe = re.search(r"does not accept option '([\w.]+)'", message)
    if in_recipe and parser is not None:  # a key of the recipe file
        keys = [o[2:] for o in _option_names(parser)]
        close = difflib.get_close_matches(in_recipe.group(1), keys, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
    key = re.search(r'Parser key "(model\.(?:solver|operator|noise))"', message)
    if key and not option:
        given = (re.search(r"string: '?([\w.]+)", message)
                 or re.search(r"(?:class_path|[Ii]mport path) '?([\w.]+)", message))
        names = [c.rsplit(".", 1)[1] for c in _known_classes(key.group(1))]
        if given and names:
            close = difflib.get_close_matches(given.group(1).rsplit(".", 1)[-1], names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of {', '.join(names)}"
    return message + hint

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
                parser_class=DpgkitParser,
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
            raise UserError("an output folder is needed: --out_dir DIR (or out_dir: in the recipe)")
        if config.get("trainer.inference_mode"):
            raise UserError("trainer.inference_mode must be false: guidance differentiates through the prior")
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
        handler = signal.getsignal(signal.SIGINT)
        try:
            return self.trainer.predict(**kwargs)
        except SystemExit:
            if self.trainer.state.status != TrainerStatus.INTERRUPTED:
                raise
            # Lightning turns Ctrl-C into exit status 1 after its teardown; say what is done instead
            writer = next((c for c in self.trainer.callbacks if isinstance(c, PredictionWriter)), None)
            datamodule = self.datamodule
            total = len(getattr(datamodule, "items", []) or [])
            done = (getattr(datamodule, "num_done", 0) + len(writer.rows)) if writer is not None else 0
            raise Interrupted(done, total) from None
        finally:
            torch.set_num_threads(before)
            if signal.getsignal(signal.SIGINT) is not handler and handler is not None:
                signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C while it shuts down

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
            raise UserError(f"recipe file not found: {recipe} (expected a YAML file such as recipes/imagenet_sr.yaml)")
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


def _refuse_lightning_checkpoint(args: Sequence[str]) -> None:
    if any(a == "--ckpt_path" or a.startswith("--ckpt_path=") for a in args):
        raise UserError("--ckpt_path expects a Lightning training checkpoint, which a predict run does not use; "
                        "give the prior's weights with --model.prior.checkpoint PATH")


def _with_overrides(args: list[str]) -> list[str]:
    """`predict --config RECIPE ...` with the recipe rewritten as the command line means it
    (`recipe_overrides`); unchanged when nothing needs rewriting."""
    from .runs import read_recipe

    if "--config" not in args or args.index("--config") + 1 >= len(args):
        return args
    k = args.index("--config")
    if not Path(args[k + 1]).is_file():
        return args
    recipe = read_recipe(args[k + 1])
    config, notes = apply_overrides(recipe, args[k + 2 :])
    for note in notes:
        print(f"dpgkit: {note}", file=sys.stderr, flush=True)
    if config == recipe:
        return args
    return [*args[: k + 1], yaml.safe_dump(config, sort_keys=False), *args[k + 2 :]]


def predict_main(argv: list[str]) -> int:
    """`dpgkit predict ...` (argv starts with "predict"); returns the exit status."""
    _refuse_lightning_checkpoint(argv)
    args = _recipe_as_config(argv)
    multi = _multi_run_recipe(args)
    with quiet_lightning():
        if multi is not None:
            from .runs import run_recipe

            run_recipe(*multi)
            return 0
        PredictCLI(args=_with_overrides(args))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dpgkit` console script; returns the exit status.

    A user error (a bad recipe key, a missing folder, an unknown solver, ...) prints one line and
    returns 2; `--debug` (or the environment variable DPGKIT_DEBUG=1) shows the traceback instead.
    Ctrl-C during a run returns 130 after saying how many images are done.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command = argv[0]
    try:
        if command == "evaluate":
            from .. import evaluate

            return int(evaluate.main(argv[1:]) or 0)
        if command == "compare":
            from .. import compare

            return int(compare.main(argv[1:]) or 0)
        if command == "predict":
            return predict_main(argv)
        if command == "fit":
            try:
                from .training import fit_main
            except ImportError as err:
                print(f"dpgkit fit is not available in this installation ({err})", file=sys.stderr)
                return 2
            fit_main(_recipe_as_config(argv))
            return 0
    except Interrupted as err:
        print(str(err), file=sys.stderr, flush=True)
        return 130
    except (UserError, *USER_ERRORS) as err:
        if debug:
            raise
        text = str(err) if isinstance(err, UserError) else one_line(err)
        print(f"dpgkit {command}: error: {text} (--debug shows the traceback)", file=sys.stderr, flush=True)
        return 2
    print(f"dpgkit: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
