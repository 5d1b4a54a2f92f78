"""`dpgkit compare RUN_DIR ...`: a side-by-side picture and a PSNR table of finished runs.

Runs are grouped by task (the `task` label of each run's summary.json, else the folder's name);
within a task each run is a column named by its `method` label (by its folder's name where two
runs of the task share a label, as in a sweep of one solver's settings). The picture has one
block per task, with the columns input | each method | truth and one row per image the task's
runs share, the PSNR (dB) under each picture; the table gives the mean PSNR of the degraded input
and of each method per task. Both come from what `dpgkit predict` wrote (recon/, input/, label/
PNGs and metrics.jsonl rows), so any runs can be compared, not only the demo's. The input column
and its PSNR are those of the task's first run (runs of one task with the same seed see the same
measurement).

    dpgkit compare runs/sr_dps runs/sr_dpg --out grid.png [--table summary.md] [--json summary.json]

Multi-run recipes call it after their runs through their `compare:` key (see
`dpgkit.lightning.runs`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .io import from_uint8, load_image, read_json, save_png, to_uint8, write_json, write_text

__all__ = ["Run", "compare_runs", "format_table", "grid_picture", "load_run", "main"]


@dataclass
class Run:
    """What `dpgkit compare` reads of one run folder."""

    path: Path
    task: str
    method: str
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> metrics.jsonl row


def load_run(run_dir: str | Path) -> Run:
    """A run folder's labels and metrics rows. Raises FileNotFoundError when it has no metrics.jsonl
    (not a finished `dpgkit predict` run) and ValueError for a malformed row."""
    path = Path(run_dir)
    rows_file = path / "metrics.jsonl"
    if not rows_file.is_file():
        raise FileNotFoundError(f"{path}: expected a run folder of `dpgkit predict` (metrics.jsonl), not found")
    labels = {"task": path.name, "method": path.name}
    summary = path / "summary.json"
    if summary.is_file():
        data = read_json(summary)
        labels.update({k: str(data[k]) for k in ("task", "method") if isinstance(data, dict) and data.get(k)})
    rows: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(rows_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or "name" not in row or "index" not in row:
            raise ValueError(f"{rows_file}:{n}: expected a row with name and index, found {line[:80]!r}")
        rows[row["name"]] = row
    return Run(path, labels["task"], labels["method"], rows)


def _group(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs by task, in order of appearance. Runs of one task with the same method label (a sweep
    of one solver's settings) are told apart by their folder names."""
    tasks: dict[str, list[Run]] = {}
    for run in runs:
        tasks.setdefault(run.task, []).append(run)
    for task, group in tasks.items():
        labels = [r.method for r in group]
        if len(set(labels)) < len(labels):
            group[:] = [Run(r.path, r.task, r.path.name if labels.count(r.method) > 1 else r.method, r.rows)
                        for r in group]
        labels = [r.method for r in group]
        if len(set(labels)) < len(labels):
            twice = next(m for m in labels if labels.count(m) > 1)
            raise ValueError(f"two runs of task {task!r} named {twice!r}: "
                             f"{', '.join(str(r.path) for r in group if r.method == twice)}")
    return tasks


def _shared_names(group: Sequence[Run]) -> list[str]:
    names = set(group[0].rows)
    for run in group[1:]:
        names &= set(run.rows)
    return sorted(names, key=lambda n: group[0].rows[n]["index"])


def _mean(values: list[float | None]) -> float | None:
    good = [v for v in values if v is not None and math.isfinite(v)]
    return sum(good) / len(good) if good else None


def summarize(runs: Sequence[Run]) -> dict[str, Any]:
    """{"tasks": {task: {"input": mean, METHOD: mean, ...}}, "images": {task: n}, "runs": [...]}:
    the mean PSNR (dB) over the images all runs of a task share (None where not measured)."""
    out: dict[str, Any] = {"tasks": {}, "images": {}, "runs": []}
    for task, group in _group(runs).items():
        names = _shared_names(group)
        scores = {"input": _mean([group[0].rows[n].get("input_psnr") for n in names])}
        for run in group:
            scores[run.method] = _mean([run.rows[n].get("psnr") for n in names])
        out["tasks"][task] = scores
        out["images"][task] = len(names)
        out["runs"] += [{"run_dir": str(r.path), "task": task, "method": r.method} for r in group]
    return out


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a markdown table: one row per task, columns input and each method (mean PSNR, dB)."""
    methods: list[str] = []
    for scores in summary["tasks"].values():
        methods += [m for m in scores if m != "input" and m not in methods]
    lines = ["| task | images | input | " + " | ".join(methods) + " |", "| --- " * (len(methods) + 3) + "|"]
    for task, scores in summary["tasks"].items():
        cells = [f"{scores[k]:.2f}" if scores.get(k) is not None else "-" for k in ("input", *methods)]
        lines.append(f"| {task} | {summary['images'][task]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nmean PSNR (dB) over the images each task's runs share\n"


def _tile(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A PNG as an (H, W, 3) uint8 tile of `size`, enlarged by pixel repetition (a display zoom)."""
    x, _ = load_image(path, channels=3, alpha="black")
    h, w = x.shape[-2:]
    if (h, w) != size:
        fy, fx = max(1, size[0] // h), max(1, size[1] // w)
        x = x.repeat_interleave(fy, 1).repeat_interleave(fx, 2)
        x = torch.nn.functional.pad(x, (0, max(0, size[1] - x.shape[2]), 0, max(0, size[0] - x.shape[1])),
                                    value=1.0)[:, : size[0], : size[1]]
    return to_uint8(x)


def grid_picture(runs: Sequence[Run], zoom: int = 3, max_images: int | None = 8) -> torch.Tensor:
    """The comparison picture (3, H, W) in [-1, 1]: per task a block of columns input | methods |
    truth, one row per shared image (at most `max_images`), the PSNR (dB) under each picture."""
    from PIL import Image, ImageDraw

    groups = _group(runs)
    blocks = []
    for task, group in groups.items():
        names = _shared_names(group)[:max_images]
        if not names:
            raise ValueError(f"task {task!r}: its runs share no image ({', '.join(str(r.path) for r in group)})")
        first = group[0]
        cols: list[tuple[str, Path, str, list[float | None]]] = [
            ("input", first.path / "input", "input_psnr", [first.rows[n].get("input_psnr") for n in names])
        ]
        cols += [(r.method, r.path / "recon", "psnr", [r.rows[n].get("psnr") for n in names]) for r in group]
        cols.append(("truth", first.path / "label", "", [None] * len(names)))
        blocks.append((task, names, cols))
    _, first_names, first_cols = blocks[0]
    probe, _ = load_image(first_cols[1][1] / f"{first_names[0]}.png", channels=3)
    th, pw = probe.shape[1] * zoom, probe.shape[2] * zoom
    tw = max(pw, 64)  # room for the label under the picture
    text_h, head_h, gap = 14, 30, 12
    rows = max(len(b[1]) for b in blocks)
    width = sum(len(b[2]) * (tw + 2) for b in blocks) + gap * (len(blocks) - 1) + 4
    height = head_h + rows * (th + text_h + 2) + 4
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x0 = 2
    for task, names, cols in blocks:
        draw.text((x0, 2), task, fill="black")
        for ci, (label, folder, _, scores) in enumerate(cols):
            left = x0 + ci * (tw + 2)
            draw.text((left + 2, 16), label, fill="black")
            for ri, name in enumerate(names):
                top = head_h + ri * (th + text_h + 2)
                png = folder / f"{name}.png"
                if png.is_file():
                    canvas.paste(Image.fromarray(_tile(png, (th, pw))), (left, top))
                score = scores[ri]
                if label != "truth":
                    draw.text((left + 2, top + th), f"{score:.2f} dB" if score is not None else "n/a", fill="black")
        x0 += len(cols) * (tw + 2) + gap
    return from_uint8(np.array(canvas))


def compare_runs(
    run_dirs: Sequence[str | Path],
    out: str | Path | None = None,
    table: str | Path | None = None,
    json_out: str | Path | None = None,
    zoom: int = 3,
    max_images: int | None = 8,
) -> dict[str, Any]:
    """Compare run folders: write the picture to `out` (PNG), the markdown table to `table` and the
    summary to `json_out` (each only when given); returns the summary (see `summarize`)."""
    if not run_dirs:
        raise ValueError("expected at least one run folder")
    runs = [load_run(d) for d in run_dirs]
    summary = summarize(runs)
    if out is not None:
        save_png(grid_picture(runs, zoom=zoom, max_images=max_images), out)
        summary["grid"] = str(out)
    if table is not None:
        write_text(format_table(summary), table)
    if json_out is not None:
        write_json(summary, json_out)
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dpgkit compare",
        description="A side-by-side picture (input | each method | truth, PSNR under each) and the mean "
        "PSNR table of finished `dpgkit predict` runs, grouped by task.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", type=Path)
    p.add_argument("--out", type=Path, default=None, help="the picture (PNG)")
    p.add_argument("--table", type=Path, default=None, help="the table (markdown); it is always printed")
    p.add_argument("--json", dest="json_out", type=Path, default=None, help="the summary (JSON)")
    p.add_argument("--zoom", type=int, default=3, help="pixel repetition of the pictures (default 3)")
    p.add_argument("--max-images", type=int, default=8, help="rows of the picture per task (default 8)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `dpgkit compare`; prints the table."""
    args = parser().parse_args(argv)
    try:
        summary = compare_runs(args.run_dirs, args.out, args.table, args.json_out, args.zoom, args.max_images)
    except (FileNotFoundError, ValueError) as err:
        print(f"dpgkit compare: error: {err}", file=sys.stderr)
        return 1
    print(format_table(summary), end="")
    if args.out is not None:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
