"""Multi-run recipes: several `dpgkit predict` runs that share a base config (a sweep).

A recipe with a top-level `runs:` mapping describes one run per entry: the entry's name names
its folder (OUT_DIR/NAME/) and its value holds the keys that differ from the rest of the recipe
(the base). An optional `compare:` mapping makes `dpgkit compare` picture and tabulate the runs
afterwards, with the options of that command (`out`, `table`, `json`, `zoom`, `max_images`; paths
relative to OUT_DIR):

    out_dir: runs/sweep
    model: {prior: ..., operator: ..., noise: ..., solver: {class_path: dpgkit.solvers.DPG, init_args: ...}}
    data: {root: ..., image_size: 256}
    runs:
      s80:  {model: {solver: {init_args: {scale: 80}}}}
      s160: {model: {solver: {init_args: {scale: 160}}}}
    compare: {out: grid.png, table: summary.md, json: summary.json}

How an entry combines with the base: mappings merge key by key, except a mapping that names a
`class_path`, which replaces the base's value whole (another class takes other arguments); lists
and scalars replace. Each run is then an ordinary predict run (`Trainer.predict` through
`PredictCLI`), run one after the other in this process: its folder holds recon/, input/, label/,
metrics.jsonl, summary.json and config.yaml (the merged config), and rerunning the recipe
resumes every run, skipping finished images. Options on the command line apply to every run
(`--data.limit 2`, `--model.solver.init_args.steps 50`), as `dpgkit.lightning.recipe_overrides`
reads them (`--data.root` drops a list file, `--model.solver NAME` starts from its own defaults);
`--out_dir DIR` moves the whole sweep;
`--runs a,b` runs only those entries (and compares only them).
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .recipe_overrides import apply_overrides

__all__ = ["COMPARE_KEYS", "expand_runs", "is_multi_run", "merge_config", "read_recipe", "run_recipe"]

COMPARE_KEYS = ("out", "table", "json", "zoom", "max_images")


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe file as a mapping; raises ValueError when it is not one (or not YAML)."""
    with open(path) as f:
        try:
            recipe = yaml.safe_load(f)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"{path}: expected a YAML mapping of config keys, found invalid YAML{where}: "
                             f"{problem}") from err
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, found {type(recipe).__name__}")
    return recipe


def is_multi_run(recipe: Mapping[str, Any]) -> bool:
    """Whether a recipe describes several runs (a top-level `runs:` key)."""
    return "runs" in recipe


def merge_config(base: Any, override: Any) -> Any:
    """`override` laid over `base`: mappings merge key by key, except that a mapping naming a
    `class_path` replaces the base's value whole; anything else replaces. Neither is modified."""
    if not isinstance(base, Mapping) or not isinstance(override, Mapping) or "class_path" in override:
        return copy.deepcopy(override)
    merged = {k: copy.deepcopy(v) for k, v in base.items()}
    for key, value in override.items():
        merged[key] = merge_config(base[key], value) if key in base else copy.deepcopy(value)
    return merged


def expand_runs(recipe: Mapping[str, Any], out_dir: str | Path | None = None,
                only: Sequence[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """[(name, config)] of a multi-run recipe: the base merged with each entry, `out_dir` set to
    OUT_DIR/NAME. `out_dir` replaces the recipe's; `only` keeps those entries (in recipe order).
    Raises ValueError for a malformed `runs:` / `compare:` or an unknown name in `only`."""
    runs = recipe.get("runs")
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError(f"`runs:` must map run names to their overrides, found {runs!r}")
    compare = recipe.get("compare")
    if compare is not None and not isinstance(compare, Mapping):
        raise ValueError(f"`compare:` must be a mapping of {', '.join(COMPARE_KEYS)}, found {compare!r}")
    unknown = sorted(set(compare or {}) - set(COMPARE_KEYS))
    if unknown:
        raise ValueError(f"`compare:` takes {', '.join(COMPARE_KEYS)}; unknown keys: {unknown}")
    root = out_dir if out_dir is not None else recipe.get("out_dir")
    if not root:
        raise ValueError("a multi-run recipe needs an output folder: out_dir: in the recipe, or --out_dir DIR")
    names = [str(n) for n in runs]
    if only is not None:
        missing = sorted(set(only) - set(names))
        if missing:
            raise ValueError(f"--runs names {missing}, but the recipe's runs are {names}")
    base = {k: v for k, v in recipe.items() if k not in ("runs", "compare", "out_dir")}
    expanded = []
    for name, override in runs.items():
        name = str(name)
        if only is not None and name not in only:
            continue
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"run name {name!r}: expected a plain folder name")
        if override is not None and not isinstance(override, Mapping):
            raise ValueError(f"run {name!r}: expected a mapping of config keys, found {override!r}")
        if override and "out_dir" in override:
            raise ValueError(f"run {name!r}: a run's folder is OUT_DIR/{name}; set out_dir at the top level")
        config = merge_config(base, override or {})
        config["out_dir"] = str(Path(root) / name)
        expanded.append((name, config))
    return expanded


def _pop_option(args: list[str], flag: str) -> str | None:
    """Remove `flag VALUE` or `flag=VALUE` from args; return VALUE (the last one given)."""
    value = None
    i = 0
    while i < len(args):
        if args[i] == flag and i + 1 < len(args):
            value = args[i + 1]
            del args[i : i + 2]
        elif args[i].startswith(flag + "="):
            value = args[i].split("=", 1)[1]
            del args[i]
        else:
            i += 1
    return value


def _is_rank_zero() -> bool:
    # the launchers Lightning supports (its own, torchrun, SLURM) set one of these on every process
    return all(int(os.environ.get(k, "0") or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def run_recipe(recipe_path: str | Path, args: Sequence[str] = ()) -> list[Path]:
    """Run a multi-run recipe: every run through `PredictCLI`, then its `compare:` if any.

    `args` are the command line after the recipe: `--out_dir DIR`, `--runs a,b` and options applied
    to every run. `--help` prints the runs and the options of one run, and runs nothing.
    Returns the run folders.
    """
    from .cli import PredictCLI

    args = list(args)
    recipe = read_recipe(recipe_path)
    out_dir = _pop_option(args, "--out_dir")
    only_text = _pop_option(args, "--runs")
    only = [n for n in only_text.split(",") if n] if only_text is not None else None
    if any(a in ("-h", "--help") for a in args):
        names = list(recipe.get("runs") or {})
        print(f"{recipe_path} is a multi-run recipe: runs {', '.join(map(str, names))}, each written to "
              f"OUT_DIR/NAME (OUT_DIR: {out_dir or recipe.get('out_dir')}); then `dpgkit compare` "
              f"({'compare: ' + str(dict(recipe['compare'])) if recipe.get('compare') else 'no compare: key'}).\n"
              "Options: --out_dir DIR, --runs NAME[,NAME], and any option of one run (below), applied to every "
              "run.\n")
        base = {k: v for k, v in recipe.items() if k not in ("runs", "compare")}
        PredictCLI(args=["predict", "--config", yaml.safe_dump(base), "--help"])  # exits
        return []
    runs = expand_runs(recipe, out_dir, only)
    folders = []
    for k, (name, config) in enumerate(runs, 1):
        print(f"[{k}/{len(runs)}] {name} -> {config['out_dir']}", file=sys.stderr, flush=True)
        config, notes = apply_overrides(config, args)
        for note in notes:
            print(f"dpgkit: {note}", file=sys.stderr, flush=True)
        PredictCLI(args=["predict", "--config", yaml.safe_dump(config, sort_keys=False), *args])
        folders.append(Path(config["out_dir"]))
    compare = recipe.get("compare")
    if compare is not None and _is_rank_zero():
        from .. import compare as cmp

        root = Path(out_dir if out_dir is not None else recipe["out_dir"])

        def where(key: str) -> Path | None:
            return root / compare[key] if compare.get(key) else None

        summary = cmp.compare_runs(folders, out=where("out"), table=where("table"), json_out=where("json"),
                                   zoom=int(compare.get("zoom", 3)), max_images=compare.get("max_images", 8))
        print(cmp.format_table(summary), end="", flush=True)
        written = [str(p) for p in (where("out"), where("table"), where("json")) if p is not None]
        if written:
            print(f"wrote {', '.join(written)}", flush=True)
    return folders
