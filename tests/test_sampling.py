"""Teacher sampling: cache equivalence, LlamaGen's CFG/top-k/top-p rules, prefixes, compilation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params, tiny_gpt_config

from ddjax.teacher.llamagen import sampling as sampling_lib
from ddjax.teacher.llamagen.gpt import GPT, init_cache, init_params
from ddjax.teacher.llamagen.sampling import (
    SamplingSettings,
    filter_logits,
    guide,
    process_logits,
    sample,
)

_FORWARD = {}


def forward(cfg, params, tokens, cond):
    """Jitted teacher forcing (compiled once per config)."""
    if cfg not in _FORWARD:
        _FORWARD[cfg] = jax.jit(GPT(cfg).apply)
    return _FORWARD[cfg]({"params": params}, tokens, cond)


def test_cached_decoding_matches_teacher_forcing(tiny_gpt):
    cfg, params = tiny_gpt
    model = GPT(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, cfg.block_size), 0, cfg.vocab_size)
    labels = jnp.array([0, 5, 9])
    full = model.apply({"params": params}, tokens, labels)
    caches = init_cache(cfg, 3)
    first, caches = model.apply({"params": params}, labels, caches, method=GPT.prefill)
    decode = jax.jit(lambda t, c, i: model.apply({"params": params}, t, c, i, method=GPT.decode))
    steps = [first]
    for i in range(cfg.block_size - 1):
        lg, caches = decode(tokens[:, i:i + 1], caches, cfg.cls_token_num + i)
        steps.append(lg[:, 0])
    np.testing.assert_allclose(np.stack(steps, 1), full, atol=1e-5, rtol=0)
    # Several tokens at once against the cache equal the same positions of the full pass.
    caches = init_cache(cfg, 3)
    _, caches = model.apply({"params": params}, labels, caches, method=GPT.prefill)
    chunk, _ = model.apply({"params": params}, tokens[:, :7], caches, cfg.cls_token_num,
                           method=GPT.decode)
    np.testing.assert_allclose(chunk[:, :6], full[:, 1:7], atol=1e-5, rtol=0)


def test_greedy_equals_stepwise_argmax_of_full_forward(tiny_gpt):
    cfg, params = tiny_gpt
    labels = jnp.array([1, 2, 3, 4])
    got = np.asarray(sample(params, cfg, labels, jax.random.PRNGKey(0),
                            SamplingSettings(greedy=True)))
    seq = np.zeros_like(got)
    for i in range(cfg.block_size):
        logits = forward(cfg, params, jnp.asarray(seq), labels)
        seq[:, i] = np.argmax(np.asarray(logits[:, i]), -1)
    np.testing.assert_array_equal(got, seq)


def test_greedy_with_cfg_uses_guided_logits(tiny_gpt):
    cfg, params = tiny_gpt
    labels = jnp.array([3, 7])
    scale, interval = 3.0, 4
    got = np.asarray(sample(params, cfg, labels, jax.random.PRNGKey(0),
                            SamplingSettings(cfg_scale=scale, cfg_interval=interval, greedy=True)))
    seq = np.zeros_like(got)
    null = jnp.full_like(labels, cfg.num_classes)
    for i in range(cfg.block_size):
        c = forward(cfg, params, jnp.asarray(seq), labels)[:, i]
        u = forward(cfg, params, jnp.asarray(seq), null)[:, i]
        # LlamaGen: guidance for the prefill token and decode steps j <= interval (token j+1).
        lg = u + (c - u) * scale if i <= interval + 1 else c
        seq[:, i] = np.argmax(np.asarray(lg), -1)
    np.testing.assert_array_equal(got, seq)


def test_argmax_and_categorical_equal_jax():
    """The two-reduction argmax is jnp.argmax (first of ties, NaN first, -inf rows), and
    categorical is jax.random.categorical draw for draw."""
    from ddjax.teacher.base import argmax, categorical

    x = jax.random.normal(jax.random.PRNGKey(0), (64, 300))
    x = x.at[1, 5].set(9.0).at[1, 7].set(9.0)  # a tie: the first wins
    x = x.at[2, 11].set(jnp.nan).at[2, 3].set(jnp.inf).at[2, 20].set(jnp.nan)
    x = x.at[3].set(-jnp.inf)
    np.testing.assert_array_equal(argmax(x), jnp.argmax(x, axis=-1))
    assert argmax(x).dtype == jnp.int32 and argmax(x)[1] == 5 and argmax(x)[2] == 11
    logp = jax.nn.log_softmax(jnp.where(jnp.arange(300) % 7 == 0, -jnp.inf, x[4:] * 3), axis=-1)
    for seed in range(5):
        key = jax.random.PRNGKey(seed)
        np.testing.assert_array_equal(categorical(key, logp),
                                      jax.random.categorical(key, logp, axis=-1))


def test_cfg_rule_by_hand():
    cond = jnp.array([[1.0, 2.0, 0.0]])
    uncond = jnp.array([[0.5, 3.0, 1.0]])
    np.testing.assert_allclose(guide(cond, uncond, 2.0), [[1.5, 1.0, -1.0]])
    np.testing.assert_allclose(guide(cond, uncond, 2.0, use=False), cond)


def test_top_k_by_hand():
    logits = jnp.array([[1.0, 5.0, 3.0, 3.0, 0.0, 4.0]])
    out = np.asarray(filter_logits(logits, top_k=3))
    # kept: 5, 4 and both 3s (ties with the k-th value stay, as in LlamaGen)
    np.testing.assert_array_equal(np.isfinite(out), [[False, True, True, True, False, True]])
    np.testing.assert_array_equal(np.isfinite(filter_logits(logits, top_k=1)),
                                  [[False, True, False, False, False, False]])


def test_top_p_by_hand():
    p = np.array([0.5, 0.05, 0.3, 0.15])
    logits = jnp.log(jnp.asarray(p))[None]
    # sorted: .5 (cum .5), .3 (.8), .15 (.95), .05 (1.0)
    keep = lambda top_p: np.isfinite(np.asarray(filter_logits(logits, top_p=top_p)))[0]  # noqa: E731
    np.testing.assert_array_equal(keep(0.6), [True, False, True, False])  # first past .6 kept
    np.testing.assert_array_equal(keep(0.79), [True, False, True, False])
    np.testing.assert_array_equal(keep(0.81), [True, False, True, True])
    np.testing.assert_array_equal(keep(0.4), [True, False, False, False])  # top token always
    lp = process_logits(logits, SamplingSettings(top_p=0.6))
    np.testing.assert_allclose(np.exp(lp[0]), [0.5 / 0.8, 0, 0.3 / 0.8, 0], atol=1e-6)


def test_temperature_then_top_k_then_top_p():
    logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
    s = SamplingSettings(temperature=0.5, top_k=3, top_p=0.9)
    z = np.array([4.0, 2.0, 0.0])  # logits / 0.5, top-3
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()  # [.867, .117, .016]: cum .867, .984
    want = np.array([p[0], p[1], 0, 0]) / (p[0] + p[1])
    np.testing.assert_allclose(np.exp(process_logits(logits, s))[0], want, atol=1e-6)


def test_multinomial_frequencies_match_processed_probabilities(tiny_gpt):
    cfg, params = tiny_gpt
    settings = SamplingSettings(cfg_scale=2.0, top_k=5, top_p=0.9)
    labels = jnp.full((2000,), 4)
    toks = np.asarray(sample(params, cfg, labels, jax.random.PRNGKey(3), settings, num_tokens=1))
    c = forward(cfg, params, jnp.zeros((1, 1), jnp.int32), labels[:1])[:, 0]
    u = forward(cfg, params, jnp.zeros((1, 1), jnp.int32),
                       jnp.array([cfg.num_classes]))[:, 0]
    p = np.exp(np.asarray(process_logits(guide(c, u, 2.0), settings))[0])
    freq = np.bincount(toks[:, 0], minlength=cfg.vocab_size) / len(toks)
    assert set(np.nonzero(freq)[0]) <= set(np.nonzero(p)[0])
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(0.25 / len(toks)))


def test_prefix_continuation_and_determinism(tiny_gpt):
    cfg, params = tiny_gpt
    labels = jnp.array([0, 1, 2, 3])
    s = SamplingSettings(cfg_scale=2.0, top_k=20)
    key = jax.random.PRNGKey(7)
    full = np.asarray(sample(params, cfg, labels, key, s))
    np.testing.assert_array_equal(full, np.asarray(sample(params, cfg, labels, key, s)))
    # Same key: continuing from the sampler's own prefix reproduces the same sequence.
    cont = np.asarray(sample(params, cfg, labels, key, s, prefix_ids=jnp.asarray(full),
                             prefix_len=6))
    np.testing.assert_array_equal(cont, full)
    # A foreign prefix is kept verbatim and the rest continues from it.
    other = np.asarray(jax.random.randint(jax.random.PRNGKey(9), full.shape, 0, cfg.vocab_size))
    cont = np.asarray(sample(params, cfg, labels, key, SamplingSettings(greedy=True),
                             prefix_ids=jnp.asarray(other), prefix_len=5))
    np.testing.assert_array_equal(cont[:, :5], other[:, :5])
    seq = cont.copy()
    for i in range(5, cfg.block_size):
        lg = forward(cfg, params, jnp.asarray(seq), labels)[:, i]
        assert (np.argmax(np.asarray(lg), -1) == seq[:, i]).all()


def test_no_recompilation_for_same_shapes(tiny_gpt):
    cfg, params = tiny_gpt
    s = SamplingSettings(temperature=0.9)
    labels = jnp.array([1, 2])
    sample(params, cfg, labels, jax.random.PRNGKey(0), s)
    fn = sampling_lib._compiled(cfg, s, sampling_lib.multinomial_rule, 0, cfg.block_size, None,
                                sampling_lib._default_weight_major(params, cfg))
    before = fn._cache_size()
    for seed in range(3):
        sample(params, cfg, labels + seed, jax.random.PRNGKey(seed), s)
    assert fn._cache_size() == before == 1


def test_bad_arguments(tiny_gpt):
    cfg, params = tiny_gpt
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(top_p=0.0)
    with pytest.raises(ValueError, match="prefix_ids"):
        sample(params, cfg, jnp.array([1]), jax.random.PRNGKey(0), prefix_len=3)
    with pytest.raises(ValueError, match="num_tokens"):
        sample(params, cfg, jnp.array([1]), jax.random.PRNGKey(0), num_tokens=cfg.block_size + 1)


# -- the XLA path's cache-window segments (DECODE_WINDOW rows at a time) ----------------------
WINDOW_BLOCK = 144  # a 12x12 grid: 143 loop steps over three windows (64, 128, 144 rows)


@pytest.fixture(scope="module")
def window_gpt():
    cfg = tiny_gpt_config(n_layer=1, dim=32, n_head=2, n_kv_head=1, block_size=WINDOW_BLOCK)
    return cfg, random_params(init_params(cfg, jax.random.PRNGKey(0)), seed=1, scale=0.5)


def _guided_logits(cfg, params, seq, labels, scale):
    c = np.asarray(forward(cfg, params, jnp.asarray(seq), labels))
    u = np.asarray(forward(cfg, params, jnp.asarray(seq), jnp.full_like(labels, cfg.num_classes)))
    return u + (c - u) * scale


@pytest.mark.parametrize("prefix_len", [0, 70])
def test_greedy_cfg_over_cache_windows_equals_teacher_forcing(window_gpt, prefix_len):
    cfg, params = window_gpt
    assert sampling_lib._uses_xla_attention(cfg, 4)
    segments = sampling_lib._segments(prefix_len, cfg.block_size - 1, cfg.cls_token_num,
                                      cfg.cls_token_num + cfg.block_size - 1, sampling_lib.DECODE_WINDOW)
    assert [n for *_, n in segments] == [64, 128, 144][-len(segments):] and len(segments) >= 2
    labels = jnp.array([2, 7])
    scale = 2.0
    prefix = np.asarray(jax.random.randint(jax.random.PRNGKey(4), (2, cfg.block_size), 0,
                                           cfg.vocab_size))
    got = np.asarray(sample(params, cfg, labels, jax.random.PRNGKey(0),
                            SamplingSettings(cfg_scale=scale, greedy=True),
                            prefix_ids=jnp.asarray(prefix), prefix_len=prefix_len))
    np.testing.assert_array_equal(got[:, :prefix_len], prefix[:, :prefix_len])
    # Causality: the full forward of the sampled sequence gives, at every position, the logits
    # of the step-by-step argmax decode, so the sampler's tokens must be their argmax.
    lg = _guided_logits(cfg, params, got, labels, scale)[:, prefix_len:]
    top2 = np.sort(lg, -1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 1e-4  # no near-ties for cache rounding to flip
    np.testing.assert_array_equal(got[:, prefix_len:], np.argmax(lg, -1))


def test_bf16_dense_accumulates_in_float32():
    """bf16 compute: inputs and weights rounded to bf16, the product accumulated in float32
    (then rounded once), the head's logits left in float32."""
    from ddjax.teacher.llamagen.layers import _dense, accumulating_dot

    assert accumulating_dot(jnp.float32) is None
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 512))
    dense = _dense(64, "w", jnp.bfloat16, jnp.float32)
    p = dense.init(jax.random.PRNGKey(1), x)
    out = dense.apply(p, x)
    w = p["params"]["kernel"]
    exact = jnp.dot(x.astype(jnp.bfloat16).astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32),
                    precision="highest")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, exact.astype(jnp.bfloat16))
    head_dot = accumulating_dot(jnp.bfloat16, jnp.float32)
    y = head_dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (((1,), (0,)), ((), ())))
    assert y.dtype == jnp.float32 and float(jnp.abs(y - exact).max()) < 1e-4


def test_bf16_sampling_runs_and_mostly_agrees_with_f32(tiny_gpt):
    """The bf16 loop (weights cast once, float32 accumulation) against f32, greedy with CFG."""
    import dataclasses

    cfg, params = tiny_gpt
    cfg16 = dataclasses.replace(cfg, dtype=jnp.bfloat16)
    s = SamplingSettings(cfg_scale=2.0, greedy=True)
    labels = jnp.arange(4) % cfg.num_classes
    a = sample(params, cfg, labels, jax.random.PRNGKey(0), s)
    b = sample(params, cfg16, labels, jax.random.PRNGKey(0), s)
    assert b.dtype == jnp.int32 and b.shape == a.shape
    assert float((a[:, :4] == b[:, :4]).mean()) >= 0.75


def test_weight_major_dot_is_the_dense_product():
    """kernel^T x^T on an [out, in] buffer's [in, out] view: the Dense product, any leading
    shape, f32 and bf16 (float32 accumulation)."""
    from ddjax.teacher.llamagen.layers import accumulating_dot

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 96))
    w_t = jax.random.normal(jax.random.PRNGKey(1), (40, 96))  # [out, in]
    exact = jnp.einsum("bti,oi->bto", x, w_t, precision="highest")
    dims = (((2,), (0,)), ((), ()))
    out = jax.jit(lambda x, w_t: accumulating_dot(jnp.float32, weight_major=True)(x, w_t.T, dims))(x, w_t)
    assert out.shape == (2, 3, 40) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-5)
    b16 = accumulating_dot(jnp.bfloat16, jnp.float32, weight_major=True)
    y = b16(x.astype(jnp.bfloat16), w_t.T.astype(jnp.bfloat16), dims)
    rounded = jnp.einsum("bti,oi->bto", x.astype(jnp.bfloat16).astype(jnp.float32),
                         w_t.astype(jnp.bfloat16).astype(jnp.float32), precision="highest")
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, rounded, rtol=1e-5, atol=1e-4)


def test_weight_major_params_transpose_the_kernels_only(tiny_gpt):
    cfg, params = tiny_gpt
    moved = sampling_lib.weight_major_params(params)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    got = jax.tree_util.tree_leaves(moved)
    kernels = 0
    for (path, a), b in zip(flat, got):
        if jax.tree_util.keystr(path).endswith("['kernel']"):
            kernels += 1
            np.testing.assert_array_equal(b, np.asarray(a).T)
        else:
            np.testing.assert_array_equal(b, a)
    assert kernels == 5 * cfg.n_layer + 1  # wqkv, wo, w1, w3, w2 per layer, and the head


def test_weight_major_sampling_draws_the_same_tokens(tiny_gpt):
    cfg, params = tiny_gpt
    labels = jnp.array([1, 2, 3, 4])
    for s in (SamplingSettings(cfg_scale=2.0, top_k=20), SamplingSettings(cfg_scale=2.0, greedy=True)):
        on = sample(params, cfg, labels, jax.random.PRNGKey(3), s, weight_major=True)
        off = sample(params, cfg, labels, jax.random.PRNGKey(3), s, weight_major=False)
        np.testing.assert_array_equal(on, off)
    assert sampling_lib._default_weight_major(params, cfg)  # CPU arrays, f32: on by default
    assert not sampling_lib._default_weight_major(params, dataclasses.replace(cfg, dtype="bfloat16"))
    # Under an outer jit the default is off, and asking for it names the problem.
    traced = jax.jit(lambda p: sample(p, cfg, labels, jax.random.PRNGKey(3), s))(params)
    np.testing.assert_array_equal(traced, off)
    with pytest.raises(ValueError, match="weight_major=True needs concrete params"):
        jax.jit(lambda p: sample(p, cfg, labels, jax.random.PRNGKey(3), s, weight_major=True))(params)
