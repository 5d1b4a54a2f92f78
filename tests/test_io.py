"""dpgkit.io: pixels to files and back, conversions of awkward files, atomic writes."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpgkit import io


def _png16(a: np.ndarray, path: Path) -> Path:
    """A 16-bit-per-sample PNG (gray, RGB or RGBA) written by hand: Pillow cannot write 48-bit RGB."""
    h, w, c = a.shape
    raw = b"".join(b"\x00" + a[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    color = {1: 0, 3: 2, 4: 6}[c]
    header = struct.pack(">IIBBBBB", w, h, 16, color, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def test_png_roundtrip_is_exact_on_the_8bit_grid(tmp_path):
    x = torch.rand(3, 9, 7, generator=torch.Generator().manual_seed(0)) * 2 - 1
    path = io.save_png(x, tmp_path / "sub" / "a.png")
    back, notes = io.load_image(path)
    assert notes == []
    assert back.shape == (3, 9, 7)
    assert torch.equal(back, io.quantize(x))
    # quantization error is at most half a level
    assert (back - x).abs().max() <= 1 / 255 + 1e-6
    assert torch.equal(io.quantize(back), back)


def test_uint8_conversions_are_inverse():
    a = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 14
    assert np.array_equal(io.to_uint8(io.from_uint8(a)), a)
    with pytest.raises(ValueError, match="uint8"):
        io.from_uint8(a.astype(np.int16))
    with pytest.raises(ValueError, match="float"):
        io.to_uint8(torch.zeros(3, 2, 2, dtype=torch.long))


def test_one_channel_png(tmp_path):
    x = torch.linspace(-1, 1, 16).reshape(1, 4, 4)
    io.save_png(x, tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "L"
    gray, notes = io.load_image(tmp_path / "g.png", channels=1)
    assert gray.shape == (1, 4, 4) and notes == []
    rgb, notes = io.load_image(tmp_path / "g.png", channels=3)
    assert rgb.shape == (3, 4, 4) and torch.equal(rgb[0], rgb[2])
    assert any("grayscale to RGB" in n for n in notes)


def test_rgb_to_gray_uses_luma(tmp_path):
    a = np.zeros((2, 2, 3), np.uint8)
    a[..., 1] = 255
    Image.fromarray(a).save(tmp_path / "green.png")
    gray, notes = io.load_image(tmp_path / "green.png", channels=1)
    assert torch.allclose(gray, torch.full((1, 2, 2), 0.587 * 2 - 1), atol=1e-6)
    assert notes


def test_alpha_opaque_dropped_transparent_refused_or_composited(tmp_path):
    a = np.full((4, 4, 4), 255, np.uint8)
    a[..., :3] = 0
    Image.fromarray(a, "RGBA").save(tmp_path / "opaque.png")
    x, notes = io.load_image(tmp_path / "opaque.png")
    assert torch.equal(x, -torch.ones(3, 4, 4)) and any("opaque" in n for n in notes)

    a[0, 0, 3] = 0
    Image.fromarray(a, "RGBA").save(tmp_path / "hole.png")
    with pytest.raises(io.ImageError, match="transparent"):
        io.load_image(tmp_path / "hole.png")
    white, notes = io.load_image(tmp_path / "hole.png", alpha="white")
    assert torch.equal(white[:, 0, 0], torch.ones(3)) and torch.equal(white[:, 1, 1], -torch.ones(3))
    black, _ = io.load_image(tmp_path / "hole.png", alpha="black")
    assert torch.equal(black[:, 0, 0], -torch.ones(3))


def test_16bit_gray_is_scaled_not_clipped(tmp_path):
    g = np.array([[0, 65535], [32768, 16384]], dtype=np.uint16)
    Image.fromarray(g).save(tmp_path / "g16.png")
    x, notes = io.load_image(tmp_path / "g16.png")
    expected = torch.tensor(g.astype(np.float64) / 65535 * 2 - 1, dtype=torch.float32)
    assert torch.allclose(x[0], expected, atol=1e-6)
    assert any("16-bit" in n for n in notes)


def test_16bit_rgb_png_is_read_and_noted(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 65536, (5, 6, 3)).astype(np.uint16)
    x, notes = io.load_image(_png16(a, tmp_path / "rgb16.png"))
    assert x.shape == (3, 5, 6)
    # within one 8-bit level of the 16-bit value
    assert (x - torch.tensor(a.transpose(2, 0, 1) / 65535 * 2 - 1, dtype=torch.float32)).abs().max() <= 2 / 255 + 1e-6
    assert any("16-bit" in n for n in notes)
    rgba = np.concatenate([a, np.full((5, 6, 1), 65535, np.uint16)], axis=2)
    x4, notes4 = io.load_image(_png16(rgba, tmp_path / "rgba16.png"))
    assert x4.shape == (3, 5, 6) and any("opaque" in n for n in notes4)


def test_palette_and_jpeg_and_webp(tmp_path):
    rng = np.random.default_rng(2)
    a = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(a).convert("P").save(tmp_path / "p.png")
    x, notes = io.load_image(tmp_path / "p.png")
    assert x.shape == (3, 8, 8) and any("palette" in n for n in notes)
    Image.fromarray(a).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(a).save(tmp_path / "a.webp", lossless=True)
    assert io.load_image(tmp_path / "a.jpg")[0].shape == (3, 8, 8)
    w, _ = io.load_image(tmp_path / "a.webp")
    assert np.array_equal(io.to_uint8(w), a)  # lossless WebP


def test_corrupt_and_missing_files_raise_image_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(io.ImageError, match="cannot read"):
        io.load_image(tmp_path / "bad.png")
    with pytest.raises(io.ImageError):
        io.load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="channels"):
        io.load_image(tmp_path / "bad.png", channels=2)


def test_atomic_write_leaves_target_or_old_content(tmp_path):
    target = tmp_path / "d" / "row.json"
    io.write_json({"a": 1}, target)
    assert io.read_json(target) == {"a": 1}
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert io.read_json(target) == {"a": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["row.json"]  # no temp file left
    with pytest.raises(ValueError):
        io.write_json({"psnr": float("inf")}, target)
    assert io.read_json(target) == {"a": 1}
    io.write_text("x\n", target, durable=True)
    assert target.read_text() == "x\n"


def test_save_png_checks_shape(tmp_path):
    with pytest.raises(ValueError, match="1 or 3"):
        io.save_png(torch.zeros(2, 4, 4), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"got shape \(1, 3, 4, 4\)"):
        io.save_png(torch.zeros(1, 3, 4, 4), tmp_path / "x.png")


def test_outputs_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    import os

    from dpgkit.io import write_text

    old = os.umask(0o022)
    try:
        path = write_text("hello", tmp_path / "note.txt")
        assert (path.stat().st_mode & 0o777) == 0o644
        os.umask(0o077)
        private = write_text("secret", tmp_path / "private.txt")
        assert (private.stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old)
