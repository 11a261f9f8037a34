"""LlamaGen's VQ image tokenizer (`tokenizer/tokenizer_image/vq_model.py`) in Flax Linen.

A convolutional encoder/decoder (taming-transformers style: GroupNorm(32), swish, ResNet
blocks, single-head attention at the lowest resolution) around an l2-normalised codebook.
Images are NHWC in [-1, 1]; latents are NHWC [B, h, w, d]; token ids are row-major [B, h*w]
(the order LlamaGen's GPT reads them).

    cfg = vq_config("VQ-16")
    params = load_vq("vq_ds16_c2i.pt", cfg)
    ids = encode(params, cfg, images)                # [B, 256] for 256x256 images
    images = decode_ids(params, cfg, ids)            # [B, 256, 256, 3]

Module and parameter names follow the PyTorch modules (`encoder.conv_blocks.0.res.1.norm1`,
`quantize.embedding`, ...) so that checkpoints convert by `ddjax.utils.state_dict`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddjax.teacher.llamagen.gpt import as_dtype

Dtype = Any
NORM_GROUPS = 32  # LlamaGen's `Normalize`: GroupNorm(32 groups, eps 1e-6)
NORM_EPS = 1e-6

# name -> channel multipliers per resolution (encoder and decoder alike).
VARIANTS: dict[str, tuple[int, ...]] = {
    "VQ-16": (1, 1, 2, 2, 4),  # 16x downsampling, 72M parameters
    "VQ-8": (1, 2, 2, 4),  # 8x downsampling
}


@dataclasses.dataclass(frozen=True)
class VQConfig:
    """LlamaGen VQ `ModelArgs` plus the Encoder/Decoder constructor arguments and dtypes."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    encoder_ch_mult: tuple[int, ...] = VARIANTS["VQ-16"]
    decoder_ch_mult: tuple[int, ...] = VARIANTS["VQ-16"]
    z_channels: int = 256
    ch: int = 128
    num_res_blocks: int = 2
    dropout_p: float = 0.0
    in_channels: int = 3
    out_channels: int = 3
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            mult = tuple(int(m) for m in getattr(self, name))
            if not mult or any(m <= 0 for m in mult):
                raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {mult}")
            object.__setattr__(self, name, mult)
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError(
                f"encoder_ch_mult {self.encoder_ch_mult} and decoder_ch_mult "
                f"{self.decoder_ch_mult} must have the same length (same down/upsampling factor)"
            )
        widths = {self.ch} | {self.ch * m for m in self.encoder_ch_mult + self.decoder_ch_mult}
        bad = sorted(w for w in widths if w % NORM_GROUPS)
        if bad:
            raise ValueError(
                f"GroupNorm uses {NORM_GROUPS} groups, so every width ch * mult must be divisible "
                f"by {NORM_GROUPS}; ch={self.ch} with these multipliers gives {bad}"
            )
        for name in ("codebook_size", "codebook_embed_dim", "z_channels", "num_res_blocks",
                     "in_channels", "out_channels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got {self.dropout_p}")
        object.__setattr__(self, "dtype", as_dtype(self.dtype))
        object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype))

    @property
    def downsample_factor(self) -> int:
        """Image pixels per token along each side (16 for VQ-16)."""
        return 2 ** (len(self.encoder_ch_mult) - 1)


def vq_config(variant: str = "VQ-16", **overrides: Any) -> VQConfig:
    """A config for a named LlamaGen tokenizer (`VARIANTS`).

    e.g. vq_config("VQ-16"), vq_config("VQ-8", dtype="bfloat16").
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown VQ variant {variant!r}; choose one of {sorted(VARIANTS)}")
    mult = VARIANTS[variant]
    base: dict[str, Any] = dict(encoder_ch_mult=mult, decoder_ch_mult=mult)
    base.update(overrides)
    unknown = set(base) - {f.name for f in dataclasses.fields(VQConfig)}
    if unknown:
        raise ValueError(f"unknown VQ config fields: {sorted(unknown)}")
    return VQConfig(**base)


# -- layers -------------------------------------------------------------------------------------
class GroupNorm(nn.Module):
    """torch.nn.GroupNorm(32, C, eps=1e-6) on NHWC: statistics over (H, W, C/32) in float32."""

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
        mean = jnp.mean(xf, axis=(1, 2, 4), keepdims=True)
        centred = xf - mean
        var = jnp.mean(jnp.square(centred), axis=(1, 2, 4), keepdims=True)
        y = (centred * jax.lax.rsqrt(var + NORM_EPS)).reshape(b, h, w, c)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def _conv(features: int, kernel: int, dtype: Dtype, param_dtype: Dtype, stride: int = 1,
          pad: int | None = None, name: str | None = None) -> nn.Conv:
    """torch's Conv2d(kernel, stride, padding=pad), padding kernel // 2 by default."""
    pad = kernel // 2 if pad is None else pad
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad),) * 2,
                   dtype=dtype, param_dtype=param_dtype, name=name)


class ResnetBlock(nn.Module):
    """norm1 -> swish -> conv1 -> norm2 -> swish -> dropout -> conv2, plus a (1x1) shortcut."""

    in_channels: int
    out_channels: int
    dropout_p: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x [B, H, W, in_channels] -> [B, H, W, out_channels]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.swish(GroupNorm(self.in_channels, **kw, name="norm1")(x))
        h = _conv(self.out_channels, 3, **kw, name="conv1")(h)
        h = nn.swish(GroupNorm(self.out_channels, **kw, name="norm2")(h))
        h = nn.Dropout(self.dropout_p, deterministic=not train)(h)
        h = _conv(self.out_channels, 3, **kw, name="conv2")(h)
        if self.in_channels != self.out_channels:
            x = _conv(self.out_channels, 1, **kw, name="nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (1x1-conv q/k/v, scale C^-0.5)."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, C] -> [B, H, W, C]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = self.channels
        h = GroupNorm(c, **kw, name="norm")(x)
        b, hh, ww, _ = h.shape
        q, k, v = (_conv(c, 1, **kw, name=n)(h).reshape(b, hh * ww, c) for n in ("q", "k", "v"))
        logits = jnp.einsum("bic,bjc->bij", q, k).astype(jnp.float32) * (c ** -0.5)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bij,bjc->bic", probs, v).reshape(b, hh, ww, c)
        return x + _conv(c, 1, **kw, name="proj_out")(out)


class Resample(nn.Module):
    """`downsample`: zero-pad one row/column at the bottom/right, 3x3 stride-2 conv (H -> H/2).
    `upsample`: nearest-neighbour 2x, 3x3 conv (H -> 2H). x [B, H, W, C] -> [B, H', W', C]."""

    channels: int
    up: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name="conv")
        if self.up:
            return _conv(self.channels, 3, **kw)(jnp.repeat(jnp.repeat(x, 2, 1), 2, 2))
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.channels, 3, stride=2, pad=0, **kw)(x)


class Level(nn.Module):
    """One resolution of the encoder or decoder (torch's anonymous `conv_block`).

    `res_i` ResNet blocks, each followed by `attn_i` when `with_attn`, then an optional
    `downsample` or `upsample`.
    """

    in_channels: int
    out_channels: int
    num_blocks: int
    with_attn: bool
    resample: str | None  # None | "downsample" | "upsample"
    dropout_p: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ins = [self.in_channels] + [self.out_channels] * (self.num_blocks - 1)
        self.res = [ResnetBlock(i, self.out_channels, self.dropout_p, **kw) for i in ins]
        self.attn = [AttnBlock(self.out_channels, **kw)
                     for _ in range(self.num_blocks if self.with_attn else 0)]
        if self.resample == "downsample":
            self.downsample = Resample(self.out_channels, up=False, **kw)
        elif self.resample == "upsample":
            self.upsample = Resample(self.out_channels, up=True, **kw)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x [B, H, W, in_channels] -> [B, H', W', out_channels] (H' = H/2, H or 2H)."""
        for i, block in enumerate(self.res):
            x = block(x, train)
            if self.attn:
                x = self.attn[i](x)
        if self.resample == "downsample":
            x = self.downsample(x)
        elif self.resample == "upsample":
            x = self.upsample(x)
        return x


def _mid(h: jax.Array, config: VQConfig, train: bool) -> jax.Array:
    """`mid.0..2`: ResNet block, attention, ResNet block at constant width (call in compact)."""
    kw = dict(dtype=config.dtype, param_dtype=config.param_dtype)
    c = h.shape[-1]
    h = ResnetBlock(c, c, config.dropout_p, **kw, name="mid_0")(h, train)
    h = AttnBlock(c, **kw, name="mid_1")(h)
    return ResnetBlock(c, c, config.dropout_p, **kw, name="mid_2")(h, train)


class Encoder(nn.Module):
    """Images [B, H, W, in_channels] -> [B, H/f, W/f, z_channels], f = config.downsample_factor."""

    config: VQConfig

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = self.config
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        mult = c.encoder_ch_mult
        h = _conv(c.ch, 3, **kw, name="conv_in")(x.astype(c.dtype))
        in_mult = (1,) + mult
        last = len(mult) - 1
        for i, m in enumerate(mult):
            h = Level(c.ch * in_mult[i], c.ch * m, c.num_res_blocks, with_attn=i == last,
                      resample=None if i == last else "downsample", dropout_p=c.dropout_p, **kw,
                      name=f"conv_blocks_{i}")(h, train)
        width = c.ch * mult[-1]
        h = _mid(h, c, train)
        h = nn.swish(GroupNorm(width, **kw, name="norm_out")(h))
        return _conv(c.z_channels, 3, **kw, name="conv_out")(h)


class Decoder(nn.Module):
    """[B, h, w, z_channels] -> images [B, h*f, w*f, out_channels] (float32)."""

    config: VQConfig

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        c = self.config
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        mult = c.decoder_ch_mult
        width = c.ch * mult[-1]
        h = _conv(width, 3, **kw, name="conv_in")(z.astype(c.dtype))
        h = _mid(h, c, train)
        # Lowest resolution first; torch's conv_blocks[j] is level len(mult) - 1 - j.
        for j, level in enumerate(reversed(range(len(mult)))):
            out = c.ch * mult[level]
            h = Level(width, out, c.num_res_blocks + 1, with_attn=j == 0,
                      resample="upsample" if level != 0 else None, dropout_p=c.dropout_p, **kw,
                      name=f"conv_blocks_{j}")(h, train)
            width = out
        h = nn.swish(GroupNorm(width, **kw, name="norm_out")(h))
        return _conv(c.out_channels, 3, **kw, name="conv_out")(h).astype(jnp.float32)


def _l2_normalize(x: jax.Array) -> jax.Array:
    """torch.nn.functional.normalize(x, dim=-1): x / max(||x||, 1e-12)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, 1e-12)


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantisation (l2-normalised vectors when codebook_l2_norm)."""

    config: VQConfig

    def setup(self):
        c = self.config
        # LlamaGen: uniform(+-1/K), then l2-normalised (see `init_params`).
        init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -1 / shape[0],
                                                            1 / shape[0])
        self.embedding = nn.Embed(c.codebook_size, c.codebook_embed_dim, embedding_init=init,
                                  param_dtype=c.param_dtype)

    def codebook(self) -> jax.Array:
        """The code vectors as the quantiser compares them, float32 [K, d]."""
        table = self.embedding.embedding.astype(jnp.float32)
        return _l2_normalize(table) if self.config.codebook_l2_norm else table

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """z [B, h, w, d] -> (z, normalised if l2; z_q [B, h, w, d]; ids [B, h*w] int32)."""
        z = z.astype(jnp.float32)
        if self.config.codebook_l2_norm:
            z = _l2_normalize(z)
        codes = self.codebook()
        flat = z.reshape(-1, z.shape[-1])
        dots = jnp.einsum("nd,kd->nk", flat, codes, precision=jax.lax.Precision.HIGHEST)
        dist = (jnp.sum(flat**2, axis=1, keepdims=True) + jnp.sum(codes**2, axis=1)[None, :]
                - 2.0 * dots)
        ids = jnp.argmin(dist, axis=1).astype(jnp.int32)
        z_q = codes[ids].reshape(z.shape)
        return z, z_q, ids.reshape(z.shape[0], -1)


# -- the model ----------------------------------------------------------------------------------
class VQModel(nn.Module):
    """LlamaGen's `VQModel`: encoder -> quant_conv -> quantize -> post_quant_conv -> decoder."""

    config: VQConfig

    def setup(self):
        c = self.config
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quantize_ = VectorQuantizer(c, name="quantize")
        self.quant_conv = _conv(c.codebook_embed_dim, 1, **kw)
        self.post_quant_conv = _conv(c.z_channels, 1, **kw)

    def encode_latents(self, images: jax.Array, train: bool = False) -> jax.Array:
        """images [B, H, W, C] in [-1, 1] -> pre-quantisation latents [B, H/f, W/f, d], float32."""
        return self.quant_conv(self.encoder(images, train)).astype(jnp.float32)

    def quantize(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        """latents [B, h, w, d] -> (code vectors z_q [B, h, w, d], ids [B, h*w] int32)."""
        _, z_q, ids = self.quantize_(z)
        return z_q, ids

    def codebook(self) -> jax.Array:
        """[K, d] float32, l2-normalised when codebook_l2_norm."""
        return self.quantize_.codebook()

    def encode(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] in [-1, 1] -> token ids [B, (H/f) * (W/f)] int32, row-major."""
        return self.quantize(self.encode_latents(images))[1]

    def decode_latents(self, z: jax.Array, train: bool = False) -> jax.Array:
        """Continuous latents [B, h, w, d] (not snapped) -> images [B, h*f, w*f, C] float32."""
        return self.decoder(self.post_quant_conv(z.astype(self.config.dtype)), train)

    def decode_ids(self, ids: jax.Array) -> jax.Array:
        """ids [B, h*w] (square grid) or [B, h, w] -> images [B, h*f, w*f, C] float32."""
        if ids.ndim == 2:
            n = ids.shape[1]
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"{n} tokens per image is not a square grid; pass [B, h, w] ids")
            ids = ids.reshape(ids.shape[0], side, side)
        elif ids.ndim != 3:
            raise ValueError(f"ids must be [B, h*w] or [B, h, w], got shape {ids.shape}")
        return self.decode_latents(self.codebook()[ids])

    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Reconstruction [B, H, W, C] float32 through the quantiser (straight-through gradient)."""
        z, z_q, _ = self.quantize_(self.encode_latents(images, train))
        return self.decode_latents(z + jax.lax.stop_gradient(z_q - z), train)


def _host_init(flat: dict[tuple[str, ...], Any], l2_norm: bool, key_data: Any) -> list[Any]:
    """numpy draws for `init_params`: kernels N(0, 1/fan_in), codebook as the module's init."""
    rng = np.random.default_rng(np.asarray(key_data, np.uint32).ravel().tolist())
    out = []
    for p, x in flat.items():
        if p[-1] == "kernel":
            fan_in = math.prod(x.shape[:-1])
            value = rng.standard_normal(x.shape, np.float32) / np.float32(math.sqrt(fan_in))
        elif p[-1] == "embedding":
            value = rng.uniform(-1.0 / x.shape[0], 1.0 / x.shape[0], x.shape).astype(np.float32)
            if l2_norm:
                value /= np.maximum(np.linalg.norm(value, axis=-1, keepdims=True), 1e-12)
        else:  # GroupNorm scale -> 1, biases -> 0
            value = np.full(x.shape, 1.0 if p[-1] == "scale" else 0.0, np.float32)
        out.append(value.astype(x.dtype))
    return out


def init_params(config: VQConfig, rng: jax.Array, image_size: int | None = None) -> Any:
    """Random parameters: conv kernels N(0, 1/fan_in), GroupNorm (1, 0), biases 0, and the
    codebook uniform(+-1/K) (l2-normalised when codebook_l2_norm), as LlamaGen initialises it.

    The shapes come from `jax.eval_shape` (traced on [1, S, S, C] images, S = 2 *
    downsample_factor by default); the values are drawn on the host in one callback, since
    compiling one PRNG kernel per tensor takes far longer than drawing VQ-16's 72M numbers.
    Under `jax.eval_shape` nothing is drawn.
    """
    size = image_size or 2 * config.downsample_factor
    images = jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)
    template = jax.eval_shape(VQModel(config).init, jax.random.PRNGKey(0), images)["params"]
    flat = traverse_util.flatten_dict(template)
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in flat.values()]
    values = jax.pure_callback(functools.partial(_host_init, flat, config.codebook_l2_norm),
                               shapes, rng)
    return traverse_util.unflatten_dict(dict(zip(flat, values, strict=True)))


@functools.partial(jax.jit, static_argnames=("config",))
def encode(params: Any, config: VQConfig, images: jax.Array) -> jax.Array:
    """images [B, H, W, C] in [-1, 1] -> ids [B, h*w] int32 (jitted)."""
    return VQModel(config).apply({"params": params}, images, method=VQModel.encode)


@functools.partial(jax.jit, static_argnames=("config",))
def decode_ids(params: Any, config: VQConfig, ids: jax.Array) -> jax.Array:
    """ids [B, h*w] or [B, h, w] -> images [B, H, W, C] float32 (jitted)."""
    return VQModel(config).apply({"params": params}, ids, method=VQModel.decode_ids)


@functools.partial(jax.jit, static_argnames=("config",))
def decode_latents(params: Any, config: VQConfig, z: jax.Array) -> jax.Array:
    """Continuous latents [B, h, w, d] -> images [B, H, W, C] float32 (jitted)."""
    return VQModel(config).apply({"params": params}, z, method=VQModel.decode_latents)


__all__ = ["VARIANTS", "VQConfig", "VQModel", "vq_config", "init_params", "encode", "decode_ids",
           "decode_latents"]
