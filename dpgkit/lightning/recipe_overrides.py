"""What a command line overriding a recipe means, beyond key-by-key replacement.

jsonargparse lays command-line options over the recipe key by key. Two of its rules contradict
what a user asks for:

- `--data.root DIR` keeps the recipe's `data.files` (a list file relative to the root), so a
  folder of one's own photos is read through the recipe's list and is not found. A list file or
  glob applies only when it is the one asked for: when the command line sets data.files or
  data.glob, the recipe's other one is dropped (its root stays as their base); when it sets only
  data.root, the recipe's list (or glob) is kept only if it names files in that folder (the
  ImageNet recipes' 1k list under `--data.root /data/imagenet/val`), else the whole folder is read
  (your own photos). A note says which.
- `--model.solver DPS` on a DPG recipe keeps DPG's `init_args` whose names DPS shares (its guidance
  scale, tuned for DPG). A class given on the command line starts from its own defaults: the
  recipe's entry for that key is replaced by the new class alone (operator, noise and solver
  alike); `--model.solver.init_args.X` options still apply on top.

`apply_overrides` rewrites the recipe (a mapping) before it reaches the parser.
"""

from __future__ import annotations

import copy
import glob as globlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..io import resolve_path

__all__ = ["CLASS_KEYS", "apply_overrides", "option_values"]

# the recipe keys whose value is a class (class_path + init_args) a user may switch
CLASS_KEYS = ("model.solver", "model.operator", "model.noise")
DATA_SOURCES = ("data.root", "data.files", "data.glob")


def option_values(args: Sequence[str]) -> dict[str, str]:
    """{key: value} of the `--key value` and `--key=value` options of a command line (the last
    one of a key wins); flags without a value are left out."""
    values: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            values[key] = value
        elif arg.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            values[arg[2:]] = args[i + 1]
            i += 1
        i += 1
    return values


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _applies_under(data: Mapping[str, Any], root: str) -> bool:
    """Whether the recipe's list file (or glob) names at least one file under `root`."""
    try:
        if data.get("files") is not None:
            lines = resolve_path(data["files"]).read_text(encoding="utf-8").splitlines()
            names = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
            return any((Path(root) / n).is_file() or (Path(root) / n.split()[0]).is_file() for n in names)
        if data.get("glob") is not None:
            return any(Path(p).is_file() for p in globlib.iglob(str(Path(root) / data["glob"]), recursive=True))
    except (OSError, ValueError):
        return False
    return False


def _same_class(given: str, recipe_class: str) -> bool:
    # "DPS" and "dpgkit.solvers.DPS" name the same class (jsonargparse resolves short names)
    return given == recipe_class or given.rsplit(".", 1)[-1] == recipe_class.rsplit(".", 1)[-1]


def apply_overrides(config: Mapping[str, Any], args: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """The recipe `config` as the command line `args` means it, and one note per change made.

    Neither argument is modified. See the module docstring for the two rules.
    """
    config = copy.deepcopy(dict(config))
    given = option_values(args)
    notes: list[str] = []
    data = config.get("data")
    asked = [k for k in DATA_SOURCES if k in given]
    if asked == ["data.root"] and isinstance(data, dict) and (data.get("files") or data.get("glob")):
        which = "data.files" if data.get("files") is not None else "data.glob"
        if _applies_under(data, given["data.root"]):
            notes.append(f"the recipe's {which} ({data[which.split('.')[1]]}) applies under --data.root "
                         f"{given['data.root']}: it names files there (--{which} null reads the whole folder)")
            asked = []
    if asked and isinstance(data, dict):
        for key in DATA_SOURCES:
            name = key.split(".", 1)[1]
            # the recipe's root stays as the base of a list or glob given on the command line
            if key in asked or key == "data.root" or data.get(name) is None:
                continue
            why = " (it names no file there)" if asked == ["data.root"] else ""
            notes.append(f"{' and '.join('--' + k for k in asked)} given: the recipe's {key} ({data[name]}) "
                         f"is not used{why}")
            data[name] = None
    for key in CLASS_KEYS:
        new_class = given.get(key, given.get(f"{key}.class_path"))
        node = _get(config, key)
        if new_class is None or not isinstance(node, Mapping) or not node.get("class_path"):
            continue
        if _same_class(new_class, str(node["class_path"])):
            continue
        parent = _get(config, key.rsplit(".", 1)[0])
        dropped = sorted((node.get("init_args") or {}).keys())
        parent[key.rsplit(".", 1)[1]] = {"class_path": new_class}
        if dropped:
            notes.append(f"--{key} {new_class} replaces the recipe's {node['class_path']}: its arguments "
                         f"({', '.join(dropped)}) are not carried over; {new_class} starts from its defaults")
    return config, notes
