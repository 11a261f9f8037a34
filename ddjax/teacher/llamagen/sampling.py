"""Teacher sampling: one jit-compiled KV-cache decoding loop with classifier-free guidance.

LlamaGen semantics (`autoregressive/models/generate.py`):
  * CFG when cfg_scale > 1: each example runs twice (condition, null condition);
    logits = uncond + (cond - uncond) * cfg_scale; with cfg_interval = k > -1 guidance is
    used for image tokens 0..k+1 and the conditional logits alone afterwards;
  * logits / max(temperature, 1e-5), then top-k (ties with the k-th kept), then top-p (the
    first token past the threshold kept), then softmax and a multinomial draw (or argmax).
The draw is a pluggable `TokenRule`, so the flow-matching map can replace it in the same
loop. On the XLA attention path the loop runs in segments over a growing window of the cache
(`DECODE_WINDOW`), and top-k finds its threshold by an exact selection (`kth_largest`) rather
than a sort: both leave the tokens unchanged and matter on the CPU. Conditional and
unconditional rows are interleaved ([c0, u0, c1, u1, ...]) so that a batch split over the
mesh keeps each pair on one device.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ddjax.kernels import default_implementation
from ddjax.sharding import batch_sharding, batch_size_per_step, replicated
from ddjax.teacher.base import TokenRule, argmax, categorical
from ddjax.teacher.llamagen.captions import batch_size as cond_batch
from ddjax.teacher.llamagen.captions import key_mask as caption_key_mask
from ddjax.teacher.llamagen.gpt import GPT, GPTConfig, cache_seq_axis, init_cache

# rule(key, logp [B, V] float32 with -inf for removed tokens, position (int32 scalar),
#      inputs: pytree of [B, ...] for this position) -> token ids [B] int32
# (ddjax.teacher.base.TokenRule with one position per step).


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Static sampling settings (hashable: part of the compiled loop's cache key)."""

    cfg_scale: float = 1.0
    cfg_interval: int = -1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False

    def __post_init__(self):
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

    @property
    def use_cfg(self) -> bool:
        return self.cfg_scale > 1.0


def settings_from_config(c: Any) -> SamplingSettings:
    """SamplingSettings from a config block with the same field names (extra fields ignored)."""
    names = {f.name for f in dataclasses.fields(SamplingSettings)}
    return SamplingSettings(**{k: c[k] for k in names if k in c})


# -- the per-token rules ------------------------------------------------------------------
def guide(cond: jax.Array, uncond: jax.Array, scale: float, use: jax.Array | bool = True):
    """CFG: uncond + (cond - uncond) * scale where `use`, else cond."""
    return jnp.where(use, uncond + (cond - uncond) * scale, cond)


def kth_largest(x: jax.Array, k: int) -> jax.Array:
    """The k-th largest value along the last axis, ties counted: `lax.top_k(x, k)[0][..., -1:]`.

    Exact, without sorting: a 32-step binary search over the order-preserving unsigned-integer
    image of the float32 bits, each step counting the entries at or above a candidate. On the
    CPU this is 10-20x faster than `lax.top_k` at LlamaGen's k = 8000 of 16384 (and still
    faster at small k), which matters since it runs once per generated token. NaN is ordered
    as `lax.top_k` does (above +inf). Returns [..., 1] in x's dtype.
    """
    if not 0 < k <= x.shape[-1]:
        raise ValueError(f"k must be in [1, {x.shape[-1]}], got {k}")
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):  # not exact through float32
        return jax.lax.top_k(x, k)[0][..., -1:]
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    sign = jnp.uint32(0x80000000)
    # Negative floats: flip every bit; positive: set the sign bit. Then unsigned order = float order.
    key = jnp.where(bits >= sign, ~bits, bits | sign)

    def step(i, ans):
        cand = ans | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        enough = jnp.sum(key >= cand[..., None], axis=-1, dtype=jnp.int32) >= k
        return jnp.where(enough, cand, ans)

    # The largest key t with at least k entries >= t: the k-th largest key itself.
    ans = jax.lax.fori_loop(0, 32, step, jnp.zeros(x.shape[:-1], jnp.uint32), unroll=True)
    out = jnp.where(ans >= sign, ans & ~sign, ~ans)
    return jax.lax.bitcast_convert_type(out, jnp.float32).astype(x.dtype)[..., None]


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """LlamaGen's top-k then top-p filtering of logits [B, V]; removed entries become -inf."""
    neg_inf = jnp.array(-jnp.inf, logits.dtype)
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        logits = jnp.where(logits < kth_largest(logits, top_k), neg_inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Remove past the threshold, shifted right by one: the first token past it stays.
        remove = jnp.concatenate([jnp.zeros_like(cum[..., :1], bool), (cum > top_p)[..., :-1]], -1)
        remove_orig = jnp.zeros_like(remove).at[jnp.arange(logits.shape[0])[:, None], order].set(remove)
        logits = jnp.where(remove_orig, neg_inf, logits)
    return logits


def process_logits(logits: jax.Array, settings: SamplingSettings) -> jax.Array:
    """Temperature, top-k, top-p -> log-probabilities [B, V] (float32, -inf where removed)."""
    logits = logits.astype(jnp.float32) / max(settings.temperature, 1e-5)
    logits = filter_logits(logits, settings.top_k, settings.top_p)
    return jax.nn.log_softmax(logits, axis=-1)


def multinomial_rule(key: jax.Array, logp: jax.Array, position: jax.Array, inputs: Any) -> jax.Array:
    del position, inputs
    return categorical(key, logp)


def greedy_rule(key: jax.Array, logp: jax.Array, position: jax.Array, inputs: Any) -> jax.Array:
    del key, position, inputs
    return argmax(logp)


# -- the loop -----------------------------------------------------------------------------
@flax.struct.dataclass
class LoopState:
    tokens: jax.Array  # [B, L] int32
    logits: jax.Array  # [rows, V] raw logits for the next token (rows = 2B with CFG)
    caches: list  # per-layer {"k", "v"}: [rows, Hkv, S, D] (XLA) or [rows, S, Hkv, D]
    key_mask: Any = None  # [rows, S] caption padding (t2i) or None


def _null_cond(config: GPTConfig, cond: Any) -> tuple[Any, jax.Array]:
    """(condition rows, drop mask) with cond/null interleaved: [c0, n0, c1, n1, ...]. A null
    caption row keeps its caption's padding mask, as LlamaGen's generate() does."""
    b = cond_batch(cond)
    both = jax.tree_util.tree_map(lambda x: jnp.repeat(x, 2, axis=0), cond)
    drop = jnp.tile(jnp.array([False, True]), b)
    return both, drop


# On the XLA attention path every decoding step reads (and, on the CPU, transposes to the dot's
# layout) the whole KV cache it is given, so the loop runs in segments over a cache window that
# grows in steps of this many rows: for 256 tokens the average window is 160 rows instead of
# 257, at the price of one compiled loop body per segment (GPT-B, 2 CPU cores: 1.5x the tokens/s
# at batch 8, about 3x the compile time; see benchmarks/README.md). The fused kernels (pallas,
# cudnn) already stop at the current length: they get one segment over the full cache.
DECODE_WINDOW = 64


def _segments(start: int, stop: int, cls: int, cache_len: int, window: int | None):
    """[(first, end, cache rows)]: loop steps first..end-1 (step i writes row cls + i) over a
    cache window of that many rows, covering start..stop-1."""
    if not window:
        return [(start, stop, cache_len)] if start < stop else []
    out = []
    first = start
    while first < stop:
        rows = min(cache_len, (cls + first) // window * window + window)
        end = min(stop, rows - cls)
        out.append((first, end, rows))
        first = end
    return out


def _uses_xla_attention(config: GPTConfig, rows: int) -> bool:
    if config.attention_impl is not None:
        return config.attention_impl == "xla"
    q = jax.ShapeDtypeStruct((rows, 1, config.n_head, config.head_dim), config.dtype)
    return default_implementation(q) == "xla"


def _is_kernel(path, x) -> bool:
    return getattr(path[-1], "key", None) == "kernel" and x.ndim == 2


def _transposed_kernels(params: Any) -> Any:
    """Every Dense kernel of params transposed ([in, out] <-> [out, in]), other leaves as they are."""
    return jax.tree_util.tree_map_with_path(lambda p, x: x.T if _is_kernel(p, x) else x, params)


_transpose_kernels = jax.jit(_transposed_kernels)


def weight_major_params(params: Any) -> Any:
    """params with every Dense kernel [in, out] stored as its transpose [out, in] (a copy),
    for `sample(weight_major=True)`; run outside the sampling loop's jit, so the buffers XLA
    receives are laid out [out, in]."""
    return _transpose_kernels(params)


def _traced(params: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(params))


def _default_weight_major(params: Any, config: GPTConfig) -> bool:
    """On for float32 compute where every parameter lives on CPU devices; off under an outer
    jit (whose computation would fold the kernels' copy back into their original layout) and
    for bf16 compute (measured slower with it at batch 32, benchmarks/README.md)."""
    if _traced(params) or jnp.dtype(config.dtype) != jnp.float32:
        return False
    leaves = jax.tree_util.tree_leaves(params)
    devices = {d for x in leaves if isinstance(x, jax.Array) for d in x.devices()}
    if not devices:
        return jax.default_backend() == "cpu"
    return all(d.platform == "cpu" for d in devices)


def _sample_impl(params, cond, key, prefix, rule_inputs, *, config: GPTConfig,
                 settings: SamplingSettings, rule: TokenRule, prefix_len: int,
                 num_tokens: int, mesh: Mesh | None, weight_major: bool = False):
    model = GPT(config, weight_major=weight_major)
    if weight_major:
        # The kernels arrive [out, in] (weight_major_params); the model sees their [in, out]
        # views, which XLA cancels against the kernel^T of the weight-major dot.
        params = _transposed_kernels(params)
    if jnp.dtype(config.dtype) != jnp.dtype(config.param_dtype):
        # Every use casts the weights to the compute dtype: cast them once, not at every step
        # (the same values; the loop then reads half the bytes in bf16).
        params = jax.tree_util.tree_map(
            lambda x: x.astype(config.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    apply = functools.partial(model.apply, {"params": params})
    b = cond_batch(cond)
    cfg = settings.use_cfg
    rows = 2 * b if cfg else b
    c = config.cls_token_num

    def constrain(x):
        if mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim))

    caches = init_cache(config, rows)
    window = DECODE_WINDOW if _uses_xla_attention(config, rows) else None
    axis = cache_seq_axis(config)

    def rows_of(x, n):
        return jax.lax.slice_in_dim(x, 0, n, axis=axis)

    if window:
        # The last token is drawn but never fed back: c + num_tokens - 1 rows suffice.
        caches = [{n: rows_of(x, c + num_tokens - 1) for n, x in layer.items()} for layer in caches]
    caches = jax.tree_util.tree_map(constrain, caches)
    cache_len = caches[0]["k"].shape[axis]
    cond_rows, drop = _null_cond(config, cond) if cfg else (cond, None)
    key_mask = caption_key_mask(cond_rows, cache_len)
    if key_mask is not None:
        key_mask = constrain(key_mask)
    logits, caches = apply(cond_rows, caches, drop, key_mask, method=GPT.prefill)
    tokens = jnp.zeros((b, num_tokens), jnp.int32)
    if prefix_len:
        p = prefix[:, :prefix_len].astype(jnp.int32)
        tokens = tokens.at[:, :prefix_len].set(p)
        fed = jnp.repeat(p, 2, axis=0) if cfg else p
        step_logits, caches = apply(fed, caches, c, key_mask, method=GPT.decode)
        logits = step_logits[:, -1]

    def pick(state: LoopState, i: jax.Array) -> jax.Array:
        lg = state.logits
        if cfg:
            lg = lg.reshape(b, 2, -1)
            # The interval counts from the end of the prefix, as the official
            # intermediate_generate does (LlamaGen's generate() is the prefix_len = 0 case).
            use = (settings.cfg_interval < 0) | (i <= settings.cfg_interval + 1 + prefix_len)
            lg = guide(lg[:, 0], lg[:, 1], settings.cfg_scale, use)
        logp = process_logits(lg, settings)
        inputs = jax.tree_util.tree_map(lambda x: x[:, i], rule_inputs)
        return rule(jax.random.fold_in(key, i), logp, i, inputs).astype(jnp.int32)

    def body(i, state: LoopState) -> LoopState:
        tok = pick(state, i)
        fed = jnp.repeat(tok, 2, axis=0) if cfg else tok
        step_logits, caches = apply(fed[:, None], state.caches, c + i, state.key_mask,
                                    method=GPT.decode)
        return LoopState(state.tokens.at[:, i].set(tok), step_logits[:, 0], caches,
                         state.key_mask)

    state = LoopState(tokens, logits, caches, key_mask)
    for first, end, n in _segments(prefix_len, num_tokens - 1, c, cache_len, window):
        # Every row past the window lies past the positions this segment feeds (masked by
        # causality), so the window attends to exactly the keys the full cache would.
        part = [{k: rows_of(x, n) for k, x in layer.items()} for layer in state.caches]
        part_mask = None if key_mask is None else key_mask[:, :n]
        part = jax.lax.fori_loop(first, end, body, state.replace(caches=part, key_mask=part_mask))
        caches = jax.tree_util.tree_map(
            lambda full, x: jax.lax.dynamic_update_slice_in_dim(full, x, 0, axis=axis),
            state.caches, part.caches,
        )
        state = part.replace(caches=caches, key_mask=key_mask)
    last = pick(state, jnp.int32(num_tokens - 1))
    return state.tokens.at[:, num_tokens - 1].set(last)


@functools.lru_cache(maxsize=64)
def _compiled(config, settings, rule, prefix_len, num_tokens, mesh, weight_major=False):
    kw = dict(config=config, settings=settings, rule=rule, prefix_len=prefix_len,
              num_tokens=num_tokens, mesh=mesh, weight_major=weight_major)
    fn = functools.partial(_sample_impl, **kw)
    if mesh is None:
        return jax.jit(fn)
    return jax.jit(fn, out_shardings=batch_sharding(mesh, 2))


def sample(
    params: Any,
    config: GPTConfig,
    cond: jax.Array,
    key: jax.Array,
    settings: SamplingSettings = SamplingSettings(),
    *,
    rule: TokenRule | None = None,
    rule_inputs: Any = None,
    prefix_ids: jax.Array | None = None,
    prefix_len: int = 0,
    num_tokens: int | None = None,
    mesh: Mesh | None = None,
    weight_major: bool | None = None,
) -> jax.Array:
    """Samples image tokens from the teacher in one compiled loop.

    Args:
      params: GPT params.
      config: the GPTConfig (static).
      cond: class labels [B] int (c2i) or a `captions.Captions` batch (t2i: features
        [B, cls_token_num, caption_dim], left-padded, with their padding mask).
      key: PRNG key; token i uses fold_in(key, i), so a continuation from a prefix draws the
        same randomness for the same positions.
      settings: CFG / temperature / top-k / top-p / greedy.
      rule: the per-token draw (default multinomial, or argmax when settings.greedy).
      rule_inputs: pytree of [B, L, ...] arrays; the rule gets [:, i] at position i
        (the flow-matching map passes its noise here).
      prefix_ids: [B, >= prefix_len] tokens to continue from (teacher-involved sampling);
        positions < prefix_len are copied, the rest are sampled.
      prefix_len: static number of given tokens. `settings.cfg_interval` counts from here.
      num_tokens: tokens to produce (default block_size).
      mesh: split the batch over the mesh's batch axes (B must divide evenly).
      weight_major: copy the Dense kernels to [out, in] for the call and apply them as
        kernel^T x^T (`GPT.weight_major`): the same model, with matmuls about 1.5x faster on
        XLA:CPU at the 16 rows of batch 8 with CFG (less at more rows), for one extra copy of
        the kernels during the call. None
        (default): on for float32 compute when the params live on CPU devices.
    Returns:
      token ids [B, num_tokens] int32.
    """
    num_tokens = num_tokens or config.block_size
    if not 0 < num_tokens <= config.block_size:
        raise ValueError(f"num_tokens must be in [1, {config.block_size}], got {num_tokens}")
    if not 0 <= prefix_len < num_tokens:
        raise ValueError(f"prefix_len must be in [0, {num_tokens}), got {prefix_len}")
    b = cond_batch(cond)
    if prefix_len and (prefix_ids is None or prefix_ids.shape[0] != b
                       or prefix_ids.shape[1] < prefix_len):
        raise ValueError(f"prefix_ids must be [{b}, >={prefix_len}] for prefix_len={prefix_len}")
    if mesh is not None and b % batch_size_per_step(mesh):
        raise ValueError(f"batch {b} does not split over {batch_size_per_step(mesh)} devices")
    if rule is None:
        rule = greedy_rule if settings.greedy else multinomial_rule
    if prefix_ids is None:
        prefix_ids = jnp.zeros((b, 1), jnp.int32)
    if mesh is not None:
        # No-ops when the arrays already live there (keep params replicated across calls).
        params = jax.device_put(params, replicated(mesh))
        cond, prefix_ids, rule_inputs = jax.tree_util.tree_map(
            lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim)), (cond, prefix_ids, rule_inputs)
        )
    if weight_major is None:
        weight_major = _default_weight_major(params, config)
    if weight_major:
        if _traced(params):
            raise ValueError("weight_major=True needs concrete params (call sample outside "
                             "jax.jit): inside a jit the kernels' [out, in] copy is folded away")
        params = weight_major_params(params)
    fn = _compiled(config, settings, rule, prefix_len, num_tokens, mesh, bool(weight_major))
    return fn(params, cond, key, prefix_ids, rule_inputs)
