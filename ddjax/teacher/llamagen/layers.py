"""LlamaGen transformer layers: RMSNorm, SwiGLU, 2-D RoPE and attention with a KV cache.

Parameter names follow LlamaGen's PyTorch modules (`wqkv`, `wo`, `w1`..`w3`, `weight`) so that
checkpoints convert by a mechanical renaming (see `ddjax.utils.state_dict`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddjax.kernels import attention as attention_op
from ddjax.kernels import kv_cache_layout

Dtype = Any
# {"k", "v"}: [B, Hkv, S, D] on the XLA attention path, [B, S, Hkv, D] for the fused kernels
# (`cache_layout`; `ddjax.kernels.kv_cache_layout` says why).
KVCache = dict[str, jax.Array]


def cache_layout(attention_impl: str | None, dtype: Dtype, n_head: int, head_dim: int) -> str:
    """"bhsd" or "bshd": the KV-cache layout for this attention implementation and dtype."""
    q = jax.ShapeDtypeStruct((1, 1, n_head, head_dim), dtype)
    return kv_cache_layout(attention_impl, q)


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """LlamaGen's SwiGLU width: 2/3 of 4*dim, optionally scaled, rounded up to `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return find_multiple(hidden, multiple_of)


def rope_table_2d(grid_size: int, head_dim: int, base: float, cls_token_num: int) -> np.ndarray:
    """LlamaGen's 2-D RoPE table, [cls_token_num + grid_size**2, head_dim // 2, 2] (cos, sin).

    The first half of each head's rotary pairs encodes the row, the second half the column.
    The condition tokens' rows are zero (not identity): their rotated q and k are zero.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (np.arange(0, half, 2)[: half // 2].astype(np.float32) / half))
    t = np.arange(grid_size, dtype=np.float32)
    freqs = np.outer(t, freqs).astype(np.float32)  # [G, half // 2]
    grid = np.concatenate(
        [
            np.broadcast_to(freqs[:, None, :], (grid_size, grid_size, freqs.shape[-1])),
            np.broadcast_to(freqs[None, :, :], (grid_size, grid_size, freqs.shape[-1])),
        ],
        axis=-1,
    )  # [G, G, half]
    cache = np.stack([np.cos(grid), np.sin(grid)], axis=-1).reshape(grid_size * grid_size, half, 2)
    zeros = np.zeros((cls_token_num, half, 2), np.float32)
    return np.concatenate([zeros, cache.astype(np.float32)], axis=0)


def apply_rope(x: jax.Array, table: jax.Array) -> jax.Array:
    """Rotates interleaved pairs of x [B, T, H, D] by table [T, D // 2, 2]; math in float32."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    cos = table[None, :, None, :, 0]
    sin = table[None, :, None, :, 1]
    out = jnp.stack(
        [xf[..., 0] * cos - xf[..., 1] * sin, xf[..., 1] * cos + xf[..., 0] * sin], axis=-1
    )
    return out.reshape(x.shape).astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a `weight` scale, normalised in float32 as LlamaGen does."""

    dim: int
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (self.dim,), self.param_dtype)
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * weight.astype(self.dtype)


def accumulating_dot(dtype: Dtype, out_dtype: Dtype | None = None, weight_major: bool = False):
    """A `dot_general` for nn.Dense that accumulates in float32 when `dtype` is bf16/f16.

    The product is cast to `out_dtype` (default `dtype`). None for float32 without
    weight_major (the default dot).
    On the CPU a bf16 x bf16 -> bf16 dot is slower than f32, while bf16 inputs with float32
    accumulation are faster (half the weight bytes); on GPU/TPU it is the usual mixed precision.

    weight_major: the kernel [in, out] is the transpose of an [out, in] buffer (the sampler's
    `weight_major_params` on the CPU): x [..., in] @ kernel is then taken as kernel^T x^T, the
    weights as the left operand, which XLA:CPU runs about 1.5x faster than x @ kernel at the
    16 rows of a decoding step at batch 8 with CFG, less at more rows (benchmarks/micro.py
    decode-matmul). The optimization barriers keep XLA from folding the transposes back into
    the x @ kernel form.
    """
    if jnp.dtype(dtype) == jnp.float32 and not weight_major:
        return None
    out_dtype = dtype if out_dtype is None else out_dtype
    acc = None if jnp.dtype(dtype) == jnp.float32 else jnp.float32

    def dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs):
        kwargs.pop("preferred_element_type", None)
        (contract_l, contract_r), (batch_l, _) = dimension_numbers
        if (weight_major and rhs.ndim == 2 and tuple(contract_l) == (lhs.ndim - 1,)
                and tuple(contract_r) == (0,) and not tuple(batch_l)):
            barrier = jax.lax.optimization_barrier
            x = lhs.reshape(-1, lhs.shape[-1])
            out = barrier(jnp.matmul(barrier(rhs.T), barrier(x.T), precision=precision,
                                     preferred_element_type=acc)).T
            out = out.reshape(lhs.shape[:-1] + rhs.shape[1:])
        else:
            out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                      preferred_element_type=acc, **kwargs)
        return out.astype(out_dtype)

    return dot_general


def _dense(features: int, name: str, dtype: Dtype, param_dtype: Dtype, std: float = 0.02,
           use_bias: bool = False, weight_major: bool = False) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.initializers.normal(std),
        dot_general=accumulating_dot(dtype, weight_major=weight_major),
        name=name,
    )


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), then dropout."""

    dim: int
    hidden_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    weight_major: bool = False  # `accumulating_dot`

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kw = dict(weight_major=self.weight_major)
        w1 = _dense(self.hidden_dim, "w1", self.dtype, self.param_dtype, **kw)
        w3 = _dense(self.hidden_dim, "w3", self.dtype, self.param_dtype, **kw)
        w2 = _dense(self.dim, "w2", self.dtype, self.param_dtype, **kw)
        h = w2(nn.silu(w1(x)) * w3(x))
        return nn.Dropout(self.dropout)(h, deterministic=deterministic)


class Attention(nn.Module):
    """Grouped-query self-attention with a fused `wqkv` projection and an optional KV cache.

    Without a cache, the T inputs attend causally to themselves. With a cache (a dict of
    static-size arrays in the `cache_layout` of this implementation), the inputs sit at absolute positions
    `cache_index + i`, are written into the cache, and attend to it; the updated cache is
    returned so the sampler can carry it as an explicit pytree.

    `key_mask` [B, S] (S = T without a cache, else the cache length) hides keys from every query
    but the one at the key's own position: LlamaGen's caption padding (`emb_masks`, with the
    diagonal kept so a padded position still attends to itself). It runs on the XLA path.
    """

    dim: int
    n_head: int
    n_kv_head: int
    resid_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    weight_major: bool = False  # `accumulating_dot`

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        rope: jax.Array,
        cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
        deterministic: bool = True,
        key_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        b, t, _ = x.shape
        hd = self.dim // self.n_head
        kv_size = self.n_kv_head * hd
        qkv = _dense(self.dim + 2 * kv_size, "wqkv", self.dtype, self.param_dtype,
                     weight_major=self.weight_major)(x)
        q = qkv[..., : self.dim].reshape(b, t, self.n_head, hd)
        k = qkv[..., self.dim : self.dim + kv_size].reshape(b, t, self.n_kv_head, hd)
        v = qkv[..., self.dim + kv_size :].reshape(b, t, self.n_kv_head, hd)
        q = apply_rope(q, rope)
        k = apply_rope(k, rope)
        if cache is None:
            mask = None if key_mask is None else padding_mask(key_mask, 0, t)
            out = attention_op(q, k, v, causal=mask is None, mask=mask,
                               implementation="xla" if mask is not None else self.attention_impl)
            new_cache = None
        else:
            layout = cache_layout(self.attention_impl, q.dtype, self.n_head, hd)
            if layout == "bhsd":
                k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
                idx = (0, 0, cache_index, 0)
            else:
                idx = (0, cache_index, 0, 0)
            keys = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), idx)
            values = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), idx)
            mask = None if key_mask is None else padding_mask(key_mask, cache_index, t)
            out = attention_op(
                q, keys.astype(q.dtype), values.astype(q.dtype), causal=mask is None, mask=mask,
                q_offset=cache_index, kv_layout=layout,
                implementation="xla" if mask is not None else self.attention_impl,
            )
            new_cache = {"k": keys, "v": values}
        out = _dense(self.dim, "wo", self.dtype, self.param_dtype,
                     weight_major=self.weight_major)(out.reshape(b, t, self.dim))
        out = nn.Dropout(self.resid_dropout)(out, deterministic=deterministic)
        return out, new_cache


def padding_mask(key_mask: jax.Array, q_offset: jax.Array | int, t: int) -> jax.Array:
    """[B, T, S] bool: query i (at q_offset + i) sees key j <= its position where key_mask[b, j],
    and always its own position (LlamaGen's eye, so a padded position never sees nothing)."""
    s = key_mask.shape[1]
    q_pos = q_offset + jnp.arange(t)[:, None]
    j = jnp.arange(s)[None, :]
    return (j <= q_pos)[None] & (key_mask[:, None, :] | (j == q_pos)[None])


class TransformerBlock(nn.Module):
    """Pre-norm Llama block: x + attn(norm(x)), then h + ffn(norm(h)), with optional drop-path."""

    dim: int
    n_head: int
    n_kv_head: int
    ffn_hidden: int
    norm_eps: float = 1e-5
    resid_dropout: float = 0.0
    ffn_dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    weight_major: bool = False  # `accumulating_dot`

    def _drop_path(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.drop_path == 0.0:
            return x
        keep = 1.0 - self.drop_path
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0], 1, 1))
        return jnp.where(mask, x / keep, 0).astype(x.dtype)

    @nn.compact
    def __call__(self, x, rope, cache=None, cache_index=0, deterministic=True, key_mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn_out, new_cache = Attention(
            self.dim, self.n_head, self.n_kv_head, self.resid_dropout,
            attention_impl=self.attention_impl, weight_major=self.weight_major, name="attention", **kw,
        )(RMSNorm(self.dim, self.norm_eps, name="attention_norm", **kw)(x), rope, cache,
          cache_index, deterministic, key_mask)
        h = x + self._drop_path(attn_out, deterministic)
        ffn_out = FeedForward(self.dim, self.ffn_hidden, self.ffn_dropout, name="feed_forward",
                              weight_major=self.weight_major, **kw)(
            RMSNorm(self.dim, self.norm_eps, name="ffn_norm", **kw)(h), deterministic
        )
        return h + self._drop_path(ffn_out, deterministic), new_cache
