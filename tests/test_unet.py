"""The guided-diffusion UNet against reference numerics and checkpoint layouts; the loader's checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dpgkit as dk
from dpgkit.models import registry
from dpgkit.models.registry import CheckpointMismatchError, CheckpointReadError, build_unet, load, register_preset
from dpgkit.models.unet import unet_from_config

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "adm"
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"ADM reference fixtures not found at {FIXTURES}"
)

# Small enough for CPU tests, yet takes every code path the 256 px presets take.
TINY = {
    "image_size": 16,
    "num_channels": 32,
    "num_res_blocks": 1,
    "channel_mult": "1,2",
    "learn_sigma": True,
    "attention_resolutions": "8",
    "num_head_channels": 16,
    "use_scale_shift_norm": True,
    "resblock_updown": True,
}


def _x_t(batch: int = 2, size: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    t = torch.tensor([5, 900][:batch])
    return x, t


@needs_fixtures
@pytest.mark.parametrize("name", ["adm_tiny_scale_shift_updown.pt", "adm_tiny_plain.pt"])
def test_matches_reference_numerics(name: str) -> None:
    ref = torch.load(FIXTURES / name, weights_only=True)
    with torch.device("meta"):
        net = unet_from_config(ref["config"])
    assert list(net.state_dict()) == list(ref["state_dict"])
    net.load_state_dict(ref["state_dict"], strict=True, assign=True)
    with torch.no_grad():
        out = net.eval()(ref["x"], ref["t"])
    assert out.shape == ref["out"].shape
    err = (out - ref["out"]).abs().max().item()
    assert err < 1e-4, f"max abs error {err:.3g} vs the reference"


@needs_fixtures
@pytest.mark.parametrize(
    ("preset", "layout_key"),
    [("adm-imagenet256", "adm-imagenet256-uncond"), ("adm-ffhq256", "adm-ffhq256-dps")],
)
def test_preset_matches_checkpoint_layout(preset: str, layout_key: str) -> None:
    layout = json.loads((FIXTURES / "adm_state_dict_layout.json").read_text())[layout_key]
    for key, value in layout["config"].items():
        assert registry.PRESETS[preset].config[key] == value, key
    model = load(preset, device="meta")
    tensors = [[k, list(v.shape)] for k, v in model.net.state_dict().items()]
    assert tensors == layout["tensors"]
    assert len(tensors) == layout["num_tensors"]
    assert sum(p.numel() for p in model.net.parameters()) == layout["num_parameters"]
    assert model.image_shape == (3, 256, 256) and model.learned_sigma is True
    assert len(model.schedule) == 1000


def test_lsun_alias_shares_the_imagenet_network() -> None:
    a = build_unet("adm-imagenet256", device="meta").state_dict()
    b = build_unet("adm-lsun-bedroom256", device="meta").state_dict()
    assert [(k, v.shape) for k, v in a.items()] == [(k, v.shape) for k, v in b.items()]
    assert registry.PRESETS["adm-lsun-bedroom256"].checkpoint_name == "lsun_bedroom.pt"


def test_random_weights_are_seeded_and_leave_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a, b = build_unet(TINY, seed=3), build_unet(TINY, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
        assert bool((va != 0).all()), k
    x, t = _x_t()
    with torch.no_grad():
        out = a(x, t)
    assert out.shape == (2, 6, 16, 16) and out.abs().mean() > 1e-3


def test_checkpoint_round_trip_pt_and_safetensors(tmp_path: Path) -> None:
    src = build_unet(TINY, seed=7)
    torch.save(src.state_dict(), tmp_path / "tiny.pt")
    save_file(src.state_dict(), str(tmp_path / "tiny.safetensors"))
    x, t = _x_t()
    with torch.no_grad():
        want = src.eval()(x, t)
    for name in ("tiny.pt", "tiny.safetensors"):
        model = load(TINY, checkpoint=tmp_path / name)
        for k, v in src.state_dict().items():
            assert torch.equal(model.net.state_dict()[k], v), (name, k)
        with torch.no_grad():
            assert torch.equal(model(x, t), want), name
        assert not any(p.requires_grad for p in model.parameters())


def test_renamed_key_names_missing_and_unexpected(tmp_path: Path) -> None:
    state = build_unet(TINY).state_dict()
    state["middle_block.1.qkv_renamed.weight"] = state.pop("middle_block.1.qkv.weight")
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointMismatchError) as info:
        load(TINY, checkpoint=tmp_path / "bad.pt")
    msg = str(info.value)
    assert "missing" in msg and "middle_block.1.qkv.weight" in msg
    assert "unexpected" in msg and "middle_block.1.qkv_renamed.weight" in msg
    assert info.value.missing == ["middle_block.1.qkv.weight"]
    assert info.value.unexpected == ["middle_block.1.qkv_renamed.weight"]


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    state = build_unet(TINY).state_dict()
    state["out.2.weight"] = torch.ones(3, 32, 3, 3)  # a fixed-sigma head for a learned-sigma net
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointMismatchError) as info:
        load(TINY, checkpoint=tmp_path / "bad.safetensors")
    msg = str(info.value)
    assert "out.2.weight: expected (6, 32, 3, 3) vs found (3, 32, 3, 3)" in msg
    assert not info.value.missing and not info.value.unexpected


def test_missing_file_names_file_and_url(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load("adm-imagenet256", checkpoint=tmp_path)  # a folder without the file
    msg = str(info.value)
    assert "256x256_diffusion_uncond.pt" in msg
    assert "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/" in msg
    with pytest.raises(FileNotFoundError) as info:
        load("adm-ffhq256", checkpoint=tmp_path / "nowhere" / "ffhq.pt")
    msg = str(info.value)
    assert "ffhq_10m.pt" in msg and "drive.google.com" in msg and "DPS2022" in msg


def test_register_preset_and_bad_configs(tmp_path: Path) -> None:
    name = "test-tiny-unet"
    try:
        preset = register_preset(name, TINY, checkpoint_name="tiny.pt", url="https://example.org")
        assert preset.image_shape == (3, 16, 16)
        with pytest.raises(ValueError, match="already registered"):
            register_preset(name, TINY)
        torch.save(build_unet(TINY, seed=2).state_dict(), tmp_path / "tiny.pt")
        model = dk.models.load(name, checkpoint=tmp_path)  # the folder holding the preset's file
        assert model.image_shape == (3, 16, 16)
    finally:
        registry.PRESETS.pop(name, None)
    with pytest.raises(NotImplementedError, match="class_cond"):
        build_unet({**TINY, "class_cond": True}, device="meta")
    with pytest.raises(ValueError, match="unknown UNet config keys"):
        build_unet({**TINY, "num_chanels": 64}, device="meta")
    with pytest.raises(KeyError, match="unknown preset"):
        load("adm-imagenet512")


def test_activation_checkpointing_same_output_and_vjp() -> None:
    x, t = _x_t()
    v = torch.randn(2, 6, 16, 16, generator=torch.Generator().manual_seed(2))
    results = []
    for ckpt in (False, True):
        model = load(TINY, activation_checkpointing=ckpt, seed=5)
        assert model.net.use_checkpoint is ckpt
        calls: list[int] = []
        model.net.middle_block[0].in_layers.register_forward_hook(lambda *_, c=calls: c.append(1))
        xg = x.clone().requires_grad_(True)
        out = model(xg, t)
        (grad,) = torch.autograd.grad(out, xg, v)
        # a checkpointed block runs its forward again during the backward pass
        assert len(calls) == (2 if ckpt else 1)
        results.append((out.detach(), grad))
    (out0, g0), (out1, g1) = results
    assert g0.abs().mean() > 1e-3
    torch.testing.assert_close(out1, out0, rtol=0, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)


def test_new_attention_order_changes_the_head_split() -> None:
    x, t = _x_t()
    legacy = build_unet(TINY, seed=4)
    new = build_unet({**TINY, "use_new_attention_order": True}, seed=4)
    with torch.no_grad():
        assert not torch.allclose(legacy(x, t), new(x, t), atol=1e-4)


def test_bf16_autocast_close_to_fp32() -> None:
    x, t = _x_t()
    ref = load(TINY, seed=6)
    low = load(TINY, seed=6, dtype=torch.bfloat16)
    with torch.no_grad():
        want, got = ref(x, t), low(x, t)
    assert got.dtype == torch.float32 and got.shape == want.shape
    rel = (got - want).norm() / want.norm()
    assert 0 < rel < 0.05, f"bf16 relative error {rel:.3g}"


@pytest.mark.parametrize("name", ["cut.pt", "cut.safetensors"])
def test_a_corrupt_checkpoint_names_the_file_and_never_suggests_unsafe_loading(tmp_path: Path, name: str) -> None:
    whole = tmp_path / ("whole" + Path(name).suffix)
    state = build_unet(TINY).state_dict()
    torch.save(state, whole) if name.endswith(".pt") else save_file(state, str(whole))
    cut = tmp_path / name
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # an interrupted download
    with pytest.raises(CheckpointReadError) as info:
        load(TINY, checkpoint=cut)
    msg = str(info.value)
    assert str(cut) in msg and "Fetch the file again" in msg
    assert "weights_only=False" not in msg and "\n" not in msg


def test_a_pickled_object_checkpoint_is_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "trainer_state.pt"
    torch.save({"state_dict": build_unet(TINY).state_dict(), "optimizer": Path("x")}, path)
    with pytest.raises(CheckpointReadError) as info:
        load(TINY, checkpoint=path)
    msg = str(info.value)
    assert str(path) in msg and "state_dict()" in msg and "weights_only=False" not in msg
