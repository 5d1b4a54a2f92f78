"""Draw docs/operators.png: every forward model of dpgkit applied to one photo.

The photo is scikit-image's astronaut (skimage.data.astronaut()), resized to 256 x 256. Random
operators are drawn from seed 0, item 0, exactly as `Task.measure` draws them. The grid is
composed with Pillow (matplotlib is not a dependency).

    python scripts/make_operators_figure.py [--out docs/operators.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from skimage import data

import dpgkit as dk
from dpgkit.noise import Gaussian, Noiseless, Poisson
from dpgkit.operators import (
    JPEG,
    Colorization,
    Denoising,
    GaussianBlur,
    Inpainting,
    MotionBlur,
    PhaseRetrieval,
    SuperResolution,
)

SIZE = 256
CAPTION = 26
GAP = 6


def astronaut() -> torch.Tensor:
    """(1, 3, 256, 256) in [-1, 1]."""
    img = Image.fromarray(data.astronaut()).resize((SIZE, SIZE), Image.LANCZOS)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1
    return x[None]


def to_tile(y: torch.Tensor) -> Image.Image:
    """An image (1, C, h, w) in [-1, 1] as a 256 x 256 RGB tile (small ones shown as big pixels)."""
    a = ((y[0].clamp(-1, 1) + 1) * 127.5).round().byte()
    if a.shape[0] == 1:
        a = a.expand(3, -1, -1)
    tile = Image.fromarray(a.permute(1, 2, 0).numpy(), mode="RGB")
    if tile.size != (SIZE, SIZE):
        tile = tile.resize((SIZE, SIZE), Image.NEAREST)
    return tile


def magnitude_tile(y: torch.Tensor) -> Image.Image:
    """A Fourier magnitude (1, C, h, w) on a log scale, its 1st..99.9th percentiles to [-1, 1]."""
    m = torch.log(y.mean(1, keepdim=True) + 1e-3)
    lo, hi = torch.quantile(m.flatten(), torch.tensor([0.01, 0.999]))
    m = ((m - lo) / (hi - lo)).clamp(0, 1) * 2 - 1
    return to_tile(torch.nn.functional.interpolate(m, size=(SIZE, SIZE), mode="area"))


def kernel_tile(k: torch.Tensor) -> Image.Image:
    """A blur kernel (kh, kw), brightest tap white."""
    return to_tile((k / k.max() * 2 - 1)[None, None])


def measure(operator, x: torch.Tensor, noise=None):
    task = dk.Task(operator, noise or Noiseless())
    return task.measure(x, seed=0)


def panels(x: torch.Tensor) -> list[tuple[str, Image.Image]]:
    out = [("original (astronaut, 256 px)", to_tile(x))]
    out.append(("box inpainting 128 px", to_tile(measure(Inpainting.box(), x)[0])))
    out.append(("random inpainting, 92% missing", to_tile(measure(Inpainting.random(), x)[0])))
    out.append(("uncropping, keep centre", to_tile(measure(Inpainting.uncrop((SIZE, SIZE)), x)[0])))
    out.append(("uncropping, keep left half",
                to_tile(measure(Inpainting.uncrop((SIZE, SIZE), keep="left"), x)[0])))
    out.append(("SR x4, average pooling", to_tile(measure(SuperResolution(4), x)[0])))
    out.append(("SR x4, bicubic", to_tile(measure(SuperResolution(4, "bicubic"), x)[0])))
    out.append(("Gaussian blur 61, std 3", to_tile(measure(GaussianBlur(), x)[0])))
    y, drawn = measure(MotionBlur(), x)
    out.append(("motion blur 61, intensity 0.5", to_tile(y)))
    out.append(("its motion kernel (61 px)", kernel_tile(drawn.operator.kernel[0])))
    out.append(("phase retrieval |FFT| (log)", magnitude_tile(measure(PhaseRetrieval(), x)[0])))
    out.append(("JPEG, quality 10", to_tile(measure(JPEG(10), x)[0])))
    out.append(("colorization (channel mean)", to_tile(measure(Colorization(), x)[0])))
    out.append(("denoising, Gaussian sigma 0.05", to_tile(measure(Denoising(), x, Gaussian(0.05))[0])))
    out.append(("denoising, Poisson rate 1", to_tile(measure(Denoising(), x, Poisson(1.0))[0])))
    return out


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def compose(tiles: list[tuple[str, Image.Image]], columns: int = 5) -> Image.Image:
    rows = -(-len(tiles) // columns)
    cell_w, cell_h = SIZE + GAP, SIZE + CAPTION + GAP
    sheet = Image.new("RGB", (columns * cell_w + GAP, rows * cell_h + GAP), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font(15)
    for i, (caption, tile) in enumerate(tiles):
        left, top = GAP + (i % columns) * cell_w, GAP + (i // columns) * cell_h
        sheet.paste(tile, (left, top))
        draw.text((left + 2, top + SIZE + 5), caption, fill="black", font=font)
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "operators.png")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        sheet = compose(panels(astronaut()))
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out} ({sheet.size[0]}x{sheet.size[1]})")


if __name__ == "__main__":
    main()
