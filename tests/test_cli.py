"""`dpgkit predict` end to end on a tiny random-weight UNet: outputs, resume, 2-process DDP, measured mode."""

from __future__ import annotations

import contextlib
import io as stdio
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dpgkit
from dpgkit.lightning.cli import main

RECIPE = """\
trainer:
  accelerator: cpu
  devices: 1
model:
  prior:
    preset: {image_size: 16, num_channels: 32, num_res_blocks: 1, channel_mult: "1",
             attention_resolutions: "", learn_sigma: false}
  operator:
    class_path: dpgkit.operators.SuperResolution
    init_args: {factor: 2}
  noise:
    class_path: dpgkit.noise.Gaussian
    init_args: {sigma: 0.05}
  solver:
    class_path: dpgkit.solvers.DPG
    init_args: {scale: 5.0, num_samples: 16, sampler: ddim, steps: 8}
  seed: 7
data:
  root: IMAGES
  image_size: 16
  batch_size: 1
"""
NAMES = ["gray", "nested/deep", "rgb0", "rgb1", "rgba", "sixteen"]


@contextlib.contextmanager
def one_thread():
    # the 2-process run gets one thread per process; float sums must split the same way to match bits
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_cli(*args: str) -> str:
    out = stdio.StringIO()
    with one_thread(), contextlib.redirect_stdout(out):
        assert main(["predict", *args]) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    images = root / "images"
    (images / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)

    def rgb(h, w):
        return (rng.random((h, w, 3)) * 255).astype(np.uint8)

    Image.fromarray(rgb(20, 24)).save(images / "rgb0.png")
    Image.fromarray(rgb(16, 16)).save(images / "rgb1.png")
    Image.fromarray(rgb(18, 18)).convert("L").save(images / "gray.jpg")
    rgba = np.concatenate([rgb(16, 16), np.full((16, 16, 1), 255, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(images / "rgba.png")
    Image.fromarray((rng.random((16, 16)) * 65535).astype(np.uint16)).save(images / "sixteen.png")
    Image.fromarray(rgb(24, 20)).save(images / "nested" / "deep.webp", lossless=True)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    recipe = root / "tiny.yaml"
    recipe.write_text(RECIPE.replace("IMAGES", str(images)))
    return root, recipe


@pytest.fixture(scope="module")
def single(data):
    root, recipe = data
    out = root / "single"
    printed = run_cli(str(recipe), "--out_dir", str(out))
    return out, printed


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_outputs_metrics_and_summary(single):
    out, printed = single
    for kind in ("recon", "input", "label"):
        for name in NAMES:
            assert Image.open(out / kind / f"{name}.png").size == (16, 16), (kind, name)
    assert not (out / "mask").exists()  # super-resolution has no mask
    rows = _rows(out)
    assert [r["name"] for r in rows] == NAMES  # sorted by index = sorted relative path
    assert [r["index"] for r in rows] == [1, 2, 3, 4, 5, 6]  # broken.png is index 0
    for r in rows:
        assert {"psnr", "ssim", "input_psnr", "seconds"} <= set(r) and r["seconds"] > 0
        assert 0 < r["psnr"] < 60
    notes = {r["name"]: " ".join(r.get("notes", [])) for r in rows}
    assert "grayscale" in notes["gray"] and "opaque" in notes["rgba"] and "16-bit" in notes["sixteen"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 6 and summary["restored_now"] == 6 and summary["restored_before"] == 0
    assert summary["num_bad"] == 1 and summary["bad"][0]["path"].endswith("broken.png")
    assert summary["metrics"]["psnr"]["mean"] == pytest.approx(np.mean([r["psnr"] for r in rows]))
    assert summary["metrics"]["lpips"] is None or summary["metrics"]["lpips"]["count"] == 6
    assert "DPG(scale=5.0" in summary["run"]["solver"] and summary["world_size"] == 1
    assert (summary["method"], summary["task"]) == ("DPG DDIM", "SR x2")  # labels from the operator and solver that ran
    assert (out / "config.yaml").is_file()
    # the table, and a progress bar counted in images with the running PSNR
    assert "PSNR (dB)" in printed and "broken.png" in printed
    assert "img/s" in printed and "psnr=" in printed


def test_resume_recomputes_only_missing_items(single, tmp_path):
    first, _ = single
    out = tmp_path / "resumed"
    shutil.copytree(first, out)  # copy2 keeps the modification times
    for name in ("rgb1", "nested/deep"):
        (out / "recon" / f"{name}.png").unlink()
    kept = {n: (out / "recon" / f"{n}.png").stat().st_mtime_ns for n in NAMES if n not in ("rgb1", "nested/deep")}
    printed = run_cli(str(first.parent / "tiny.yaml"), "--out_dir", str(out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["restored_now"] == 2 and summary["restored_before"] == 4 and summary["images"] == 6
    assert "2 now, 4 by earlier runs" in printed
    for name, mtime in kept.items():
        assert (out / "recon" / f"{name}.png").stat().st_mtime_ns == mtime, name
    for name in NAMES:  # the recomputed ones come out the same: everything is seeded per item
        assert (out / "recon" / f"{name}.png").read_bytes() == (first / "recon" / f"{name}.png").read_bytes()
    assert len(_rows(out)) == 6

    # nothing left to do (a glob of done items): the loop runs no batch, the summary is still
    # rebuilt for the items asked for, and no file is touched
    stamps = {n: (out / "recon" / f"{n}.png").stat().st_mtime_ns for n in NAMES}
    run_cli(str(first.parent / "tiny.yaml"), "--out_dir", str(out), "--data.glob", "r*.png")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["restored_now"] == 0 and summary["restored_before"] == 3 and summary["num_bad"] == 0
    assert [r["name"] for r in _rows(out)] == ["rgb0", "rgb1", "rgba"]
    assert stamps == {n: (out / "recon" / f"{n}.png").stat().st_mtime_ns for n in NAMES}


def test_two_process_ddp_writes_the_same_pixels(single, data):
    first, _ = single
    root, recipe = data
    out = root / "ddp"
    cmd = [sys.executable, "-m", "dpgkit.lightning.cli", "predict", str(recipe), "--out_dir", str(out),
           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["images"] == 6 and summary["restored_now"] == 6
    assert summary["num_bad"] == 1
    rows = _rows(out)
    assert sorted(r["name"] for r in rows) == NAMES  # each image once: nothing lost, nothing twice
    for name in NAMES:
        assert (out / "recon" / f"{name}.png").read_bytes() == (first / "recon" / f"{name}.png").read_bytes(), name
    # the table is printed once, by rank 0
    assert proc.stdout.count("dpgkit predict ->") == 1


def test_measured_mode_on_low_resolution_images(tmp_path):
    lowres = tmp_path / "phone"
    lowres.mkdir()
    rng = np.random.default_rng(3)
    for i, (h, w) in enumerate([(8, 8), (8, 8), (10, 12)]):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(lowres / f"shot{i}.jpg")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("IMAGES", str(lowres)))
    out = tmp_path / "out"
    printed = run_cli("--config", str(recipe), "--out_dir", str(out), "--data.mode", "measured",
                      "--data.image_size", "8", "--data.batch_size", "2")
    for name in ("shot0", "shot1", "shot2"):
        assert Image.open(out / "recon" / f"{name}.png").size == (16, 16)
        assert Image.open(out / "input" / f"{name}.png").size == (16, 16)
    assert not (out / "label").exists()
    rows = _rows(out)
    assert [r["name"] for r in rows] == ["shot0", "shot1", "shot2"]
    assert all("psnr" not in r and r["seconds"] > 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "measured" and summary["images"] == 3 and summary["metrics"]["psnr"] is None
    assert "PSNR" not in printed.split("dpgkit predict ->")[1]


def test_measured_mode_lists_the_wrong_size_as_bad(tmp_path, data):
    # every file is 4x4 where SR x2 of the 16x16 prior needs 8x8: each is a bad item with the
    # reason, and the run ends with its summary rather than an exception
    _, recipe = data
    out = tmp_path / "o"
    run_cli(str(recipe), "--out_dir", str(out), "--data.mode", "measured", "--data.limit", "2",
            "--data.preprocess", "resize_center_crop", "--data.image_size", "4")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 0 and summary["num_bad"] == 2
    assert all("expected 8x8, found 4x4 (set data.image_size 8)" in b["error"] for b in summary["bad"][1:])


def test_command_line_errors(tmp_path, data, capsys):
    _, recipe = data
    assert main([]) == 2
    assert main(["--help"]) == 0 and "evaluate RUN_DIR" in capsys.readouterr().out
    assert main(["restore"]) == 2 and "unknown command" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nope.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    assert main(["predict", str(recipe)]) == 2  # no --out_dir
    assert "--out_dir" in capsys.readouterr().err
    assert main(["predict", str(recipe), "--out_dir", str(tmp_path / "o"), "--trainer.inference_mode", "true"]) == 2
    assert "inference_mode must be false" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_evaluate_is_dispatched(monkeypatch):
    seen = []
    fake = types.ModuleType("dpgkit.evaluate")
    fake.main = lambda argv: seen.append(list(argv)) or 0
    monkeypatch.setitem(sys.modules, "dpgkit.evaluate", fake)
    monkeypatch.setattr(dpgkit, "evaluate", fake, raising=False)
    assert main(["evaluate", "runs/a", "runs/b", "--format", "csv"]) == 0
    assert seen == [["runs/a", "runs/b", "--format", "csv"]]
