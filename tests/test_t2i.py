"""Text-to-image LlamaGen: caption padding masks as LlamaGen's `generate(..., emb_masks)`.

Fixtures: tests/fixtures/gpt_t2i_masked.{npz,json}, written by make_t2i_mask_fixtures.py from
LlamaGen's own `generate()` (greedy, CFG 1 and 2) on the t2i_small weights, with left-padded
captions of 8, 5, 1 and 0 valid tokens.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddjax.teacher.llamagen import sampling as sampling_lib
from ddjax.teacher.llamagen.captions import Captions, CaptionSet, key_mask, left_pad, load_t5_feature
from ddjax.teacher.llamagen.family import LlamaGenTeacher
from ddjax.teacher.llamagen.gpt import GPT, gpt_config, init_cache
from ddjax.teacher.llamagen.loading import load_gpt

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
ATOL = 1e-4  # the bound; measured below 1e-5


@pytest.fixture(scope="module")
def case():
    meta = json.loads((FIXTURES / "gpt_t2i_masked.json").read_text())
    with np.load(FIXTURES / "gpt_t2i_masked.npz") as z:
        a = {k: z[k] for k in z.files}
    cfg = gpt_config("GPT-B", **meta["config"])
    params = load_gpt(str(FIXTURES / meta["weights"]), cfg)
    return cfg, params, a


def _caps(a, raw=False):
    return Captions(jnp.asarray(a["caption_raw" if raw else "caption"]),
                    jnp.asarray(a["emb_masks"].astype(bool)))


def _diff(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert x.shape == y.shape, (x.shape, y.shape)
    return float(np.abs(x - y).max())


@pytest.mark.parametrize("cfg_scale,name", [(1.0, "tokens_cfg1"), (2.0, "tokens_cfg2")])
@pytest.mark.parametrize("raw", [False, True])
def test_masked_greedy_sampling_equals_llamagen(case, cfg_scale, name, raw):
    cfg, params, a = case
    settings = sampling_lib.SamplingSettings(cfg_scale=cfg_scale, greedy=True)
    tokens = sampling_lib.sample(params, cfg, _caps(a, raw), jax.random.PRNGKey(0), settings)
    # raw=True: padded positions hold random features. They never change a token: ddjax zeroes
    # padding as sample_t2i.py does, so even the empty caption (row 3) equals LlamaGen's run on
    # the zeroed caption.
    np.testing.assert_array_equal(np.asarray(tokens), a[name])


def _forced(cfg, params, tokens, caps, drop=None):
    return GPT(cfg).apply({"params": params}, jnp.asarray(tokens), caps, drop=drop)


def test_masked_teacher_forcing_logits_equal_llamagen(case):
    cfg, params, a = case
    caps = _caps(a)
    b = caps.features.shape[0]
    assert _diff(_forced(cfg, params, a["tokens_cfg1"], caps), a["tf_logits"]) < ATOL
    assert _diff(_forced(cfg, params, a["tokens_cfg1"], caps), a["logits_cfg1"]) < ATOL
    # CFG: the conditional rows, the null caption with the same padding mask, then guidance.
    cond = _forced(cfg, params, a["tokens_cfg2"], caps)
    uncond = _forced(cfg, params, a["tokens_cfg2"], caps, drop=jnp.ones(b, bool))
    assert _diff(uncond, a["uncond_logits_cfg2"]) < ATOL
    assert _diff(sampling_lib.guide(cond, uncond, 2.0), a["logits_cfg2"]) < ATOL
    assert 0.5 < float(np.std(a["logits_cfg2"])) < 3.0  # the comparison is not trivially small


def test_masked_kv_cache_logits_equal_llamagen(case):
    """prefill + one decode per token, with the caption key mask, as generate() runs."""
    cfg, params, a = case
    caps = _caps(a)
    tokens = jnp.asarray(a["tokens_cfg1"])
    b, n = tokens.shape
    model = GPT(cfg)
    km = key_mask(caps, cfg.seq_len)
    logits, caches = model.apply({"params": params}, caps, init_cache(cfg, b), None, km,
                                 method=GPT.prefill)
    steps = [logits]
    for i in range(n - 1):
        out, caches = model.apply({"params": params}, tokens[:, i:i + 1], caches,
                                  cfg.cls_token_num + i, km, method=GPT.decode)
        steps.append(out[:, 0])
    assert _diff(np.stack(steps, 1), a["logits_cfg1"]) < ATOL


def test_padding_never_changes_logits(case):
    cfg, params, a = case
    caps = _caps(a)
    noisy = np.array(a["caption"])
    pad = ~a["emb_masks"].astype(bool)
    noisy[pad] = np.random.default_rng(0).normal(size=noisy[pad].shape) * 5
    tokens = a["tokens_cfg2"]
    base = _forced(cfg, params, tokens, caps)
    other = _forced(cfg, params, tokens, Captions(jnp.asarray(noisy), caps.mask))
    assert _diff(base, other) == 0.0
    # ... while a real token does change them (the check can fail).
    changed = np.array(a["caption"])
    changed[0, -1] += 1.0
    assert _diff(base, _forced(cfg, params, tokens, Captions(jnp.asarray(changed), caps.mask))) > 1e-3


def test_unmasked_captions_match_the_unpadded_forward(case):
    """A caption with every token real is the same as bare features (the t2i_small parity)."""
    cfg, params, a = case
    full = jnp.asarray(a["caption"][:1])
    caps = Captions(full, jnp.ones((1, cfg.cls_token_num), bool))
    tokens = a["tokens_cfg1"][:1]
    assert _diff(_forced(cfg, params, tokens, caps), _forced(cfg, params, tokens, full)) < 1e-6


def test_caption_shape_errors_name_the_field(case):
    cfg, params, a = case
    bad = Captions(jnp.zeros((2, 5, cfg.caption_dim)), jnp.ones((2, 5), bool))
    with pytest.raises(ValueError, match="caption features must be"):
        _forced(cfg, params, a["tokens_cfg1"][:2], bad)
    bad = Captions(jnp.zeros((2, 8, cfg.caption_dim)), jnp.ones((2, 7), bool))
    with pytest.raises(ValueError, match="caption mask"):
        _forced(cfg, params, a["tokens_cfg1"][:2], bad)


# -- caption files and the caption set ----------------------------------------------------
def test_load_t5_feature_left_pads_llamagen_files(tmp_path):
    """LlamaGen's extract_t5_feature.py writes [1, n, C] float32, the valid tokens only."""
    rng = np.random.default_rng(1)
    feats = [rng.normal(size=(1, n, 6)).astype(np.float32) for n in (3, 8, 11)]
    paths = []
    for i, f in enumerate(feats):
        (tmp_path / "00").mkdir(exist_ok=True)
        p = tmp_path / "00" / f"{i}.npy"
        np.save(p, f)
        paths.append(str(p))
    x, m = load_t5_feature(paths[0], max_len=8)
    np.testing.assert_array_equal(m, [False] * 5 + [True] * 3)
    np.testing.assert_array_equal(x[5:], feats[0][0])
    assert not x[:5].any()
    x, m = load_t5_feature(paths[2], max_len=8)  # longer: its first 8 tokens (dataset/t2i.py)
    assert m.all() and np.array_equal(x, feats[2][0, :8])
    cs = CaptionSet.from_feature_dir(str(tmp_path), max_len=8)
    assert len(cs) == 3 and cs.texts == ["00/0.npy", "00/1.npy", "00/2.npy"]
    got = cs.lookup(np.array([2, 0]))
    assert got.features.shape == (2, 8, 6) and np.array_equal(got.mask[1], [False] * 5 + [True] * 3)
    cs.save(str(tmp_path / "set.npz"))
    back = CaptionSet.load(str(tmp_path / "set.npz"))
    np.testing.assert_array_equal(back.features, cs.features)
    assert back.texts == cs.texts
    with pytest.raises(ValueError, match="caption_dim=7"):
        load_t5_feature(paths[0], 8, caption_dim=7)
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_t5_feature(str(tmp_path / "missing.npy"))
    with pytest.raises(ValueError, match=r"caption ids must be in \[0, 3\)"):
        cs.lookup(np.array([3]))
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="bad.npy"):
        load_t5_feature(str(bad))


def test_left_pad_empty_caption():
    x, m = left_pad(np.zeros((0, 4), np.float32), 5)
    assert x.shape == (5, 4) and not m.any()


def test_t2i_teacher_samples_caption_ids(case):
    """Integer conditions of a t2i teacher index its caption set (what pair files store)."""
    cfg, params, a = case
    cs = CaptionSet(a["caption"], a["emb_masks"].astype(bool), texts=list("abcd"))
    teacher = LlamaGenTeacher.from_codebook(cfg, params, np.eye(cfg.vocab_size, 4, dtype=np.float32))
    teacher = teacher.with_captions(cs)
    assert teacher.num_classes == 4
    settings = sampling_lib.SamplingSettings(cfg_scale=2.0, greedy=True)
    ids = np.array([3, 1, 0])
    tokens = teacher.sample(ids, jax.random.PRNGKey(0), settings)
    np.testing.assert_array_equal(np.asarray(tokens), a["tokens_cfg2"][ids])
    lp = teacher.log_probs(a["tokens_cfg2"][ids], ids, sampling_lib.SamplingSettings(cfg_scale=2.0))
    np.testing.assert_array_equal(np.asarray(lp.argmax(-1)), a["tokens_cfg2"][ids])
    with pytest.raises(ValueError, match="caption set"):
        LlamaGenTeacher.from_codebook(cfg, params, np.eye(cfg.vocab_size, 4, dtype=np.float32)
                                      ).sample(ids, jax.random.PRNGKey(0), settings)
    wrong = CaptionSet(np.zeros((2, 5, cfg.caption_dim), np.float32), np.ones((2, 5), bool))
    with pytest.raises(ValueError, match="cls_token_num"):
        teacher.with_captions(wrong)
