"""Plain attention in XLA: the reference every kernel is tested against (and the XLA path)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

KV_LAYOUTS = ("bshd", "bhsd")  # keys/values sequence-major or head-major


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    q_offset: jax.Array | int = 0,
    mask: jax.Array | None = None,
    scale: float | None = None,
    kv_layout: str = "bshd",
) -> jax.Array:
    """Plain attention, softmax in float32.

    Args:
      q: [B, T, H, D] queries; query i sits at absolute position `q_offset + i`.
      k, v: [B, S, Hkv, D] keys/values at positions 0..S-1; H must be a multiple of Hkv
        (query head h reads kv head h // (H // Hkv), as `repeat_interleave` in LlamaGen).
      causal: mask key j for query i when j > q_offset + i.
      q_offset: scalar int (may be traced).
      mask: optional [T, S] or per-example [B, T, S] bool (True: attend), combined with
        `causal`.
      scale: softmax scale (default 1/sqrt(D)).
      kv_layout: "bshd" (k, v as above) or "bhsd" (head-major [B, Hkv, S, D], the layout the
        XLA decoding cache keeps: the dots then read it in place instead of transposing it).
    Returns:
      [B, T, H, D] in q's dtype.
    """
    b, t, h, d = q.shape
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
    head_major = kv_layout == "bhsd"
    s, hkv = (k.shape[2], k.shape[1]) if head_major else (k.shape[1], k.shape[2])
    kv = "bgsd" if head_major else "bsgd"
    if h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
    rep = h // hkv
    qg = q.reshape(b, t, hkv, rep, d)
    scores = jnp.einsum(f"btgrd,{kv}->bgrts", qg, k, preferred_element_type=jnp.float32)
    if scale is None:
        scores = scores * (1.0 / jnp.sqrt(jnp.float32(d)))
    elif scale != 1.0:
        scores = scores * jnp.float32(scale)
    if mask is not None and tuple(mask.shape) not in ((t, s), (b, t, s)):
        raise ValueError(f"mask must be [T, S] = [{t}, {s}] or [B, T, S] = [{b}, {t}, {s}], "
                         f"got {tuple(mask.shape)}")
    if causal:
        q_pos = q_offset + jnp.arange(t)
        allowed = jnp.arange(s)[None, :] <= q_pos[:, None]  # [T, S]
        mask = allowed if mask is None else (allowed & mask)
    if mask is not None:
        if mask.ndim == 3:  # [B, T, S] -> scores' [B, Hkv, rep, T, S]
            mask = mask[:, None, None]
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if head_major:
        # Contracted into [B, Hkv, rep, T, D] and then transposed (a small array): XLA:CPU has
        # no bf16 x bf16 -> f32 dot that writes the [B, T, Hkv, rep, D] order from a
        # head-major v ("Unsupported element type for DotThunk" at run time).
        out = jnp.einsum("bgrts,bgsd->bgrtd", probs, v, preferred_element_type=jnp.float32)
        out = jnp.transpose(out, (0, 3, 1, 2, 4))
    else:
        out = jnp.einsum("bgrts,bsgd->btgrd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)
