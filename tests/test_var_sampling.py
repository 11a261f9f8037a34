"""ddjax's VAR sampler against FoundationVision/VAR's `autoregressive_infer_cfg`.

torch's multinomial draws cannot be reproduced, so the fixtures record them
(`make_var_fixtures.py` hooks `sample_with_top_k_top_p_` and `get_next_autoregressive_input`)
and the tests replay them through the rule hook: per scale the guided logits must match
within 1e-4, the top-k/top-p keep-masks exactly, and f_hat and the image within 1e-5 / 1e-4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from var_fixtures import arrays, max_diff, meta
from var_fixtures import load_case as _load

from ddjax.teacher.var import sampling as S
from ddjax.teacher.var import vqvae as V
from ddjax.teacher.var.model import VAR

ATOL = 1e-4
FHAT_ATOL = 1e-5


def replay_rule(key, logp, si, inputs):
    """Returns the recorded ids of the scale (passed as rule_inputs)."""
    del key, logp, si
    return inputs


@pytest.fixture(scope="module", params=["sample_small", "sample_full"])
def case(request):
    return _load(request.param)


@pytest.fixture(scope="module")
def small():
    return _load("sample_small")


def _settings(run: dict) -> S.VARSamplingSettings:
    return S.VARSamplingSettings(cfg=run["cfg"], top_k=run["top_k"], top_p=run["top_p"])


def _unpack(bits: np.ndarray, vocab: int) -> np.ndarray:
    return np.unpackbits(bits, axis=-1, count=vocab).astype(bool)


def test_filter_equals_var_sample_with_top_k_top_p():
    a, settings = arrays("topkp"), meta()["topkp"]["settings"]
    logits = jnp.asarray(a["logits"])
    for i, (k, p) in enumerate(settings):
        keep = np.isfinite(np.asarray(S.filter_top_k_top_p(logits, k, p)))
        want = _unpack(a[f"keep_{i}"], logits.shape[-1])
        rows = slice(None, -1) if p > 0 else slice(None)  # top-p on tied logits: sort-order dependent
        np.testing.assert_array_equal(keep[rows], want[rows], err_msg=f"top_k={k} top_p={p}")


def test_cumsum_extended_is_float64_accumulation():
    x = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(0), (4, 4099)) * 3, axis=-1)
    want = np.cumsum(np.asarray(x, np.float64), axis=-1).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(S.cumsum_extended)(x)), want)


def test_replay_matches_var(case):
    name, m, vcfg, tcfg, vae, var, a = case
    vocab = tcfg.vocab_size
    for r, run in enumerate(m["runs"]):
        p = f"run{r}_"
        trace = S.sample(var, tcfg, vae, vcfg, a["labels"], jax.random.PRNGKey(0), _settings(run),
                         rule=replay_rule, rule_inputs=jnp.asarray(a[p + "ids"]), return_trace=True)
        np.testing.assert_array_equal(trace.ids, a[p + "ids"])
        logits = np.concatenate([np.asarray(x) for x in trace.logits], 1)
        keep = np.concatenate([np.isfinite(np.asarray(x)) for x in trace.logp], 1)
        x = logits.astype(np.float64)
        lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
        diffs = {"lse": max_diff(lse, a[p + "lse"]), "f_hat": max_diff(trace.f_hat, a[p + "f_hat"])}
        np.testing.assert_array_equal(keep.sum(-1), a[p + "kept"])
        if name == "sample_full":
            cut = a[p + "logits_head"].shape[1]
            diffs["logits_cols"] = max_diff(logits[:, :, a["cols"]], a[p + "logits_cols"])
            diffs["logits_head"] = max_diff(logits[:, :cut], a[p + "logits_head"])
            np.testing.assert_array_equal(keep[:, :cut], _unpack(a[p + "keep_head"], vocab))
        else:
            diffs["logits"] = max_diff(logits, a[p + "logits"])
            np.testing.assert_array_equal(keep, _unpack(a[p + "keep"], vocab))
        image = (np.asarray(S.ids_to_image(vae, vcfg, trace.ids)) + 1) / 2
        diffs["image"] = max_diff(image, a[p + "image"])
        print(name, r, diffs)
        assert diffs["f_hat"] < FHAT_ATOL and max(diffs.values()) < ATOL, diffs


def test_greedy_equals_teacher_forced_argmax(small):
    name, m, vcfg, tcfg, vae, var, a = small
    settings = S.VARSamplingSettings(cfg=2.0, greedy=True)
    ids = S.sample(var, tcfg, vae, vcfg, a["labels"], jax.random.PRNGKey(0), settings)

    @jax.jit
    def forced(ids):
        x = V.VQVAE(vcfg).apply({"params": vae}, ids, method=V.VQVAE.idxBl_to_var_input)
        b = ids.shape[0]
        labels = jnp.concatenate([jnp.asarray(a["labels"]), jnp.full((b,), tcfg.num_classes)])
        lg = VAR(tcfg).apply({"params": var}, labels, jnp.concatenate([x, x]))
        return lg[:b], lg[b:]

    cond, uncond = forced(ids)
    for si, (start, end) in enumerate(tcfg.begin_ends):
        t = S.cfg_weight(2.0, si, tcfg.num_scales)
        guided = S.guide(cond[:, start:end], uncond[:, start:end], t)
        np.testing.assert_array_equal(np.argmax(guided, -1), ids[:, start:end], err_msg=f"scale {si}")


def test_prefix_continuation(small):
    name, m, vcfg, tcfg, vae, var, a = small
    settings = _settings(m["runs"][0])
    key = jax.random.PRNGKey(3)
    full = S.sample(var, tcfg, vae, vcfg, a["labels"], key, settings, return_trace=True)
    start = tcfg.begin_ends[2][0]
    cont = S.sample(var, tcfg, vae, vcfg, a["labels"], key, settings, prefix_ids=full.ids[:, :start],
                    prefix_scales=2, return_trace=True)
    np.testing.assert_array_equal(cont.ids, full.ids)  # same key, same draws for scales >= 2
    assert cont.logits[0] is None and cont.logits[1] is None
    assert max_diff(cont.logits[3], full.logits[3]) < 1e-5
    # a different prefix changes what follows, and is kept as given
    other = (full.ids[:, :start] + 1) % tcfg.vocab_size
    moved = S.sample(var, tcfg, vae, vcfg, a["labels"], key, settings, prefix_ids=other,
                     prefix_scales=2, return_trace=True).ids  # the same program as `cont`
    np.testing.assert_array_equal(moved[:, :start], other)
    assert not np.array_equal(moved[:, start:], full.ids[:, start:])


def test_unguided_sampling_skips_null_rows_and_draws_valid_ids(small):
    name, m, vcfg, tcfg, vae, var, a = small
    ids = S.sample(var, tcfg, vae, vcfg, a["labels"], jax.random.PRNGKey(1),
                   S.VARSamplingSettings(cfg=0.0, top_k=5))
    assert ids.shape == (2, tcfg.seq_len) and ids.dtype == jnp.int32
    assert int(ids.min()) >= 0 and int(ids.max()) < tcfg.vocab_size
    image = S.ids_to_image(vae, vcfg, ids)
    assert image.shape == (2, vcfg.image_size, vcfg.image_size, 3)
    assert float(jnp.abs(image).max()) <= 1.0


def test_bad_arguments(small):
    name, m, vcfg, tcfg, vae, var, a = small
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="prefix_ids must be"):
        S.sample(var, tcfg, vae, vcfg, a["labels"], key, prefix_scales=2)
    with pytest.raises(ValueError, match="prefix_scales must be"):
        S.sample(var, tcfg, vae, vcfg, a["labels"], key, prefix_scales=tcfg.num_scales)
    with pytest.raises(ValueError, match="disagree: vocab_size"):
        S.sample(var, tcfg, vae, V.vqvae_config(**{**vcfg.__dict__, "vocab_size": 7}), a["labels"], key)
    with pytest.raises(ValueError, match="top_p"):
        S.VARSamplingSettings(top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        S.VARSamplingSettings(top_k=-1)
