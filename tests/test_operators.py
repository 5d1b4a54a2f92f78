"""Forward models: adjoints, SVD views, per-item draws, kernels, references and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dpgkit as dk
from dpgkit.noise import Gaussian, Noiseless
from dpgkit.operators import (
    JPEG,
    BlackBox,
    Blur,
    Colorization,
    Denoising,
    GaussianBlur,
    Inpainting,
    MotionBlur,
    PhaseRetrieval,
    SuperResolution,
    gaussian_kernel,
    motion_kernel,
)
from dpgkit.operators._checks import generator_from_seed
from dpgkit.seeding import derive_seed

C, H, W = 3, 8, 12  # deliberately not square
SHAPE = (C, H, W)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _drawn(template, items: int = 2, seed: int = 0):
    return template.draw([derive_seed(seed, i, "operator") for i in range(items)], SHAPE)


# Every linear operator, in the configurations that the dot-product and SVD tests cover.
LINEAR = {
    "inpaint-mask": lambda: Inpainting((_rand(1, C, H, W, seed=5) > 0.4).float()),
    "inpaint-box": lambda: _drawn(Inpainting.box(side=(3, 5), margin=1)),
    "inpaint-random": lambda: _drawn(Inpainting.random(drop=(0.5, 0.9))),
    "uncrop-center": lambda: Inpainting.uncrop((H, W), keep="center"),
    "uncrop-left": lambda: Inpainting.uncrop((H, W), keep="left"),
    "sr-avgpool": lambda: SuperResolution(2),
    "sr-bicubic-2": lambda: SuperResolution(2, mode="bicubic"),
    "sr-bicubic-4": lambda: SuperResolution(4, mode="bicubic"),
    "gauss-reflect": lambda: GaussianBlur(5, 1.2),
    "gauss-circular": lambda: GaussianBlur(5, 1.2, padding="circular"),
    "motion-reflect": lambda: _drawn(MotionBlur(7, 0.5)),
    "motion-circular": lambda: _drawn(MotionBlur(7, 0.5, padding="circular")),
    "blur-even-reflect": lambda: Blur(_rand(4, 3, seed=3)),
    "blur-wide-circular": lambda: Blur(_rand(11, 15, seed=4), padding="circular"),
    "colorization": Colorization,
    "denoising": Denoising,
}
WITH_SVD = [k for k in LINEAR if k not in ("gauss-reflect", "motion-reflect", "blur-even-reflect")]


def _pair(name: str):
    op = LINEAR[name]().double()
    items = op.batch_size or 2
    x = _rand(items, C, H, W, seed=1) - 0.5
    return op, x


@pytest.mark.parametrize("name", list(LINEAR))
def test_adjoint_dot_product(name):
    op, x = _pair(name)
    assert op.is_linear
    ax = op(x)
    y = _rand(*ax.shape, seed=2)
    lhs, rhs = (ax * y).sum(), (x * op.adjoint(y)).sum()
    assert abs(float(lhs - rhs)) < 1e-5 * abs(float(lhs))
    # and in float32, the default dtype, to float32 accuracy
    op32 = LINEAR[name]()
    x32, y32 = x.float(), y.float()
    l32, r32 = (op32(x32) * y32).sum(), (x32 * op32.adjoint(y32)).sum()
    assert abs(float(l32 - r32)) < 1e-4 * (op32(x32).norm() * y32.norm())


def _orthonormality_error(f, dim: int) -> float:
    """max |M M^T - I| for M = f(I): the basis vectors pushed through f."""
    eye = torch.eye(dim, dtype=torch.float64)
    rows = f(eye)
    return float((rows @ rows.T - eye).abs().max())


@pytest.mark.parametrize("name", WITH_SVD)
def test_svd_view_reconstructs_and_is_orthogonal(name):
    op, x = _pair(name)
    view = op.svd(SHAPE)
    b = x.shape[0]
    s = view.singulars()
    assert s.dtype == torch.float64
    assert bool((s >= 0).all())
    assert bool((s[..., :-1] >= s[..., 1:]).all()), "singular values must be in descending order"
    ax = op(x).reshape(b, -1)
    assert torch.allclose(view.apply(x.reshape(b, -1)), ax, atol=1e-10)
    d, m = x[0].numel(), ax.shape[1]
    # a per-item view (singulars (B, R)) is item b's own view in row b
    items = [op.item(i).svd(SHAPE) for i in range(b)] if s.dim() == 2 else [view]
    if s.dim() == 2:
        for i, one in enumerate(items):
            si = one.singulars()
            assert torch.allclose(s[i, : si.numel()], si, atol=1e-14)
            assert not bool(s[i, si.numel() :].any())
            assert torch.allclose(view.vt(x.reshape(b, -1))[i], one.vt(x[i].reshape(1, -1))[0])
    for one in items:
        assert _orthonormality_error(one.vt, d) < 1e-10
        assert _orthonormality_error(one.ut, m) < 1e-10
    # V and U invert V^T and U^T
    assert torch.allclose(view.v(view.vt(x.reshape(b, -1))), x.reshape(b, -1), atol=1e-12)
    y = _rand(b, m, seed=7)
    assert torch.allclose(view.u(view.ut(y)), y, atol=1e-12)
    # A^T through the factors: V (s * (U^T y)[:R]) padded
    r = s.shape[-1]
    z = torch.zeros(b, d, dtype=torch.float64)
    z[:, :r] = view.ut(y)[:, :r] * s
    aty = op.adjoint(y.reshape(op(x).shape)).reshape(b, -1)
    assert torch.allclose(view.v(z), aty, atol=1e-10)


def test_svd_pseudo_inverse_recovers_a_low_resolution_image():
    # DDNM's range-space step A^+ y = V S^-1 U^T y with A A^+ y = y
    for mode in ("avgpool", "bicubic"):
        op = SuperResolution(2, mode).double()
        view = op.svd(SHAPE)
        y = _rand(2, C, H // 2, W // 2, seed=3)
        s = view.singulars()
        z = torch.zeros(2, C * H * W, dtype=torch.float64)
        z[:, : s.numel()] = view.ut(y.reshape(2, -1)) / s
        assert torch.allclose(op(view.v(z).reshape(2, C, H, W)), y, atol=1e-9)


def test_svd_singulars_match_known_values():
    assert torch.allclose(SuperResolution(4).svd((1, 8, 8)).singulars(), torch.full((4,), 0.25))
    assert torch.allclose(Colorization().svd((3, 2, 2)).singulars(), torch.full((4,), 3 ** -0.5))
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert torch.equal(Inpainting(mask).svd((1, 2, 2)).singulars(), torch.ones(3))
    assert torch.equal(Inpainting(mask).svd((3, 2, 2)).singulars(), torch.ones(9))
    # a per-item mask view pads the item that keeps fewer pixels with zeros
    masks = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]], [[[0.0, 0.0], [1.0, 0.0]]]])
    assert torch.equal(Inpainting(masks).svd((1, 2, 2)).singulars(),
                       torch.tensor([[1.0, 1, 1], [1, 0, 0]]))
    # a mask with one entry per channel knows its size
    assert Inpainting(torch.ones(1, 3, 2, 2)).svd().singulars().shape == (12,)
    # the Fourier view of a circular blur has |DFT(kernel)| as singular values; DC first (= 1)
    s = GaussianBlur(5, 1.0, padding="circular").svd((1, 8, 8)).singulars()
    assert abs(float(s[0]) - 1.0) < 1e-6
    assert float(s[-1]) < 0.05


def test_circular_blur_matches_its_svd_view_and_reflect_differs_only_near_borders():
    kernel = motion_kernel(7, 0.5, torch.Generator().manual_seed(3)).double()
    x = _rand(1, C, 16, 16, seed=1)
    circ, refl = Blur(kernel, "circular").double(), Blur(kernel, "reflect").double()
    view = circ.svd((C, 16, 16))
    assert torch.allclose(view.apply(x.reshape(1, -1)), circ(x).reshape(1, -1), atol=1e-12)
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))
    assert torch.allclose(circ(x)[inner], refl(x)[inner], atol=1e-12)
    assert float((circ(x) - refl(x)).abs().max()) > 1e-3


@pytest.mark.parametrize("padding", ["reflect", "circular"])
@pytest.mark.parametrize("ksize", [(5, 5), (4, 3), (1, 1), (7, 2)])
def test_blur_matches_direct_convolution(padding, ksize):
    kh, kw = ksize
    k = _rand(2, kh, kw, seed=kh * 10 + kw).float().double()  # representable in float32
    x = _rand(2, C, 9, 10, seed=1)
    op = Blur(k, padding).double()
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    xp = F.pad(x, (pw, kw - 1 - pw, ph, kh - 1 - ph), mode=padding)
    ref = torch.stack([F.conv2d(xp[b : b + 1], k[b].expand(C, 1, kh, kw), groups=C)[0] for b in range(2)])
    assert torch.allclose(op(x), ref, atol=1e-12)


def test_reflect_blur_with_a_kernel_wider_than_the_image_is_still_exact_adjoint():
    op = Blur(_rand(9, 9, seed=2), "reflect").double()
    x, y = _rand(1, 1, 4, 5, seed=3), _rand(1, 1, 4, 5, seed=4)
    assert abs(float((op(x) * y).sum() - (x * op.adjoint(y)).sum())) < 1e-12


def test_bicubic_matches_antialiased_references_away_from_the_border():
    x = _rand(1, 1, 32, 48, seed=0)
    for f in (2, 4):
        y = SuperResolution(f, "bicubic").double()(x)[0, 0].numpy()
        pil = Image.fromarray(x[0, 0].float().numpy(), mode="F").resize((48 // f, 32 // f), Image.BICUBIC)
        ref = F.interpolate(x, scale_factor=1 / f, mode="bicubic", antialias=True)[0, 0].numpy()
        inner = (slice(2, -2), slice(2, -2))
        assert np.abs(y - np.asarray(pil))[inner].max() < 1e-6
        assert np.abs(y - ref)[inner].max() < 1e-12
    # weights are normalised and boundaries mirrored, so a constant image stays constant
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(SuperResolution(4, "bicubic")(flat), torch.full((1, 3, 4, 4), 0.3), atol=1e-6)


def test_avgpool_is_block_mean():
    x = _rand(2, C, H, W, seed=9)
    y = SuperResolution(4)(x)
    assert y.shape == (2, C, 2, 3)
    assert torch.allclose(y[0, 1, 1, 2], x[0, 1, 4:8, 8:12].mean())


# -- per-item draws --------------------------------------------------------------------------
RANDOM = {
    "box": lambda: Inpainting.box(side=(2, 4), margin=1),
    "random": lambda: Inpainting.random(drop=(0.5, 0.9)),
    "motion": lambda: MotionBlur(7, 0.5),
}


def _tensor_of(op) -> torch.Tensor:
    return op.mask if isinstance(op, Inpainting) else op.kernel


@pytest.mark.parametrize("name", list(RANDOM))
def test_same_seed_same_draw_other_item_other_draw(name):
    x = _rand(3, C, H, W, seed=0) * 2 - 1
    task = dk.Task(RANDOM[name](), Noiseless())
    _, drawn = task.measure(x, seed=11)
    first = _tensor_of(drawn.operator).clone()
    assert first.shape[0] == 3 and drawn.operator.batch_size == 3
    _, again = task.measure(x, seed=11)
    assert torch.equal(_tensor_of(again.operator), first)
    for i in range(3):  # items differ from each other
        for j in range(i):
            assert not torch.equal(first[i], first[j])
    # item 2 alone, drawn with its index, gets the same draw as in the batch; another run
    # seed gives another draw
    _, alone = task.measure(x[2:], seed=11, indices=[2])
    assert torch.equal(_tensor_of(alone.operator)[0], first[2])
    _, other = task.measure(x[2:], seed=12, indices=[2])
    assert not torch.equal(_tensor_of(other.operator)[0], first[2])
    assert task.operator.is_random  # the task itself is a value: drawing never changed it


def test_measure_uses_the_drawn_operator_and_item_applies_to_any_number_of_states():
    x = _rand(3, C, H, W, seed=0) * 2 - 1
    task = dk.Task(MotionBlur(7, 0.5), Gaussian(0.05))
    y, drawn = task.measure(x, seed=1)
    op = drawn.operator
    assert not op.is_random and op.batch_size == 3
    assert (y - op(x)).std() == pytest.approx(0.05, rel=0.15)
    states = _rand(5, C, H, W, seed=4)
    one = op.item(1)
    assert one.batch_size is None and one.kernel.shape[0] == 1
    batched = op(torch.stack([x[0], states[0], x[2]]))[1]
    assert torch.allclose(one(states)[0], batched, atol=1e-6)
    assert one(states).shape == (5, C, H, W)
    with pytest.raises(IndexError, match="holds 3 items"):
        op.item(3)
    with pytest.raises(ValueError, match="holds 3 per-item operators"):
        op(states)


def test_shared_operators_return_themselves_from_item():
    for op in (SuperResolution(2), GaussianBlur(5, 1.0), Colorization(), Denoising(),
               Inpainting(torch.ones(H, W)), PhaseRetrieval(), JPEG(50)):
        assert op.item(7) is op and op.batch_size is None and not op.is_random


def test_templates_refuse_to_apply_before_a_draw():
    for template in RANDOM.values():
        op = template()
        assert op.is_random and op.is_linear
        with pytest.raises(RuntimeError, match="random template"):
            op(torch.zeros(1, *SHAPE))
        with pytest.raises(RuntimeError, match="random template"):
            op.svd(SHAPE)


# -- masks ----------------------------------------------------------------------------------
def test_box_mask_has_the_side_and_margin():
    op = Inpainting.box(side=(20, 30), margin=16).draw([derive_seed(0, i) for i in range(8)], (3, 64, 64))
    for m in op.mask[:, 0]:
        rows, cols = torch.nonzero(m == 0, as_tuple=True)
        side = int(rows.max() - rows.min() + 1)
        assert 20 <= side <= 30 and int(cols.max() - cols.min() + 1) == side
        assert int((m == 0).sum()) == side * side
        assert int(rows.min()) >= 16 and int(cols.min()) >= 16
        assert int(rows.max()) <= 64 - 17 and int(cols.max()) <= 64 - 17
    with pytest.raises(ValueError, match="does not fit"):
        Inpainting.box(side=(128, 128), margin=16).draw([0], (3, 64, 64))


def test_box_corner_range_is_the_dps_codes_half_open_range():
    # The DPS code draws the corner with numpy's randint(margin, size - box - margin): for the
    # paper's 128 box in 256 px with a 16 px margin, rows and columns 16..111 (112 excluded).
    from dpgkit.operators.inpainting import box_mask

    tops, lefts = set(), set()
    for seed in range(4000):
        m = box_mask(generator_from_seed(seed), 256, 256, (128, 128), 16)[0]
        rows, cols = torch.nonzero(m == 0, as_tuple=True)
        tops.add(int(rows.min()))
        lefts.add(int(cols.min()))
    # 4000 draws over 96 values: every corner seen (P(one missed) ~ 96 exp(-4000/96) ~ 1e-16)
    assert tops == set(range(16, 112)) and lefts == set(range(16, 112))
    # general rule, small case: margin 2, box 3, image 8 -> corners 2..2 only
    for seed in range(20):
        m = box_mask(generator_from_seed(seed), 8, 8, (3, 3), 2)[0]
        rows, cols = torch.nonzero(m == 0, as_tuple=True)
        assert (int(rows.min()), int(cols.min())) == (2, 2)
    with pytest.raises(ValueError, match="does not fit"):  # 3 + 2 * 2 = 7 fits 8, not 7
        box_mask(generator_from_seed(0), 7, 7, (3, 3), 2)


def test_random_mask_drops_the_paper_fraction():
    op = Inpainting.random().draw([1, 2], (3, 50, 50))
    assert op.mask.shape == (2, 1, 50, 50)
    missing = 1 - op.mask.mean(dim=(1, 2, 3))
    assert torch.allclose(missing, torch.full((2,), 0.92))
    assert op.svd((3, 50, 50)).singulars().shape == (2, 3 * 200)  # per item


def test_uncrop_masks():
    c = Inpainting.uncrop((8, 8), keep="center", fraction=0.5).mask[0, 0]
    assert int(c.sum()) == 16 and float(c[2:6, 2:6].min()) == 1.0
    right = Inpainting.uncrop((8, 8), keep="right", fraction=0.25).mask[0, 0]
    assert float(right[:, 6:].min()) == 1.0 and float(right[:, :6].max()) == 0.0
    with pytest.raises(ValueError, match="keep must be"):
        Inpainting.uncrop((8, 8), keep="middle")


def test_masks_from_files(tmp_path):
    a = np.zeros((H, W), np.uint8)
    a[:, : W // 2] = 255
    b = 255 - a
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(b).save(tmp_path / "b.png")
    op = Inpainting.from_file(tmp_path / "a.png")
    assert op.mask.shape == (1, 1, H, W) and float(op.mask[0, 0, 0, 0]) == 1.0
    assert float(Inpainting.from_file(tmp_path / "a.png", keep="black").mask[0, 0, 0, 0]) == 0.0
    assert Inpainting.from_file(tmp_path / "a.png", size=(4, 6)).mask.shape == (1, 1, 4, 6)
    pool = Inpainting.from_files([tmp_path / "a.png", tmp_path / "b.png"])
    drawn = pool.draw([derive_seed(0, i) for i in range(16)], SHAPE)
    picked = {int(m[0, 0, 0]) for m in drawn.mask}
    assert picked == {0, 1}  # both files are used across 16 items
    with pytest.raises(FileNotFoundError, match="nope.png"):
        Inpainting.from_file(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="pass size"):
        pool.draw([0], (3, 4, 4))


# -- kernels --------------------------------------------------------------------------------
def test_kernels_are_nonnegative_and_sum_to_one():
    g = gaussian_kernel(61, 3.0)
    assert g.shape == (61, 61) and float(g.min()) >= 0
    assert abs(float(g.sum()) - 1) < 1e-6
    assert torch.allclose(g, g.flip(0)) and torch.allclose(g, g.T)
    assert int(g.argmax()) == 30 * 61 + 30
    asymmetric = 0
    for seed in range(6):
        k = motion_kernel(61, 0.5, torch.Generator().manual_seed(seed))
        assert k.shape == (61, 61) and float(k.min()) >= 0
        assert abs(float(k.sum()) - 1) < 1e-5
        assert int((k > 1e-4).sum()) > 3  # a path, not a dot
        flipped = k.flip(0, 1)  # point symmetry, and mirror symmetry in both axes
        if min(float((k - flipped).abs().max()), float((k - k.flip(0)).abs().max()),
               float((k - k.flip(1)).abs().max())) > 1e-3:
            asymmetric += 1
    assert asymmetric >= 5
    same = motion_kernel(61, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(same, motion_kernel(61, 0.5, torch.Generator().manual_seed(0)))


def _kernel_statistics(k: torch.Tensor) -> tuple[int, int, float, float]:
    """(pixels holding 99% of the mass, nonzero pixels, spread = sqrt(trace of the mass's
    covariance) in px, elongation = ratio of its principal standard deviations)."""
    k = k.double() / k.double().sum()
    flat = k.flatten().sort(descending=True).values
    n99 = int(torch.searchsorted(flat.cumsum(0), torch.tensor(0.99, dtype=torch.float64))) + 1
    rows, cols = torch.meshgrid(torch.arange(k.shape[0], dtype=torch.float64),
                                torch.arange(k.shape[1], dtype=torch.float64), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], 1)
    mean = (k.flatten()[:, None] * pos).sum(0)
    d = pos - mean
    cov = (k.flatten()[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0)
    ev = torch.linalg.eigvalsh(cov)
    return n99, int((k > 0).sum()), float(ev.sum().sqrt()), float((ev[1] / ev[0].clamp_min(1e-12)).sqrt())


def test_motion_kernels_have_the_reference_generators_statistics():
    # Medians over 900 kernels (61 x 61, intensity 0.5) of LeviBorodenko/motionblur's generator,
    # the one the DPS and DPG experiments draw from, run as published (3 x 300 kernels; the three
    # medians agree to within 2%): 99% of the mass in 105 px, 139 nonzero px, spread 10.5 px,
    # elongation 8.7. A generator whose lines are about twice as thick (99% mass in ~200 px,
    # ~420 nonzero px) fails the first two bands; one without the 8-bit storage (~430 nonzero px)
    # fails the second. Bands: +-15% around the reference (+-20% for elongation, the noisiest),
    # for 150 kernels (sampling error of each median about 6%, 9% for elongation).
    stats = torch.tensor([_kernel_statistics(motion_kernel(61, 0.5, torch.Generator().manual_seed(seed)))
                          for seed in range(150)])
    n99, support, spread, elongation = stats.median(0).values.tolist()
    assert 0.85 * 105 <= n99 <= 1.15 * 105, n99
    assert 0.85 * 139 <= support <= 1.15 * 139, support
    assert 0.85 * 10.5 <= spread <= 1.15 * 10.5, spread
    assert 0.8 * 8.7 <= elongation <= 1.2 * 8.7, elongation


def test_motion_intensity_zero_is_a_straight_line():
    k = motion_kernel(31, 0.0, torch.Generator().manual_seed(2)).double()
    ys, xs = torch.nonzero(k > 0.2 * k.max(), as_tuple=True)
    pts = torch.stack([xs, ys], 1).double()
    pts = pts - pts.mean(0)
    sv = torch.linalg.svdvals(pts)
    assert float(sv[1] / sv[0]) < 0.1  # the support is a thin segment


# -- non-linear operators ------------------------------------------------------------------
def test_phase_retrieval_shape_padding_and_parseval():
    assert PhaseRetrieval(2.0).padding(256, 256) == (64, 64)
    op = PhaseRetrieval(2.0)
    x = (_rand(2, C, 16, 16, seed=1) * 2 - 1).requires_grad_(True)
    y = op(x)
    assert y.shape == (2, C, 24, 24) and not op.is_linear and op.differentiable
    # orthonormal DFT of the zero-padded image: energy is preserved
    assert torch.allclose(y.square().sum(dim=(2, 3)), x.square().sum(dim=(2, 3)), rtol=1e-10)
    # magnitude only: a shifted image (inside the padding) has the same measurement
    shifted = torch.roll(F.pad(x[:, :, 2:-2, 2:-2], (2, 2, 2, 2)), (1, 2), dims=(-2, -1))
    assert torch.allclose(op(shifted), op(F.pad(x[:, :, 2:-2, 2:-2], (2, 2, 2, 2))), atol=1e-10)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_jpeg_is_a_real_codec():
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    x = torch.stack([xx, yy, xx * yy])[None].repeat(2, 1, 1, 1) * 0.8
    x[1, :, 8:16, 8:16] = 1.0  # a sharp square: JPEG rings around it
    low, high = JPEG(10), JPEG(90)
    assert not low.differentiable
    yl, yh = low(x.requires_grad_(True)), high(x)
    assert yl.shape == x.shape and yl.grad_fn is None
    assert float(yl.min()) >= -1 and float(yl.max()) <= 1
    err_low, err_high = (yl - x).abs().mean(), (yh - x).abs().mean()
    assert 0 < err_high < err_low < 0.2
    assert torch.equal(low(x), yl)  # deterministic
    gray = JPEG(50)(x[:, :1])
    assert gray.shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        low(torch.zeros(1, 2, 8, 8))


def test_black_box_wraps_numpy():
    op = BlackBox(lambda a: np.flip(a, -1).copy() ** 2)
    x = _rand(2, C, 4, 4).float()
    assert not op.differentiable
    assert torch.allclose(op(x), x.flip(-1) ** 2)


def test_colorization_and_denoising_shapes():
    x = _rand(2, C, H, W)
    assert Colorization()(x).shape == (2, 1, H, W)
    assert torch.allclose(Colorization()(x)[:, 0], x.mean(1))
    assert Denoising()(x) is x


# -- devices ---------------------------------------------------------------------------------
def test_tensors_are_buffers_that_follow_the_module():
    op = _drawn(MotionBlur(7))
    assert "kernel" in dict(op.named_buffers())
    assert op.double().kernel.dtype == torch.float64
    assert "mask" in dict(_drawn(Inpainting.random()).named_buffers())
    x = _rand(2, C, H, W)
    assert op.double()(x).dtype == torch.float64


# -- errors ----------------------------------------------------------------------------------
def test_clear_errors():
    with pytest.raises(ValueError, match="factor 3 must divide the image size, got 8x12"):
        SuperResolution(3)(torch.zeros(1, C, H, W))
    with pytest.raises(ValueError, match="factor 3 must divide"):
        SuperResolution(3, "bicubic").svd(SHAPE)
    with pytest.raises(ValueError, match="positive integer"):
        SuperResolution(2.5)
    with pytest.raises(ValueError, match="mode must be one of"):
        SuperResolution(2, mode="nearest")
    with pytest.raises(ValueError, match=r"expects images of shape \(B, C, H, W\), got \(3, 8, 12\)"):
        GaussianBlur(5)(torch.zeros(C, H, W))
    with pytest.raises(ValueError, match="does not fit images"):
        Inpainting(torch.ones(H, W))(torch.zeros(1, C, H + 1, W))
    with pytest.raises(ValueError, match=r"mask must have shape"):
        Inpainting(torch.ones(C, H, W))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Inpainting(torch.full((H, W), 2.0))
    with pytest.raises(ValueError, match="binary"):
        Inpainting(torch.full((H, W), 0.5)).svd(SHAPE)
    with pytest.raises(ValueError, match=r"needs the image shape \(C, H, W\) for a mask shared"):
        Inpainting(torch.ones(H, W)).svd()
    with pytest.raises(ValueError, match="kernel must have shape"):
        Blur(torch.ones(1, 1, 3, 3))
    with pytest.raises(ValueError, match="padding must be one of"):
        Blur(torch.ones(3, 3), padding="zeros")
    with pytest.raises(ValueError, match=r"needs the image shape \(C, H, W\)"):
        GaussianBlur(5).svd()
    with pytest.raises(ValueError, match="intensity must lie in"):
        MotionBlur(61, 1.5)
    with pytest.raises(ValueError, match="quality"):
        JPEG(0)


def test_operators_pickle_for_worker_processes():
    import pickle

    x = _rand(2, C, H, W, seed=8)
    for template in (*RANDOM.values(), lambda: GaussianBlur(5), lambda: SuperResolution(2, "bicubic")):
        op = template()
        clone = pickle.loads(pickle.dumps(op))
        assert repr(clone) == repr(op)
        drawn, drawn_clone = _drawn(op) if op.is_random else op, _drawn(clone) if clone.is_random else clone
        assert torch.equal(drawn(x), drawn_clone(x))
