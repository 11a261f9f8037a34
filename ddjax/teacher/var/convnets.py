"""The convolutional encoder and decoder of VAR's VQVAE (`models/basic_vae.py`), NHWC.

GroupNorm(32, eps 1e-6) and SiLU; ResNet blocks with a 1x1 `nin_shortcut` on width changes;
single-head attention with a fused 1x1 `qkv` conv at the lowest resolution and in the middle;
downsampling by a bottom/right zero pad and a stride-2 3x3 conv, upsampling by nearest 2x and a
3x3 conv. Module names follow the PyTorch attributes (`down.{l}.block.{b}`, `up.{l}.attn.{b}`,
`mid.block_1`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
NORM_GROUPS = 32  # VAR's `Normalize`: GroupNorm(32, eps 1e-6)
NORM_EPS = 1e-6


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm(32, C, eps=1e-6) on NHWC; statistics in float32."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, C] -> [B, H, W, C]."""
        scale = self.param("scale", nn.initializers.ones, (self.channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.channels,), self.param_dtype)
        b, h, w, c = x.shape
        xf = x.astype(jnp.float32).reshape(b, h, w, NORM_GROUPS, c // NORM_GROUPS)
        centred = xf - jnp.mean(xf, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(centred), axis=(1, 2, 4), keepdims=True)
        y = (centred * jax.lax.rsqrt(var + NORM_EPS)).reshape(b, h, w, c)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def conv2d(features: int, kernel: int, dtype: Dtype, param_dtype: Dtype, stride: int = 1,
          pad: int | None = None, name: str | None = None) -> nn.Conv:
    """torch's Conv2d(kernel, stride, padding=pad), padding kernel // 2 by default."""
    pad = kernel // 2 if pad is None else pad
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad),) * 2,
                   dtype=dtype, param_dtype=param_dtype, name=name)


class ResnetBlock(nn.Module):
    """norm1 -> silu -> conv1 -> norm2 -> silu -> conv2, plus a 1x1 `nin_shortcut` on a width change."""

    in_channels: int
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, in] -> [B, H, W, out]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = conv2d(self.out_channels, 3, **kw, name="conv1")(
            nn.silu(GroupNorm(self.in_channels, **kw, name="norm1")(x)))
        h = conv2d(self.out_channels, 3, **kw, name="conv2")(
            nn.silu(GroupNorm(self.out_channels, **kw, name="norm2")(h)))
        if self.in_channels != self.out_channels:
            x = conv2d(self.out_channels, 1, **kw, name="nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head attention over H*W with one fused 1x1 `qkv` conv (q | k | v), scale C^-1/2."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, C] -> [B, H, W, C]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = self.channels
        b, hh, ww, _ = x.shape
        qkv = conv2d(3 * c, 1, **kw, name="qkv")(GroupNorm(c, **kw, name="norm")(x))
        q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(b, hh * ww, c) for i in range(3))
        w = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32) * (int(c) ** -0.5)
        probs = jax.nn.softmax(w, axis=-1).astype(self.dtype)
        out = jnp.einsum("bij,bjc->bic", probs, v).reshape(b, hh, ww, c)
        return x + conv2d(c, 1, **kw, name="proj_out")(out)


class Resample(nn.Module):
    """down: pad one row/column bottom/right, 3x3 stride-2 conv; up: nearest 2x, 3x3 conv."""

    channels: int
    up: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, C] -> [B, 2H, 2W, C] (up) or [B, H/2, W/2, C] (down)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name="conv")
        if self.up:
            return conv2d(self.channels, 3, **kw)(jnp.repeat(jnp.repeat(x, 2, 1), 2, 2))
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv2d(self.channels, 3, stride=2, pad=0, **kw)(x)


class Level(nn.Module):
    """One resolution: `block_i` ResNet blocks (each followed by `attn_i` when with_attn), then
    an optional `downsample`/`upsample` (torch's `down[l]` / `up[l]`)."""

    in_channels: int
    out_channels: int
    num_blocks: int
    with_attn: bool
    resample: str | None  # None | "downsample" | "upsample"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ins = [self.in_channels] + [self.out_channels] * (self.num_blocks - 1)
        self.block = [ResnetBlock(i, self.out_channels, **kw) for i in ins]
        self.attn = [AttnBlock(self.out_channels, **kw) for _ in ins] if self.with_attn else []
        if self.resample == "downsample":
            self.downsample = Resample(self.out_channels, up=False, **kw)
        elif self.resample == "upsample":
            self.upsample = Resample(self.out_channels, up=True, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, block in enumerate(self.block):
            x = block(x)
            if self.attn:
                x = self.attn[i](x)
        if self.resample == "downsample":
            x = self.downsample(x)
        elif self.resample == "upsample":
            x = self.upsample(x)
        return x


class Mid(nn.Module):
    """`mid.block_1 -> attn_1 -> block_2` at constant width (attn_1 is the identity when off)."""

    channels: int
    with_attn: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.block_1 = ResnetBlock(self.channels, self.channels, **kw)
        if self.with_attn:
            self.attn_1 = AttnBlock(self.channels, **kw)
        self.block_2 = ResnetBlock(self.channels, self.channels, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.block_1(x)
        if self.with_attn:
            x = self.attn_1(x)
        return self.block_2(x)


class Encoder(nn.Module):
    """images [B, H, W, in_channels] -> [B, H/f, W/f, z_channels]."""

    config: Any  # ddjax.teacher.var.vqvae.VQVAEConfig (which imports this module)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        h = conv2d(c.ch, 3, **kw, name="conv_in")(x.astype(c.dtype))
        in_mult = (1,) + c.ch_mult
        last = len(c.ch_mult) - 1
        for i, m in enumerate(c.ch_mult):
            h = Level(c.ch * in_mult[i], c.ch * m, c.num_res_blocks, i == last and c.using_sa,
                      None if i == last else "downsample", **kw, name=f"down_{i}")(h)
        width = c.ch * c.ch_mult[-1]
        h = Mid(width, c.using_mid_sa, **kw, name="mid")(h)
        h = nn.silu(GroupNorm(width, **kw, name="norm_out")(h))
        return conv2d(c.z_channels, 3, **kw, name="conv_out")(h)


class Decoder(nn.Module):
    """[B, h, w, z_channels] -> images [B, h*f, w*f, in_channels] float32 (not clamped)."""

    config: Any  # ddjax.teacher.var.vqvae.VQVAEConfig (which imports this module)

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        width = c.ch * c.ch_mult[-1]
        h = conv2d(width, 3, **kw, name="conv_in")(z.astype(c.dtype))
        h = Mid(width, c.using_mid_sa, **kw, name="mid")(h)
        last = len(c.ch_mult) - 1
        for level in reversed(range(len(c.ch_mult))):  # torch's up[level], lowest resolution first
            out = c.ch * c.ch_mult[level]
            h = Level(width, out, c.num_res_blocks + 1, level == last and c.using_sa,
                      "upsample" if level else None, **kw, name=f"up_{level}")(h)
            width = out
        h = nn.silu(GroupNorm(width, **kw, name="norm_out")(h))
        return conv2d(c.in_channels, 3, **kw, name="conv_out")(h).astype(jnp.float32)


__all__ = ["conv2d", "GroupNorm", "ResnetBlock", "AttnBlock", "Resample", "Level", "Mid", "Encoder",
           "Decoder"]
