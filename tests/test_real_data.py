"""Issue 14, replayed: the README's own-photos command, the shipped ImageNet list, stale folders,
off-size files, solver switches, `--ckpt_path`, one-line user errors, Ctrl-C, skipped files."""

from __future__ import annotations

import contextlib
import io as stdio
import json
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dpgkit.io import resolve_path
from dpgkit.lightning import cli
from dpgkit.lightning.cli import main
from dpgkit.lightning.datamodule import list_items
from dpgkit.lightning.module import RestorationModule
from dpgkit.lightning.recipe_overrides import apply_overrides
from dpgkit.lightning.writer import RunLock

REPO = Path(__file__).resolve().parents[1]

RECIPE = """\
trainer: {accelerator: cpu, devices: 1}
model:
  prior:
    preset: {image_size: 16, num_channels: 32, num_res_blocks: 1, channel_mult: "1",
             attention_resolutions: "", learn_sigma: false}
  operator: {class_path: dpgkit.operators.SuperResolution, init_args: {factor: 2}}
  noise: {class_path: dpgkit.noise.Gaussian, init_args: {sigma: 0.05}}
  solver:
    class_path: dpgkit.solvers.DPG
    init_args: {scale: 5.0, num_samples: 8, sampler: ddim, steps: 4}
  seed: 7
  lpips: null
data:
  root: IMAGES
  image_size: 16
  batch_size: 1
"""


def _png(path: Path, h: int, w: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return path


@contextlib.contextmanager
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(*args: str) -> tuple[int, str]:
    """`dpgkit predict ARGS` in this process: (exit status, stdout)."""
    out = stdio.StringIO()
    with _one_thread(), contextlib.redirect_stdout(out):
        code = main(["predict", *args])
    return code, out.getvalue()


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]


@pytest.fixture
def photos(tmp_path):
    """A recipe over 3 photos of 20x24, 16x16 and 24x20."""
    images = tmp_path / "photos"
    for i, (h, w) in enumerate([(20, 24), (16, 16), (24, 20)]):
        _png(images / f"p{i}.png", h, w, seed=i)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE.replace("IMAGES", str(images)))
    return tmp_path, recipe


# ----------------------------------------------------------------------------- fault 1: --data.root


def _readme_own_photos_command() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text[text.index("Your own degraded images"):]
    block = block[block.index("```bash") + len("```bash"): block.index("```", block.index("```bash") + 7)]
    command = " ".join(line.split("#")[0].rstrip().rstrip("\\") for line in block.strip().splitlines())
    words = shlex.split(command)
    assert words[:2] == ["dpgkit", "predict"], words
    return words[1:]


def test_readme_own_photos_command_reads_the_folder_given(tmp_path, monkeypatch, capsys):
    # the README's command word for word, in a fresh folder holding my_photos/ and the recipes
    args = _readme_own_photos_command()
    assert "--data.root" in args and "my_photos/" in args
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    for i in range(3):
        _png(tmp_path / "my_photos" / f"shot{i}.jpg", 64, 64, seed=i)
    seen = {}

    def record(self, **kwargs):  # restoring at 256x256 with the real prior is not a unit test
        dm = self.datamodule
        seen.update(files=dm.files, root=dm.root, mode=dm.mode,
                    names=[it.name for it in list_items(dm.root, dm.files, dm.glob)])

    monkeypatch.setattr(cli.PredictCLI, "predict", record)
    assert main(args) == 0
    assert seen == {"files": None, "root": "my_photos/", "mode": "measured", "names": ["shot0", "shot1", "shot2"]}
    err = capsys.readouterr().err
    assert "the recipe's data.files (pkg://dpgkit/data/imagenet_val_1k.txt) is not used" in err


def test_root_on_the_command_line_restores_that_folder(photos, tmp_path):
    # end to end: a recipe naming a list file, and a root given on the command line
    root, recipe = photos
    listed = tmp_path / "listed"
    _png(listed / "only.png", 16, 16)
    (listed / "list.txt").write_text("only.png\n")
    config = yaml.safe_load(recipe.read_text())
    config["data"].update(root=str(listed), files=str(listed / "list.txt"))
    recipe.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    code, _ = _run(str(recipe), "--out_dir", str(out), "--data.root", str(root / "photos"))
    assert code == 0
    assert sorted(p.stem for p in (out / "recon").iterdir()) == ["p0", "p1", "p2"]


def test_root_keeps_the_recipe_list_when_it_names_files_there(tmp_path):
    # the paper's recipes: `--data.root /data/imagenet/val` is the base of the shipped 1k list
    val = tmp_path / "val"
    listed = resolve_path("pkg://dpgkit/data/imagenet_val_1k.txt")
    first = next(ln for ln in listed.read_text().splitlines() if ln and not ln.startswith("#")).split()[0]
    _png(val / first, 8, 8)
    _png(val / "not_in_the_list.JPEG", 8, 8)
    recipe = {"data": {"root": "data/imagenet/val", "files": "pkg://dpgkit/data/imagenet_val_1k.txt"}}
    config, notes = apply_overrides(recipe, ["--data.root", str(val)])
    assert config == recipe and "applies under --data.root" in notes[0]
    # a folder of one's own photos: none of the listed names, so the folder is read
    own = tmp_path / "own"
    _png(own / "shot.png", 8, 8)
    config, notes = apply_overrides(recipe, ["--data.root", str(own)])
    assert config["data"]["files"] is None and "it names no file there" in notes[0]
    # a recipe glob matching nothing in the new root is dropped too; one that matches is kept
    globbed = {"data": {"root": "x", "glob": "**/*.webp"}}
    assert apply_overrides(globbed, ["--data.root", str(own)])[0]["data"]["glob"] is None
    globbed = {"data": {"root": "x", "glob": "*.png"}}
    assert apply_overrides(globbed, ["--data.root", str(own)])[0] == globbed


def test_overrides_keep_what_the_command_line_does_not_replace():
    recipe = {"data": {"root": "val", "files": "list.txt", "glob": None},
              "model": {"solver": {"class_path": "dpgkit.solvers.DPG", "init_args": {"scale": 160}}}}
    # a list on the command line keeps the recipe's root as its base
    config, _ = apply_overrides(recipe, ["--data.files", "mine.txt"])
    assert config["data"] == {"root": "val", "files": "list.txt", "glob": None}
    config, _ = apply_overrides(recipe, ["--data.glob=**/*.png"])
    assert config["data"] == {"root": "val", "files": None, "glob": None}
    # the same class (short or full name) keeps its arguments
    for same in ("DPG", "dpgkit.solvers.DPG"):
        assert apply_overrides(recipe, ["--model.solver", same])[0] == recipe
    assert recipe["data"]["files"] == "list.txt"  # not modified


# ----------------------------------------------------------------------------- fault 2: shipped list


def test_shipped_imagenet_list_resolves_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    listed = resolve_path("pkg://dpgkit/data/imagenet_val_1k.txt")
    assert listed.is_file() and listed.is_absolute()
    lines = [ln for ln in listed.read_text().splitlines() if ln and not ln.startswith("#")]
    assert len(lines) == 1000 and len({ln.split()[0] for ln in lines}) == 1000
    assert sorted(int(ln.split()[1]) for ln in lines) == list(range(1000))  # one image per class
    assert "XingangPan/deep-generative-prior" in listed.read_text()  # its header names the source
    # a root holding two of the files: 1000 items in the list's order, the rest listed as missing later
    root = tmp_path / "val"
    first, second = lines[0].split()[0], lines[1].split()[0]
    _png(root / first, 8, 8)
    _png(root / second, 8, 8)
    items = list_items(root, "pkg://dpgkit/data/imagenet_val_1k.txt")
    assert len(items) == 1000 and [items[0].path.name, items[1].path.name] == [first, second]
    # every recipe naming the list names the shipped one
    named = 0
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        files = (yaml.safe_load(path.read_text()).get("data") or {}).get("files")
        if files is not None and "imagenet_val_1k" in str(files):
            assert resolve_path(files) == listed, path
            named += 1
    assert named >= 23


# ----------------------------------------------------------------------------- fault 3: stale folders


def test_changed_settings_are_refused_same_resume_and_recompute_redoes(photos, tmp_path, capsys):
    _, recipe = photos
    out = tmp_path / "run"
    assert _run(str(recipe), "--out_dir", str(out))[0] == 0
    before = {p.name: p.read_bytes() for p in (out / "recon").iterdir()}
    first = _summary(out)["settings"]
    row = json.loads((out / "parts" / "p0.json").read_text())
    assert row["settings"] == first and "scale=5.0" in first["solver"] and first["seed"] == 7
    capsys.readouterr()

    # another scale into the same folder: refused in one line naming the key, nothing touched
    code, _ = _run(str(recipe), "--out_dir", str(out), "--model.solver.init_args.scale", "3",
                   "--model.seed", "8")
    err = capsys.readouterr().err
    assert code == 2 and len(_error_lines(err)) == 1, err
    assert "3 finished images made with other settings (differing: seed, solver" in err
    assert "--writer.on_change recompute" in err
    assert {p.name: p.read_bytes() for p in (out / "recon").iterdir()} == before
    assert _summary(out)["settings"] == first
    assert not (out / ".lock").exists()  # the refused run left the lock free

    # the same settings resume: nothing to redo
    assert _run(str(recipe), "--out_dir", str(out))[0] == 0
    summary = _summary(out)
    assert summary["restored_now"] == 0 and summary["restored_before"] == 3

    # recompute when asked: every item redone with the new settings
    assert _run(str(recipe), "--out_dir", str(out), "--model.solver.init_args.scale", "3",
                "--writer.on_change", "recompute")[0] == 0
    summary = _summary(out)
    assert summary["restored_now"] == 3 and summary["images"] == 3 and "scale=3" in summary["settings"]["solver"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["settings"]["hash"] for r in rows} == {summary["settings"]["hash"]} != {first["hash"]}
    assert {p.name: p.read_bytes() for p in (out / "recon").iterdir()} != before


def test_a_second_live_run_is_refused_by_the_lock(photos, tmp_path, capsys):
    _, recipe = photos
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": other.pid, "host": os.uname().nodename, "since": "now"}))
        code, _ = _run(str(recipe), "--out_dir", str(out))
        err = capsys.readouterr().err
        assert code == 2 and len(_error_lines(err)) == 1, err
        assert f"another run (pid {other.pid}" in err and not (out / "recon").exists()
        assert (out / ".lock").exists()  # the live run's lock stays
    finally:
        other.kill()
        other.wait()
    # the process is gone: its lock is stale and taken over; the run releases it at the end
    assert _run(str(recipe), "--out_dir", str(out))[0] == 0
    assert _summary(out)["images"] == 3 and not (out / ".lock").exists()


def test_run_lock_is_exclusive_within_a_process(tmp_path):
    a, b = RunLock(tmp_path), RunLock(tmp_path)
    a.acquire()
    with pytest.raises(FileExistsError, match="another run"):
        b.acquire()
    a.release()
    b.acquire()
    b.release()
    assert not (tmp_path / ".lock").exists()


# ----------------------------------------------------------------------------- fault 5: off-size files


@pytest.mark.parametrize("batch_size", ["1", "2"])
def test_an_off_size_file_is_bad_while_the_rest_finish(tmp_path, batch_size):
    phone = tmp_path / "phone"
    _png(phone / "a_odd.png", 10, 12)  # first in order: it must not turn the others away
    for i in range(3):
        _png(phone / f"shot{i}.png", 8, 8, seed=i)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("IMAGES", str(phone)))
    out = tmp_path / "out"
    code, printed = _run(str(recipe), "--out_dir", str(out), "--data.mode", "measured", "--data.image_size", "null",
                         "--data.preprocess", "none", "--data.batch_size", batch_size)
    assert code == 0
    summary = _summary(out)
    assert summary["images"] == 3 and summary["num_bad"] == 1 and summary["missing"] == 0
    assert summary["bad"][0]["name"] == "a_odd"
    assert "expected 8x8, found 10x12" in summary["bad"][0]["error"]
    assert "expected 8x8, found 10x12" in printed
    assert sorted(p.stem for p in (out / "recon").iterdir()) == ["shot0", "shot1", "shot2"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["original_size"] == [8, 8] and "notes" not in r for r in rows)  # nothing was resized


def test_a_failing_batch_becomes_bad_items(monkeypatch, photos, tmp_path):
    _, recipe = photos
    calls = []

    def restore(self, batch):
        calls.append(batch["name"][0])
        if len(calls) == 2:
            raise RuntimeError("the solver diverged")
        return original(self, batch)

    original = RestorationModule.restore
    monkeypatch.setattr(RestorationModule, "restore", restore)
    out = tmp_path / "out"
    assert _run(str(recipe), "--out_dir", str(out))[0] == 0
    summary = _summary(out)
    assert summary["images"] == 2 and summary["num_bad"] == 1
    assert summary["bad"][0] == {"index": 1, "name": "p1", "path": str(photos[0] / "photos" / "p1.png"),
                                 "error": "RuntimeError: the solver diverged"}


def test_resized_files_are_noted_with_their_original_size(photos, tmp_path):
    _, recipe = photos
    out = tmp_path / "out"
    code, printed = _run(str(recipe), "--out_dir", str(out), "--data.preprocess", "resize_center_crop")
    assert code == 0
    rows = {r["name"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert rows["p0"]["original_size"] == [20, 24]
    assert rows["p0"]["notes"] == ["shrank the image from 20x24 to 16x19 (bicubic, data.image_size 16) and cropped "
                                   "its centre to 16x16 (data.preprocess resize_center_crop)"]
    assert "notes" not in rows["p1"]  # 16x16 already
    assert _summary(out)["resized"] == 2 and "2 images were resized or cropped" in printed


def test_measured_shrink_says_so(tmp_path):
    phone = tmp_path / "phone"
    _png(phone / "big.png", 32, 32)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("IMAGES", str(phone)))
    out = tmp_path / "out"
    assert _run(str(recipe), "--out_dir", str(out), "--data.mode", "measured", "--data.image_size", "8")[0] == 0
    row = json.loads((out / "metrics.jsonl").read_text())
    assert row["original_size"] == [32, 32]
    assert row["notes"][0].startswith("shrank the measurement from 32x32 to 8x8")


def test_skipped_extensions_are_listed(photos, tmp_path):
    root, recipe = photos
    Image.new("P", (16, 16)).save(root / "photos" / "anim.gif")
    (root / "photos" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code, printed = _run(str(recipe), "--out_dir", str(out))
    assert code == 0
    skipped = _summary(out)["skipped"]
    assert [Path(p).name for p in skipped] == ["anim.gif", "notes.txt"]
    assert "skipped 2 files that are not images" in printed and "anim.gif" in printed


# ----------------------------------------------------------------------------- fault 7: solver switches


def test_switching_solver_and_sampler_on_the_command_line(photos, tmp_path, capsys):
    _, recipe = photos
    out = tmp_path / "dps"
    code, _ = _run(str(recipe), "--out_dir", str(out), "--data.limit", "1", "--model.solver", "DPS",
                   "--model.solver.init_args.steps", "4")
    assert code == 0
    summary = _summary(out)
    assert summary["method"] == "DPS"
    assert summary["run"]["solver"] == "DPS(scale=1.0, sampler='ddpm', steps=4)"  # DPS's defaults, not DPG's 5.0
    assert "not carried over" in capsys.readouterr().err
    out = tmp_path / "ddpm"
    assert _run(str(recipe), "--out_dir", str(out), "--data.limit", "1",
                "--model.solver.init_args.sampler", "ddpm")[0] == 0
    summary = _summary(out)
    assert summary["method"] == "DPG DDPM" and "scale=5.0" in summary["run"]["solver"]
    assert "sampler='ddpm'" in summary["run"]["solver"]


# ----------------------------------------------------------------------------- fault 8: --ckpt_path


def test_lightning_ckpt_path_is_refused(photos, tmp_path, capsys):
    _, recipe = photos
    code, _ = _run(str(recipe), "--out_dir", str(tmp_path / "o"), "--ckpt_path", str(tmp_path / "x.ckpt"))
    err = capsys.readouterr().err
    assert code == 2 and len(_error_lines(err)) == 1
    assert "--model.prior.checkpoint PATH" in err and "KeyError" not in err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- one-line user errors


@pytest.mark.parametrize(("args", "expected"), [
    (["--model.solver.init_args.scal", "3"], "Option 'scal' is not accepted; did you mean 'scale'?"),
    (["--data.rot", "x"], "unrecognized arguments: --data.rot x; did you mean '--data.root'?"),
    (["--data.root", "no/such/folder"], "image folder not found: no/such/folder"),
    (["--model.solver", "DPX"], "did you mean 'DPS'?"),
    (["--data.mode", "simulated"], "data.mode must be one of ('simulate', 'measured'), got 'simulated'"),
    (["--model.prior.checkpoint", "no/such.pt"], "no/such.pt"),
])
def test_user_errors_print_one_line(photos, tmp_path, capsys, args, expected):
    _, recipe = photos
    code, _ = _run(str(recipe), "--out_dir", str(tmp_path / "o"), *args)
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("dpgkit predict: error: ") and expected in lines[0], lines[0]
    assert not (tmp_path / "o" / ".lock").exists()  # a failed set-up leaves the folder free


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("  root:", "  rooot:", "does not accept option 'data.rooot'; did you mean 'data.root'?"),
    ("dpgkit.solvers.DPG", "dpgkit.solvers.DPQ", "has no attribute 'DPQ'; did you mean 'DPS'?"),
    ("{scale: 5.0", "{scal: 5.0", "Option 'scal' is not accepted; did you mean 'scale'?"),
    ("seed: 7", "seed: [7", "found invalid YAML at line"),
])
def test_recipe_mistakes_print_one_line(photos, tmp_path, capsys, old, new, expected):
    _, recipe = photos
    text = recipe.read_text()
    assert old in text
    recipe.write_text(text.replace(old, new))
    code, _ = _run(str(recipe), "--out_dir", str(tmp_path / "o"))
    lines = _error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1 and expected in lines[0], lines


def test_missing_recipe_and_debug_switch(tmp_path, capsys, monkeypatch, photos):
    assert main(["predict", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and "recipe file not found" in err
    _, recipe = photos
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        _run(str(recipe), "--out_dir", str(tmp_path / "o"), "--data.root", "nowhere", "--debug")
    monkeypatch.setenv("DPGKIT_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        _run(str(recipe), "--out_dir", str(tmp_path / "o"), "--data.root", "nowhere")


def test_one_line_error_in_a_subprocess(photos, tmp_path):
    # the console script as a user runs it: stderr holds the one line and no traceback
    _, recipe = photos
    proc = subprocess.run([sys.executable, "-m", "dpgkit.lightning.cli", "predict", str(recipe), "--out_dir",
                           str(tmp_path / "o"), "--model.solver", "DPZ"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(_error_lines(proc.stderr)) == 1
    assert "did you mean" in proc.stderr or "expected one of" in proc.stderr


# ----------------------------------------------------------------------------- friction


def test_no_lightning_tips_or_pytree_warning(photos, tmp_path, caplog):
    _, recipe = photos
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, printed = _run(str(recipe), "--out_dir", str(tmp_path / "o"), "--data.limit", "1")
    assert code == 0
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
    assert not [r for r in caplog.records if "Tip:" in r.getMessage()] and "Tip:" not in printed


def test_ctrl_c_says_what_is_done_and_the_rerun_resumes(monkeypatch, photos, tmp_path, capsys):
    _, recipe = photos
    calls = []
    original = RestorationModule.restore

    def restore(self, batch):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(RestorationModule, "restore", restore)
    out = tmp_path / "out"
    code, _ = _run(str(recipe), "--out_dir", str(out))
    assert code == 130
    assert "interrupted: 1 of 3 done; rerun the same command to resume" in capsys.readouterr().err
    assert not (out / ".lock").exists()
    monkeypatch.setattr(RestorationModule, "restore", original)
    assert _run(str(recipe), "--out_dir", str(out))[0] == 0
    summary = _summary(out)
    assert summary["restored_before"] == 1 and summary["restored_now"] == 2


def test_predict_help_leads_with_dpgkit_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: dpgkit predict RECIPE.yaml")
    head = text[: text.index("\n\n", text.index("keys most runs change"))]
    for key in ("--out_dir", "--data.root", "--data.mode", "--data.image_size", "--model.prior.checkpoint",
                "--model.solver", "--trainer.devices", "--writer.on_change"):
        assert re.search(rf"^\s+{re.escape(key)}\b", head, re.MULTILINE), key


def test_a_locked_folder_stops_every_rank_of_a_ddp_run(photos, tmp_path):
    # rank 0 finds the lock held; the other rank must stop too, not wait for it at a barrier
    _, recipe = photos
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": other.pid, "host": os.uname().nodename, "since": "now"}))
        proc = subprocess.run(
            [sys.executable, "-m", "dpgkit.lightning.cli", "predict", str(recipe), "--out_dir", str(out),
             "--trainer.devices", "2", "--trainer.strategy", "ddp"],
            capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        other.kill()
        other.wait()
    assert proc.returncode != 0 and f"another run (pid {other.pid}" in proc.stderr, proc.stderr[-2000:]
    assert not (out / "recon").exists()
