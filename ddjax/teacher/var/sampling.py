"""VAR's `autoregressive_infer_cfg` as one compiled program, with a pluggable per-scale rule.

The scales are unrolled in Python (all shapes static) around an explicit KV cache of
[2B, L, H, D] per block: scale si's tokens are written at their offsets and attend to every
cached position before the end of their scale, which is exactly VAR's block-causal mask.
Per scale, as VAR (`models/var.py`, `models/helpers.py`):
  * CFG ramp: t = cfg * si / (S - 1); logits = (1 + t) * cond - t * uncond (unguided at si = 0);
  * top-k: drop logits below the k-th largest (ties kept); top-p: sort ascending, drop where
    the cumulative probability is <= 1 - top_p, always keep the largest (0 = off for both);
  * draw every position of the scale at once: `rule(key, logp, si, inputs) -> ids`, by default
    a multinomial (`jax.random.categorical`) or the argmax when `greedy`;
  * f_hat += phi(bicubic(E[ids])) and the next scale's input is area(f_hat) (`next_input`).
The cumulative sum of top-p accumulates in double-float (two float32s), as torch's CPU kernel
accumulates float32 in float64, so the kept sets match the reference token for token.
Conditional and null-class rows are interleaved ([c0, u0, c1, u1, ...]) so that a batch split
over the mesh keeps each pair on one device. torch's RNG is not reproduced: tests replay
recorded ids through the rule.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ddjax.sharding import batch_sharding, batch_size_per_step, replicated
from ddjax.teacher.base import argmax, categorical
from ddjax.teacher.var.model import VAR, VARConfig, init_cache
from ddjax.teacher.var.vqvae import VQVAE, VQVAEConfig

# rule(key, logp [B, n, V] float32 with -inf for removed tokens, scale index (static int),
#      inputs: pytree of [B, n, ...] for this scale) -> token ids [B, n] int32
ScaleRule = Callable[[jax.Array, jax.Array, int, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class VARSamplingSettings:
    """Static sampling settings (hashable: part of the compiled program's cache key).

    cfg is VAR's guidance ratio (the final scale is guided with 1 + cfg); top_k = 0 and
    top_p = 0 switch the filters off (VAR's FID setting: cfg 1.5, top_k 900, top_p 0.96).
    """

    cfg: float = 1.5
    top_k: int = 0
    top_p: float = 0.0
    greedy: bool = False

    def __post_init__(self):
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1] (0 = off), got {self.top_p}")


class SampleTrace(NamedTuple):
    """What `sample(..., return_trace=True)` returns besides the ids (sampled scales only)."""

    ids: jax.Array  # [B, L] int32
    f_hat: jax.Array  # [B, H, W, Cvae] float32, the final f_hat
    logits: list  # per scale: guided logits [B, pn^2, V] float32 (None for given scales)
    logp: list  # per scale: the rule's input [B, pn^2, V], -inf where filtered (None if given)


# -- the per-scale math -----------------------------------------------------------------------
def cfg_weight(cfg: float, si: int, num_scales: int) -> float:
    """VAR's guidance at scale si: t = cfg * si / (S - 1), in float64 on the host."""
    return cfg * (si / (num_scales - 1))


def guide(cond: jax.Array, uncond: jax.Array, t: float) -> jax.Array:
    """(1 + t) * cond - t * uncond, the factors rounded to float32 as torch does."""
    return np.float32(1 + t) * cond - np.float32(t) * uncond


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _add_extended(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array]):
    """(hi, lo) + (hi, lo) in double-float, renormalised so that |lo| <= ulp(hi) / 2."""
    s, e = _two_sum(a[0], b[0])
    e = e + (a[1] + b[1])
    hi = s + e
    return hi, e - (hi - s)


def cumsum_extended(x: jax.Array, chunk: int = 16) -> jax.Array:
    """Cumulative sum over the last axis accumulated in double-float, rounded to float32.

    Matches torch's CPU `cumsum` on float32, which accumulates in float64. A scan over chunks
    of `chunk` entries carries the running (hi, lo) total; each chunk's prefix sums come from a
    double-float associative scan (a small program to compile, few sequential steps to run).
    """
    x = x.astype(jnp.float32)
    v = x.shape[-1]
    lead = x.shape[:-1]
    pad = (-v) % chunk
    xp = jnp.pad(x, [(0, 0)] * len(lead) + [(0, pad)])  # zeros leave the sums unchanged
    blocks = jnp.moveaxis(xp.reshape(*lead, -1, chunk), -2, 0)  # [n_chunks, ..., chunk]

    def step(carry, block):
        part = jax.lax.associative_scan(_add_extended, (block, jnp.zeros_like(block)),
                                        axis=block.ndim - 1)
        hi, lo = _add_extended((carry[0][..., None], carry[1][..., None]), part)
        return (hi[..., -1], lo[..., -1]), hi + lo

    zeros = jnp.zeros(lead, jnp.float32)
    _, out = jax.lax.scan(step, (zeros, zeros), blocks)
    return jnp.moveaxis(out, 0, -2).reshape(*lead, -1)[..., :v]


def softmax_torch(x: jax.Array) -> jax.Array:
    """Softmax over the last axis as torch's CPU kernel orders it: exp(x - max) * (1 / sum)."""
    e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    return e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))


def filter_top_k_top_p(logits: jax.Array, top_k: int = 0, top_p: float = 0.0) -> jax.Array:
    """VAR's `sample_with_top_k_top_p_` masking of logits [..., V]: removed entries -> -inf.

    top-k keeps every logit >= the k-th largest (ties kept; k >= V keeps all); top-p, on the
    top-k result, sorts ascending and removes where cumsum(softmax) <= 1 - top_p, never the
    largest; 0 switches each off. Only the k kept values are sorted (`lax.top_k`; the whole
    row when top_k is off), and logits tied with the k-th largest beyond k enter the sums as
    copies of it. The top-p removal is applied as a value threshold (below the smallest kept
    sorted value): the same set as VAR's positional removal except for logits tied across the
    top-p boundary, of which VAR removes an arbitrary subset (its sort is not stable) and ddjax
    none.
    """
    neg_inf = jnp.array(-jnp.inf, logits.dtype)
    vocab = logits.shape[-1]
    use_k, use_p = 0 < top_k < vocab, top_p > 0
    if not (use_k or use_p):
        return logits
    k = top_k if use_k else vocab
    top = jax.lax.top_k(logits, k)[0]  # descending
    kth = top[..., -1:]
    if use_k:
        logits = jnp.where(logits < kth, neg_inf, logits)
    if not use_p:
        return logits
    ascending = top[..., ::-1].astype(jnp.float32)
    kth32 = ascending[..., :1]
    extra = (jnp.sum(logits >= kth, axis=-1, keepdims=True) - k).astype(jnp.float32) if use_k else 0.0
    peak = ascending[..., -1:]
    e = jnp.exp(ascending - peak)
    e_tie = jnp.exp(kth32 - peak)
    inv = 1.0 / (jnp.sum(e, axis=-1, keepdims=True) + extra * e_tie)
    cum = cumsum_extended(e * inv) + extra * (e_tie * inv)
    first_kept = jnp.sum(cum[..., :-1] <= np.float32(1 - top_p), axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(top[..., ::-1], first_kept, axis=-1)
    return jnp.where(logits < threshold, neg_inf, logits)


def multinomial_rule(key: jax.Array, logp: jax.Array, si: int, inputs: Any) -> jax.Array:
    """VAR's draw: one independent categorical sample per position."""
    del si, inputs
    return categorical(key, logp)


def greedy_rule(key: jax.Array, logp: jax.Array, si: int, inputs: Any) -> jax.Array:
    del key, si, inputs
    return argmax(logp)


# -- the program ------------------------------------------------------------------------------
def _check_configs(var_cfg: VARConfig, vae_cfg: VQVAEConfig) -> None:
    pairs = {"patch_nums": (var_cfg.patch_nums, vae_cfg.patch_nums),
             "vocab_size": (var_cfg.vocab_size, vae_cfg.vocab_size),
             "cvae / z_channels": (var_cfg.cvae, vae_cfg.z_channels)}
    bad = [f"{k}: VAR {a} != VQVAE {b}" for k, (a, b) in pairs.items() if a != b]
    if bad:
        raise ValueError("VAR and VQVAE configs disagree: " + "; ".join(bad))


def _sample_impl(var_params, vae_params, labels, key, prefix, rule_inputs, *, var_cfg: VARConfig,
                 vae_cfg: VQVAEConfig, settings: VARSamplingSettings, rule: ScaleRule,
                 prefix_scales: int, mesh: Mesh | None, trace: bool, stop_scales: int | None = None):
    model, vae = VAR(var_cfg), VQVAE(vae_cfg)
    var_apply = functools.partial(model.apply, {"params": var_params})
    vae_apply = functools.partial(vae.apply, {"params": vae_params})
    b = labels.shape[0]
    s = var_cfg.num_scales
    use_cfg = settings.cfg != 0
    rows = 2 * b if use_cfg else b

    def constrain(x):
        if mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim))

    if use_cfg:  # [c0, u0, c1, u1, ...]
        row_labels = jnp.stack([labels, jnp.full_like(labels, var_cfg.num_classes)], 1).reshape(-1)
    else:
        row_labels = labels
    cond = var_apply(row_labels.astype(jnp.int32), method=VAR.embed_cond)
    caches = jax.tree_util.tree_map(constrain, init_cache(var_cfg, rows))
    x = var_apply(cond, method=VAR.embed_first)
    size = vae_cfg.latent_size
    f_hat = jnp.zeros((b, size, size, vae_cfg.z_channels), jnp.float32)
    all_ids, all_logits, all_logp = [], [], []
    stop = s if stop_scales is None else stop_scales
    for si in range(stop):
        start, end = var_cfg.begin_ends[si]
        h, caches = var_apply(x, cond, caches, start, method=VAR.blocks_step)
        if si < prefix_scales:
            ids = prefix[:, start:end].astype(jnp.int32)
            guided = logp = None
        else:
            lg = var_apply(h, cond, method=VAR.logits)
            if use_cfg:
                guided = guide(lg[0::2], lg[1::2], cfg_weight(settings.cfg, si, s))
            else:
                guided = lg
            filtered = filter_top_k_top_p(guided, settings.top_k, settings.top_p)
            logp = jax.nn.log_softmax(filtered, axis=-1)
            inputs = jax.tree_util.tree_map(lambda a, lo=start, hi=end: a[:, lo:hi], rule_inputs)
            ids = rule(jax.random.fold_in(key, si), logp, si, inputs).astype(jnp.int32)
        all_ids.append(ids)
        all_logits.append(guided)
        all_logp.append(logp)
        code_map = vae_apply(ids, method=VQVAE.embed)
        f_hat, nxt = vae_apply(si, f_hat, code_map, method=VQVAE.next_input)
        if si < stop - 1:
            x = var_apply(nxt.reshape(b, -1, vae_cfg.z_channels), si + 1, method=VAR.embed_scale)
            if use_cfg:
                x = jnp.repeat(x, 2, axis=0)
    ids = jnp.concatenate(all_ids, axis=1)
    if trace:
        return SampleTrace(ids, f_hat, all_logits, all_logp)
    return ids


@functools.lru_cache(maxsize=64)
def _compiled(var_cfg, vae_cfg, settings, rule, prefix_scales, mesh, trace, stop_scales=None):
    fn = functools.partial(_sample_impl, var_cfg=var_cfg, vae_cfg=vae_cfg, settings=settings,
                           rule=rule, prefix_scales=prefix_scales, mesh=mesh, trace=trace,
                           stop_scales=stop_scales)
    if mesh is None or trace:
        return jax.jit(fn)
    return jax.jit(fn, out_shardings=batch_sharding(mesh, 2))


def sample(
    var_params: Any,
    var_cfg: VARConfig,
    vae_params: Any,
    vae_cfg: VQVAEConfig,
    labels: jax.Array,
    key: jax.Array,
    settings: VARSamplingSettings = VARSamplingSettings(),
    *,
    rule: ScaleRule | None = None,
    rule_inputs: Any = None,
    prefix_ids: jax.Array | None = None,
    prefix_scales: int = 0,
    mesh: Mesh | None = None,
    return_trace: bool = False,
    stop_scales: int | None = None,
) -> jax.Array | SampleTrace:
    """Samples token ids of every scale from VAR in one compiled program.

    Args:
      var_params, var_cfg: the transformer.
      vae_params, vae_cfg: the VQVAE (its codebook and phis build f_hat between scales).
      labels: class labels [B] int; num_classes is the null class (unconditional).
      key: PRNG key; scale si draws with fold_in(key, si), so a continuation from a prefix
        draws the same randomness for the same scales.
      settings: cfg / top_k / top_p / greedy (static).
      rule: the per-scale draw (default multinomial, or argmax when settings.greedy); static
        and hashable (a module-level function), it is part of the compiled program's key.
      rule_inputs: pytree of [B, L, ...] arrays; the rule gets [:, begin:end] of each scale
        (the flow map passes its noise here).
      prefix_ids: [B, >= begin of scale prefix_scales] ids of the given scales.
      prefix_scales: static number of given scales (teacher-involved sampling starts there).
      mesh: split the batch over the mesh's batch axes (B must divide evenly).
      return_trace: also return the final f_hat and per-scale guided logits and logp.
      stop_scales: sample scales < stop_scales only (static; None = all): teacher-involved DD
        hands the later scales to the student.
    Returns:
      ids [B, L] int32 (the scales concatenated; [B, begin of stop_scales] with stop_scales),
      or a SampleTrace.
    """
    _check_configs(var_cfg, vae_cfg)
    s = var_cfg.num_scales
    if not 0 <= prefix_scales < s:
        raise ValueError(f"prefix_scales must be in [0, {s}), got {prefix_scales}")
    if stop_scales is not None and not prefix_scales < stop_scales <= s:
        raise ValueError(f"stop_scales must be in ({prefix_scales}, {s}], got {stop_scales}")
    b = labels.shape[0]
    need = var_cfg.begin_ends[prefix_scales][0]
    if prefix_scales and (prefix_ids is None or prefix_ids.shape[0] != b or prefix_ids.shape[1] < need):
        raise ValueError(f"prefix_ids must be [{b}, >={need}] for prefix_scales={prefix_scales}")
    if mesh is not None and b % batch_size_per_step(mesh):
        raise ValueError(f"batch {b} does not split over {batch_size_per_step(mesh)} devices")
    if rule is None:
        rule = greedy_rule if settings.greedy else multinomial_rule
    if prefix_ids is None:
        prefix_ids = jnp.zeros((b, 1), jnp.int32)
    labels = jnp.asarray(labels, jnp.int32)
    if mesh is not None:
        var_params, vae_params = jax.device_put((var_params, vae_params), replicated(mesh))
        labels, prefix_ids, rule_inputs = jax.tree_util.tree_map(
            lambda a: jax.device_put(a, batch_sharding(mesh, a.ndim)), (labels, prefix_ids, rule_inputs))
    fn = _compiled(var_cfg, vae_cfg, settings, rule, prefix_scales, mesh, return_trace,
                   None if stop_scales == s else stop_scales)
    return fn(var_params, vae_params, labels, key, prefix_ids, rule_inputs)


@functools.partial(jax.jit, static_argnames=("vae_cfg",))
def ids_to_image(vae_params: Any, vae_cfg: VQVAEConfig, ids: jax.Array) -> jax.Array:
    """ids [B, L] -> images [B, H, W, 3] in [-1, 1] (VAR's sampler returns (x + 1) / 2)."""
    return VQVAE(vae_cfg).apply({"params": vae_params}, ids, method=VQVAE.idxBl_to_img)


__all__ = ["ScaleRule", "SampleTrace", "VARSamplingSettings", "cfg_weight", "guide",
           "cumsum_extended", "filter_top_k_top_p", "multinomial_rule", "greedy_rule", "sample",
           "ids_to_image"]
