"""The guided-diffusion UNet (ADM; Dhariwal & Nichol 2021), state-dict compatible with its checkpoints.

Written from the architecture's published description. Module names and the order of parameters
follow the public checkpoints (OpenAI ImageNet 256 unconditional, LSUN, DPS FFHQ 256), so their
state dicts load strictly. Half precision is left to `torch.autocast` (`use_fp16` is accepted and
ignored); group norms always compute in float32.

Input `x` is (B, C, H, W) in [-1, 1], `t` the timesteps (B,) of the original schedule (integers,
or fractional for continuous-time samplers); the output is (B, C, H, W) eps, or (B, 2C, H, W) eps
then the learned-range variance values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "UNetModel",
    "UNET_DEFAULTS",
    "default_channel_mult",
    "random_init_",
    "timestep_embedding",
    "unet_from_config",
]

# guided-diffusion's `model_and_diffusion_defaults()` restricted to the network's arguments.
UNET_DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "channel_mult": "",
    "learn_sigma": False,
    "class_cond": False,
    "use_checkpoint": False,
    "attention_resolutions": "16,8",
    "num_heads": 4,
    "num_head_channels": -1,
    "num_heads_upsample": -1,
    "use_scale_shift_norm": True,
    "dropout": 0.0,
    "resblock_updown": False,
    "use_fp16": False,
    "use_new_attention_order": False,
    # dpgkit's one addition to guided-diffusion's arguments: image channels (1 for grayscale priors)
    "in_channels": 3,
}


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) float32: cosines first, then sines."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """32-group norm computed in float32 whatever the input dtype, returned in the input dtype."""

    def __init__(self, channels: int) -> None:
        super().__init__(32, channels)

    def forward(self, x: Tensor) -> Tensor:
        # autocast would otherwise run the norm in half precision under some policies
        with torch.autocast(x.device.type, enabled=False):
            out = F.group_norm(
                x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps
            )
        return out.to(x.dtype)


class TimestepBlock(nn.Module):
    """A block whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the embedding to the blocks that take one."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest 2x upsampling, optionally followed by a 3x3 conv (parameter name `conv`)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling: strided 3x3 conv or 2x2 average pooling (either named `op`)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            if out_channels != channels:
                raise ValueError(
                    f"average-pool downsampling keeps channels: got {channels} -> {out_channels}"
                )
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally resampling by 2.

    With `use_scale_shift_norm` the embedding gives a scale and a shift applied after the second
    norm (h = norm(h) * (1 + scale) + shift); otherwise it is added before that norm.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, use_conv=False)
            self.x_upd: nn.Module = Upsample(channels, use_conv=False)
        elif down:
            self.h_upd = Downsample(channels, use_conv=False)
            self.x_upd = Downsample(channels, use_conv=False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels),
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:
            # resample between the activation and the conv, on both paths
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttention(nn.Module):
    """Multi-head attention over a fused (B, 3*H*ch, L) qkv tensor.

    `legacy=True` is the checkpoints' layout: the channels are split into heads first, then into
    q, k, v per head. `legacy=False` (`use_new_attention_order`) splits q, k, v first.
    """

    def __init__(self, num_heads: int, legacy: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.legacy = legacy

    def forward(self, qkv: Tensor) -> Tensor:
        b, width, length = qkv.shape
        heads = self.num_heads
        ch = width // (3 * heads)
        if self.legacy:
            q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
        else:
            q, k, v = (z.reshape(b * heads, ch, length) for z in qkv.chunk(3, dim=1))
        # softmax(q^T k / sqrt(ch)) v, in the fused kernel (memory-efficient on GPUs)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return a.transpose(1, 2).reshape(b, heads * ch, length)


class AttentionBlock(TimestepBlock):
    """Spatial self-attention with a residual connection; heads from a count or a head width."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_new_attention_order: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if num_head_channels == -1:
            if channels % num_heads:
                raise ValueError(f"{channels} channels do not split into {num_heads} heads")
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"{channels} channels are not a multiple of num_head_channels "
                    f"{num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.attention = QKVAttention(self.num_heads, legacy=not use_new_attention_order)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


def default_channel_mult(image_size: int) -> tuple[float, ...]:
    """guided-diffusion's channel multipliers for `channel_mult=""`."""
    table: dict[int, tuple[float, ...]] = {
        512: (0.5, 1, 1, 2, 2, 4, 4),
        256: (1, 1, 2, 2, 4, 4),
        128: (1, 1, 2, 3, 4),
        64: (1, 2, 3, 4),
    }
    if image_size not in table:
        raise ValueError(
            f"no default channel_mult for image_size {image_size} (defaults exist for "
            f"{sorted(table)}); pass channel_mult explicitly, e.g. '1,2,2'"
        )
    return table[image_size]


class UNetModel(nn.Module):
    """The ADM UNet for unconditional models.

    Args mirror guided-diffusion's `UNetModel`, except that attention resolutions are given as
    downsampling rates (`attention_ds`, e.g. (8, 16, 32) for 32,16,8 at 256 px); build from
    guided-diffusion's argument names with `unet_from_config`.
    Forward: x (B, in_channels, H, W), t (B,) integer timesteps -> (B, out_channels, H, W).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_ds: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        use_checkpoint: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.channel_mult = tuple(channel_mult)
        attention_ds = set(attention_ds)
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        def res(ch_in: int, ch_out: int, **updown: bool) -> ResBlock:
            return ResBlock(
                ch_in, emb_dim, dropout, out_channels=ch_out,
                use_scale_shift_norm=use_scale_shift_norm, use_checkpoint=use_checkpoint,
                **updown,
            )  # fmt: skip

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(
                ch, num_heads=heads, num_head_channels=num_head_channels,
                use_new_attention_order=use_new_attention_order, use_checkpoint=use_checkpoint,
            )  # fmt: skip

        ch = input_ch = int(self.channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))]
        )
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_ds:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                down = (
                    res(ch, ch, down=True)
                    if resblock_updown
                    else Downsample(ch, conv_resample, out_channels=ch)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_ds:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(
                        res(ch, ch, up=True)
                        if resblock_updown
                        else Upsample(ch, conv_resample, out_channels=ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), nn.Conv2d(input_ch, out_channels, 3, padding=1)
        )
        # zero the last conv of every residual branch and the output, as the reference does
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.out_layers[-1].weight)
                nn.init.zeros_(m.out_layers[-1].bias)
            elif isinstance(m, AttentionBlock):
                nn.init.zeros_(m.proj_out.weight)
                nn.init.zeros_(m.proj_out.bias)
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @property
    def use_checkpoint(self) -> bool:
        """Whether residual and attention blocks recompute activations in the backward pass."""
        return any(
            m.use_checkpoint for m in self.modules() if isinstance(m, ResBlock | AttentionBlock)
        )

    @use_checkpoint.setter
    def use_checkpoint(self, value: bool) -> None:
        for m in self.modules():
            if isinstance(m, ResBlock | AttentionBlock):
                m.use_checkpoint = bool(value)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(
                f"H and W must be multiples of {factor} for {len(self.channel_mult)} levels, "
                f"got {tuple(x.shape[-2:])}"
            )
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"expected t of shape ({x.shape[0]},), got {tuple(t.shape)}")
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def _parse_channel_mult(channel_mult: str | Sequence[float], image_size: int) -> tuple[float, ...]:
    if isinstance(channel_mult, str):
        if channel_mult == "":
            return default_channel_mult(image_size)
        return tuple(float(c) if "." in c else int(c) for c in channel_mult.split(","))
    return tuple(channel_mult)


def _parse_attention(attention_resolutions: str | Sequence[int], image_size: int) -> list[int]:
    if isinstance(attention_resolutions, str):
        res = [int(r) for r in attention_resolutions.split(",") if r.strip()]
    else:
        res = [int(r) for r in attention_resolutions]
    for r in res:
        if r <= 0 or image_size % r:
            raise ValueError(f"attention resolution {r} does not divide image_size {image_size}")
    return [image_size // r for r in res]


def unet_from_config(config: Mapping[str, Any]) -> UNetModel:
    """A `UNetModel` from guided-diffusion's argument names (`create_model`'s, see UNET_DEFAULTS).

    Missing keys take guided-diffusion's defaults; unknown keys are an error. `use_fp16` is
    ignored (run under `torch.autocast` instead). Class-conditional models are not supported.
    Parameters get PyTorch's default init (global RNG): build on the meta device and fill them
    (from a checkpoint or `random_init_`) to avoid that.
    """
    unknown = sorted(set(config) - set(UNET_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown UNet config keys {unknown}; known keys: {sorted(UNET_DEFAULTS)}")
    cfg = {**UNET_DEFAULTS, **config}
    if cfg["class_cond"]:
        raise NotImplementedError(
            "class_cond=True (class-conditional ADM with label embeddings) is not supported; "
            "only unconditional models are"
        )
    image_size = int(cfg["image_size"])
    channels = int(cfg["in_channels"])
    return UNetModel(
        image_size=image_size,
        in_channels=channels,
        model_channels=int(cfg["num_channels"]),
        out_channels=2 * channels if cfg["learn_sigma"] else channels,
        num_res_blocks=int(cfg["num_res_blocks"]),
        attention_ds=_parse_attention(cfg["attention_resolutions"], image_size),
        dropout=float(cfg["dropout"]),
        channel_mult=_parse_channel_mult(cfg["channel_mult"], image_size),
        use_checkpoint=bool(cfg["use_checkpoint"]),
        num_heads=int(cfg["num_heads"]),
        num_head_channels=int(cfg["num_head_channels"]),
        num_heads_upsample=int(cfg["num_heads_upsample"]),
        use_scale_shift_norm=bool(cfg["use_scale_shift_norm"]),
        resblock_updown=bool(cfg["resblock_updown"]),
        use_new_attention_order=bool(cfg["use_new_attention_order"]),
    )


@torch.no_grad()
def random_init_(module: nn.Module, generator: torch.Generator, gain: float = 1.0) -> nn.Module:
    """Fill every parameter with seeded random values, none zero; returns `module`.

    Weights ~ N(0, gain^2 / fan_in), biases ~ N(0, 0.1^2), norm scales ~ 1 + N(0, 0.1^2). Unlike
    training init nothing is zeroed, so outputs and input gradients are not trivially zero: for
    tests and benchmarks. Draws on the CPU from `generator` (a CPU generator), then copies.
    """
    for name, p in module.named_parameters():
        if p.is_meta:
            raise ValueError(f"parameter {name} is on the meta device: materialize it first")
        z = torch.randn(p.shape, generator=generator, dtype=torch.float32)
        if p.dim() > 1:
            z *= gain / math.sqrt(p[0].numel())
        elif name.endswith("weight"):
            z = 1 + 0.1 * z
        else:
            z *= 0.1
        p.copy_(z)
    return module
