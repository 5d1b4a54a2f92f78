"""The `lightning` console script that dpgkit installs: `lightning run predict RECIPE.yaml [options]`.

It is `dpgkit predict RECIPE.yaml [options]` under the spelling Lightning users type: the same
recipe, the same options, the same run folder. Lightning itself stopped installing a `lightning`
script in 2.5.1 (2.0 to 2.5.0 had one, a legacy alias of `fabric`), and dpgkit requires
lightning>=2.5.1, so the two never collide. Lightning's own launcher is the `fabric` command
(`fabric run SCRIPT.py`); every other `lightning` subcommand prints what this command offers and
points there.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]

USAGE = """usage: lightning run predict RECIPE.yaml [--out_dir DIR] [--KEY VALUE ...]

This `lightning` command is installed by dpgkit. It offers one thing:
  lightning run predict RECIPE.yaml ...
                  restore a dataset as a recipe says; the same as `dpgkit predict RECIPE.yaml ...`
                  (options: `lightning run predict --help`)
More dpgkit commands: `dpgkit --help` (compare, evaluate, fit).
Lightning's own command line is `fabric` (e.g. `fabric run SCRIPT.py`): see `fabric --help`.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lightning` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["run", "predict"]:
        from .cli import main as dpgkit_main

        return int(dpgkit_main(["predict", *argv[2:]]) or 0)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    print(f"lightning: {' '.join(argv[:2])!r} is not a command of dpgkit's `lightning`.\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
