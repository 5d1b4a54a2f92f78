"""The Lightning pieces without the CLI: listing and loading items, sharding, the module, the writer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dpgkit.io import ImageError, load_image, quantize
from dpgkit.lightning import PredictionWriter, Prior, RestorationModule, ShardSampler
from dpgkit.lightning.datamodule import ImageItems, RestorationDataModule, collate_items, list_items, preprocess_image
from dpgkit.lightning.module import measurement_picture
from dpgkit.noise import Gaussian, Poisson
from dpgkit.operators import Inpainting, SuperResolution
from dpgkit.solvers import DPG, DPS

TINY = {"image_size": 16, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1",
        "attention_resolutions": "", "learn_sigma": False}


def _png(path, h=16, w=16, seed=0, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    Image.fromarray(a).convert(mode).save(path)
    return path


@pytest.fixture(scope="module")
def module():
    solver = DPG(scale=5.0, num_samples=16, sampler="ddim", steps=4)
    m = RestorationModule(Prior(TINY), SuperResolution(2), Gaussian(0.05), solver, seed=3, lpips=None)
    m.build_prior()
    return m


# ----------------------------------------------------------------------------- listing and loading


def test_list_folder_nested_sorted_and_named(tmp_path):
    for rel in ("b.png", "sub/a.jpg", "sub/deep/c.webp", "a.png", "a.jpg", ".hidden/x.png", "sub/.x.png"):
        _png(tmp_path / rel)
    (tmp_path / "notes.txt").write_text("not an image")
    items = list_items(tmp_path)
    assert [it.name for it in items] == ["a.jpg", "a.png", "b", "sub/a", "sub/deep/c"]
    assert [it.index for it in items] == list(range(5))
    assert items[3].path == tmp_path / "sub" / "a.jpg"


def test_list_file_keeps_its_order_and_ignores_labels(tmp_path):
    for rel in ("n01/x.png", "n02/y.png", "z.png"):
        _png(tmp_path / "root" / rel)
    listing = tmp_path / "val_1k.txt"
    listing.write_text("# subset\nz.png 7\n\nn02/y.png 3\nn01/x.png 1\n")
    items = list_items(tmp_path / "root", files=listing)
    assert [it.name for it in items] == ["z", "n02/y", "n01/x"]
    with pytest.raises(FileNotFoundError, match="is data.root right"):
        list_items(tmp_path, files=listing)
    globbed = list_items(tmp_path / "root", glob="n0*/*.png")
    assert [it.name for it in globbed] == ["n01/x", "n02/y"]
    with pytest.raises(ValueError, match="at most one"):
        list_items(tmp_path, files=listing, glob="*.png")
    with pytest.raises(FileNotFoundError, match="no images"):
        list_items(tmp_path / "root" / "n01", glob="*.jpg")


def test_preprocess_resize_crop_and_refusals():
    x = torch.rand(3, 20, 30) * 2 - 1
    y = preprocess_image(x, 16, "resize_center_crop")
    assert y.shape == (3, 16, 16) and y.min() >= -1 and y.max() <= 1
    assert preprocess_image(x, 16, "center_crop").equal(x[:, 2:18, 7:23])
    with pytest.raises(ImageError, match="too small"):
        preprocess_image(x, 24, "center_crop")
    with pytest.raises(ImageError, match="expected 16x16"):
        preprocess_image(x, 16, "none")
    with pytest.raises(ImageError, match="at least 32"):
        preprocess_image(x, 16, "resize_center_crop", min_size=32)
    assert preprocess_image(x, None, "none") is x


def test_items_report_bad_files_instead_of_raising(tmp_path):
    good = _png(tmp_path / "good.png", 20, 20)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    small = _png(tmp_path / "small.png", 8, 8)
    items = list_items(tmp_path)
    data = ImageItems(items, image_size=16, preprocess="center_crop")
    out = {s["name"]: s for s in (data[i] for i in range(len(data)))}
    assert out["good"]["error"] is None and out["good"]["x"].shape == (3, 16, 16)
    assert "cannot read" in out["bad"]["error"] and "x" not in out["bad"]
    assert "too small" in out["small"]["error"]
    batch = collate_items([out["bad"], out["good"], out["small"]])
    assert batch["name"] == ["good"] and batch["x"].shape == (1, 3, 16, 16)
    assert sorted(b["name"] for b in batch["bad"]) == ["bad", "small"]
    assert {b["path"] for b in batch["bad"]} == {str(bad), str(small)}
    assert good.exists()


def test_collate_moves_odd_sizes_to_bad():
    a = {"index": 0, "name": "a", "path": "a", "notes": [], "error": None, "y": torch.zeros(3, 4, 4)}
    b = {"index": 1, "name": "b", "path": "b", "notes": [], "error": None, "y": torch.zeros(3, 5, 4)}
    batch = collate_items([a, b])
    assert batch["name"] == ["a"] and batch["y"].shape == (1, 3, 4, 4)
    assert batch["bad"][0]["name"] == "b" and "batch_size 1" in batch["bad"][0]["error"]
    empty = collate_items([{"index": 2, "name": "c", "path": "c", "notes": [], "error": "broken"}])
    assert empty["name"] == [] and empty["index"].numel() == 0 and "x" not in empty


def test_measured_items_with_masks(tmp_path):
    _png(tmp_path / "y" / "a.png", 16, 16)
    _png(tmp_path / "y" / "b.png", 16, 16)
    m = np.full((16, 16), 255, np.uint8)
    m[4:8, 4:8] = 0
    (tmp_path / "m").mkdir()
    Image.fromarray(m).save(tmp_path / "m" / "a.png")
    data = ImageItems(list_items(tmp_path / "y"), mode="measured", image_size=16, preprocess="none",
                      mask_root=tmp_path / "m")
    a, b = data[0], data[1]
    assert a["error"] is None and a["mask"].shape == (1, 16, 16)
    assert a["mask"][0, 5, 5] == 0 and a["mask"][0, 0, 0] == 1 and a["mask"].sum() == 256 - 16
    assert "no mask file" in b["error"]


def test_datamodule_validates_its_arguments():
    with pytest.raises(ValueError, match="data.mode"):
        RestorationDataModule(root="x", mode="guess")
    with pytest.raises(ValueError, match="mask_root is for measured"):
        RestorationDataModule(root="x", mask_root="m")
    with pytest.raises(ValueError, match="needs data.image_size"):
        RestorationDataModule(root="x", image_size=None)


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 16])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_are_disjoint_complete_and_unpadded(n, world):
    data = list(range(n))
    shards = [list(ShardSampler(data, world, r)) for r in range(world)]
    flat = sorted(i for s in shards for i in s)
    assert flat == data  # every item once: none repeated (no padding), none lost
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert [len(ShardSampler(data, world, r)) for r in range(world)] == [len(s) for s in shards]
    with pytest.raises(ValueError, match="rank"):
        ShardSampler(data, world, world)


# ----------------------------------------------------------------------------- the module


def test_prior_spec(tmp_path):
    with pytest.raises(KeyError, match="adm-imagenet256"):
        Prior("no-such-prior")
    assert Prior("adm-imagenet256").image_shape == (3, 256, 256)
    assert Prior("adm-ffhq256").expected_checkpoint == "ffhq_10m.pt"
    p = Prior({**TINY, "channel_mult": 1, "attention_resolutions": 8})
    assert p.preset["channel_mult"] == "1" and p.preset["attention_resolutions"] == "8"
    assert p.image_shape == (3, 16, 16) and p.expected_checkpoint is None
    with pytest.raises(FileNotFoundError, match="256x256_diffusion_uncond.pt"):
        Prior("adm-imagenet256", checkpoint=str(tmp_path / "nothing.pt")).build()
    with pytest.raises(ValueError, match="dtype"):
        Prior(TINY, dtype="float8")


def test_module_checks_its_parts():
    with pytest.raises(TypeError, match="solver"):
        RestorationModule(Prior(TINY), SuperResolution(2), Gaussian(0.05), solver="dpg")
    with pytest.raises(TypeError, match="prior"):
        RestorationModule("adm-imagenet256", SuperResolution(2), Gaussian(0.05), DPG(1.0))
    with pytest.raises(ValueError, match="colour"):
        RestorationModule(Prior(TINY), SuperResolution(2), Gaussian(0.05), DPG(1.0), labels={"colour": "red"})
    m = RestorationModule(Prior(TINY), SuperResolution(2), Gaussian(0.05), DPG(1.0, sampler="ddim"),
                          labels={"dataset": "FFHQ"})
    assert m.labels == {"dataset": "FFHQ", "task": "SR x2", "method": "DPG DDIM"}
    with pytest.raises(ValueError, match="come from the operator and solver"):
        RestorationModule(Prior(TINY), SuperResolution(2), Gaussian(0.05), DPG(1.0), labels={"method": "DPG DDPM"})
    m = RestorationModule(Prior(TINY), SuperResolution(2), Poisson(1.0), DPS(1.0, sampler="ddim"))
    assert (m.labels["task"], m.labels["method"]) == ("SR x2 (Poisson)", "DPS DDIM")


def test_predict_needs_autograd(module):
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode=False"):
        module.on_predict_start()


def _batch(indices, seed=0):
    x = torch.stack([torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(100 + i)) * 2 - 1
                     for i in indices])
    return {"index": torch.tensor(indices), "name": [f"im{i}" for i in indices], "x": quantize(x), "bad": []}


def test_restore_is_per_item_whatever_the_batch(module):
    together = module.restore(_batch([4, 9, 2]))
    alone = module.restore(_batch([9]))
    assert together["recon"].shape == (3, 3, 16, 16)
    # the network itself differs by ~1e-6 between batch sizes on the CPU; the chain keeps that small
    assert torch.allclose(together["recon"][1], alone["recon"][0], atol=1e-4)
    assert not torch.allclose(together["recon"][0], together["recon"][1], atol=1e-2)
    row = together["metrics"][1]
    assert set(row) == {"seconds", "psnr", "ssim", "input_psnr"}
    assert abs(row["psnr"] - alone["metrics"][0]["psnr"]) < 1e-3
    # SR x2: y is 8x8, shown at 16x16
    assert together["input"].shape == (3, 3, 16, 16) and together["mask"] is None
    assert together["label"].equal(_batch([4, 9, 2])["x"])
    assert module.progress_metrics()["psnr"] == pytest.approx(
        sum(r["psnr"] for r in together["metrics"] + alone["metrics"]) / 4, abs=0.01)


def test_measured_restore_with_masks_uses_them(module):
    m = RestorationModule(Prior(TINY), Inpainting.box(side=4, margin=2), Gaussian(0.05),
                          DPG(scale=5.0, num_samples=16, sampler="ddim", steps=3), lpips=None)
    m.diffusion = module.diffusion
    with pytest.raises(ValueError, match="needs a fixed operator"):
        m._check_measured_operator(has_masks=False)
    m._check_measured_operator(has_masks=True)
    mask = torch.ones(2, 1, 16, 16)
    mask[0, :, :8] = 0
    y = torch.rand(2, 3, 16, 16) * 2 - 1
    out = m.restore({"index": torch.tensor([0, 1]), "name": ["a", "b"], "y": y * mask, "mask": mask, "bad": []})
    assert out["recon"].shape == (2, 3, 16, 16) and out["label"] is None
    assert out["metrics"] == [{"seconds": out["metrics"][0]["seconds"]}] * 2  # no ground truth, no scores
    assert out["mask"].equal(mask)
    assert (out["input"][0, :, :8] == -1).all() and (out["input"][1] > -1).any()  # missing pixels black


def test_measured_shape_mismatch_is_explained(module):
    m = RestorationModule(Prior(TINY), SuperResolution(2), Gaussian(0.05), DPG(1.0, 4, "ddim", 2), lpips=None)
    m._check_measured_operator(has_masks=False)
    with pytest.raises(ValueError, match="set data.image_size 8"):
        m.restore({"index": torch.tensor([0]), "name": ["a"], "y": torch.zeros(1, 3, 4, 4), "bad": []})


def test_measurement_picture_shapes():
    op = SuperResolution(4)
    y = torch.rand(2, 3, 4, 4) * 2 - 1
    pic = measurement_picture(y, op, (3, 16, 16))
    assert pic.shape == (2, 3, 16, 16) and pic.min() >= -1 and pic.max() <= 1
    gray = measurement_picture(torch.zeros(1, 1, 16, 16), op, (3, 16, 16))
    assert gray.shape == (1, 3, 16, 16)
    far = measurement_picture(torch.rand(1, 3, 32, 32) * 50, op, (3, 16, 16))  # e.g. Fourier magnitudes
    assert far.shape == (1, 3, 16, 16) and far.abs().max() <= 1 and far.std() > 0.1  # scaled, not clipped flat
    assert measurement_picture(torch.zeros(1, 10), op, (3, 16, 16)) is None


# ----------------------------------------------------------------------------- the writer


def _prediction(names, indices, psnrs, bad=()):
    n = len(names)
    return {"name": names, "index": indices, "path": [f"/data/{x}.png" for x in names], "notes": [[]] * n,
            "recon": torch.zeros(n, 3, 4, 4), "input": torch.ones(n, 3, 4, 4), "label": None,
            "mask": torch.ones(n, 1, 4, 4), "metrics": [{"psnr": p, "seconds": 1.0} for p in psnrs],
            "bad": list(bad)}


def test_writer_files_rows_and_summary(tmp_path, capsys):
    w = PredictionWriter(str(tmp_path / "run"))
    bad = {"index": 1, "name": "sub/broken", "path": "/data/sub/broken.png", "error": "cannot read"}
    w.write(_prediction(["sub/c", "a"], [2, 0], [20.0, float("inf")], bad=[bad]))
    assert w.is_done("a") and w.is_done("sub/c") and not w.is_done("sub/broken")
    assert (tmp_path / "run/errors/sub/broken.json").is_file()
    for kind in ("recon", "input", "mask"):
        assert Image.open(tmp_path / f"run/{kind}/sub/c.png").size == (4, 4)
    assert not (tmp_path / "run/label").exists()
    w.finalize()
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["a", "sub/c"]  # sorted by index
    assert rows[0]["psnr"] is None and rows[1]["psnr"] == 20.0  # infinite PSNR is not JSON
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["images"] == 2 and summary["restored_now"] == 2 and summary["num_bad"] == 1
    assert summary["bad"][0]["path"] == "/data/sub/broken.png"
    assert summary["metrics"]["psnr"]["mean"] == 20.0 and summary["metrics"]["psnr"]["count"] == 1
    assert "sub/broken.png: cannot read" in capsys.readouterr().out

    # a later run restores the broken item: its error file goes, the old rows stay
    w2 = PredictionWriter(str(tmp_path / "run"), print_summary=False)
    w2.write(_prediction(["sub/broken"], [1], [30.0]))
    w2.finalize()
    assert not (tmp_path / "run/errors/sub/broken.json").exists()
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["images"] == 3 and summary["restored_now"] == 1 and summary["restored_before"] == 2
    assert summary["metrics"]["psnr"]["mean"] == 25.0


def test_writer_needs_out_dir():
    with pytest.raises(ValueError, match="out_dir"):
        PredictionWriter("")


def test_loaded_label_matches_written_png(tmp_path):
    # what the writer stores as label is what `load_image` gives back for an 8-bit source
    src = _png(tmp_path / "x.png", 16, 16)
    x, _ = load_image(src)
    w = PredictionWriter(str(tmp_path / "run"), print_summary=False)
    p = _prediction(["x"], [0], [1.0])
    p["label"] = x[None]
    w.write(p)
    assert np.array_equal(np.asarray(Image.open(src)), np.asarray(Image.open(tmp_path / "run/label/x.png")))
