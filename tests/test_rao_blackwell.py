"""The Rao-Blackwellized DPG estimator (kernels.rao_blackwell) against the published one.

Exact checks on the same noise (the estimator is the row-space projection of DPG's direction when
a_i = V^T eps_i), the streamed path against the definition, seeding and batching, fallbacks, and
a statistical check over many seeds: the same mean as the published estimator, a smaller covariance.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

import dpgkit as dk
from dpgkit import kernels
from dpgkit.kernels import rao_blackwell as rb
from dpgkit.kernels import reference
from dpgkit.solvers.dpg import DPG

SHAPE = (3, 6, 9)  # D = 162
N = 37
NOISES = [dk.noise.Gaussian(0.1), dk.noise.Poisson(1.0)]


def _operators() -> dict[str, object]:
    g = torch.Generator().manual_seed(3)
    return {
        "mask": dk.operators.Inpainting((torch.rand(1, 1, 6, 9, generator=g) > 0.6).float()),
        "soft_mask": dk.operators.Inpainting(torch.rand(1, 3, 6, 9, generator=g).clamp_min(0.3) - 0.3),
        "uncrop": dk.operators.Inpainting.uncrop((6, 9), "center", 0.5),
        "avgpool3": dk.operators.SuperResolution(3, "avgpool"),
        "bicubic3": dk.operators.SuperResolution(3, "bicubic"),
        "colorization": dk.operators.Colorization(),
    }


EXPECTED = {"mask": "select", "soft_mask": "select", "uncrop": "select", "avgpool3": "avgpool",
            "bicubic3": "basis", "colorization": "channel_mean"}


def _problem(operator, noise, batch: int = 1, seed: int = 0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    x0hat = torch.rand(batch, *shape, generator=g) * 2 - 1
    x = (x0hat + 0.3 * torch.randn(batch, *shape, generator=g)).clamp(-1, 1)
    y = noise.simulate(operator(x), [torch.Generator().manual_seed(seed + b) for b in range(batch)])
    z_raw = noise.energy(y, operator(x0hat)).double()
    z = 1.3 * z_raw
    r = noise.width(z, float(x0hat[0].numel()) / 4, 0.05)
    return x0hat, y, r, z, z_raw


@pytest.mark.parametrize("name", list(_operators()))
def test_row_space_is_orthonormal_spans_the_row_space_and_has_the_expected_rank(name):
    op = _operators()[name]
    x0hat = torch.zeros(SHAPE)
    space = rb.row_space_of(op, x0hat)
    assert not isinstance(space, str), space
    assert space.kind == EXPECTED[name]
    d = math.prod(SHAPE)
    expected_rank = {"select": int((op.mask.expand(1, 3, 6, 9) != 0).sum()) if hasattr(op, "mask") else None,
                     "avgpool": d // 9, "basis": d // 9, "channel_mean": d // 3}[space.kind]
    assert space.rank == expected_rank
    # V as a matrix: V^T V = I_m, and A V V^T = A on a basis of the image space
    v = space.lift(torch.eye(space.rank, dtype=torch.float64)).T  # (D, m)
    torch.testing.assert_close(v.T @ v, torch.eye(space.rank, dtype=torch.float64), atol=1e-6, rtol=0)
    eye = torch.eye(d).view(d, *SHAPE)
    proj = (v @ v.T).float().view(d, *SHAPE)
    torch.testing.assert_close(op(proj), op(eye), atol=1e-5, rtol=0)


def test_operators_without_a_row_space_say_why():
    x0hat = torch.zeros(SHAPE)
    assert "not a linear operator" in rb.row_space_of(dk.operators.JPEG(50), x0hat)
    box = dk.operators.BlackBox(lambda img: img[:, ::2], linear=True)
    assert "does not describe its row space" in rb.row_space_of(box, x0hat)
    assert rb.row_space_of(dk.operators.Denoising(), x0hat).kind == "identity"


class _LyingMask(dk.operators.Inpainting):
    """Claims a row space of the wrong pixels: must be refused, not used."""

    def row_space(self, image_shape):
        desc = super().row_space(image_shape)
        return {**desc, "index": (desc["index"] + 1) % math.prod(image_shape)}


def test_a_wrong_row_space_is_refused():
    op = _LyingMask((torch.rand(1, 1, 6, 9, generator=torch.Generator().manual_seed(1)) > 0.5).float())
    why = rb.row_space_of(op, torch.zeros(SHAPE))
    assert isinstance(why, str) and "_LyingMask.row_space" in why


@pytest.mark.parametrize("noise", NOISES, ids=["gaussian", "poisson"])
@pytest.mark.parametrize("name", list(_operators()))
def test_on_the_same_noise_it_is_the_row_space_projection_of_dpg(name, noise):
    """a_i = V^T eps_i: the rewards are the same, so v_RB = V V^T v exactly (up to rounding)."""
    op = _operators()[name]
    x0hat, y, r, z, z_raw = _problem(op, noise)
    space = rb.row_space_of(op, x0hat[0])

    def projected(seed, start, n, numel, device="cpu"):
        return space.project(reference.torch_normal(seed, start, n, space.numel, device))

    args = (x0hat[0], y[0], op, noise, r[0], z[0], z_raw[0], N, 5)
    v, m = reference.dpg_direction_eager(*args)
    v_rb, m_rb = rb.rb_direction_eager(*args, space=space, stream=projected)
    expected = space.lift(space.project(v.reshape(1, -1)))[0].view_as(v)
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(v_rb, expected, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(m_rb, m, rtol=0, atol=1e-5)
    # and it is not DPG's direction itself: the null-space part is gone
    assert float((v - expected).norm()) > 0.1 * float(v.norm())


@pytest.mark.parametrize("noise", NOISES, ids=["gaussian", "poisson"])
@pytest.mark.parametrize("name", list(_operators()))
def test_streamed_is_the_definition_and_does_not_depend_on_the_chunk(name, noise):
    op = _operators()[name]
    x0hat, y, r, z, z_raw = _problem(op, noise, seed=1)
    args = (x0hat[0], y[0], op, noise, r[0], z[0], z_raw[0], 130, 2**63 + 7)
    v, m = rb.rb_direction_eager(*args)
    runs = [rb.rb_direction_streamed(*args, chunk_size=c) for c in (1, 64, 100, 4096)]
    for v_s, m_s in runs:
        assert torch.equal(v_s, runs[0][0]) and torch.equal(m_s, runs[0][1])
    torch.testing.assert_close(runs[0][0], v, rtol=0, atol=1e-5 * float(v.abs().max()))
    torch.testing.assert_close(runs[0][1], m, rtol=0, atol=1e-12)


def test_nearly_equal_rewards_keep_their_accuracy():
    """A huge temperature makes every weight tiny and nearly equal: the one-pass sum must not cancel."""
    op, noise = _operators()["avgpool3"], dk.noise.Gaussian(0.1)
    x0hat, y, r, z, z_raw = _problem(op, noise, seed=2)
    args = (x0hat[0], y[0], op, noise, r[0], 1e4 * z[0], z_raw[0], 500, 9)
    v, _ = rb.rb_direction_eager(*args)
    v_s, _ = rb.rb_direction_streamed(*args, chunk_size=128)
    torch.testing.assert_close(v_s, v, rtol=0, atol=1e-4 * float(v.abs().max()))


def test_batch_with_per_item_masks_is_item_by_item_and_seeded_per_item():
    noise = dk.noise.Gaussian(0.1)
    masks = (torch.rand(3, 1, 6, 9, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    op = dk.operators.Inpainting(masks)
    x0hat, y, r, z, z_raw = _problem(op, noise, batch=3)
    seeds = [11, 12, 13]
    v, m = kernels.dpg_direction(x0hat, y, op, noise, r, z, z_raw, N, seeds, backend="chunked",
                                 estimator="rao-blackwell")
    for b in range(3):
        alone = kernels.dpg_direction(x0hat[b : b + 1], y[b : b + 1], op.item(b), noise, r[b : b + 1],
                                      z[b : b + 1], z_raw[b : b + 1], N, [seeds[b]], backend="chunked",
                                      estimator="rao-blackwell")
        assert torch.equal(alone[0][0], v[b]) and torch.equal(alone[1][0], m[b])
        # nothing outside the item's observed pixels
        assert torch.equal(v[b] * (1 - masks[b]), torch.zeros_like(v[b]))
    again = kernels.dpg_direction(x0hat, y, op, noise, r, z, z_raw, N, seeds, backend="chunked",
                                  estimator="rao-blackwell")
    assert torch.equal(again[0], v)
    eager = kernels.dpg_direction(x0hat, y, op, noise, r, z, z_raw, N, seeds, backend="eager",
                                  estimator="rao-blackwell")
    torch.testing.assert_close(eager[0], v, rtol=0, atol=1e-5 * float(v.abs().max()))


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(kernels, "_logged", set())


@pytest.mark.parametrize("backend", ["eager", "chunked"])
def test_identity_row_space_gives_the_published_numbers(backend):
    noise = dk.noise.Gaussian(0.1)
    op = dk.operators.Denoising()
    x0hat, y, r, z, z_raw = _problem(op, noise, batch=2)
    args = (x0hat, y, op, noise, r, z, z_raw, N, [1, 2])
    rb_out = kernels.dpg_direction(*args, backend=backend, estimator="rao-blackwell")
    pub = kernels.dpg_direction(*args, backend=backend)
    assert torch.equal(rb_out[0], pub[0]) and torch.equal(rb_out[1], pub[1])


def test_operators_without_a_row_space_get_the_published_estimator_logged_once(fresh_log, caplog):
    noise = dk.noise.Gaussian(0.1)
    op = dk.operators.JPEG(50)
    x0hat, y, r, z, z_raw = _problem(op, noise, batch=2)
    args = (x0hat, y, op, noise, r, z, z_raw, 9, [1, 2])
    with caplog.at_level(logging.WARNING, logger="dpgkit.kernels"):
        v, m = kernels.dpg_direction(*args, backend="chunked", estimator="rao-blackwell")
        kernels.dpg_direction(*args, backend="chunked", estimator="rao-blackwell")
    v_p, m_p = kernels.dpg_direction(*args, backend="chunked")
    assert torch.equal(v, v_p) and torch.equal(m, m_p)
    records = [rec for rec in caplog.records if "published estimator is used" in rec.getMessage()]
    assert len(records) == 1 and "JPEG" in records[0].getMessage()


def test_unknown_estimator_is_refused():
    noise = dk.noise.Gaussian(0.1)
    op = dk.operators.Denoising()
    x0hat, y, r, z, z_raw = _problem(op, noise)
    with pytest.raises(ValueError, match="unknown DPG estimator 'rb'"):
        kernels.dpg_direction(x0hat, y, op, noise, r, z, z_raw, N, [1], estimator="rb")
    with pytest.raises(ValueError, match="DPG estimator must be one of .*did you mean .rao-blackwell."):
        DPG(scale=1.0, estimator="rao_blackwell")
    with pytest.raises(ValueError, match="needs a linear operator with a row space"):
        rb.rb_direction_eager(x0hat[0], y[0], dk.operators.JPEG(50), noise, r[0], z[0], z_raw[0], N, 1)


@pytest.mark.parametrize("name,noise", [("avgpool3", NOISES[0]), ("mask", NOISES[0]), ("colorization", NOISES[1])],
                         ids=["avgpool-gaussian", "mask-gaussian", "colorization-poisson"])
def test_same_mean_as_the_published_estimator_and_a_smaller_covariance(name, noise, record_property):
    """Over 3000 seeds: E[v_RB] = E[v] coordinate by coordinate (|z| < 4.5 on every one of D), the
    null-space part of E[v] is zero, and tr Cov(v_RB) < tr Cov(v) (ratio recorded, near m/D)."""
    shape, n, seeds = (1, 6, 6), 8, 3000
    op = {"avgpool3": dk.operators.SuperResolution(3), "colorization": dk.operators.Colorization(),
          "mask": dk.operators.Inpainting((torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(5))
                                           > 0.6).float())}[name]
    shape = (3, 6, 6) if name == "colorization" else shape
    x0hat, y, r, z, z_raw = _problem(op, noise, seed=6, shape=shape)
    space = rb.row_space_of(op, x0hat[0])
    args = (x0hat[0], y[0], op, noise, r[0], z[0], z_raw[0], n)
    pub, rbv = [], []
    for s in range(seeds):
        v, m = reference.dpg_direction_eager(*args, s)
        pub.append((v.double() * m.exp()).reshape(-1))
        v, m = rb.rb_direction_eager(*args, s, space=space)
        rbv.append((v.double() * m.exp()).reshape(-1))
    pub, rbv = torch.stack(pub), torch.stack(rbv)
    se = (pub.var(0) / seeds + rbv.var(0) / seeds).sqrt()
    zscores = (pub.mean(0) - rbv.mean(0)) / se
    assert float(zscores.abs().max()) < 4.5, zscores
    null = pub - space.lift(space.project(pub))
    z_null = null.mean(0) / (null.var(0) / seeds).sqrt().clamp_min(1e-30)
    assert float(z_null.abs().max()) < 4.5
    ratio = float(rbv.var(0).sum() / pub.var(0).sum())
    m_over_d = space.rank / space.numel
    record_property("trace_ratio", ratio)
    record_property("m_over_d", m_over_d)
    print(f"{name}: tr Cov(v_RB) / tr Cov(v) = {ratio:.3f}, m/D = {m_over_d:.3f}")
    assert ratio < 1.0
    assert ratio < 2 * m_over_d  # most of the published variance lies in the null space


def test_dpg_runs_with_the_rao_blackwell_estimator():
    shape = (3, 6, 6)

    def eps(x_t, t):  # the exact eps of a N(0, 0.25 I) prior
        abar = dk.diffusion.Schedule.linear(1000).alphas_cumprod.to(x_t)[t].view(-1, 1, 1, 1)
        return (1 - abar).sqrt() * x_t / (abar * 0.25 + 1 - abar)

    model = dk.models.DiffusionModel(eps, shape)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    task = dk.Task(dk.operators.SuperResolution(2), dk.noise.Gaussian(0.05))
    y = task.measure(x, seed=0)
    y = y[0] if isinstance(y, tuple) else y

    def run(estimator, backend="chunked"):
        solver = DPG(scale=2.0, num_samples=9, sampler="ddim", steps=4, backend=backend, estimator=estimator)
        return solver.restore(model, task, y, seed=1)

    out = run("rao-blackwell")
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(out, run("rao-blackwell"))
    torch.testing.assert_close(out, run("rao-blackwell", "eager"), rtol=0, atol=1e-4)
    assert not torch.allclose(out, run("published"))
    assert "estimator='rao-blackwell'" in repr(DPG(scale=1.0, estimator="rao-blackwell"))


@pytest.mark.parametrize("start,count", [(0, 300), (3, 200), (64, 128), (10, 60), (1000, 1024)])
def test_threaded_stream_is_the_torch_stream_bit_for_bit(start, count):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        drawn = rb.threaded_normal(7, start, count, 33)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(drawn, reference.torch_normal(7, start, count, 33))
    buffer = torch.full((count, 33), float("nan"))
    torch.set_num_threads(1)
    try:
        again = rb.threaded_normal(7, start, count, 33, out=buffer)
    finally:
        torch.set_num_threads(threads)
    assert again.data_ptr() == buffer.data_ptr() and torch.equal(again, drawn)


def test_blurs_circular_basis_is_used_and_reflected_borders_are_refused():
    shape = (1, 32, 32)
    circular = dk.operators.GaussianBlur(13, 2.0, padding="circular")
    space = rb.row_space_of(circular, torch.zeros(shape))
    # frequencies the blur damps below 1e-6 of its largest gain are left out
    assert space.kind == "basis" and 0 < space.rank < 1024
    noise = dk.noise.Gaussian(0.05)
    x0hat, y, r, z, z_raw = _problem(circular, noise, shape=shape)

    def projected(seed, start, n, numel, device="cpu"):
        return space.project(reference.torch_normal(seed, start, n, space.numel, device))

    args = (x0hat[0], y[0], circular, noise, r[0], z[0], z_raw[0], N, 5)
    v, m = reference.dpg_direction_eager(*args)
    v_rb, m_rb = rb.rb_direction_eager(*args, space=space, stream=projected)
    expected = space.lift(space.project(v.reshape(1, -1)))[0].view_as(v)
    torch.testing.assert_close(v_rb, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
    # the SVD view of a reflect-padded blur is the circular one: not its row space
    why = rb.row_space_of(dk.operators.GaussianBlur(13, 2.0), torch.zeros(shape))
    assert isinstance(why, str) and "does not span the row space" in why
