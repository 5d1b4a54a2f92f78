"""Training a prior (`dpgkit fit`), the data it reads, and the embedded demo prior."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dpgkit.io import read_idx_images
from dpgkit.lightning.training import DiffusionTrainingModule, fit_main
from dpgkit.lightning.training_data import ImageDataModule, load_fashion_mnist, pad_or_resize
from dpgkit.models import PRESETS, load, sample_prior

TINY_UNET = {
    "image_size": 8,
    "in_channels": 1,
    "num_channels": 32,
    "channel_mult": "1,2",
    "num_res_blocks": 1,
    "attention_resolutions": "",
    "learn_sigma": False,
}


@pytest.fixture(autouse=True)
def _one_thread():
    # the test machine's cores are shared: oversubscribed OpenMP threads only slow everyone down
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_idx(path, images: np.ndarray) -> None:
    n, h, w = images.shape
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, h, w) + images.astype(np.uint8).tobytes())


def test_idx_reader_and_fashion_mnist_padding(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(5, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    np.testing.assert_array_equal(read_idx_images(tmp_path / "train-images-idx3-ubyte.gz"), images)

    x = load_fashion_mnist(tmp_path, "train", size=32, limit=3)
    assert x.shape == (3, 1, 32, 32) and x.dtype == torch.float32
    # the 28x28 picture sits in the middle, the 2 px border is black (-1)
    torch.testing.assert_close(x[:, 0, 2:30, 2:30], torch.from_numpy(images[:3]).float() / 127.5 - 1)
    assert bool((x[:, :, :2] == -1).all()) and bool((x[:, :, :, 30:] == -1).all())

    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2049, 1, 2, 2) + b"\0" * 4)
    with pytest.raises(ValueError, match="magic 2051"):
        read_idx_images(tmp_path / "bad.gz")
    with pytest.raises(ValueError, match="use mode='resize'"):
        pad_or_resize(torch.zeros(1, 1, 40, 40), 32)


def test_folder_datamodule_reads_resizes_and_shuffles_reproducibly(tmp_path):
    rng = np.random.default_rng(1)
    for k in range(6):
        Image.fromarray(rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
    dm = ImageDataModule(source=str(tmp_path), image_size=8, channels=1, batch_size=4, seed=3)
    first = next(iter(dm.train_dataloader()))
    again = next(iter(ImageDataModule(source=str(tmp_path), image_size=8, channels=1,
                                      batch_size=4, seed=3).train_dataloader()))
    assert first.shape == (4, 1, 8, 8)
    assert float(first.min()) >= -1 and float(first.max()) <= 1 and float(first.std()) > 0.05
    torch.testing.assert_close(first, again)
    with pytest.raises(ValueError, match="grayscale"):
        ImageDataModule(channels=3).setup()


def test_training_module_loss_and_seeded_init_leave_global_rng_alone():
    state = torch.random.get_rng_state()
    a = DiffusionTrainingModule(unet=TINY_UNET, seed=5)
    b = DiffusionTrainingModule(unet=TINY_UNET, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    for p, q in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(p, q)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    loss = a.loss(x0, torch.Generator().manual_seed(0))
    # the output convolution starts at zero, so the first prediction is 0 and the loss is E[eps^2]
    assert 0.5 < float(loss) < 1.5
    with pytest.raises(ValueError, match="learn_sigma"):
        DiffusionTrainingModule(unet={**TINY_UNET, "learn_sigma": True})


def test_fit_runs_a_few_steps_and_exports_loadable_ema_weights(tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(2)
    for k in range(8):
        Image.fromarray(rng.integers(0, 256, size=(8, 8), dtype=np.uint8)).save(data / f"{k}.png")
    out = tmp_path / "ema.safetensors"
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"unet": TINY_UNET, "warmup_steps": 1, "export_path": str(out)},
        "data": {"source": str(data), "image_size": 8, "channels": 1, "batch_size": 4},
    }))
    # `dpgkit fit RECIPE.yaml --key value`: the recipe given positionally, overrides after it
    fit_main([
        str(recipe), "--trainer.max_steps=3", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.accelerator=cpu",
    ])
    assert out.is_file()
    model = load(TINY_UNET, checkpoint=out)
    assert model.image_shape == (1, 8, 8)
    init = DiffusionTrainingModule(unet=TINY_UNET, seed=0).net.state_dict()
    trained = model.net.state_dict()
    # 3 optimizer steps moved the EMA away from the (seeded) initial weights
    assert any(not torch.equal(trained[k], init[k]) for k in init)
    eps = model.eps(torch.randn(2, 1, 8, 8), torch.tensor([10, 900]))
    assert eps.shape == (2, 1, 8, 8) and bool(torch.isfinite(eps).all())


def test_shipped_demo_prior_loads_and_samples():
    preset = PRESETS["demo-fashion32"]
    model = load("demo-fashion32", checkpoint=preset.checkpoint_name)
    assert model.image_shape == (1, 32, 32)
    x = sample_prior(model, 4, steps=10, seed=0)
    assert x.shape == (4, 1, 32, 32)
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert float(x.std()) > 0.2  # not constant
    assert float((x[0] - x[1]).abs().mean()) > 0.05  # the samples differ
    # Fashion-MNIST pictures have a black frame: the 2 px border of a sample is mostly dark
    border = torch.cat([x[:, :, :2].flatten(1), x[:, :, -2:].flatten(1)], 1)
    assert float(border.mean()) < -0.5
    again = sample_prior(model, 2, steps=10, seed=0)
    torch.testing.assert_close(again, x[:2])
