"""One new query per sequence against a static-size KV cache, in Pallas (sampling, T == 1).

q [B, 1, H, D] sits at position `q_offset` (a traced scalar: the sampler's loop index); the cache
k/v [B, S, Hkv, D] holds valid keys at 0..q_offset and stale or zero rows after them.

The grid is (batch, kv head). One program holds all H // Hkv query heads of its kv group as the
rows of one (rows, D) tile, padded to MIN_BLOCK rows (Triton's smallest dot; a bf16 sublane tile
on TPU), so each key block is read once per group. It loops over key blocks with an online
softmax in float32 and stops after block cdiv(q_offset + 1, block_k): the work follows the
current length, not the cache size. There is no split over S (flash-decoding): at batch 32 the
B * Hkv programs already fill the machine, and caches here are short (257 or 376 rows).

Layouts, as in `flash_attention` (whose module docstring explains the backend choice):
  * GPU (Triton) and CPU (interpret): the cache is read in place in its [B, S, Hkv, D] layout.
    S need not be a multiple of block_k: the last block starts at S - block_k and masks the
    keys the previous block already covered.
  * TPU (Mosaic): the kernel reads a head-major [B, Hkv, S', D] copy, S' a multiple of block_k.
    The copy costs one extra pass over the cache per call; a head-major cache would avoid it.
The kernel has no VJP (sampling does not differentiate through attention).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ddjax.kernels.flash_attention import (
    DEFAULT_MASK_VALUE,
    MIN_BLOCK,
    NN,
    NT,
    check_head_dim,
    compiler_params,
    dot,
    fit_block,
    matmul_precision,
    resolve_interpret,
    resolve_platform,
    round_up,
    scalar_block_spec,
    seq_block_spec,
)
from ddjax.kernels.reference import attention_reference


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_k: keys per loop step (a power of two >= MIN_BLOCK). num_warps/num_stages: Triton."""

    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if self.block_k < MIN_BLOCK or self.block_k & (self.block_k - 1):
            raise ValueError(f"block_k must be a power of two >= {MIN_BLOCK}, got {self.block_k}")

    @classmethod
    def get_default(cls, platform: str | None = None) -> BlockSizes:
        del platform  # 128 suits both: a full lane width on TPU, a Triton tile on GPU
        return cls()


def _decode_kernel(length_ref, q_ref, k_ref, v_ref, o_ref, *, scale: float, block_k: int,
                   precision):
    rows, head_dim = q_ref.shape
    cache_len = k_ref.shape[0]
    length = length_ref[0]  # valid keys: 0..length-1, length >= 1
    q = q_ref[...]
    aligned = cache_len % block_k == 0

    def body(j, carry):
        m_prev, l_prev, acc_prev = carry
        if aligned:
            start = pl.multiple_of(j * block_k, block_k)
        else:  # the last block overlaps the previous one instead of running past the cache
            start = jnp.minimum(j * block_k, cache_len - block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s = dot(q, k, NT, precision) * scale
        k_pos = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        keep = k_pos < length
        if not aligned:
            keep = keep & (k_pos >= j * block_k)
        s = jnp.where(keep, s, DEFAULT_MASK_VALUE)
        m = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m)
        alpha = jnp.exp(m_prev - m)
        l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        acc = alpha * acc_prev + dot(p.astype(v.dtype), v, NN, precision)
        return m, l_new, acc

    init = (
        jnp.full((rows, 1), DEFAULT_MASK_VALUE, jnp.float32),
        jnp.zeros((rows, 1), jnp.float32),
        jnp.zeros((rows, head_dim), jnp.float32),
    )
    # Block 0 always holds key 0, so every row has a real running max after the first step.
    num_blocks = lax.div(length + block_k - 1, block_k)
    _, l_sum, acc = lax.fori_loop(0, num_blocks, body, init)
    o_ref[...] = (acc / l_sum).astype(o_ref.dtype)


@functools.partial(
    jax.jit, static_argnames=("causal", "block_sizes", "interpret", "debug", "platform")
)
def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_offset: jax.Array | int,
    *,
    causal: bool = True,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    debug: bool = False,
    platform: str | None = None,
) -> jax.Array:
    """Attention of one query per sequence to a KV cache.

    Args:
      q: [B, 1, H, D], the query at absolute position q_offset.
      k, v: [B, S, Hkv, D] cache, H a multiple of Hkv; cast to q's dtype.
      q_offset: scalar int (may be traced); keys 0..q_offset are attended (all S if not causal).
      block_sizes, interpret, debug, platform: as in `flash_attention.flash_attention`.
    Returns:
      [B, 1, H, D] in q's dtype.
    """
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if t != 1:
        raise ValueError(f"decode_attention takes one query per sequence, got T={t}")
    if k.shape != (b, s, hkv, d) or v.shape != k.shape:
        raise ValueError(f"k, v must be [B, S, Hkv, D] matching q {q.shape}: {k.shape} {v.shape}")
    if h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
    platform = resolve_platform(platform)
    check_head_dim(d, platform)
    interpret = resolve_interpret(interpret, platform)
    sizes = block_sizes or BlockSizes.get_default(platform)
    block_k = fit_block(sizes.block_k, s)
    group = h // hkv
    rows = fit_block(1 << 30, group)  # group rounded up to a power of two >= MIN_BLOCK
    head_major = platform == "tpu"

    qg = q.reshape(b, hkv, group, d)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    cache_len = round_up(s, block_k) if head_major else max(s, block_k)
    if cache_len != s:
        pad = ((0, 0), (0, cache_len - s), (0, 0), (0, 0))
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    if head_major:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    length = jnp.clip(jnp.asarray(q_offset, jnp.int32) + 1, 1, s) if causal else jnp.int32(s)
    q_spec = pl.BlockSpec((None, None, rows, d), lambda b_, g_: (b_, g_, 0, 0))
    kv_spec = seq_block_spec(head_major, cache_len, d, lambda b_, g_: (b_, g_, 0))
    kernel = functools.partial(_decode_kernel, scale=1.0 / math.sqrt(d), block_k=block_k,
                               precision=matmul_precision(q.dtype))
    out = pl.pallas_call(
        kernel,
        grid=(b, hkv),
        in_specs=[scalar_block_spec(platform), q_spec, kv_spec, kv_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        compiler_params=compiler_params(platform, interpret, 2, sizes.num_warps,
                                        sizes.num_stages),
        interpret=interpret,
        debug=debug,
        name="decode_attention",
    )(length.reshape(1), qg, k, v)
    return out[:, :, :group].reshape(b, 1, h, d)


def decode_attention_reference(q, k, v, q_offset, *, causal=True):
    """What `decode_attention` computes, in plain XLA (`attention_reference` with T == 1)."""
    return attention_reference(q, k, v, causal=causal, q_offset=q_offset)
