"""The demo is an ordinary predict run: multi-run recipes, `dpgkit compare`, threads, lazy metrics."""

from __future__ import annotations

import contextlib
import io as stdio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dpgkit.compare import compare_runs
from dpgkit.io import from_uint8, load_mask, resolve_path, save_png
from dpgkit.lightning.cli import SMALL_IMAGE_PIXELS, _multi_run_recipe, _recipe_as_config, cpu_threads, main
from dpgkit.lightning.runs import expand_runs, merge_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DEMO = RECIPES / "demo.yaml"
# run-name prefix -> the task label the module gives (from the operator)
TASKS = {"inpaint_box": "inpaint (box)", "sr_x4": "SR x4", "deblur_gauss": "Gaussian deblur"}
METHODS = {"dps": "DPS", "dpg": "DPG DDPM"}  # run-name suffix -> the solver's label
# the recipe's path shortened: 2 images, 3 solver steps (the code path is the full demo's)
SHORT = ("--data.limit", "2", "--model.solver.init_args.steps", "3")


def run_main(*argv: str) -> str:
    out = stdio.StringIO()
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # what predict must change for the run, and give back after it
    try:
        with contextlib.redirect_stdout(out):
            assert main(list(argv)) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    return out.getvalue()


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    cwd = tmp_path_factory.mktemp("elsewhere")  # the shipped images are found from any folder
    before = os.getcwd()
    os.chdir(cwd)
    try:
        printed = run_main("predict", str(DEMO), "--out_dir", str(out), *SHORT)
    finally:
        os.chdir(before)
    return out, printed


def test_demo_recipe_writes_ordinary_run_folders(demo):
    out, printed = demo
    recipe = yaml.safe_load(DEMO.read_text())
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(recipe["runs"])
    for name in recipe["runs"]:
        run = out / name
        rows = _rows(run)
        assert [r["name"] for r in rows] == ["test00000_boot", "test00001_pullover"]
        for row in rows:
            # rows of the PredictionWriter: one part file each, the outputs it wrote, the module's metrics
            assert (run / "parts" / f"{row['name']}.json").is_file()
            assert set(row["outputs"]) >= {"recon", "input", "label"}
            assert all((run / f).is_file() for f in row["outputs"].values())
            assert np.isfinite(row["psnr"]) and np.isfinite(row["input_psnr"])
            assert Path(row["file"]).parent == resolve_path("pkg://dpgkit/data/demo_fashion32")
        summary = json.loads((run / "summary.json").read_text())
        assert summary["images"] == 2 and summary["num_bad"] == 0
        assert summary["run"]["threads"] == "1"  # a CPU run on 1x32x32 images: one intra-op thread
        task, method = name.split("-")
        assert summary["task"] == TASKS[task] and summary["method"] == METHODS[method]
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["model"]["solver"]["init_args"]["steps"] == 3  # the override reached every run
        with Image.open(run / "recon" / "test00000_boot.png") as im:
            assert im.size == (32, 32) and im.mode == "L"
    assert "| SR x4 | 2 |" in printed


def test_demo_summary_and_grid_come_from_the_run_folders(demo):
    out, _ = demo
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["tasks"]) == list(TASKS.values())
    for task, label in TASKS.items():
        scores = summary["tasks"][label]
        assert set(scores) == {"input", *METHODS.values()}
        for method, method_label in METHODS.items():
            rows = _rows(out / f"{task}-{method}")
            assert scores[method_label] == pytest.approx(np.mean([r["psnr"] for r in rows]))
        assert scores["input"] == pytest.approx(np.mean([r["input_psnr"] for r in _rows(out / f"{task}-dps")]))
    table = (out / "summary.md").read_text()
    assert f"| SR x4 | 2 | {summary['tasks']['SR x4']['input']:.2f} |" in table
    with Image.open(out / "grid.png") as im:
        w, h = im.size
        grid = np.asarray(im.convert("RGB"))
    # 3 tasks x 4 columns (input, DPS, DPG, truth) of 96 px pictures; 2 rows of images
    assert w > 12 * 96 and 2 * 96 < h < 3 * 96 + 80
    # the truth of the first image sits in the grid at 3x zoom: its top-left block is the label's pixel
    label = np.asarray(Image.open(out / "sr_x4-dps" / "label" / "test00000_boot.png"))
    assert grid.std() > 10 and label.std() > 10


def test_demo_reruns_resume_every_run(demo):
    out, _ = demo
    before = {p: p.stat().st_mtime_ns for p in out.rglob("recon/*.png")}
    printed = run_main("predict", str(DEMO), "--out_dir", str(out), *SHORT)
    assert printed.count("(0 now, 2 by earlier runs)") == 6
    assert {p: p.stat().st_mtime_ns for p in out.rglob("recon/*.png")} == before


def test_demo_help_prints_help_and_runs_nothing(tmp_path):
    out = tmp_path / "never"
    buf = stdio.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as stop:
        main(["predict", str(DEMO), "--out_dir", str(out), "--help"])
    assert stop.value.code == 0
    text = buf.getvalue()
    assert "multi-run recipe" in text and "inpaint_box-dps" in text
    assert "--model.solver" in text and "--threads" in text  # one run's options
    assert not out.exists()


def test_the_cli_has_no_demo_special_case():
    assert _multi_run_recipe(_recipe_as_config(["predict", str(DEMO)])) is not None
    assert _multi_run_recipe(_recipe_as_config(["predict", str(RECIPES / "imagenet_sr.yaml")])) is None
    import dpgkit.lightning.cli as cli

    source = Path(cli.__file__).read_text()
    assert "..demo" not in source and "dpgkit.demo" not in source and "demo:" not in source
    assert not (Path(cli.__file__).parents[1] / "demo.py").exists()


# ----------------------------------------------------------------------------- multi-run recipes


def test_merge_config_merges_mappings_and_replaces_classes():
    base = {"model": {"solver": {"class_path": "A", "init_args": {"x": 1, "y": 2}}, "seed": 0}, "data": [1, 2]}
    assert merge_config(base, {"model": {"solver": {"init_args": {"x": 5}}}})["model"]["solver"] == {
        "class_path": "A", "init_args": {"x": 5, "y": 2}}
    swapped = merge_config(base, {"model": {"solver": {"class_path": "B", "init_args": {"z": 3}}}})
    assert swapped["model"] == {"solver": {"class_path": "B", "init_args": {"z": 3}}, "seed": 0}
    assert merge_config(base, {"data": [3]})["data"] == [3]
    assert base["model"]["solver"]["init_args"] == {"x": 1, "y": 2}  # nothing modified


def test_expand_runs_names_folders_and_checks_the_recipe(tmp_path):
    recipe = {"out_dir": "sweep", "model": {"seed": 1}, "runs": {"a": {"model": {"seed": 2}}, "b": None}}
    runs = expand_runs(recipe)
    assert [(n, c["out_dir"], c["model"]["seed"]) for n, c in runs] == [("a", "sweep/a", 2), ("b", "sweep/b", 1)]
    assert [n for n, _ in expand_runs(recipe, tmp_path, only=["b"])] == ["b"]
    assert expand_runs(recipe, tmp_path)[0][1]["out_dir"] == str(tmp_path / "a")
    with pytest.raises(ValueError, match="--runs names \\['c'\\]"):
        expand_runs(recipe, only=["c"])
    with pytest.raises(ValueError, match="map run names"):
        expand_runs({"out_dir": "x", "runs": ["a"]})
    with pytest.raises(ValueError, match="unknown keys: \\['grid'\\]"):
        expand_runs({**recipe, "compare": {"grid": "g.png"}})
    with pytest.raises(ValueError, match="plain folder name"):
        expand_runs({"out_dir": "x", "runs": {"../up": {}}})
    with pytest.raises(ValueError, match="needs an output folder"):
        expand_runs({"runs": {"a": {}}})


# ----------------------------------------------------------------------------- dpgkit compare


def _fake_run(root: Path, name: str, task: str, method: str, psnrs: list[float], inputs: list[float]) -> Path:
    run = root / name
    rows = []
    for i, (p, q) in enumerate(zip(psnrs, inputs)):
        img = torch.full((1, 8, 8), -1.0 + 0.25 * i)
        for kind in ("recon", "input", "label"):
            save_png(img, run / kind / f"im{i}.png")
        rows.append({"name": f"im{i}", "index": i, "psnr": p, "input_psnr": q})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({"task": task, "method": method}))
    return run


def test_compare_tabulates_and_pictures_any_runs(tmp_path):
    runs = [
        _fake_run(tmp_path, "r1", "SR", "A", [20.0, 22.0, 30.0], [10.0, 12.0, 14.0]),
        _fake_run(tmp_path, "r2", "SR", "B", [24.0, 26.0], [10.0, 12.0]),  # shares im0, im1 only
        _fake_run(tmp_path, "r3", "blur", "A", [15.0], [11.0]),
    ]
    printed = run_main("compare", *map(str, runs), "--out", str(tmp_path / "g.png"),
                       "--json", str(tmp_path / "s.json"), "--table", str(tmp_path / "s.md"), "--zoom", "4")
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["tasks"] == {"SR": {"input": 11.0, "A": 21.0, "B": 25.0}, "blur": {"input": 11.0, "A": 15.0}}
    assert summary["images"] == {"SR": 2, "blur": 1}
    assert "| SR | 2 | 11.00 | 21.00 | 25.00 |" in printed and "| blur | 1 | 11.00 | 15.00 | - |" in printed
    assert (tmp_path / "s.md").read_text().startswith("| task | images | input | A | B |")
    with Image.open(tmp_path / "g.png") as im:
        grid = from_uint8(np.asarray(im.convert("RGB")))
    # SR block: input, A, B, truth; blur block: input, A, truth -> 7 columns of 64 px (8 px x 4, widened)
    assert grid.shape[2] == 7 * 66 + 12 + 4
    # im1 (grey level -0.75) in the first column, second row, at 4x zoom
    top = 30 + (32 + 14 + 2)
    torch.testing.assert_close(grid[:, top : top + 32, 2 : 2 + 32], torch.full((3, 32, 32), -0.75), atol=0.01,
                               rtol=0)


def test_compare_refuses_what_is_not_a_run(tmp_path):
    buf = stdio.StringIO()
    with contextlib.redirect_stderr(buf):
        assert main(["compare", str(tmp_path)]) == 1
    assert "metrics.jsonl" in buf.getvalue()
    a = _fake_run(tmp_path, "a", "SR", "A", [1.0], [1.0])
    b = _fake_run(tmp_path, "b", "SR", "A", [2.0], [1.0])
    # a sweep: one task, one method label -> the columns are the folders' names
    assert compare_runs([a, b])["tasks"] == {"SR": {"input": 1.0, "a": 1.0, "b": 2.0}}
    c = _fake_run(tmp_path / "other", "a", "SR", "A", [3.0], [1.0])
    with contextlib.redirect_stderr(buf):
        assert main(["compare", str(a), str(c)]) == 1
    assert "two runs of task 'SR' named 'a'" in buf.getvalue()


# ----------------------------------------------------------------------------- threads, files, lazy metrics


def test_cpu_threads_rule():
    assert cpu_threads(None, (1, 32, 32), on_cpu=True) == 1
    assert cpu_threads(None, (3, 256, 256), on_cpu=True) is None
    assert SMALL_IMAGE_PIXELS == 3 * 64 * 64 and cpu_threads(None, (3, 64, 64), on_cpu=True) == 1
    assert cpu_threads(None, (1, 32, 32), on_cpu=False) is None
    assert cpu_threads(4, (1, 32, 32), on_cpu=True) == 4 and cpu_threads(4, (1, 32, 32), on_cpu=False) is None
    with pytest.raises(ValueError, match="--threads must be >= 1"):
        cpu_threads(0, (1, 32, 32), on_cpu=True)


def test_one_mask_threshold_for_every_mask_reader(tmp_path):
    from dpgkit.operators.inpainting import Inpainting

    levels = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    Image.fromarray(levels).save(tmp_path / "m.png")
    expected = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
    torch.testing.assert_close(load_mask(tmp_path / "m.png"), expected)
    torch.testing.assert_close(load_mask(tmp_path / "m.png", keep="black"), 1 - expected)
    torch.testing.assert_close(Inpainting.from_file(tmp_path / "m.png").mask[0], expected)
    with pytest.raises(FileNotFoundError, match="mask file not found"):
        load_mask(tmp_path / "none.png")


def test_package_paths_resolve_inside_the_package():
    import dpgkit

    assert resolve_path("pkg://dpgkit/data/demo_fashion32") == Path(dpgkit.__file__).parent / "data/demo_fashion32"
    assert resolve_path("data/x") == Path("data/x")
    with pytest.raises(ValueError, match="no package 'no_such_pkg'"):
        resolve_path("pkg://no_such_pkg/x")


def test_metrics_is_a_lazy_attribute_of_dpgkit():
    code = ("import sys, dpgkit as dk\n"
            "assert 'dpgkit.metrics' not in sys.modules\n"
            "import torch\n"
            "x = torch.zeros(1, 1, 4, 4)\n"
            "assert float(dk.metrics.psnr(x, x + 0.1)[0]) == float(dk.metrics.image.psnr(x, x + 0.1)[0])\n"
            "from dpgkit.metrics import FID, LPIPS, psnr, ssim\n"
            "assert psnr is dk.metrics.psnr and 'metrics' in dir(dk)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
