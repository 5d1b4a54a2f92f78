"""`PredictionWriter`: restored images, per-image metrics and the run's summary on disk.

Layout of a run folder (names keep the input's relative path, with `.png`):

    recon/NAME.png   the restoration          input/NAME.png  y shown as a picture
    label/NAME.png   the ground truth          mask/NAME.png   the observation mask (inpainting)
    parts/NAME.json  the item's metrics row    errors/NAME.json  why an item could not be used
    metrics.jsonl    all rows, sorted by index summary.json    means, counts, bad files, what ran

Every file is written to a temporary name and renamed (atomic). An item counts as done when its
recon PNG and its row exist; the row is written last, so a killed run never leaves an item that
looks done but is not. Rows are one file per item rather than appended lines of one shared file:
ranks never write the same file, and a run killed half-way loses nothing. `metrics.jsonl` and
`summary.json` are rebuilt from the rows at the end of every run by rank 0, after gathering the
rows and bad files of all ranks.

Each row records the settings that determine its pixels (`settings`: the prior, operator, noise,
solver, seed and the data's mode, size and preprocessing, with a hash of them). A run into a
folder whose finished items were made with other settings refuses to start, naming the keys that
differ (`on_change="recompute"` redoes those items instead), so that a folder never mixes the
images of two configurations under one summary. A lock file (`.lock`, holding the pid and host of
the run) keeps two live runs out of one folder; a lock whose process is gone is taken over.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import math
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf

from ..io import read_json, save_png, write_json, write_text

__all__ = ["ImageProgressBar", "PredictionWriter", "FolderInUseError", "RunLock", "format_summary", "settings_hash"]

ON_CHANGE = ("refuse", "recompute")

METRIC_KEYS = ("psnr", "ssim", "lpips", "input_psnr", "seconds")
_LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS", "input_psnr": "PSNR of input (dB)",
           "seconds": "seconds / image"}


def _finite(v: Any) -> Any:
    """JSON has no NaN or infinity: such values (e.g. the PSNR of identical images) become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _stats(values: Sequence[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std(unbiased=False)), "min": float(t.min()),
            "max": float(t.max()), "count": len(values)}


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a small text table."""
    lines = [
        f"dpgkit predict -> {summary['out_dir']}",
        f"  {summary['images']} of {summary['dataset_items']} images restored "
        f"({summary['restored_now']} now, {summary['restored_before']} by earlier runs), "
        f"{summary['num_bad']} bad, {summary['missing']} missing",
        "",
        f"  {'metric':<20} {'mean':>9} {'std':>9} {'min':>9} {'max':>9}",
    ]
    for key in METRIC_KEYS:
        s = summary["metrics"].get(key)
        if s is not None:
            lines.append(f"  {_LABELS[key]:<20} {s['mean']:>9.4f} {s['std']:>9.4f} {s['min']:>9.4f} {s['max']:>9.4f}")
    if summary.get("mode") == "simulate" and summary["metrics"].get("lpips") is None:
        lines.append(f"  LPIPS: {summary.get('run', {}).get('lpips', 'unavailable')}")
    if summary.get("resized"):
        lines.append(f"  {summary['resized']} images were resized or cropped (each row's notes say how; "
                     "data.preprocess none keeps files as they are)")
    if summary.get("skipped"):
        shown = ", ".join(summary["skipped"][:10]) + (" ..." if len(summary["skipped"]) > 10 else "")
        lines.append(f"  skipped {len(summary['skipped'])} files that are not images of a read format "
                     f"(summary.json lists them): {shown}")
    for item in summary["bad"][:20]:
        lines.append(f"  bad: {item['path']}: {item['error']}")
    if len(summary["bad"]) > 20:
        lines.append(f"  ... and {len(summary['bad']) - 20} more bad files (summary.json lists them)")
    return "\n".join(lines)


def settings_hash(settings: dict[str, Any]) -> str:
    """A short hash of the settings (their JSON with sorted keys), to compare folders at a glance."""
    text = json.dumps({k: v for k, v in settings.items() if k != "hash"}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class FolderInUseError(FileExistsError):
    """Another live run holds the run folder's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """`FOLDER/.lock`, created exclusively (O_EXCL) with the pid and host of its run.

    A lock left by a process that is gone (same host, pid not alive, or this very process after
    an earlier run in it failed) is stale and taken over; any other raises `FolderInUseError`
    naming the run that holds it.
    """

    _held: set[str] = set()  # the locks this process holds now

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / ".lock"
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = self._holder()
                if holder is None or self._stale(holder):
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                raise FolderInUseError(
                    f"another run (pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}) is "
                    f"writing to {self.path.parent}: wait for it or use another --out_dir (if no such run is alive, "
                    f"remove {self.path})"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            RunLock._held.add(str(self.path.resolve()))
            atexit.register(self.release)
            return
        raise RuntimeError(f"could not take the lock {self.path}: it keeps reappearing")

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = read_json(self.path)
        except (OSError, json.JSONDecodeError):
            # being written this instant, or damaged: a damaged lock older than a minute is stale
            with contextlib.suppress(OSError):
                if time.time() - self.path.stat().st_mtime > 60:
                    return None
            return {"pid": "?", "host": "?", "since": "?"}
        return holder if isinstance(holder, dict) else None

    def _stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False  # another machine's process cannot be checked from here
        if holder["pid"] == os.getpid():
            return str(self.path.resolve()) not in RunLock._held
        return not _pid_alive(holder["pid"])

    def release(self) -> None:
        if self.held:
            self.held = False
            RunLock._held.discard(str(self.path.resolve()))
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


class PredictionWriter(BasePredictionWriter):
    """Writes what `RestorationModule.predict_step` returns; see the module docstring for the layout.

    Args:
        out_dir: the run folder.
        save_input, save_label, save_mask: also write y as a picture, the ground truth, the mask.
        print_summary: print the summary table at the end (rank 0).
        on_change: what to do when the folder holds items made with other settings: "refuse"
            (the run stops before restoring anything, naming the keys that differ) or "recompute"
            (those items are restored again with the current settings).
    """

    def __init__(self, out_dir: str, save_input: bool = True, save_label: bool = True, save_mask: bool = True,
                 print_summary: bool = True, on_change: str = "refuse") -> None:
        super().__init__(write_interval="batch")
        if not out_dir:
            raise ValueError("the PredictionWriter needs an out_dir (dpgkit predict --out_dir DIR)")
        if on_change not in ON_CHANGE:
            raise ValueError(f"writer.on_change must be one of {ON_CHANGE}, got {on_change!r}")
        self.on_change = on_change
        self.settings: dict[str, Any] | None = None
        self.stale: set[str] = set()
        self.lock = RunLock(out_dir)
        self.out_dir = Path(out_dir)
        self.save_input, self.save_label, self.save_mask = save_input, save_label, save_mask
        self.print_summary = print_summary
        self.rows: list[dict[str, Any]] = []
        self.bad: list[dict[str, Any]] = []
        self.summary: dict[str, Any] | None = None

    # ------------------------------------------------------------------ paths

    def path(self, kind: str, name: str) -> Path:
        suffix = ".json" if kind in ("parts", "errors") else ".png"
        return self.out_dir / kind / f"{name}{suffix}"

    def is_done(self, name: str) -> bool:
        """Whether `name` has its restoration and its metrics row, made with the current settings
        (then resume skips it)."""
        return name not in self.stale and self.path("recon", name).is_file() and self.path("parts", name).is_file()

    def prepare(self, trainer: pl.Trainer, items: Sequence[Any] = ()) -> None:
        """Before any item is restored: take the folder's lock (rank 0) and compare the settings of
        the finished items on disk with this run's. Raises ValueError on a difference when
        `on_change` is "refuse", naming the differing keys; with "recompute" (or a data module
        that does not resume) those items count as not done."""
        module, datamodule = trainer.lightning_module, getattr(trainer, "datamodule", None)
        settings: dict[str, Any] = {}
        for part in (module, datamodule):
            describe = getattr(part, "pixel_settings", None)
            if callable(describe):
                settings.update(describe())
        self.settings = {**settings, "hash": settings_hash(settings)} if settings else None
        refused = None
        if trainer.global_rank == 0 and not self.lock.held:
            try:
                self.lock.acquire()
            except FolderInUseError as err:
                refused = str(err)
        if trainer.world_size > 1:  # every rank stops, not only the one that holds the lock
            refused = trainer.strategy.broadcast(refused, src=0)
        if refused is not None:
            raise FolderInUseError(refused)
        self.stale = set()
        if self.settings is None:
            return
        differing: dict[str, int] = {}
        for name, row in self._rows_on_disk().items():
            recorded = row.get("settings")
            if isinstance(recorded, dict) and recorded.get("hash") == self.settings["hash"]:
                continue
            self.stale.add(name)
            if not isinstance(recorded, dict):
                keys = ["settings (not recorded)"]
            else:
                keys = [k for k in self.settings if k != "hash" and recorded.get(k) != self.settings[k]]
            for key in keys or ["hash"]:
                differing[key] = differing.get(key, 0) + 1
        if self.stale and self.on_change == "refuse" and getattr(datamodule, "resume", True):
            self.lock.release()
            first = next(iter(sorted(self.stale)))
            raise ValueError(
                f"{self.out_dir} holds {len(self.stale)} finished images made with other settings "
                f"(differing: {', '.join(sorted(differing))}; e.g. parts/{first}.json): use another --out_dir, "
                "or --writer.on_change recompute to restore them again with these settings"
            )

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.rows, self.bad, self.summary = [], [], None
        if stage == "predict" and self.settings is None:
            # a data module that is not dpgkit's did not call `prepare`
            self.prepare(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.lock.release()

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        self.write(prediction)

    def write(self, prediction: dict[str, Any]) -> None:
        """Write one batch's images and rows (also usable without a Trainer)."""
        for item in prediction.get("bad", []):
            record = {k: item[k] for k in ("name", "index", "path", "error")}
            write_json(record, self.path("errors", item["name"]))
            self.bad.append(record)
        for b, name in enumerate(prediction["name"]):
            save_png(prediction["recon"][b], self.path("recon", name))
            files = {"recon": f"recon/{name}.png"}
            for kind, wanted in (("input", self.save_input), ("label", self.save_label), ("mask", self.save_mask)):
                images = prediction.get(kind)
                if wanted and images is not None:
                    save_png(images[b] * 2 - 1 if kind == "mask" else images[b], self.path(kind, name))
                    files[kind] = f"{kind}/{name}.png"
            row = {"name": name, "index": int(prediction["index"][b])}
            row.update({k: _finite(v) for k, v in prediction["metrics"][b].items()})
            if prediction.get("path"):
                row["file"] = prediction["path"][b]
            if prediction.get("original_size") and prediction["original_size"][b] is not None:
                row["original_size"] = list(prediction["original_size"][b])
            if prediction.get("notes") and prediction["notes"][b]:
                row["notes"] = list(prediction["notes"][b])
            if self.settings is not None:
                row["settings"] = self.settings
            row["outputs"] = files
            write_json(row, self.path("parts", name))  # last: its presence marks the item done
            self.path("errors", name).unlink(missing_ok=True)
            self.rows.append(row)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # teardown runs on every rank, also on one whose shard was empty (its predict loop is skipped)
        if stage == "predict":
            try:
                self.finalize(trainer, pl_module)
            finally:
                self.lock.release()

    # ------------------------------------------------------------------ summary

    def finalize(self, trainer: pl.Trainer | None = None, pl_module: pl.LightningModule | None = None) -> None:
        """Gather this run's rows and bad files from all ranks; rank 0 writes metrics.jsonl and summary.json."""
        payload = {"rows": self.rows, "bad": self.bad}
        parts = [payload]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, payload)
        if trainer is not None and trainer.global_rank != 0:
            return
        rows_now = [r for p in parts for r in p["rows"]]
        bad = sorted((b for p in parts for b in p["bad"]), key=lambda b: b["index"])
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        items = getattr(datamodule, "items", None) or []
        self.summary = self.merge(rows_now, bad, items, trainer, pl_module, datamodule)
        if self.print_summary:
            print(format_summary(self.summary), file=sys.stdout, flush=True)

    def _rows_on_disk(self) -> dict[str, dict[str, Any]]:
        rows = {}
        parts = self.out_dir / "parts"
        for path in sorted(parts.rglob("*.json")) if parts.is_dir() else []:
            try:
                row = read_json(path)
            except (OSError, json.JSONDecodeError):
                continue  # a foreign or damaged file: its item is simply not counted as done
            if isinstance(row, dict) and "name" in row and "index" in row:
                rows[row["name"]] = row
        return rows

    def merge(self, rows_now: list[dict[str, Any]], bad: list[dict[str, Any]], items: Sequence[Any],
              trainer: pl.Trainer | None, pl_module: pl.LightningModule | None, datamodule: Any) -> dict[str, Any]:
        rows = self._rows_on_disk()
        for row in rows_now:  # rows of ranks whose file system this rank does not see
            rows[row["name"]] = row
        names_now = {r["name"] for r in rows_now}
        if self.settings is not None:  # items made with other settings and not redone are not this run's
            rows = {n: r for n, r in rows.items()
                    if (r.get("settings") or {}).get("hash") == self.settings["hash"]}
        if items:
            wanted = {it.name for it in items}
            rows = {n: r for n, r in rows.items() if n in wanted}
        ordered = sorted(rows.values(), key=lambda r: r["index"])
        write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in ordered), self.out_dir / "metrics.jsonl")
        bad_names = {b["name"] for b in bad}
        missing = len({it.name for it in items} - set(rows) - bad_names) if items else 0
        summary: dict[str, Any] = {
            "out_dir": str(self.out_dir),
            "mode": getattr(datamodule, "mode", "simulate" if any("psnr" in r for r in ordered) else "measured"),
            "dataset_items": len(items) if items else len(ordered) + len(bad),
            "images": len(ordered),
            "restored_now": len(names_now & set(rows)),
            "restored_before": len(set(rows) - names_now),
            "num_bad": len(bad),
            "missing": missing,
            "metrics": {k: _stats([r.get(k) for r in ordered]) for k in METRIC_KEYS},
            "bad": bad,
            "skipped": [str(p) for p in getattr(datamodule, "skipped", [])],
            "resized": sum(1 for r in ordered if any(str(n).startswith(("shrank", "enlarged", "cropped"))
                                                     for n in r.get("notes", []))),
            "world_size": trainer.world_size if trainer is not None else 1,
        }
        if self.settings is not None:
            summary["settings"] = self.settings
        describe = getattr(pl_module, "describe", None)
        if callable(describe):
            summary["run"] = describe()
        # the labels `dpgkit evaluate` reads to place the run in its table
        summary.update(getattr(pl_module, "labels", None) or {})
        write_json(summary, self.out_dir / "summary.json")
        return summary


class ImageProgressBar(TQDMProgressBar):
    """Lightning's bar, counted in images (rate and ETA per image), with the running mean PSNR."""

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = True) -> None:
        super().__init__(refresh_rate, process_position, leave)
        self._images = 0

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                               batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.has_dataloader_changed(dataloader_idx):
            return
        datamodule = trainer.datamodule
        total = getattr(datamodule, "num_on_rank", 0) if datamodule is not None else 0
        self._images = 0
        bar = self.predict_progress_bar
        bar.reset(total=total or convert_inf(self.total_predict_batches_current_dataloader))
        bar.initial = 0
        bar.unit = "img" if total else "it"
        bar.set_description(self.predict_description)

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if isinstance(batch, dict) and "name" in batch:
            self._images += len(batch["name"]) + len(batch.get("bad", []))
        else:
            self._images = batch_idx + 1
        bar = self.predict_progress_bar
        if bar is not None and not bar.disable:
            bar.n = self._images
            progress = getattr(pl_module, "progress_metrics", None)
            bar.set_postfix(progress() if callable(progress) else {}, refresh=False)
            bar.refresh()
