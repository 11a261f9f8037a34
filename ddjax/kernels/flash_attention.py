"""Flash attention in Pallas: forward and backward, causal with a query offset, grouped-query heads.

Shapes follow `ddjax.kernels.reference.attention_reference`: q [B, T, H, D] at absolute positions
`q_offset + i`, k/v [B, S, Hkv, D] at positions 0..S-1, query head h reads kv head h // (H // Hkv).
With `q_offset = 0` and T == S this is teacher forcing; a positive offset puts the queries after
a prefix already in k/v (condition tokens, or a KV cache).

Algorithm (FlashAttention-2). The forward grid is (batch, query head, query block); each program
holds one query block and loops over key blocks with an online softmax in float32. Under the
causal mask the loop stops at the block holding key `q_offset + last row`. Lengths that are not
multiples of the block sizes (257 = 1 class token + 256 image tokens) are zero-padded by the
wrapper: padded keys are masked, padded query rows are sliced off. The forward saves the
logsumexp; the backward (`jax.custom_vjp`) is two Pallas kernels that recompute the probabilities
from it: one program per (query head, key block) for dK/dV (summed over each GQA group outside
the kernel) and one per (query head, query block) for dQ, with delta = rowsum(dO * O) in XLA.

Backends. The same kernel bodies and BlockSpecs run everywhere; `platform` only picks the
compiler parameters, the memory layout and the lowering:
  * CPU: `pallas_call(interpret=True)`, configured as for GPU (this is what the tests run).
  * TPU: Mosaic. The kernels see head-major [B, H, S, D] arrays (the wrapper transposes), because
    Mosaic blocks need their last two dimensions to be (multiple of 8, multiple of 128) or whole,
    which a (block, None, D) tile of [B, S, H, D] is not; row statistics are [B, H, T, 1].
  * GPU: Triton, selected explicitly with `pallas.triton.CompilerParams`. In jax 0.10.2 a bare
    `pallas_call` on GPU lowers to Mosaic GPU (`jax_pallas_use_mosaic_gpu` defaults to True), and
    that route warns that Mosaic GPU through `pallas_call` is deprecated in favour of
    `plgpu.kernel`. A Mosaic GPU kernel is a different program (warpgroups, TMA, WGMMA, explicit
    barriers; see jax's `pallas/ops/gpu/attention_mgpu.py`), Hopper-or-newer only, and shares
    neither code nor a CPU test path with the TPU kernel. The Triton lowering takes the same
    grid/BlockSpec program that the interpret-mode tests check, runs on Ampere and Hopper, and
    carries no deprecation warning in 0.10.2. On GPU the dispatcher prefers cuDNN for bf16/f16
    anyway, so this kernel is the fallback there (float32, head dims cuDNN rejects). If the
    Triton route goes away, port the two loops to `plgpu.kernel` starting from attention_mgpu.py.
    Triton needs power-of-two block sizes and head dim, and dot tiles of at least 16.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from ddjax.kernels.reference import attention_reference

DEFAULT_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
MIN_BLOCK = 16  # Triton's smallest dot tile; a whole bf16 sublane tile on TPU.


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two, >= MIN_BLOCK); shorter sequences shrink them automatically.

    block_q/block_k tile the forward; block_q_bwd/block_k_bwd (default: the forward ones) tile
    both backward kernels. num_warps/num_stages are Triton's and ignored elsewhere.
    """

    block_q: int = 64
    block_k: int = 64
    block_q_bwd: int | None = None
    block_k_bwd: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            size = getattr(self, name)
            if size is not None and (size < MIN_BLOCK or size & (size - 1)):
                raise ValueError(f"{name} must be a power of two >= {MIN_BLOCK}, got {size}")

    @classmethod
    def get_default(cls, platform: str | None = None) -> BlockSizes:
        if resolve_platform(platform) == "tpu":  # 128 lanes: full-width score tiles
            return cls(block_q=128, block_k=128)
        # GPU: the backward holds two (block_k, D) f32 accumulators; smaller tiles avoid spills
        # (the tiles of jax's Triton attention).
        return cls(block_q=64, block_k=64, block_q_bwd=32, block_k_bwd=32)


# -- helpers shared with decode_attention ---------------------------------------------------------
def resolve_platform(platform: str | None) -> str:
    """'gpu' | 'tpu' | 'cpu': the backend the kernel is configured for (None: the default one)."""
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform) or jax.default_backend()
    if platform not in ("gpu", "tpu", "cpu"):
        raise ValueError(f"no Pallas configuration for platform {platform!r}")
    return platform


def resolve_interpret(interpret: bool | None, platform: str) -> bool:
    """None: interpret exactly when running on the CPU (the only way Pallas runs there)."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if platform == "cpu" and not interpret:
        raise ValueError("Pallas kernels run on the CPU only with interpret=True")
    return interpret


def check_head_dim(head_dim: int, platform: str) -> None:
    """Triton (GPU, and the CPU mirror of it) needs a power-of-two head dim >= 16."""
    if platform != "tpu" and (head_dim < MIN_BLOCK or head_dim & (head_dim - 1)):
        raise ValueError(f"head dim must be a power of two >= {MIN_BLOCK} on {platform}, "
                         f"got {head_dim}")


def fit_block(block: int, length: int) -> int:
    """Shrinks a block to the smallest power of two >= length (but >= MIN_BLOCK)."""
    return min(block, max(MIN_BLOCK, 1 << max(length - 1, 0).bit_length()))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def seq_block_spec(head_major: bool, block: int, head_dim: int, index_map) -> pl.BlockSpec:
    """A (block, head_dim) tile of [B, S, H, D], or of [B, H, S, D] when head_major.

    index_map(*grid_indices) -> (batch, head, sequence block).
    """
    def full_index(*grid):
        b, h, s = index_map(*grid)
        return (b, h, s, 0) if head_major else (b, s, h, 0)

    shape = (None, None, block, head_dim) if head_major else (None, block, None, head_dim)
    return pl.BlockSpec(shape, full_index)


def row_block_spec(block: int, index_map) -> pl.BlockSpec:
    """A (block, 1) tile of per-row statistics [B, H, T, 1]; index_map -> (b, h, row block)."""
    return pl.BlockSpec((None, None, block, 1), lambda *grid: (*index_map(*grid), 0))


def scalar_block_spec(platform: str) -> pl.BlockSpec:
    """The int32 [1] array of traced scalars: SMEM on TPU, a one-element block elsewhere."""
    if platform == "tpu":
        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec((1,), lambda *_: (0,))


def compiler_params(platform: str, interpret: bool, grid_rank: int, num_warps: int,
                    num_stages: int) -> Any:
    if interpret:
        return None
    if platform == "tpu":
        return pltpu.CompilerParams(dimension_semantics=("parallel",) * grid_rank)
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def matmul_precision(dtype: Any) -> Any:
    """Full float32 matmuls for float32 inputs (Triton would otherwise use TF32)."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dot(a: jax.Array, b: jax.Array, contract: tuple[tuple[int], tuple[int]],
        precision: Any) -> jax.Array:
    """2-D dot_general accumulating in float32: ((1,), (1,)) is a @ b.T, ((0,), (0,)) a.T @ b."""
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


NT = ((1,), (1,))
NN = ((1,), (0,))
TN = ((0,), (0,))


# -- kernels ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call (hashable: it is a custom_vjp non-diff argument)."""

    causal: bool
    scale: float
    q_len: int
    kv_len: int
    q_len_pad: int
    kv_len_pad: int
    group: int  # query heads per kv head
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    platform: str
    interpret: bool
    debug: bool
    precision: Any
    num_warps: int
    num_stages: int

    @property
    def head_major(self) -> bool:
        return self.platform == "tpu"

    def params(self, grid_rank: int) -> Any:
        return compiler_params(self.platform, self.interpret, grid_rank, self.num_warps,
                               self.num_stages)


def _masked_scores(q, k, q_pos, k_start, cfg: _Config):
    """Scaled scores [bq, bk] in float32 with the causal and key-padding masks applied."""
    s = dot(q, k, NT, cfg.precision) * cfg.scale
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (1, k.shape[0]), 1)
    keep = None
    if cfg.causal:
        keep = k_pos <= q_pos
    if cfg.kv_len_pad != cfg.kv_len:
        in_range = k_pos < cfg.kv_len
        keep = in_range if keep is None else keep & in_range
    return s if keep is None else jnp.where(keep, s, DEFAULT_MASK_VALUE)


def _key_blocks(offset, q_block, block_q: int, block_k: int, cfg: _Config):
    """Number of key blocks query block `q_block` must visit (stops at the causal diagonal)."""
    total = -(-cfg.kv_len // block_k)
    if not cfg.causal:
        return total
    # lax.div: pl.cdiv would take jnp's floor division (with sign handling) on traced ints.
    return jnp.minimum(total, lax.div(offset + (q_block + 1) * block_q + block_k - 1, block_k))


def _forward_kernel(offset_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: _Config):
    block_q, head_dim = q_ref.shape
    block_k = cfg.block_k
    i = pl.program_id(2)
    offset = offset_ref[0]
    q = q_ref[...]
    q_pos = offset + i * block_q + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)

    def body(j, carry):
        m_prev, l_prev, acc_prev = carry
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s = _masked_scores(q, k, q_pos, start, cfg)
        m = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m)
        alpha = jnp.exp(m_prev - m)
        l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        acc = alpha * acc_prev + dot(p.astype(v.dtype), v, NN, cfg.precision)
        return m, l_new, acc

    init = (
        jnp.full((block_q, 1), DEFAULT_MASK_VALUE, jnp.float32),
        jnp.zeros((block_q, 1), jnp.float32),
        jnp.zeros((block_q, head_dim), jnp.float32),
    )
    # Key 0 is visible to every row and sits in block 0, so each row's running max is a real
    # score after the first step and masked entries vanish (exp(mask - max) == 0).
    m, l_sum, acc = lax.fori_loop(0, _key_blocks(offset, i, block_q, block_k, cfg), body, init)
    o_ref[...] = (acc / l_sum).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l_sum)


def _dq_kernel(offset_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               cfg: _Config):
    block_q, head_dim = q_ref.shape
    block_k = cfg.block_k_bwd
    i = pl.program_id(2)
    offset = offset_ref[0]
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos = offset + i * block_q + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)

    def body(j, dq):
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        p = jnp.exp(_masked_scores(q, k, q_pos, start, cfg) - lse)
        ds = p * (dot(do, v, NT, cfg.precision) - delta)
        return dq + dot(ds.astype(k.dtype), k, NN, cfg.precision)

    dq = lax.fori_loop(0, _key_blocks(offset, i, block_q, block_k, cfg), body,
                       jnp.zeros((block_q, head_dim), jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(offset_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                cfg: _Config):
    block_k, head_dim = k_ref.shape
    block_q = cfg.block_q_bwd
    j = pl.program_id(2)
    offset = offset_ref[0]
    k, v = k_ref[...], v_ref[...]
    k_start = j * block_k
    num_q = -(-cfg.q_len // block_q)
    first = 0
    if cfg.causal:  # the first query block with a row at position >= k_start
        first = jnp.minimum(lax.div(jnp.maximum(k_start - offset, 0), block_q), num_q)

    def body(i, carry):
        dk, dv = carry
        start = pl.multiple_of(i * block_q, block_q)
        q = q_ref[pl.ds(start, block_q), :]
        do = do_ref[pl.ds(start, block_q), :]
        lse = lse_ref[pl.ds(start, block_q), :]
        delta = delta_ref[pl.ds(start, block_q), :]
        q_pos = offset + start + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
        p = jnp.exp(_masked_scores(q, k, q_pos, k_start, cfg) - lse)
        dv = dv + dot(p.astype(do.dtype), do, TN, cfg.precision)
        ds = p * (dot(do, v, NT, cfg.precision) - delta)
        dk = dk + dot(ds.astype(q.dtype), q, TN, cfg.precision)
        return dk, dv

    zeros = jnp.zeros((block_k, head_dim), jnp.float32)
    dk, dv = lax.fori_loop(first, num_q, body, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# -- pallas_calls --------------------------------------------------------------------------------
def _forward_call(q, k, v, offset, cfg: _Config):
    """Kernel-layout q [B, T', H, D] (or [B, H, T', D]) and k/v -> (o like q, lse [B, H, T', 1])."""
    hm, g = cfg.head_major, cfg.group
    b, h, d = q.shape[0], q.shape[1 if hm else 2], q.shape[3]
    bq = cfg.block_q
    q_spec = seq_block_spec(hm, bq, d, lambda b_, h_, i: (b_, h_, i))
    kv_spec = seq_block_spec(hm, cfg.kv_len_pad, d, lambda b_, h_, i: (b_, lax.div(h_, g), 0))
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        grid=(b, h, cfg.q_len_pad // bq),
        in_specs=[scalar_block_spec(cfg.platform), q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, row_block_spec(bq, lambda b_, h_, i: (b_, h_, i))],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, h, cfg.q_len_pad, 1), jnp.float32),
        ],
        compiler_params=cfg.params(3),
        interpret=cfg.interpret,
        debug=cfg.debug,
        name="flash_attention_fwd",
    )(offset, q, k, v)


def _backward_calls(q, k, v, do, lse, delta, offset, cfg: _Config):
    """Kernel-layout inputs -> (dq like q, dk, dv per query head [B, S', H, D] or head-major)."""
    hm, g = cfg.head_major, cfg.group
    b, h, d = q.shape[0], q.shape[1 if hm else 2], q.shape[3]
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    scalar = scalar_block_spec(cfg.platform)

    q_blk = seq_block_spec(hm, bq, d, lambda b_, h_, i: (b_, h_, i))
    rows_blk = row_block_spec(bq, lambda b_, h_, i: (b_, h_, i))
    kv_all = seq_block_spec(hm, cfg.kv_len_pad, d, lambda b_, h_, i: (b_, lax.div(h_, g), 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(b, h, cfg.q_len_pad // bq),
        in_specs=[scalar, q_blk, kv_all, kv_all, q_blk, rows_blk, rows_blk],
        out_specs=q_blk,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=cfg.params(3),
        interpret=cfg.interpret,
        debug=cfg.debug,
        name="flash_attention_dq",
    )(offset, q, k, v, do, lse, delta)

    q_all = seq_block_spec(hm, cfg.q_len_pad, d, lambda b_, h_, j: (b_, h_, 0))
    rows_all = row_block_spec(cfg.q_len_pad, lambda b_, h_, j: (b_, h_, 0))
    kv_blk = seq_block_spec(hm, bk, d, lambda b_, h_, j: (b_, lax.div(h_, g), j))
    out_blk = seq_block_spec(hm, bk, d, lambda b_, h_, j: (b_, h_, j))
    # One dK/dV per query head, summed over the group by the caller (float32 when g > 1).
    out_dtype = k.dtype if g == 1 else jnp.float32
    out_shape = (b, h, cfg.kv_len_pad, d) if hm else (b, cfg.kv_len_pad, h, d)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(b, h, cfg.kv_len_pad // bk),
        in_specs=[scalar, q_all, kv_blk, kv_blk, q_all, rows_all, rows_all],
        out_specs=[out_blk, out_blk],
        out_shape=[jax.ShapeDtypeStruct(out_shape, out_dtype)] * 2,
        compiler_params=cfg.params(3),
        interpret=cfg.interpret,
        debug=cfg.debug,
        name="flash_attention_dkv",
    )(offset, q, k, v, do, lse, delta)
    return dq, dk, dv


# -- layout and custom_vjp -----------------------------------------------------------------------
def _to_kernel(x: jax.Array, length: int, head_major: bool) -> jax.Array:
    """[B, L, H, D] -> zero-padded to `length` along L, transposed to [B, H, L, D] if head_major."""
    x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
    return x.transpose(0, 2, 1, 3) if head_major else x


def _from_kernel(x: jax.Array, length: int, head_major: bool) -> jax.Array:
    x = x.transpose(0, 2, 1, 3) if head_major else x
    return x[:, :length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, offset, cfg: _Config):
    return _flash_fwd(q, k, v, offset, cfg)[0]


def _flash_fwd(q, k, v, offset, cfg: _Config):
    hm = cfg.head_major
    qk = _to_kernel(q, cfg.q_len_pad, hm)
    kk = _to_kernel(k, cfg.kv_len_pad, hm)
    vk = _to_kernel(v, cfg.kv_len_pad, hm)
    o, lse = _forward_call(qk, kk, vk, offset, cfg)
    return _from_kernel(o, cfg.q_len, hm), (qk, kk, vk, o, lse, offset)


def _flash_bwd(cfg: _Config, residuals, do):
    qk, kk, vk, o, lse, offset = residuals
    hm = cfg.head_major
    dok = _to_kernel(do.astype(qk.dtype), cfg.q_len_pad, hm)
    delta = jnp.sum(o.astype(jnp.float32) * dok.astype(jnp.float32), axis=-1, keepdims=True)
    if not hm:  # [B, T', H, 1] -> [B, H, T', 1], the row-statistics layout
        delta = delta.transpose(0, 2, 1, 3)
    dq, dk, dv = _backward_calls(qk, kk, vk, dok, lse, delta, offset, cfg)

    def group_sum(x):  # per query head -> per kv head, back to [B, S, Hkv, D]
        x = _from_kernel(x, cfg.kv_len, hm)
        b, s, h, d = x.shape
        if cfg.group > 1:
            x = x.reshape(b, s, h // cfg.group, cfg.group, d).sum(axis=3)
        return x.astype(kk.dtype)

    return _from_kernel(dq, cfg.q_len, hm), group_sum(dk), group_sum(dv), None


_flash.defvjp(_flash_fwd, _flash_bwd)


# -- public --------------------------------------------------------------------------------------
@functools.partial(
    jax.jit, static_argnames=("causal", "block_sizes", "interpret", "debug", "platform")
)
def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_offset: jax.Array | int = 0,
    *,
    causal: bool = True,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    debug: bool = False,
    platform: str | None = None,
) -> jax.Array:
    """Flash attention with a custom VJP (dq, dk, dv; none for q_offset).

    Args:
      q: [B, T, H, D] queries at absolute positions q_offset + i.
      k, v: [B, S, Hkv, D], H a multiple of Hkv; cast to q's dtype.
      q_offset: scalar int (may be traced), the position of the first query.
      causal: mask key j for query i when j > q_offset + i.
      block_sizes: tiles (default `BlockSizes.get_default(platform)`).
      interpret: run through the Pallas interpreter (None: exactly when on the CPU).
      debug: print the kernels' jaxprs as they are traced.
      platform: 'gpu' | 'tpu' | 'cpu' configuration (None: the default backend); set it to
        lower ahead of time for another backend, e.g. `.lower(lowering_platforms=('tpu',))`.
    Returns:
      [B, T, H, D] in q's dtype.
    """
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if k.shape != (b, s, hkv, d) or v.shape != k.shape:
        raise ValueError(f"k, v must be [B, S, Hkv, D] matching q {q.shape}: {k.shape} {v.shape}")
    if h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
    platform = resolve_platform(platform)
    check_head_dim(d, platform)
    sizes = block_sizes or BlockSizes.get_default(platform)
    bq, bk = fit_block(sizes.block_q, t), fit_block(sizes.block_k, s)
    bq_bwd = fit_block(sizes.block_q_bwd or sizes.block_q, t)
    bk_bwd = fit_block(sizes.block_k_bwd or sizes.block_k, s)
    cfg = _Config(
        causal=causal, scale=1.0 / math.sqrt(d), q_len=t, kv_len=s,
        q_len_pad=round_up(t, max(bq, bq_bwd)), kv_len_pad=round_up(s, max(bk, bk_bwd)),
        group=h // hkv, block_q=bq, block_k=bk, block_q_bwd=bq_bwd, block_k_bwd=bk_bwd,
        platform=platform, interpret=resolve_interpret(interpret, platform), debug=debug,
        precision=matmul_precision(q.dtype), num_warps=sizes.num_warps,
        num_stages=sizes.num_stages,
    )
    offset = jnp.asarray(q_offset, jnp.int32).reshape(1)
    return _flash(q, k.astype(q.dtype), v.astype(q.dtype), offset, cfg)


def flash_attention_reference(q, k, v, q_offset=0, *, causal=True):
    """What `flash_attention` computes, in plain XLA (`attention_reference`), for the tests."""
    return attention_reference(q, k, v, causal=causal, q_offset=q_offset)
