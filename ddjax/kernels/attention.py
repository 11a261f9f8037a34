"""Multi-head attention with grouped-query heads, a causal mask and a query offset.

One signature serves teacher forcing (`q_offset=0`, T == S), prefill and KV-cache decoding
(queries at absolute positions `q_offset + i` against a static-size cache of S keys: keys
past the current position are masked by causality alone, so no separate length is needed).
An explicit boolean `mask` [T, S] (VAR's block-causal mask) or [B, T, S] (caption padding) is
taken by the XLA path only;
`scale` replaces the default softmax scale 1/sqrt(D) (pallas and cudnn get it by pre-scaling q).

`attention(..., implementation=...)` dispatches by name:
  * "xla":    `attention_reference` below, everywhere.
  * "cudnn":  `jax.nn.dot_product_attention(implementation="cudnn")`, GPU only, bf16/f16.
  * "pallas": `flash_attention` (T > 1, with a custom VJP) or `decode_attention` (T == 1) from
              this package; compiled on GPU (Triton) and TPU (Mosaic), interpreted on the CPU.
  * None:     GPU: cudnn where it takes the dtype and head dim, else pallas, else xla;
              TPU: pallas; CPU: xla.
"""

from __future__ import annotations

import numbers
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddjax.kernels.decode_attention import decode_attention
from ddjax.kernels.flash_attention import flash_attention
from ddjax.kernels.reference import KV_LAYOUTS, attention_reference

__all__ = ["AVAILABLE_IMPLEMENTATIONS", "KV_LAYOUTS", "attention", "attention_reference",
           "available_implementations", "default_implementation", "kv_cache_layout"]

# Every name `attention(implementation=...)` knows; `available_implementations()` lists those
# that run on a given backend.
AVAILABLE_IMPLEMENTATIONS = ("xla", "cudnn", "pallas")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def available_implementations(backend: str | None = None) -> tuple[str, ...]:
    """The implementations that run on `backend` (default: jax.default_backend())."""
    backend = backend or jax.default_backend()
    if backend in ("gpu", "cuda"):
        return ("xla", "cudnn", "pallas")
    return ("xla", "pallas")  # pallas runs interpreted (slowly) on the CPU


def default_implementation(q: jax.Array, backend: str | None = None) -> str:
    """What `implementation=None` picks for queries like q on `backend`.

    The Pallas and cuDNN paths have been checked in interpret mode and by ahead-of-time
    lowering only; until `benchmarks/attention.py` has confirmed them on a device, None picks
    XLA everywhere unless DDJAX_ATTENTION_AUTO=1 asks for the accelerated choice below.
    """
    backend = backend or jax.default_backend()
    if os.environ.get("DDJAX_ATTENTION_AUTO", "0") != "1":
        return "xla"
    d = q.shape[-1]
    if backend in ("gpu", "cuda"):
        if q.dtype in _CUDNN_DTYPES and d % 8 == 0 and d <= 128:
            return "cudnn"
        if d >= 16 and not d & (d - 1):  # the Triton kernels' head-dim constraint
            return "pallas"
        return "xla"
    return "pallas" if backend == "tpu" else "xla"


def kv_cache_layout(implementation: str | None, q: Any, backend: str | None = None) -> str:
    """The KV-cache layout that suits the implementation used for queries like q.

    "bhsd" (head-major) for XLA: its attention dots contract the cache in place, where a
    [B, S, Hkv, D] cache is transposed to the dots' layout at every decoding step (on the CPU
    that copy was the largest cost of a step). "bshd" for the fused kernels, which read the
    sequence-major cache in place.
    """
    impl = implementation or default_implementation(q, backend)
    return "bhsd" if impl == "xla" else "bshd"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    q_offset: jax.Array | int = 0,
    mask: jax.Array | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    interpret: bool | None = None,
    mesh: Mesh | None = None,
    batch_axes: str | tuple[str, ...] | None = None,
    kv_layout: str = "bshd",
) -> jax.Array:
    """Dispatches to an attention implementation; shapes as in `attention_reference`.

    Args:
      q, k, v, causal, q_offset, mask, scale: as in `attention_reference`.
      implementation: None picks the best for the backend (`default_implementation`), or
        "xla" when a `mask` is given; otherwise one of `available_implementations()`, else
        ValueError. Only "xla" takes a `mask`.
      interpret: pallas only: run the kernels in the Pallas interpreter (None: on the CPU).
      mesh: pallas only: run the kernels per shard under `shard_map`, the batch dimension
        split over `batch_axes` (default: the mesh's 'data' and 'fsdp' axes, else all of its
        axes) and everything else replicated. XLA and cuDNN are partitioned by XLA itself.
      kv_layout: "bshd" or "bhsd" (k, v head-major [B, Hkv, S, D]; see `kv_cache_layout`).
        The kernels take "bshd": a head-major k, v is transposed for them.
    Returns:
      [B, T, H, D] in q's dtype.
    """
    backend = jax.default_backend()
    if implementation is None:
        implementation = "xla" if mask is not None else default_implementation(q, backend)
    available = available_implementations(backend)
    if implementation not in AVAILABLE_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; "
            f"on backend {backend!r} choose one of {available} or None"
        )
    if implementation not in available:
        raise ValueError(
            f"attention implementation {implementation!r} is not available on backend "
            f"{backend!r}; choose one of {available} or None"
        )
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
    if implementation == "xla":
        return attention_reference(q, k, v, causal=causal, q_offset=q_offset, mask=mask,
                                   scale=scale, kv_layout=kv_layout)
    if kv_layout == "bhsd":
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if mask is not None:
        raise ValueError(f"attention implementation {implementation!r} takes no explicit mask; "
                         "use implementation='xla' (or None)")
    if scale is not None:  # the kernels scale by 1/sqrt(D): fold the requested scale into q
        q = (q.astype(jnp.float32) * (scale * q.shape[-1] ** 0.5)).astype(q.dtype)
    if implementation == "cudnn":
        return _cudnn_attention(q, k, v, causal=causal, q_offset=q_offset)
    if mesh is None:
        return _pallas_attention(q, k, v, q_offset, causal=causal, interpret=interpret)
    return _sharded_pallas_attention(q, k, v, q_offset, causal=causal, interpret=interpret,
                                     mesh=mesh, batch_axes=batch_axes)


def _is_static_zero(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and x == 0


def _cudnn_attention(q, k, v, *, causal: bool, q_offset) -> jax.Array:
    """cuDNN flash attention; its causal mask is top-left aligned (key j <= query i)."""
    if q.dtype not in _CUDNN_DTYPES:
        raise ValueError(f"cudnn attention takes bfloat16/float16, got {q.dtype}; "
                         "use implementation='pallas' or 'xla'")
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    b, t = q.shape[:2]
    s = k.shape[1]
    kw: dict[str, Any] = {}
    if causal and _is_static_zero(q_offset):
        kw["is_causal"] = True
    elif causal and t == 1:  # decoding: the first q_offset + 1 cache rows are valid
        length = jnp.clip(jnp.asarray(q_offset, jnp.int32) + 1, 1, s)
        kw["key_value_seq_lengths"] = jnp.broadcast_to(length, (b,))
    elif causal:
        q_pos = q_offset + jnp.arange(t)
        kw["mask"] = (jnp.arange(s)[None, :] <= q_pos[:, None])[None, None]
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kw)


def _pallas_attention(q, k, v, q_offset, *, causal: bool, interpret: bool | None) -> jax.Array:
    if q.shape[1] == 1:
        return decode_attention(q, k, v, q_offset, causal=causal, interpret=interpret)
    return flash_attention(q, k, v, q_offset, causal=causal, interpret=interpret)


def _sharded_pallas_attention(q, k, v, q_offset, *, causal, interpret, mesh: Mesh,
                              batch_axes) -> jax.Array:
    if batch_axes is None:
        batch_axes = tuple(a for a in mesh.axis_names if a in ("data", "fsdp")) or tuple(
            mesh.axis_names
        )
    batch = P(batch_axes)
    fn = jax.shard_map(
        lambda q_, k_, v_, off: _pallas_attention(q_, k_, v_, off, causal=causal,
                                                  interpret=interpret),
        mesh=mesh,
        in_specs=(batch, batch, batch, P()),
        out_specs=batch,
        check_vma=False,
    )
    if AxisType.Explicit in mesh.axis_types:  # typed shardings must match in_specs exactly
        q, k, v = (jax.sharding.reshard(x, NamedSharding(mesh, batch)) for x in (q, k, v))
    return fn(q, k, v, jnp.asarray(q_offset, jnp.int32))
