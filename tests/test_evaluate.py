"""`dpgkit evaluate` (dpgkit.evaluate.main) on run folders written by the tests."""

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dpgkit import evaluate as E
from dpgkit import metrics as M


def _images(seed: int, n: int, size: int = 16) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(n)]


def _degrade(images: list[np.ndarray], seed: int, amount: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for im in images:
        noise = rng.integers(-amount, amount + 1, size=im.shape)
        out.append(np.clip(im.astype(int) + noise, 0, 255).astype(np.uint8))
    return out


def _write_run(root, name, labels, recons, summary=None):
    run = root / name
    (run / "recon").mkdir(parents=True)
    (run / "label").mkdir()
    for i, (lab, rec) in enumerate(zip(labels, recons)):
        Image.fromarray(lab).save(run / "label" / f"{i:05d}.png")
        Image.fromarray(rec).save(run / "recon" / f"{i:05d}.png")
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def _psnr_ref(labels, recons) -> float:
    """Mean over images of 10 log10(1 / MSE) on [0, 1] values, from the uint8 arrays."""
    values = []
    for lab, rec in zip(labels, recons):
        mse = np.mean((lab.astype(np.float64) / 255 - rec.astype(np.float64) / 255) ** 2)
        values.append(10 * math.log10(1 / mse))
    return float(np.mean(values))


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """Three runs: (ffhq, DPG, sr4), (ffhq, DPS, sr4), (ffhq, DPG, deblur); an empty hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    labels = _images(0, 3)
    spec = {
        "dpg_sr4": ("DPG", "sr4", 10),
        "dps_sr4": ("DPS", "sr4", 40),
        "dpg_deblur": ("DPG", "deblur", 25),
    }
    out = {}
    for i, (name, (method, task, amount)) in enumerate(spec.items()):
        recons = _degrade(labels, seed=10 + i, amount=amount)
        summary = {"method": method, "task": task, "dataset": "ffhq", "seed": 0}
        out[name] = (_write_run(tmp_path, name, labels, recons, summary), labels, recons)
    return out


def test_markdown_table_has_the_recomputed_psnr(runs, capsys):
    dirs = [str(runs[k][0]) for k in ("dpg_sr4", "dps_sr4", "dpg_deblur")]
    assert E.main([*dirs, "--no-fid"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == "| dataset | method | sr4 FID / LPIPS / PSNR | deblur FID / LPIPS / PSNR |"
    psnr = {k: _psnr_ref(v[1], v[2]) for k, v in runs.items()}
    assert psnr["dpg_sr4"] > psnr["dpg_deblur"] > psnr["dps_sr4"]  # less noise, higher PSNR
    assert f"| ffhq | DPG | n/a / n/a / {psnr['dpg_sr4']:.2f} | n/a / n/a / {psnr['dpg_deblur']:.2f} |" in lines
    assert f"| ffhq | DPS | n/a / n/a / {psnr['dps_sr4']:.2f} | - |" in lines
    # LPIPS without its backbone file: n/a, and the note says which file
    assert "vgg16-397923af.pth" in text


def test_json_and_csv_carry_psnr_and_ssim(runs, capsys):
    run, labels, recons = runs["dpg_sr4"]
    assert E.main([str(run), "--no-fid", "--no-lpips", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    cell = data["table"]["ffhq"]["DPG"]["sr4"]
    assert cell["psnr"] == pytest.approx(_psnr_ref(labels, recons), rel=1e-6)
    assert cell["num_images"] == 3 and cell["fid"] is None and cell["lpips"] is None
    x = torch.stack([torch.from_numpy(a).permute(2, 0, 1).double() / 255 for a in recons])
    y = torch.stack([torch.from_numpy(a).permute(2, 0, 1).double() / 255 for a in labels])
    assert cell["ssim"] == pytest.approx(float(M.ssim(x, y).mean()), abs=1e-6)
    assert 0 < cell["ssim"] < 1

    assert E.main([str(run), "--no-fid", "--no-lpips", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 1 and rows[0]["method"] == "DPG"
    assert float(rows[0]["sr4 PSNR"]) == pytest.approx(_psnr_ref(labels, recons), rel=1e-6)
    assert float(rows[0]["sr4 SSIM"]) == pytest.approx(cell["ssim"], rel=1e-9)
    assert rows[0]["sr4 FID"] == ""


def _fid_ref(a: np.ndarray, b: np.ndarray) -> float:
    ca = (a - a.mean(0)) / math.sqrt(len(a) - 1)
    cb = (b - b.mean(0)) / math.sqrt(len(b) - 1)
    ev = np.linalg.eigvalsh(ca @ (cb.T @ cb) @ ca.T)
    mean = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return float(mean + (ca**2).sum() + (cb**2).sum() - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def test_fid_with_the_offline_inception(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    labels = _images(5, 2, size=32)
    recons = _degrade(labels, seed=6, amount=60)
    run = _write_run(tmp_path, "run", labels, recons, {"method": "m", "task": "t", "dataset": "d"})
    assert E.main([str(run), "--no-lpips", "--format", "json"]) == 0
    fid = json.loads(capsys.readouterr().out)["table"]["d"]["m"]["t"]["fid"]
    inception = M.load_fid_inception()
    to01 = lambda ims: torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in ims])
    fr = inception(to01(labels)).double().numpy()
    ff = inception(to01(recons)).double().numpy()
    assert fid == pytest.approx(_fid_ref(fr, ff), rel=1e-4)
    assert fid > 1.0


class _MeanStd(nn.Module):
    num_features = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_fid_over_batches_equals_the_reference_on_the_features(runs):
    run, labels, recons = runs["dps_sr4"]
    rows, _ = E.evaluate_runs([run], lpips_net=None, fid_feature=_MeanStd(), batch_size=2)
    to01 = lambda ims: torch.stack([torch.from_numpy(a).permute(2, 0, 1).double() / 255 for a in ims])
    fr, ff = _MeanStd()(to01(labels)).numpy(), _MeanStd()(to01(recons)).numpy()
    assert rows[0]["fid"] == pytest.approx(_fid_ref(fr, ff), rel=1e-5)  # float32 pixels through [-1, 1]
    assert rows[0]["fid"] > 1e-4


def test_lpips_with_a_given_backbone_file(tmp_path, capsys):
    g = torch.Generator().manual_seed(11)
    shapes = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3),
              10: (256, 256, 3, 3)}  # fmt: skip
    state = {}
    for i, shape in shapes.items():
        state[f"features.{i}.weight"] = torch.randn(shape, generator=g) * 0.05
        state[f"features.{i}.bias"] = torch.zeros(shape[0])
    weights = tmp_path / "alexnet.pth"
    torch.save(state, weights)
    labels = _images(7, 2, size=32)
    recons = _degrade(labels, seed=8, amount=30)
    run = _write_run(tmp_path, "run", labels, recons, {"method": "DPG", "task": "sr4", "dataset": "ffhq"})
    argv = [str(run), "--no-fid", "--lpips-net", "alex", "--lpips-weights", str(weights)]
    assert E.main([*argv, "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)["table"]["ffhq"]["DPG"]["sr4"]["lpips"]
    to01 = lambda ims: torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in ims])
    expected = float(M.LPIPS("alex", weights)(to01(recons), to01(labels)).mean())
    assert got == pytest.approx(expected, rel=1e-5) and got > 0
    small = _write_run(tmp_path, "small", _images(9, 2), _images(10, 2))
    assert E.main([str(small), "--no-fid", "--lpips-net", "alex", "--lpips-weights", str(weights)]) == 1
    assert "at least 31 x 31" in capsys.readouterr().err


def test_without_summary_the_folder_name_is_method_and_task(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    labels = _images(1, 2)
    run = _write_run(tmp_path, "my_run", labels, _degrade(labels, 2, 10))
    rows, notes = E.evaluate_runs([run], fid=False)
    assert rows[0]["method"] == "my_run" and rows[0]["task"] == "my_run"
    assert rows[0]["lpips"] is None and any("vgg16-397923af.pth" in n for n in notes)


def test_errors_name_the_file(tmp_path, capsys):
    labels = _images(1, 2)
    run = _write_run(tmp_path, "r", labels, _degrade(labels, 2, 10))
    (run / "label" / "00001.png").unlink()
    assert E.main([str(run), "--no-fid", "--no-lpips"]) == 1
    assert "00001.png" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="recon"):
        E.evaluate_runs([tmp_path / "nowhere"], lpips_net=None, fid=False)
    same = {"method": "r", "task": "r", "dataset": ""}
    first = _write_run(tmp_path, "r2", labels, labels, same)
    second = _write_run(tmp_path, "r3", labels, labels, same)
    with pytest.raises(ValueError, match="two runs"):
        E.format_table(E.evaluate_runs([first, second], lpips_net=None, fid=False)[0])
