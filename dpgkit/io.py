"""Images to and from files: the one place where pixels meet disk.

Library images are float tensors in [-1, 1], (C, H, W) per image. Files are 8-bit PNG on the way
out; on the way in PNG, JPEG, WebP, BMP and TIFF, with grayscale, palette, CMYK, 16-bit and alpha
images converted when that is safe (each conversion is reported as a note) and refused with an
`ImageError` otherwise. Every write goes to a temporary file in the target folder first and is then
renamed over the target (`os.replace`), so a reader never sees a half-written file, even when the
process is killed mid-write or several processes write the same folder.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import os
import struct
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

__all__ = [
    "IMAGE_EXTENSIONS",
    "MASK_THRESHOLD",
    "PACKAGE_SCHEME",
    "ImageError",
    "atomic_path",
    "from_uint8",
    "load_image",
    "load_mask",
    "quantize",
    "read_idx_images",
    "read_json",
    "resolve_path",
    "save_png",
    "to_uint8",
    "write_json",
    "write_text",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
ALPHA_POLICIES = ("skip", "white", "black")
# A mask pixel is observed when its 8-bit level is at least this (brighter than mid-grey).
MASK_THRESHOLD = 128
# `pkg://PACKAGE/PATH`: a file shipped inside an installed Python package (see `resolve_path`).
PACKAGE_SCHEME = "pkg://"


class ImageError(ValueError):
    """A file that cannot be used as an image: unreadable, or a conversion that would not be safe."""


# ----------------------------------------------------------------------------- tensors <-> pixels


def to_uint8(x: Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W, C) uint8, rounding to the nearest level (out of range clamps)."""
    if x.dim() != 3:
        raise ValueError(f"expected one image (C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected a float image in [-1, 1], got dtype {x.dtype}")
    levels = ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255)
    return levels.to(torch.uint8).permute(1, 2, 0).numpy()


def from_uint8(a: np.ndarray) -> Tensor:
    """(H, W, C) or (H, W) uint8 -> (C, H, W) float32 in [-1, 1]."""
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float() / 127.5 - 1


def quantize(x: Tensor) -> Tensor:
    """x snapped to the 256 levels an 8-bit PNG stores (same shape, in [-1, 1]).

    Metrics computed on quantized images equal those recomputed later from the saved PNGs.
    """
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


# ----------------------------------------------------------------------------- reading


def _png_bit_depth(path: Path) -> int | None:
    # IHDR is always the first chunk: 8-byte signature, 8-byte chunk header, width, height, depth
    with open(path, "rb") as f:
        head = f.read(25)
    if len(head) == 25 and head[:8] == b"\x89PNG\r\n\x1a\n":
        return head[24]
    return None


def _flatten_alpha(rgb: np.ndarray, alpha: np.ndarray, policy: str, notes: list[str]) -> np.ndarray:
    """rgb (H, W, C) float in [0, 1], alpha (H, W) in [0, 1]."""
    if bool((alpha >= 1).all()):
        notes.append("dropped an alpha channel that was fully opaque")
        return rgb
    if policy == "skip":
        raise ImageError(
            "has transparent pixels; flatten it first, or choose a background (data.alpha: white or black)"
        )
    background = 1.0 if policy == "white" else 0.0
    notes.append(f"composited transparent pixels over {policy}")
    return rgb * alpha[..., None] + background * (1 - alpha[..., None])


def load_image(path: str | Path, channels: int = 3, alpha: str = "skip") -> tuple[Tensor, list[str]]:
    """Read an image file as (channels, H, W) float32 in [-1, 1], and notes on what was converted.

    Converted (with a note): grayscale to RGB (or RGB to grayscale when channels == 1), palette and
    CMYK to RGB, 16-bit samples (scaled, not clipped), an opaque alpha channel (dropped), EXIF
    rotation (applied). Transparent pixels are composited over `alpha` ("white" or "black") or,
    with "skip", refused. Raises `ImageError` for unreadable files and unsafe conversions.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if alpha not in ALPHA_POLICIES:
        raise ValueError(f"alpha must be one of {ALPHA_POLICIES}, got {alpha!r}")
    path = Path(path)
    notes: list[str] = []
    try:
        with Image.open(path) as img:
            img.load()
            if img.getexif().get(0x0112, 1) != 1:  # EXIF Orientation
                img = ImageOps.exif_transpose(img)
                notes.append("applied the EXIF orientation")
            mode = img.mode
            if mode == "P" or mode == "PA":
                notes.append("converted a palette image to RGB")
                img = img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB")
                mode = img.mode
            elif mode == "CMYK" or mode == "YCbCr" or mode == "LAB" or mode == "HSV":
                notes.append(f"converted {mode} to RGB")
                img = img.convert("RGB")
                mode = "RGB"
            elif mode == "1":
                notes.append("converted a 1-bit image to grayscale")
                img = img.convert("L")
                mode = "L"
            pixels = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"cannot read the image: {err}") from err
    except Image.DecompressionBombError as err:  # pragma: no cover - needs a huge file
        raise ImageError(str(err)) from err

    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise ImageError(f"32-bit integer samples outside 0..65535 (mode {mode}) cannot be scaled safely")
        notes.append("scaled 16-bit samples to [0, 1]")
        data = pixels.astype(np.float64) / 65535.0
    elif mode == "F":
        if pixels.size and (np.nanmin(pixels) < 0 or np.nanmax(pixels) > 1 or np.isnan(pixels).any()):
            raise ImageError("floating-point samples outside [0, 1] cannot be converted safely")
        data = pixels.astype(np.float64)
    elif pixels.dtype == np.uint8:
        data = pixels.astype(np.float64) / 255.0
        if path.suffix.lower() == ".png" and _png_bit_depth(path) == 16:
            notes.append("16-bit samples read at 8-bit precision")
    else:
        raise ImageError(f"unsupported pixel format: mode {mode}, {pixels.dtype}")

    if data.ndim == 2:
        data = data[:, :, None]
    if data.shape[2] in (2, 4):  # LA, RGBA
        data = _flatten_alpha(data[:, :, :-1], data[:, :, -1], alpha, notes)
    if data.shape[2] not in (1, 3):
        raise ImageError(f"expected 1, 3 or 4 channels, found {data.shape[2]}")
    if data.shape[2] == 1 and channels == 3:
        notes.append("converted grayscale to RGB")
        data = np.repeat(data, 3, axis=2)
    elif data.shape[2] == 3 and channels == 1:
        notes.append("converted RGB to grayscale (ITU-R 601 luma)")
        data = data @ np.array([0.299, 0.587, 0.114])[:, None]
    if min(data.shape[:2]) == 0:
        raise ImageError("has no pixels")
    x = torch.from_numpy(np.ascontiguousarray(data.transpose(2, 0, 1))).float() * 2 - 1
    return x, notes


def load_mask(path: str | Path, size: Sequence[int] | None = None, keep: str = "white") -> Tensor:
    """A binary mask (1, H, W) float in {0, 1} from an image file, 1 = observed.

    A pixel whose grey level (8-bit, ITU-R 601 luma for colour files) is at least
    `MASK_THRESHOLD` is observed with `keep="white"`, missing with `keep="black"`. `size` (H, W):
    resized first (nearest neighbour, so the mask stays binary). Raises FileNotFoundError for a
    missing file and `ImageError` for an unreadable one.
    """
    if keep not in ("white", "black"):
        raise ValueError(f"keep must be 'white' or 'black', got {keep!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    x, _ = load_image(path, channels=1, alpha="black")
    if size is not None and tuple(x.shape[-2:]) != (int(size[0]), int(size[1])):
        x = torch.nn.functional.interpolate(x[None], size=(int(size[0]), int(size[1])), mode="nearest-exact")[0]
    levels = ((x + 1) * 127.5).round()
    white = levels >= MASK_THRESHOLD
    return (white if keep == "white" else ~white).float()


def read_idx_images(path: str | Path) -> np.ndarray:
    """The images of an idx3-ubyte file (optionally .gz) as uint8 (N, H, W)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"idx file not found: {path} (Fashion-MNIST: `apt-get install dataset-fashion-mnist` "
            "puts it in /usr/share/datasets/fashion-mnist)"
        )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic, n, h, w = struct.unpack(">IIII", data[:16])
    if magic != 2051:
        raise ValueError(f"{path}: expected an idx3-ubyte image file (magic 2051), found {magic}")
    if len(data) != 16 + n * h * w:
        raise ValueError(f"{path}: expected {16 + n * h * w} bytes for {n}x{h}x{w}, found {len(data)}")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, h, w)


def resolve_path(path: str | Path) -> Path:
    """A path as given, or, for `pkg://PACKAGE/SUB/PATH`, that path inside the installed package.

    Recipes name data that ships with a package this way (the demo's images are
    `pkg://dpgkit/data/demo_fashion32`), so that they are found from any working directory.
    Raises ValueError when the package is not installed.
    """
    text = str(path)
    if not text.startswith(PACKAGE_SCHEME):
        return Path(path)
    package, _, sub = text[len(PACKAGE_SCHEME) :].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{text}: expected {PACKAGE_SCHEME}PACKAGE/PATH with an installed package, "
                         f"found no package {package!r}")
    return Path(next(iter(spec.submodule_search_locations))) / sub


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed over `path`, else removed.

    The temporary file lives in the target's folder (a rename within one file system is atomic)
    and has a unique name, so concurrent writers never collide.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 files; give the result the mode an ordinary open() would
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _umask() -> int:
    """The process umask (read by setting and restoring it: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_text(text: str, path: str | Path, durable: bool = False) -> Path:
    """Write `text` (UTF-8) atomically; `durable` also fsyncs it before the rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
        if durable:
            _fsync(tmp)
    return Path(path)


def write_json(obj: Any, path: str | Path, durable: bool = False) -> Path:
    """Write `obj` as indented JSON atomically (NaN and infinities are refused: they are not JSON)."""
    return write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n", path, durable)


def save_png(x: Tensor, path: str | Path) -> Path:
    """Save one image (C, H, W), C = 1 or 3, values in [-1, 1], as an 8-bit PNG, atomically."""
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected an image (1 or 3, H, W), got shape {tuple(x.shape)}")
    pixels = to_uint8(x)
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
