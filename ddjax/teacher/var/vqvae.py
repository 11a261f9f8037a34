"""VAR's multi-scale VQVAE (`models/vqvae.py`, `quant.py`, `basic_vae.py`) in Flax Linen.

A taming-style conv encoder/decoder around a residual quantiser over a pyramid of scales
(`patch_nums`, 1x1 up to the full latent grid). Scale si quantises the area-downsampled
residual against a raw (not normalised) codebook; its code map is bicubic-upsampled to the full
grid, passed through one of the shared 3x3 convolutions phi (`quant_resi`), added to f_hat and
subtracted from the residual. Images are NHWC in [-1, 1], latents NHWC [B, h, w, Cvae], and the
ids of one scale are row-major [B, pn * pn].

    cfg = vqvae_config()                                   # vae_ch160v4096z32
    params = load_vqvae("vae_ch160v4096z32.pth", cfg)
    ids = img_to_idxBl(params, cfg, images)                # 10 arrays [B, pn^2]
    x = idxBl_to_var_input(params, cfg, ids)               # [B, 679, 32] teacher forcing input
    images = idxBl_to_img(params, cfg, ids)                # [B, 256, 256, 3] in [-1, 1]

Parameter names follow the PyTorch modules (`encoder.down.0.block.1.norm1`,
`quantize.quant_resi.qresi_ls.2`, ...); `mid.block_1/attn_1/block_2` are the one place where
the Flax path needs the explicit renaming of `var_torch_key`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddjax.teacher.var.convnets import NORM_GROUPS, Decoder, Encoder, conv2d
from ddjax.teacher.var.resize import area, bicubic
from ddjax.utils.state_dict import torch_key

Dtype = Any
DEFAULT_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name: Any) -> Any:
    """'float32' | 'bfloat16' | 'float16' (or a dtype) -> jnp dtype."""
    if isinstance(name, str):
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}")
        return _DTYPES[name]
    return name


def phi_ticks(count: int) -> np.ndarray:
    """VAR's `PhiPartiallyShared.ticks` for `count` phi layers, float64."""
    if count == 4:
        return np.linspace(1 / 3 / count, 1 - 1 / 3 / count, count)
    return np.linspace(1 / 2 / count, 1 - 1 / 2 / count, count)


def phi_table(num_scales: int, count: int) -> tuple[int, ...]:
    """Which phi serves each scale: argmin |ticks - si / (S - 1)|, in float64 as VAR does.

    For S = 10 and 4 phis this is (0, 0, 1, 1, 1, 2, 2, 3, 3, 3); si = 2 and 7 are ties in the
    reals that float64 rounding breaks (float32 would give phi 2 at si = 7).
    """
    if num_scales < 2:
        raise ValueError(f"VAR needs at least 2 scales (it divides by S - 1), got {num_scales}")
    if count <= 1:
        return (0,) * num_scales
    ticks = phi_ticks(count)
    return tuple(int(np.argmin(np.abs(ticks - si / (num_scales - 1)))) for si in range(num_scales))


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
    """VAR's `VQVAE` constructor arguments (+ the encoder/decoder shape VAR hard-codes)."""

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    using_sa: bool = True
    using_mid_sa: bool = True
    using_znorm: bool = False
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    default_qresi_counts: int = 0
    patch_nums: tuple[int, ...] = DEFAULT_PATCH_NUMS
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("ch_mult", "patch_nums"):
            value = tuple(int(v) for v in getattr(self, name))
            if not value or any(v <= 0 for v in value):
                raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {value}")
            object.__setattr__(self, name, value)
        if len(self.patch_nums) < 2:
            raise ValueError(f"patch_nums needs at least 2 scales, got {self.patch_nums}")
        if list(self.patch_nums) != sorted(self.patch_nums):
            raise ValueError(f"patch_nums must grow from small to large, got {self.patch_nums}")
        bad = sorted({self.ch * m for m in (1,) + self.ch_mult if (self.ch * m) % NORM_GROUPS})
        if bad:
            raise ValueError(f"GroupNorm uses {NORM_GROUPS} groups: every width ch * mult must be "
                             f"divisible by {NORM_GROUPS}; ch={self.ch} gives {bad}")
        for name in ("vocab_size", "z_channels", "num_res_blocks", "in_channels", "quant_conv_ks"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.quant_conv_ks % 2 == 0:
            raise ValueError(f"quant_conv_ks must be odd, got {self.quant_conv_ks}")
        if self.share_quant_resi < 0 or self.default_qresi_counts < 0:
            raise ValueError("share_quant_resi and default_qresi_counts must be >= 0")
        object.__setattr__(self, "dtype", as_dtype(self.dtype))
        object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype))

    @property
    def downsample(self) -> int:
        """Image pixels per latent cell along each side (16 for ch_mult of length 5)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        """The full latent grid: patch_nums[-1]."""
        return self.patch_nums[-1]

    @property
    def image_size(self) -> int:
        return self.latent_size * self.downsample

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def seq_len(self) -> int:
        """L = sum of pn^2 (680 for the default patch_nums)."""
        return sum(p * p for p in self.patch_nums)

    @property
    def begin_ends(self) -> tuple[tuple[int, int], ...]:
        """(start, end) of each scale's tokens in the concatenated sequence."""
        out, cur = [], 0
        for p in self.patch_nums:
            out.append((cur, cur + p * p))
            cur += p * p
        return tuple(out)

    @property
    def num_phi(self) -> int:
        """Number of phi convolutions (0 when quant_resi is ~0: phi is the identity)."""
        if abs(self.quant_resi) <= 1e-6:
            return 0
        if self.share_quant_resi == 0:
            return self.default_qresi_counts or self.num_scales
        return self.share_quant_resi

    @property
    def phi_index(self) -> tuple[int, ...]:
        """The phi used by each scale (see `phi_table`)."""
        return phi_table(self.num_scales, max(self.num_phi, 1))


def vqvae_config(**overrides: Any) -> VQVAEConfig:
    """`vae_ch160v4096z32` (VAR's released tokenizer) with field overrides."""
    unknown = set(overrides) - {f.name for f in dataclasses.fields(VQVAEConfig)}
    if unknown:
        raise ValueError(f"unknown VQVAE config fields: {sorted(unknown)}")
    return VQVAEConfig(**overrides)


_MID_KEY = re.compile(r"(^|\.)mid\.(block|attn)\.(\d)(?=\.)")


def var_torch_key(path: tuple[str, ...]) -> str:
    """Flax path -> VAR state-dict key: the generic rule, with `mid.block_1` etc. kept whole."""
    return _MID_KEY.sub(r"\1mid.\2_\3", torch_key(path))


class Phi(nn.Module):
    """quant_resi: (1 - r) h + r conv3x3(h), in float32 (a Conv2d subclass in VAR: its `weight`
    and `bias` sit directly on the module)."""

    channels: int
    ratio: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        """h [B, H, W, C] -> [B, H, W, C] float32."""
        c = self.channels
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, c, c), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        h = h.astype(jnp.float32)
        conv = jax.lax.conv_general_dilated(
            h, kernel.astype(jnp.float32), (1, 1), ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST,
        ) + bias.astype(jnp.float32)
        r = abs(self.ratio)
        return h * np.float32(1 - r) + conv * np.float32(r)


class Quantizer(nn.Module):
    """VAR's `VectorQuantizer2`: the codebook `embedding` and the phi convolutions."""

    config: VQVAEConfig

    def setup(self):
        c = self.config
        self.embedding = nn.Embed(c.vocab_size, c.z_channels, param_dtype=c.param_dtype)
        n = c.num_phi
        if n and c.share_quant_resi == 1:
            self.quant_resi = PhiShared(c.z_channels, c.quant_resi, c.param_dtype)
        elif n and c.share_quant_resi == 0:
            self.quant_resi = [Phi(c.z_channels, c.quant_resi, c.param_dtype) for _ in range(n)]
        elif n:
            self.quant_resi = PhiList(c.z_channels, c.quant_resi, n, c.param_dtype)

    def codebook(self) -> jax.Array:
        """[V, Cvae] float32."""
        return jnp.asarray(self.embedding.embedding, jnp.float32)

    def phi_k(self, h: jax.Array, k: int) -> jax.Array:
        """The k-th phi (static) on h [B, H, W, Cvae] -> float32 (identity when there is none)."""
        c = self.config
        if not c.num_phi:
            return h.astype(jnp.float32)
        if c.share_quant_resi == 0:
            return self.quant_resi[k](h)
        return self.quant_resi(h, k)

    def phi(self, h: jax.Array, si: int) -> jax.Array:
        """The phi of scale si (static, chosen by `VQVAEConfig.phi_index`)."""
        return self.phi_k(h, self.config.phi_index[si])

    def __call__(self, h: jax.Array) -> jax.Array:  # for init: touches every parameter
        for k in range(max(self.config.num_phi, 1)):
            h = self.phi_k(h, k)
        return h + self.codebook()[0]


class PhiShared(nn.Module):
    """One phi for every scale (`quant_resi.qresi`)."""

    channels: int
    ratio: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, k: int) -> jax.Array:
        del k
        return Phi(self.channels, self.ratio, self.param_dtype, name="qresi")(h)


class PhiList(nn.Module):
    """`share_quant_resi` phis shared over the scales (`quant_resi.qresi_ls.{k}`)."""

    channels: int
    ratio: float
    count: int
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.qresi_ls = [Phi(self.channels, self.ratio, self.param_dtype) for _ in range(self.count)]

    def __call__(self, h: jax.Array, k: int) -> jax.Array:
        return self.qresi_ls[k](h)


# -- the model ----------------------------------------------------------------------------------
def split_scales(ids: jax.Array | Sequence[jax.Array], patch_nums: Sequence[int]) -> list[jax.Array]:
    """[B, L] concatenated ids (or a list of [B, pn^2]) -> a list of [B, pn^2], one per scale."""
    if isinstance(ids, (list, tuple)):
        parts = list(ids)
        if len(parts) != len(patch_nums):
            raise ValueError(f"expected {len(patch_nums)} scales of ids, got {len(parts)}")
    else:
        total = sum(p * p for p in patch_nums)
        if ids.ndim != 2 or ids.shape[1] != total:
            raise ValueError(f"ids must be [B, {total}] for patch_nums {tuple(patch_nums)}, "
                             f"got {ids.shape}")
        offsets = np.cumsum([0] + [p * p for p in patch_nums])
        parts = [ids[:, offsets[i]:offsets[i + 1]] for i in range(len(patch_nums))]
    for p, part in zip(patch_nums, parts, strict=True):
        if part.shape[1] != p * p:
            raise ValueError(f"a scale with patch_num {p} needs {p * p} ids, got {part.shape}")
    return parts


class VQVAE(nn.Module):
    """encoder -> quant_conv -> residual multi-scale quantiser -> post_quant_conv -> decoder."""

    config: VQVAEConfig

    def setup(self):
        c = self.config
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quantize = Quantizer(c)
        self.quant_conv = conv2d(c.z_channels, c.quant_conv_ks, **kw)
        self.post_quant_conv = conv2d(c.z_channels, c.quant_conv_ks, **kw)

    # -- pieces -------------------------------------------------------------------------------
    def encode_f(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] in [-1, 1] -> f = quant_conv(encoder(x)) [B, h, w, Cvae] float32."""
        return self.quant_conv(self.encoder(images)).astype(jnp.float32)

    def codebook(self) -> jax.Array:
        """[V, Cvae] float32."""
        return self.quantize.codebook()

    def embed(self, ids: jax.Array) -> jax.Array:
        """One scale's ids [B, pn^2] (row-major) -> code map [B, pn, pn, Cvae] float32."""
        b, n = ids.shape
        pn = int(round(n ** 0.5))
        return jnp.take(self.codebook(), ids, axis=0).reshape(b, pn, pn, -1)

    def nearest(self, z: jax.Array) -> jax.Array:
        """z [N, Cvae] -> nearest code ids [N] int32 (||z||^2 + ||e||^2 - 2 z.e, first minimum)."""
        codes = self.codebook()
        z = z.astype(jnp.float32)
        if self.config.using_znorm:
            zn = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
            en = codes / jnp.maximum(jnp.linalg.norm(codes, axis=-1, keepdims=True), 1e-12)
            sim = jnp.einsum("nc,vc->nv", zn, en, precision=jax.lax.Precision.HIGHEST)
            return jnp.argmax(sim, axis=1).astype(jnp.int32)
        dots = jnp.einsum("nc,vc->nv", z, codes, precision=jax.lax.Precision.HIGHEST)
        dist = jnp.sum(z * z, axis=1, keepdims=True) + jnp.sum(codes * codes, axis=1) - 2.0 * dots
        return jnp.argmin(dist, axis=1).astype(jnp.int32)

    def scale_residual(self, code_map: jax.Array, si: int) -> jax.Array:
        """phi_si(bicubic(code map, full size)): what scale si adds to f_hat, [B, H, W, Cvae]."""
        c = self.config
        h = code_map if si == c.num_scales - 1 else bicubic(code_map, c.latent_size)
        return self.quantize.phi(h, si)

    # -- VAR's API ----------------------------------------------------------------------------
    def f_to_idxBl_or_fhat(self, f: jax.Array, to_fhat: bool = False) -> list[jax.Array]:
        """Residual quantisation of f [B, H, W, Cvae] (H = W = patch_nums[-1]).

        Returns per scale the ids [B, pn^2] int32, or (to_fhat) the running f_hat [B, H, W, Cvae].
        """
        c = self.config
        b, hh, ww, cv = f.shape
        if hh != c.latent_size or ww != c.latent_size:
            raise ValueError(f"f is {hh}x{ww}; patch_nums {c.patch_nums} end at {c.latent_size}")
        f_rest = f.astype(jnp.float32)
        f_hat = jnp.zeros_like(f_rest)
        out = []
        for si, pn in enumerate(c.patch_nums):
            z = f_rest if si == c.num_scales - 1 else area(f_rest, pn)
            ids = self.nearest(z.reshape(-1, cv)).reshape(b, pn * pn)
            h = self.scale_residual(self.embed(ids), si)
            f_hat = f_hat + h
            f_rest = f_rest - h
            out.append(f_hat if to_fhat else ids)
        return out

    def img_to_idxBl(self, images: jax.Array) -> list[jax.Array]:
        """images [B, H, W, 3] in [-1, 1] -> per scale ids [B, pn^2] int32."""
        return self.f_to_idxBl_or_fhat(self.encode_f(images), to_fhat=False)

    def idxBl_to_fhat(self, ids: jax.Array | Sequence[jax.Array]) -> jax.Array:
        """Per-scale ids (list or [B, L]) -> f_hat [B, H, W, Cvae] float32 (`embed_to_fhat`)."""
        c = self.config
        parts = split_scales(ids, c.patch_nums)
        f_hat = 0.0
        for si, part in enumerate(parts):
            f_hat = f_hat + self.scale_residual(self.embed(part), si)
        return f_hat

    def fhat_to_img(self, f_hat: jax.Array) -> jax.Array:
        """f_hat [B, H, W, Cvae] -> images [B, H*f, W*f, 3] float32, clamped to [-1, 1]."""
        return jnp.clip(self.decoder(self.post_quant_conv(f_hat.astype(self.config.dtype))), -1, 1)

    def idxBl_to_img(self, ids: jax.Array | Sequence[jax.Array]) -> jax.Array:
        """Per-scale ids -> images [B, H, W, 3] in [-1, 1] (`idxBl_to_img(same_shape=True,
        last_one=True)`)."""
        return self.fhat_to_img(self.idxBl_to_fhat(ids))

    def idxBl_to_var_input(self, ids: jax.Array | Sequence[jax.Array]) -> jax.Array:
        """Teacher-forcing input: per-scale ids -> [B, L - pn_0^2, Cvae] float32.

        For si < S-1: f_hat += phi_si(bicubic(E[ids_si])), then emit area(f_hat, pn_{si+1}).
        """
        c = self.config
        parts = split_scales(ids, c.patch_nums)
        b = parts[0].shape[0]
        f_hat = jnp.zeros((b, c.latent_size, c.latent_size, c.z_channels), jnp.float32)
        nxt = []
        for si in range(c.num_scales - 1):
            f_hat, x = self.next_input(si, f_hat, self.embed(parts[si]))
            nxt.append(x.reshape(b, -1, c.z_channels))
        return jnp.concatenate(nxt, axis=1)

    def latents_to_var_input(self, latents: jax.Array) -> jax.Array:
        """`idxBl_to_var_input` of continuous tokens: latents [B, L, Cvae] (scales concatenated,
        codes or off-codebook vectors) -> [B, L - pn_0^2, Cvae] float32. Scale si+1's rows
        depend on the latents of scales <= si only."""
        c = self.config
        b = latents.shape[0]
        if latents.ndim != 3 or latents.shape[1] != c.seq_len:
            raise ValueError(f"latents must be [B, {c.seq_len}, Cvae], got {latents.shape}")
        f_hat = jnp.zeros((b, c.latent_size, c.latent_size, c.z_channels), jnp.float32)
        nxt = []
        for si in range(c.num_scales - 1):
            a, e = c.begin_ends[si]
            pn = c.patch_nums[si]
            code_map = latents[:, a:e].reshape(b, pn, pn, -1).astype(jnp.float32)
            f_hat, x = self.next_input(si, f_hat, code_map)
            nxt.append(x.reshape(b, -1, c.z_channels))
        return jnp.concatenate(nxt, axis=1)

    def next_input(self, si: int, f_hat: jax.Array, code_map: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`get_next_autoregressive_input`: add scale si's code map [B, pn, pn, Cvae] to f_hat.

        Returns (f_hat, area(f_hat, pn_{si+1}) [B, pn', pn', Cvae]), or (f_hat, f_hat) at the last
        scale.
        """
        c = self.config
        f_hat = f_hat + self.scale_residual(code_map, si)
        if si == c.num_scales - 1:
            return f_hat, f_hat
        return f_hat, area(f_hat, c.patch_nums[si + 1])

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstruction through the quantiser (used to create the parameters)."""
        f = self.encode_f(images)
        return self.fhat_to_img(self.quantize(f))


def init_params(config: VQVAEConfig, rng: jax.Array) -> Any:
    """Random parameters (Flax default initialisers; VAR only ships trained weights)."""
    size = config.downsample
    images = jnp.zeros((1, size, size, config.in_channels), jnp.float32)
    return VQVAE(config).init(rng, images)["params"]


def _method(name: str):
    fn = getattr(VQVAE, name)

    @functools.partial(jax.jit, static_argnames=("config",) + (("to_fhat",) if name ==
                                                                 "f_to_idxBl_or_fhat" else ()))
    def run(params: Any, config: VQVAEConfig, *args, **kwargs):
        return VQVAE(config).apply({"params": params}, *args, method=fn, **kwargs)

    run.__name__ = name
    run.__doc__ = f"`VQVAE.{name}` as a jitted function of (params, config, ...).\n\n{fn.__doc__}"
    return run


encode_f = _method("encode_f")
f_to_idxBl_or_fhat = _method("f_to_idxBl_or_fhat")
img_to_idxBl = _method("img_to_idxBl")
idxBl_to_fhat = _method("idxBl_to_fhat")
fhat_to_img = _method("fhat_to_img")
idxBl_to_img = _method("idxBl_to_img")
idxBl_to_var_input = _method("idxBl_to_var_input")


@functools.partial(jax.jit, static_argnames=("config", "si"))
def get_next_autoregressive_input(params: Any, config: VQVAEConfig, si: int, f_hat: jax.Array,
                                  code_map: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`VQVAE.next_input` as a jitted function (si static)."""
    return VQVAE(config).apply({"params": params}, si, f_hat, code_map, method=VQVAE.next_input)


__all__ = [
    "DEFAULT_PATCH_NUMS", "VQVAE", "VQVAEConfig", "vqvae_config", "phi_table", "phi_ticks",
    "var_torch_key", "split_scales", "init_params", "encode_f", "f_to_idxBl_or_fhat",
    "img_to_idxBl", "idxBl_to_fhat", "fhat_to_img", "idxBl_to_img", "idxBl_to_var_input",
    "get_next_autoregressive_input",
]
