"""`RestorationDataModule`: the images to restore, as indexed items sharded over ranks.

Each item has a dataset index (its place in the sorted listing, which seeds everything drawn for
it), a name (its path relative to the root, without the extension; the outputs use it) and a file.
In `simulate` mode the file is the ground truth x and the measurement is simulated from it; in
`measured` mode the file is the user's own degraded image y (and, for inpainting, an optional mask
file of the same name), and there is no ground truth.

A file that cannot be used is never a crash half-way through a dataset: it comes out of the
loader as a bad item with the reason, which the writer lists in the summary.
"""

from __future__ import annotations

import glob as globlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..io import IMAGE_EXTENSIONS, ImageError, load_image, load_mask, resolve_path

__all__ = [
    "Item",
    "ImageItems",
    "RestorationDataModule",
    "ShardSampler",
    "collate_items",
    "describe_preprocess",
    "list_items",
    "preprocess_image",
]

MODES = ("simulate", "measured")
PREPROCESS = ("resize_center_crop", "center_crop", "none")


@dataclass(frozen=True)
class Item:
    """One image of a dataset: `index` seeds it, `name` names its outputs."""

    index: int
    name: str
    path: Path


# ----------------------------------------------------------------------------- listing


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _scan_folder(root: Path, skipped: list[Path] | None = None) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .ipynb_checkpoints, temp folders
        found += [Path(folder) / f for f in files if _is_image(Path(f))]
        if skipped is not None:
            skipped += [Path(folder) / f for f in files if not f.startswith(".") and not _is_image(Path(f))]
    return found


def _read_list(list_file: Path, root: Path) -> list[Path]:
    """One path per line, relative to root; text after the path (e.g. a class label) is ignored."""
    paths = []
    for line in list_file.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # a path with spaces is taken whole when it exists; otherwise the first field is the path
        whole = root / line
        paths.append(whole if whole.exists() else root / line.split()[0])
    return paths


def _names(paths: Sequence[Path], base: Path) -> list[str]:
    """Relative paths without the extension; the extension is kept where that would collide."""
    rel = [p.relative_to(base).as_posix() if p.is_relative_to(base) else p.name for p in paths]
    stems = [r.rsplit(".", 1)[0] if "." in Path(r).name else r for r in rel]
    count: dict[str, int] = {}
    for s in stems:
        count[s] = count.get(s, 0) + 1
    names = [s if count[s] == 1 else r for s, r in zip(stems, rel)]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"the image list names the same file more than once: {repeated[:5]}")
    return names


def list_items(root: str | Path | None = None, files: str | Path | None = None,
               glob: str | None = None, skipped: list[Path] | None = None) -> list[Item]:
    """The items of a folder (recursive), a list file (paths relative to `root`, default the list's
    folder) or a glob (relative to `root` if given), indexed 0.. in a stable order.

    A folder or glob is sorted by relative path; a list keeps its own order (its line order is
    the item index, so a published 1k subset seeds the same way everywhere). Files of a folder or
    glob whose extension is not one of `IMAGE_EXTENSIONS` (.gif, .txt, ...) are not items; when
    `skipped` is a list, they are appended to it (sorted) so that the run can list them.
    """
    root = resolve_path(root) if root is not None else None
    files = resolve_path(files) if files is not None else None
    given = [s for s in (files, glob) if s is not None]
    if len(given) > 1:
        raise ValueError("give at most one of data.files (a list file) and data.glob")
    if not given and root is None:
        raise ValueError("no images given: set data.root (a folder), data.files (a list file) or data.glob")
    if files is not None:
        list_file = Path(files)
        if not list_file.is_file():
            raise FileNotFoundError(f"image list file not found: {list_file}")
        base = Path(root) if root is not None else list_file.parent
        paths = _read_list(list_file, base)
        missing = [str(p) for p in paths if not p.is_file()]
        if missing and len(missing) == len(paths):
            raise FileNotFoundError(
                f"none of the {len(paths)} files of {list_file} exist under {base} (e.g. {missing[0]}); "
                "is data.root right?"
            )
    elif glob is not None:
        pattern = str(Path(root) / glob) if root is not None else glob
        matched = sorted(Path(p) for p in globlib.glob(pattern, recursive=True) if Path(p).is_file())
        paths = [p for p in matched if _is_image(p)]
        if skipped is not None:
            skipped += [p for p in matched if not _is_image(p) and not p.name.startswith(".")]
        base = Path(root) if root is not None else Path(_glob_base(glob))
        if not paths:
            raise FileNotFoundError(f"no images match {pattern} (extensions {', '.join(IMAGE_EXTENSIONS)})")
    else:
        base = Path(root)
        if not base.is_dir():
            raise FileNotFoundError(f"image folder not found: {base}")
        others: list[Path] = []
        paths = sorted(_scan_folder(base, others), key=lambda p: p.relative_to(base).as_posix())
        if skipped is not None:
            skipped += sorted(others)
        if not paths:
            raise FileNotFoundError(f"no images in {base} (extensions {', '.join(IMAGE_EXTENSIONS)})")
    names = _names(paths, base)
    return [Item(i, n, p) for i, (n, p) in enumerate(zip(names, paths))]


def _glob_base(pattern: str) -> str:
    parts = Path(pattern).parts
    fixed = [p for p in parts[: next((i for i, p in enumerate(parts) if globlib.has_magic(p)), len(parts))]]
    return str(Path(*fixed)) if fixed else "."


# ----------------------------------------------------------------------------- preprocessing


def preprocess_image(x: Tensor, size: int | None, how: str, min_size: int = 0,
                     mode: str = "bicubic") -> Tensor:
    """(C, H, W) in [-1, 1] -> (C, size, size).

    "resize_center_crop": resize the short side to `size` (antialiased) and crop the centre, as
    the paper's data loaders; "center_crop": crop only; "none": the image must already be
    size x size (any size when `size` is None). Raises ImageError when the image does not fit.
    """
    h, w = x.shape[-2:]
    if min(h, w) < min_size:
        raise ImageError(f"too small: {h}x{w}, the short side must be at least {min_size} px (data.min_size)")
    if size is None or how == "none":
        if size is not None and (h, w) != (size, size):
            raise ImageError(f"is {h}x{w}, expected {size}x{size} (data.preprocess none)")
        return x
    if how == "resize_center_crop" and min(h, w) != size:
        scale = size / min(h, w)
        new = (max(size, round(h * scale)), max(size, round(w * scale)))
        kwargs = {"antialias": True} if mode in ("bicubic", "bilinear") else {}
        x = F.interpolate(x[None], size=new, mode=mode, **kwargs)[0].clamp(-1, 1)
        h, w = new
    if min(h, w) < size:
        raise ImageError(f"too small: {h}x{w}, needs at least {size}x{size} to crop (data.preprocess center_crop)")
    top, left = (h - size) // 2, (w - size) // 2
    return x[:, top : top + size, left : left + size].contiguous()


def describe_preprocess(h: int, w: int, size: int | None, how: str, measured: bool = False) -> str | None:
    """What `preprocess_image` does to an h x w file, in words (None when it keeps it as it is).

    In measured mode the file is the measurement: a resize there changes what was measured, so the
    note says so plainly."""
    if size is None or how == "none" or (h, w) == (size, size):
        return None
    what = "the measurement" if measured else "the image"
    if how == "resize_center_crop" and min(h, w) != size:
        scale = size / min(h, w)
        new = (max(size, round(h * scale)), max(size, round(w * scale)))
        verb = "shrank" if scale < 1 else "enlarged"
        text = f"{verb} {what} from {h}x{w} to {new[0]}x{new[1]} (bicubic, data.image_size {size})"
        if new != (size, size):
            text += f" and cropped its centre to {size}x{size}"
        return text + " (data.preprocess resize_center_crop)"
    return f"cropped the centre of {what}: {h}x{w} to {size}x{size} (data.preprocess {how})"


def _find_mask(mask_root: Path, name: str) -> Path | None:
    for ext in IMAGE_EXTENSIONS:
        for candidate in (mask_root / f"{name}{ext}", mask_root / f"{name}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


class ImageItems(Dataset):
    """Loads items: dicts with index, name, path, notes, original_size (H, W of the file) and either
    the image or the error.

    `expected_shape` (C, H, W), when given, is the shape every item must have after preprocessing
    (the prior's images, or the measurement the operator makes of them); an item of another size
    is a bad item with the reason, never a failed batch.
    """

    def __init__(self, items: Sequence[Item], mode: str = "simulate", image_size: int | None = 256,
                 preprocess: str = "resize_center_crop", channels: int = 3, alpha: str = "skip",
                 min_size: int = 0, mask_root: str | Path | None = None,
                 expected_shape: Sequence[int] | None = None) -> None:
        self.items = list(items)
        self.mode, self.image_size, self.preprocess = mode, image_size, preprocess
        self.channels, self.alpha, self.min_size = channels, alpha, min_size
        self.mask_root = resolve_path(mask_root) if mask_root is not None else None
        self.expected_shape = tuple(expected_shape) if expected_shape is not None else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        out: dict[str, Any] = {"index": item.index, "name": item.name, "path": str(item.path),
                               "notes": [], "original_size": None, "error": None}
        key = "x" if self.mode == "simulate" else "y"
        try:
            if not item.path.is_file():
                raise ImageError("file not found")
            image, notes = load_image(item.path, self.channels, self.alpha)
            out["notes"] = notes
            h, w = image.shape[-2:]
            out["original_size"] = [int(h), int(w)]
            out[key] = preprocess_image(image, self.image_size, self.preprocess, self.min_size)
            transform = describe_preprocess(h, w, self.image_size, self.preprocess, self.mode == "measured")
            if transform is not None:
                notes.append(transform)
            if self.expected_shape is not None and tuple(out[key].shape[-2:]) != self.expected_shape[-2:]:
                eh, ew = self.expected_shape[-2:]
                fh, fw = out[key].shape[-2:]
                hint = (f"bring the file to that size, or set data.image_size {eh}" if self.image_size is None
                        else f"set data.image_size {eh}")
                raise ImageError(f"expected {eh}x{ew}, found {fh}x{fw} ({hint})")
            if self.mask_root is not None:
                mask_path = _find_mask(self.mask_root, item.name)
                if mask_path is None:
                    raise ImageError(f"no mask file {item.name}.png (or another image extension) in {self.mask_root}")
                try:
                    mask = load_mask(mask_path) * 2 - 1  # {0, 1} -> [-1, 1] for the shared preprocessing
                except ImageError as err:
                    raise ImageError(f"mask {mask_path}: {err}") from err
                # nearest keeps the mask binary through the same resize and crop as the image
                mask = preprocess_image(mask, self.image_size, self.preprocess, 0, mode="nearest")
                if mask.shape[-2:] != out[key].shape[-2:]:
                    raise ImageError(f"mask {mask_path} is {tuple(mask.shape[-2:])}, "
                                     f"the image {tuple(out[key].shape[-2:])}")
                out["mask"] = (mask > 0).float()
        except ImageError as err:
            out["error"] = str(err)
            out.pop(key, None)
        except Exception as err:  # a loader must not end a long run: report and go on
            out["error"] = f"{type(err).__name__}: {err}"
            out.pop(key, None)
        return out


def collate_items(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack the good items; bad ones (and any whose size differs from the batch's) go to "bad"."""
    good = [s for s in samples if s["error"] is None]
    bad = [{k: s[k] for k in ("index", "name", "path", "error")} for s in samples if s["error"] is not None]
    # the most common shape forms the batch, so one odd file never turns the others away
    key = "x" if good and "x" in good[0] else "y"
    if good:
        shapes = [tuple(s[key].shape) for s in good]
        common = max(shapes, key=lambda sh: (shapes.count(sh), -shapes.index(sh)))
        good = sorted(good, key=lambda s: tuple(s[key].shape) != common)
    if good:
        shape = good[0][key].shape
        for s in good[1:]:
            if s[key].shape != shape:
                bad.append({"index": s["index"], "name": s["name"], "path": s["path"],
                            "error": f"is {tuple(s[key].shape)} but its batch is {tuple(shape)}: "
                                     "set data.image_size, or data.batch_size 1"})
        good = [s for s in good if s[key].shape == shape]
    batch: dict[str, Any] = {
        "index": torch.tensor([s["index"] for s in good], dtype=torch.long),
        "name": [s["name"] for s in good],
        "path": [s["path"] for s in good],
        "notes": [s["notes"] for s in good],
        "original_size": [s.get("original_size") for s in good],
        "bad": bad,
    }
    if good:
        batch[key] = torch.stack([s[key] for s in good])
        if "mask" in good[0]:
            batch["mask"] = torch.stack([s["mask"] for s in good])
    return batch


# ----------------------------------------------------------------------------- sharding


class ShardSampler(DistributedSampler):
    """Rank r of W takes items r, r + W, r + 2W, ...: disjoint, nothing repeated, nothing padded.

    A rank may get one item fewer than another, or none at all (fewer items than ranks); predict
    runs no collective per batch, so that is safe. Being a DistributedSampler, Lightning keeps it
    instead of putting its own (which would pad by repeating items).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.dataset, self.num_replicas, self.rank = dataset, num_replicas, rank
        self.epoch, self.shuffle, self.seed, self.drop_last = 0, False, 0, False
        self.total_size = len(dataset)
        self.num_samples = len(range(rank, self.total_size, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


# ----------------------------------------------------------------------------- data module


class RestorationDataModule(pl.LightningDataModule):
    """Images to restore, from a folder (nested), a list file, or a glob.

    Args:
        root: image folder (searched recursively), or the folder the list / glob is relative to.
            Paths are relative to the working directory; `pkg://PACKAGE/PATH` names a folder shipped
            inside an installed package (the demo: `pkg://dpgkit/data/demo_fashion32`).
        files: a text file with one image path per line, relative to `root` (e.g. the ImageNet 1k
            validation subset); extra fields on a line (a class label) are ignored.
        glob: a pattern such as "**/*.png", relative to `root` when given.
        mode: "simulate" (files are ground truth; y is simulated per item from (seed, index)) or
            "measured" (files are the degraded measurements y; no ground truth, no metrics).
        image_size: the side the files are brought to: the prior's image size in simulate mode,
            the measurement's size in measured mode (e.g. 64 for x4 super-resolution at 256).
            None: use the files as they are (measured mode): each must have the size the operator
            makes of the prior's images (e.g. 64x64 for x4 super-resolution at 256); a file of
            another size is listed as a bad item.
        preprocess: "resize_center_crop" (the paper), "center_crop" or "none".
        channels: 3 (RGB) or 1; other files are converted (noted in metrics.jsonl).
        alpha: what to do with transparent pixels: "skip" the file (reported), or composite over
            "white" or "black".
        min_size: files whose short side is smaller are skipped (reported).
        mask_root: measured mode: a folder of masks named like the images (white = observed),
            which replace the recipe's inpainting mask per item.
        limit: restore only the first `limit` items (their indices, and so their results, are
            the same as in the full run).
        batch_size, num_workers: of the DataLoader.
        resume: skip items whose outputs already exist (the PredictionWriter decides).
    """

    def __init__(
        self,
        root: str | None = None,
        files: str | None = None,
        glob: str | None = None,
        mode: str = "simulate",
        image_size: int | None = 256,
        preprocess: str = "resize_center_crop",
        channels: int = 3,
        alpha: str = "skip",
        min_size: int = 0,
        mask_root: str | None = None,
        limit: int | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        resume: bool = True,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"data.mode must be one of {MODES}, got {mode!r}")
        if preprocess not in PREPROCESS:
            raise ValueError(f"data.preprocess must be one of {PREPROCESS}, got {preprocess!r}")
        if image_size is None and preprocess != "none":
            raise ValueError(f"data.preprocess {preprocess!r} needs data.image_size (or use preprocess none)")
        if image_size is None and mode == "simulate":
            raise ValueError("simulate mode needs data.image_size (the prior's image size)")
        if mask_root is not None and mode != "measured":
            raise ValueError("data.mask_root is for measured mode; in simulate mode the recipe's operator draws "
                             "the masks (e.g. dpgkit.operators.Inpainting.from_files)")
        if batch_size < 1 or (limit is not None and limit < 0) or channels not in (1, 3):
            raise ValueError(f"expected batch_size >= 1, limit >= 0 and channels 1 or 3; got {batch_size}, "
                             f"{limit}, {channels}")
        self.root, self.files, self.glob = root, files, glob
        self.mode, self.image_size, self.preprocess = mode, image_size, preprocess
        self.channels, self.alpha, self.min_size, self.mask_root = channels, alpha, min_size, mask_root
        self.limit, self.batch_size, self.num_workers, self.resume = limit, batch_size, num_workers, resume
        self.items: list[Item] = []
        self.skipped: list[Path] = []
        # set by the module once it knows the prior and operator: the shape every item must have
        self.expected_shape: tuple[int, ...] | None = None
        self.todo: list[Item] = []
        self.num_done = 0
        self.num_on_rank = 0

    def setup(self, stage: str | None = None) -> None:
        """List the items, and drop those the writer already has (before any restoring)."""
        skipped: list[Path] = []
        items = list_items(self.root, self.files, self.glob, skipped=skipped)
        self.skipped = skipped
        if self.limit is not None:
            items = items[: self.limit]
        self.items = items
        writer = self._writer()
        if writer is not None and self.trainer is not None:
            # the folder's lock, and the check that its finished items were made with these settings
            writer.prepare(self.trainer, items)
        if self.resume and writer is not None:
            # every rank lists the same folder before Lightning's post-setup barrier, and no rank
            # writes before it, so all ranks agree on the remaining items and their shards
            self.todo = [it for it in items if not writer.is_done(it.name)]
        else:
            self.todo = list(items)
        self.num_done = len(items) - len(self.todo)

    def pixel_settings(self) -> dict[str, Any]:
        """The data settings that determine each item's pixels (see `PredictionWriter`)."""
        return {"mode": self.mode, "image_size": self.image_size, "preprocess": self.preprocess,
                "channels": self.channels, "alpha": self.alpha,
                "mask_root": str(self.mask_root) if self.mask_root is not None else None}

    def _writer(self):
        from .writer import PredictionWriter

        trainer = self.trainer
        if trainer is None:
            return None
        return next((cb for cb in trainer.callbacks if isinstance(cb, PredictionWriter)), None)

    def dataset(self) -> ImageItems:
        return ImageItems(self.todo, self.mode, self.image_size, self.preprocess, self.channels,
                          self.alpha, self.min_size, self.mask_root, self.expected_shape)

    def predict_dataloader(self) -> DataLoader:
        if not self.items:
            self.setup("predict")
        dataset = self.dataset()
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ShardSampler(dataset, world, rank) if world > 1 else None
        self.num_on_rank = len(sampler) if sampler is not None else len(dataset)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, shuffle=False,
                          num_workers=self.num_workers, collate_fn=collate_items)
