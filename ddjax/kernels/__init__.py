"""Attention in one place: every model calls `attention(...)` from here.

`attention(q, k, v, causal=, q_offset=, implementation=None|"xla"|"cudnn"|"pallas")` dispatches;
the Pallas kernels live in `flash_attention` (T > 1, forward and backward) and
`decode_attention` (one query against a KV cache).
"""

from ddjax.kernels.attention import (
    AVAILABLE_IMPLEMENTATIONS,
    attention,
    attention_reference,
    available_implementations,
    default_implementation,
    kv_cache_layout,
)

__all__ = [
    "AVAILABLE_IMPLEMENTATIONS",
    "attention",
    "attention_reference",
    "available_implementations",
    "default_implementation",
    "kv_cache_layout",
]
