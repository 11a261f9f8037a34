"""VAR's next-scale-prediction transformer (`models/var.py`, `basic_var.py`) in Flax Linen.

A GPT-2-style stack of AdaLN blocks conditioned on the class embedding, over the tokens of all
scales at once: position l sees every position of its own and earlier scales (block-causal
mask), and predicts its own scale's token. The input of scale si > 0 is the area-downsampled
running f_hat of the VQVAE (`idxBl_to_var_input`), embedded by `word_embed`; scale 0's input is
the class embedding + `pos_start`. Entry points (same weights):
  * `__call__(labels [B], x [B, L - pn_0^2, Cvae])` teacher forcing -> logits [B, L, V];
  * `embed_cond`, `embed_first`, `embed_scale`, `blocks_step`, `logits` the pieces of the
    scale-by-scale KV-cache loop of `ddjax.teacher.var.sampling`.

Parameter names follow the PyTorch modules (`blocks.3.attn.mat_qkv`, `blocks.3.ada_lin.1`,
`head_nm.ada_lin.1`, `class_emb`, `pos_1LC`, ...). The buffers `lvl_1L`,
`attn_bias_for_masking` and `blocks.*.attn.zero_k_bias` are rebuilt from the config.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddjax.kernels import attention as attention_op
from ddjax.teacher.var.vqvae import DEFAULT_PATCH_NUMS, as_dtype

Dtype = Any
KVCache = dict[str, jax.Array]  # {"k": [B, L, H, D], "v": [B, L, H, D]}
DEPTHS = (16, 20, 24, 30)  # the released var_d{16,20,24,30}.pth: 310M, 601M, 1.03B, 2.0B
MAX_SCALE_MUL = float(np.log(np.float32(100)))  # torch.log(torch.tensor(100)).item()


@dataclasses.dataclass(frozen=True)
class VARConfig:
    """VAR's constructor arguments (`build_vae_var`), with compute/param dtypes."""

    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    num_classes: int = 1000
    vocab_size: int = 4096
    cvae: int = 32
    patch_nums: tuple[int, ...] = DEFAULT_PATCH_NUMS
    attn_l2_norm: bool = True
    shared_aln: bool = False
    cond_drop_rate: float = 0.1
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str | None = None

    def __post_init__(self):
        pn = tuple(int(p) for p in self.patch_nums)
        if len(pn) < 2 or any(p <= 0 for p in pn):
            raise ValueError(f"patch_nums needs at least 2 positive scales, got {pn}")
        object.__setattr__(self, "patch_nums", pn)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads "
                             f"({self.num_heads})")
        if self.shared_aln:
            raise ValueError("shared_aln=True is not supported (every released VAR uses False)")
        for name in ("depth", "num_classes", "vocab_size", "cvae"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.cond_drop_rate < 1.0 or not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError("cond_drop_rate and drop_path_rate must be in [0, 1)")
        object.__setattr__(self, "dtype", as_dtype(self.dtype))
        object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype))

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def seq_len(self) -> int:
        """L = sum of pn^2 (680 for the default patch_nums)."""
        return sum(p * p for p in self.patch_nums)

    @property
    def first_l(self) -> int:
        return self.patch_nums[0] ** 2

    @property
    def begin_ends(self) -> tuple[tuple[int, int], ...]:
        out, cur = [], 0
        for p in self.patch_nums:
            out.append((cur, cur + p * p))
            cur += p * p
        return tuple(out)

    def levels(self) -> np.ndarray:
        """`lvl_1L[0]`: the scale of every position, int32 [L]."""
        return np.concatenate([np.full(p * p, i, np.int32) for i, p in enumerate(self.patch_nums)])

    def block_mask(self) -> np.ndarray:
        """[L, L] bool: query l sees key m iff level(l) >= level(m) (`attn_bias_for_masking`)."""
        lvl = self.levels()
        return lvl[:, None] >= lvl[None, :]


def var_config(depth: int = 16, **overrides: Any) -> VARConfig:
    """A released VAR shape: width 64*depth, depth heads, drop_path 0.1*depth/24 (train only)."""
    base: dict[str, Any] = dict(depth=depth, embed_dim=64 * depth, num_heads=depth,
                                drop_path_rate=0.1 * depth / 24)
    base.update(overrides)
    unknown = set(base) - {f.name for f in dataclasses.fields(VARConfig)}
    if unknown:
        raise ValueError(f"unknown VAR config fields: {sorted(unknown)}")
    return VARConfig(**base)


# -- layers -------------------------------------------------------------------------------------
def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine parameters over the last axis, in float32."""
    xf = x.astype(jnp.float32)
    centred = xf - jnp.mean(xf, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)


def l2_normalize(x: jax.Array) -> jax.Array:
    """`F.normalize(x, dim=-1)`: x / max(||x||, 1e-12), in float32."""
    xf = x.astype(jnp.float32)
    return xf / jnp.maximum(jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True)), 1e-12)


def _dense(features: int, name: str, dtype: Dtype, param_dtype: Dtype, use_bias: bool = True):
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nn.initializers.truncated_normal(0.02), name=name)


class SelfAttention(nn.Module):
    """VAR's `SelfAttention`: bias-free `mat_qkv` plus (q_bias, 0, v_bias); with attn_l2_norm,
    q and k are l2-normalised, q is scaled by exp(min(scale_mul_1H11, ln 100)) per head and the
    softmax scale is 1 (else 0.25 / sqrt(head_dim))."""

    embed_dim: int
    num_heads: int
    attn_l2_norm: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, cache: KVCache | None = None,
                 start: int = 0) -> tuple[jax.Array, KVCache | None]:
        """x [B, T, C] -> ([B, T, C], cache).

        Without a cache, `mask` [T, T] bool (True: attend) restricts the keys. With a cache
        ([B, L, H, D] arrays), x sits at positions start..start+T-1 (static), its keys and values
        are written there and it attends to every cached position < start + T.
        """
        b, t, c = x.shape
        h, d = self.num_heads, c // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q_bias = self.param("q_bias", nn.initializers.zeros, (c,), self.param_dtype)
        v_bias = self.param("v_bias", nn.initializers.zeros, (c,), self.param_dtype)
        qkv = _dense(3 * c, "mat_qkv", use_bias=False, **kw)(x)
        bias = jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
        qkv = (qkv + bias).reshape(b, t, 3, h, d)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.attn_l2_norm:
            scale_mul = self.param("scale_mul_1H11", nn.initializers.constant(math.log(4.0)),
                                   (1, h, 1, 1), self.param_dtype)
            mul = jnp.exp(jnp.minimum(scale_mul.astype(jnp.float32), MAX_SCALE_MUL)).reshape(h, 1)
            q = (l2_normalize(q) * mul).astype(self.dtype)
            k = l2_normalize(k).astype(self.dtype)
            scale = 1.0
        else:
            scale = 0.25 / math.sqrt(d)
        new_cache = None
        if cache is not None:
            idx = (0, start, 0, 0)
            keys = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), idx)
            values = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), idx)
            new_cache = {"k": keys, "v": values}
            k = keys[:, : start + t].astype(self.dtype)
            v = values[:, : start + t].astype(self.dtype)
            mask = None
        out = attention_op(q, k, v, causal=False, mask=mask, scale=scale,
                           implementation=self.attention_impl)
        return _dense(c, "proj", **kw)(out.reshape(b, t, c)), new_cache


class FFN(nn.Module):
    """fc1 -> GELU(tanh) -> fc2, with biases."""

    embed_dim: int
    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return _dense(self.embed_dim, "fc2", **kw)(
            nn.gelu(_dense(self.hidden, "fc1", **kw)(x), approximate=True))


class AdaLNSelfAttn(nn.Module):
    """x += g1 * attn(LN(x)(1 + s1) + b1); x += g2 * ffn(LN(x)(1 + s2) + b2), where
    `ada_lin.1`(silu(cond)) is read as (g1, g2, s1, s2, b1, b2); drop-path in training."""

    config: VARConfig
    drop_path: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array, mask: jax.Array | None = None,
                 cache: KVCache | None = None, start: int = 0, train: bool = False,
                 between: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """x [B, T, C], cond [B, C] -> ([B, T, C], cache). `between` [B, T, C] is added after
        the attention residual (the DD student's per-layer noise/data embedding)."""
        c = self.config
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        ada = _dense(6 * c.embed_dim, "ada_lin_1", **kw)(nn.silu(cond.astype(c.dtype)))
        g1, g2, s1, s2, b1, b2 = jnp.split(ada.reshape(-1, 1, 6, c.embed_dim), 6, axis=2)
        g1, g2, s1, s2, b1, b2 = (a[:, :, 0].astype(jnp.float32) for a in (g1, g2, s1, s2, b1, b2))

        def modulate(h, scale, shift):
            return (layer_norm(h, c.norm_eps) * (scale + 1) + shift).astype(c.dtype)

        attn, cache = SelfAttention(c.embed_dim, c.num_heads, c.attn_l2_norm, attention_impl=c.attention_impl,
                                    name="attn", **kw)(modulate(x, s1, b1), mask, cache, start)
        x = x + self._drop(attn * g1.astype(c.dtype), train)
        if between is not None:
            x = x + between.astype(x.dtype)
        ffn = FFN(c.embed_dim, c.mlp_hidden, name="ffn", **kw)(modulate(x, s2, b2))
        return x + self._drop(ffn * g2.astype(c.dtype), train), cache

    def _drop(self, x: jax.Array, train: bool) -> jax.Array:
        if not train or self.drop_path == 0.0:
            return x
        keep = 1.0 - self.drop_path
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0], 1, 1))
        return jnp.where(mask, x / keep, 0).astype(x.dtype)


class AdaLNBeforeHead(nn.Module):
    """LN(x)(1 + scale) + shift with (scale, shift) = `ada_lin.1`(silu(cond)), in float32."""

    embed_dim: int
    norm_eps: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        """x [B, T, C], cond [B, C] -> [B, T, C] float32."""
        ada = _dense(2 * self.embed_dim, "ada_lin_1", jnp.float32, self.param_dtype)(
            nn.silu(cond.astype(jnp.float32)))
        scale, shift = ada[:, None, : self.embed_dim], ada[:, None, self.embed_dim:]
        return layer_norm(x, self.norm_eps) * (scale + 1) + shift


class VAR(nn.Module):
    """VAR's transformer; see the module docstring for the entry points."""

    config: VARConfig

    def setup(self):
        c = self.config
        std = math.sqrt(1 / c.embed_dim / 3)
        init = nn.initializers.truncated_normal(std)
        f32 = dict(dtype=jnp.float32, param_dtype=c.param_dtype)
        self.word_embed = _dense(c.embed_dim, "word_embed", **f32)
        self.class_emb = nn.Embed(c.num_classes + 1, c.embed_dim, embedding_init=init, **f32)
        self.pos_start = self.param("pos_start", init, (1, c.first_l, c.embed_dim), c.param_dtype)
        self.pos_1LC = self.param("pos_1LC", init, (1, c.seq_len, c.embed_dim), c.param_dtype)
        self.lvl_embed = nn.Embed(c.num_scales, c.embed_dim, embedding_init=init, **f32)
        rates = np.linspace(0.0, c.drop_path_rate, c.depth)
        self.blocks = [AdaLNSelfAttn(c, float(rates[i])) for i in range(c.depth)]
        self.head_nm = AdaLNBeforeHead(c.embed_dim, c.norm_eps, c.param_dtype)
        self.head = _dense(c.vocab_size, "head", c.dtype, c.param_dtype)

    # -- pieces ---------------------------------------------------------------------------------
    def embed_cond(self, labels: jax.Array, drop: jax.Array | None = None,
                   train: bool = False) -> jax.Array:
        """labels [B] int (num_classes = the null class) -> cond [B, C] float32.

        `drop` [B] bool forces the null class; in training, labels also drop with
        `cond_drop_rate` (VAR drops them in eval mode too; ddjax only when train=True).
        """
        c = self.config
        if train and c.cond_drop_rate > 0:
            rand = jax.random.uniform(self.make_rng("dropout"), labels.shape) < c.cond_drop_rate
            drop = rand if drop is None else (drop | rand)
        if drop is not None:
            labels = jnp.where(drop, c.num_classes, labels)
        return self.class_emb(labels)

    def lvl_pos(self) -> jax.Array:
        """lvl_embed(lvl_1L) + pos_1LC: [1, L, C] float32."""
        lvl = jnp.asarray(self.config.levels())
        return (self.lvl_embed(lvl)[None] + self.pos_1LC.astype(jnp.float32)).astype(jnp.float32)

    def embed_first(self, cond: jax.Array) -> jax.Array:
        """Scale 0's input: cond [B, C] -> cond + pos_start + lvl_pos[:first_l], [B, first_l, C]."""
        first = self.config.first_l
        return cond[:, None] + self.pos_start.astype(jnp.float32) + self.lvl_pos()[:, :first]

    def embed_scale(self, x: jax.Array, si: int) -> jax.Array:
        """Scale si's input (si >= 1, static): x [B, pn_si^2, Cvae] -> word_embed(x) + lvl_pos."""
        b, e = self.config.begin_ends[si]
        return self.word_embed(x.astype(jnp.float32)) + self.lvl_pos()[:, b:e]

    def blocks_step(self, h: jax.Array, cond: jax.Array, caches: list[KVCache], start: int):
        """h [B, T, C] at positions start.. (static; one whole scale) against the caches.

        Returns (hidden [B, T, C], caches).
        """
        h = h.astype(self.config.dtype)
        new = []
        for block, cache in zip(self.blocks, caches, strict=True):
            h, cache = block(h, cond, None, cache, start)
            new.append(cache)
        return h, new

    def logits(self, h: jax.Array, cond: jax.Array) -> jax.Array:
        """head(head_nm(h, cond)): [B, T, C] -> logits [B, T, V] float32."""
        return self.head(self.head_nm(h.astype(jnp.float32), cond)).astype(jnp.float32)

    # -- teacher forcing ------------------------------------------------------------------------
    def __call__(self, labels: jax.Array, x: jax.Array, *, drop: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        """labels [B] int, x [B, L - first_l, Cvae] (`idxBl_to_var_input`) -> logits [B, L, V].

        logits[:, l] is the distribution of the token at position l (of scale level(l)) given
        the class and every earlier scale. In training (rng "dropout"), labels drop to the null
        class with cond_drop_rate and the blocks drop paths.
        """
        return self.logits(*self.hidden(labels, x, drop=drop, train=train))

    def hidden(self, labels: jax.Array, x: jax.Array, *, drop: jax.Array | None = None,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
        """Teacher forcing up to the head: (h [B, L, C] after the blocks, cond [B, C])."""
        c = self.config
        if x.shape[1] != c.seq_len - c.first_l:
            raise ValueError(f"x must be [B, {c.seq_len - c.first_l}, {c.cvae}], got {x.shape}")
        cond = self.embed_cond(labels, drop, train)
        sos = cond[:, None] + self.pos_start.astype(jnp.float32)
        h = jnp.concatenate([jnp.broadcast_to(sos, (x.shape[0], c.first_l, c.embed_dim)),
                             self.word_embed(x.astype(jnp.float32))], axis=1) + self.lvl_pos()
        h = h.astype(c.dtype)
        mask = jnp.asarray(c.block_mask())
        for block in self.blocks:
            h, _ = block(h, cond, mask, None, 0, train)
        return h, cond


def init_cache(config: VARConfig, batch: int, dtype: Any = None) -> list[KVCache]:
    """Zeroed KV caches, one {"k", "v"} of [B, L, num_heads, head_dim] per block."""
    shape = (batch, config.seq_len, config.num_heads, config.head_dim)
    dtype = as_dtype(dtype) if dtype is not None else config.dtype
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.depth)]


def init_params(config: VARConfig, rng: jax.Array) -> Any:
    """Random parameters (truncated normal; VAR's `init_weights` is not reproduced)."""
    labels = jnp.zeros((1,), jnp.int32)
    x = jnp.zeros((1, config.seq_len - config.first_l, config.cvae), jnp.float32)
    return VAR(config).init(rng, labels, x)["params"]


def param_count(config: VARConfig) -> int:
    """Number of parameters, from shapes only (nothing is allocated)."""
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))


__all__ = ["DEPTHS", "VAR", "VARConfig", "var_config", "init_cache", "init_params", "param_count",
           "layer_norm", "l2_normalize"]
