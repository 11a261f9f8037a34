"""The shipped text-to-image digits teacher (ddjax/assets/digits_t2i): its files load, the text
encoder reproduces the shipped caption table, the tokenizer names its errors, caption padding never
changes a logit, samples show the digit their caption names; and a smoke run of the modes."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddjax.demo import digits_captions as dc
from ddjax.demo.common import classify_digits, digits_classifier, digits_teacher_paths
from ddjax.demo.digits_t2i import sample_images
from ddjax.demo.text_encoder import TextEncoder, TextEncoderConfig, encode, t2i_asset_paths
from ddjax.teacher.llamagen import gpt as gpt_lib
from ddjax.teacher.llamagen import vq as vq_lib
from ddjax.teacher.llamagen.captions import Captions, CaptionSet
from ddjax.teacher.llamagen.loading import load_gpt, load_vq
from ddjax.teacher.llamagen.sampling import SamplingSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _meta() -> dict:
    with open(t2i_asset_paths()["meta"]) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def shipped():
    paths, meta = t2i_asset_paths(), _meta()
    gcfg = gpt_lib.gpt_config(meta["gpt"]["variant"], **meta["gpt"]["model"])
    return dict(meta=meta, gcfg=gcfg, gpt=load_gpt(paths["gpt"], gcfg),
                encoder=TextEncoder.load(paths["text_encoder"]),
                captions=CaptionSet.load(paths["captions"]))


# -- the caption grammar ---------------------------------------------------------------------------
def test_caption_grammar():
    texts, classes = dc.all_captions()
    assert len(texts) == len(set(texts)) == dc.num_captions() == 120
    assert len(dc.VOCAB) <= 32
    for text, d in zip(texts, classes):
        words = text.split()
        assert words[-1] == dc.DIGIT_NAMES[d] and set(words) <= set(dc.VOCAB) and len(words) <= 8
    assert np.array_equal(classes[dc.caption_ids_of_digit(7)], np.full(12, 7))
    images = np.random.default_rng(0).uniform(-1, 1, (30, 32, 32, 3)).astype(np.float32)
    labels = np.arange(30) % 10
    ids, caps = dc.image_captions(images, labels, seed=3)
    again, _ = dc.image_captions(images, labels, seed=3)
    assert np.array_equal(ids, again) and [texts[i] for i in ids] == caps
    assert np.array_equal(classes[ids], labels)


# -- the tokenizer and the encoder -----------------------------------------------------------------
def test_tokenizer_pads_left_and_names_its_errors():
    enc = TextEncoder.init(TextEncoderConfig(vocab=dc.VOCAB, dim=16, n_head=2))
    ids, mask = enc.tokenize(["A Bold  seven", "a purple seven", ""])
    n = enc.config.max_len
    assert ids.shape == mask.shape == (3, n)
    assert mask[0].tolist() == [False] * (n - 3) + [True] * 3 and not mask[2].any()
    assert ids[0, -3:].tolist() == [2 + dc.VOCAB.index(w) for w in ("a", "bold", "seven")]
    assert ids[1, -2] == 1  # <unk>
    with pytest.raises(ValueError, match=r"9 words, more than .*max_len=8"):
        enc.tokenize(["a b c d e f g h seven"])
    with pytest.raises(ValueError, match="list of captions"):
        enc.tokenize("a seven")


def test_encoder_ignores_padding():
    enc = TextEncoder.init(TextEncoderConfig(vocab=dc.VOCAB, dim=16, n_head=2))
    from ddjax.demo.text_encoder import TextEncoderNet

    ids, mask = enc.tokenize(["a bold seven", "the digit two"])
    junk = np.where(mask, ids, 5)  # other ids in the padded slots
    f = lambda i: np.asarray(TextEncoderNet(enc.config).apply({"params": enc.params}, i, mask))
    a, b = f(ids), f(junk)
    np.testing.assert_array_equal(a, b)
    assert not a[~mask].any() and np.isfinite(a).all()


# -- the shipped files -------------------------------------------------------------------------------
def test_shipped_files_and_sizes(shipped):
    paths = t2i_asset_paths()
    asset_dir = os.path.dirname(paths["meta"])
    total = sum(os.path.getsize(os.path.join(asset_dir, f)) for f in os.listdir(asset_dir))
    assert total < 3 * 2**20
    meta, caps = shipped["meta"], shipped["captions"]
    texts, classes = dc.all_captions()
    assert caps.texts == texts and np.array_equal(caps.classes, classes)
    assert (caps.max_len, caps.caption_dim) == (shipped["gcfg"].cls_token_num,
                                                  shipped["gcfg"].caption_dim)
    assert meta["text_encoder"]["config"] == shipped["encoder"].config.to_json()
    assert meta["sampling"]["cfg_scale"] in [r["cfg_scale"] for r in meta["samples"]["cfg_sweep"]]
    n = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(shipped["gpt"]))
    assert n == meta["gpt"]["parameters"]


def test_encoder_reproduces_the_shipped_captions(shipped):
    caps = shipped["captions"]
    again = encode(caps.texts)  # the shipped encoder
    np.testing.assert_array_equal(again.mask, caps.mask)
    # Bitwise equal on the machine that wrote them; 1e-6 leaves room for another CPU's XLA.
    np.testing.assert_allclose(again.features, caps.features, rtol=0, atol=1e-6)


def test_caption_padding_never_changes_logits(shipped):
    gcfg, params = shipped["gcfg"], shipped["gpt"]
    caps = shipped["captions"].lookup(np.array([2, 50, 117]))  # 3- and 4-word captions
    assert (~caps.mask).any()
    junk = np.where(caps.mask[..., None], caps.features,
                    np.random.default_rng(0).normal(size=caps.features.shape) * 10).astype(np.float32)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, gcfg.vocab_size, (3, gcfg.block_size)),
                         jnp.int32)
    f = jax.jit(lambda c: gpt_lib.GPT(gcfg).apply({"params": params}, tokens, c))
    a = f(Captions(jnp.asarray(caps.features), jnp.asarray(caps.mask)))
    b = f(Captions(jnp.asarray(junk), jnp.asarray(caps.mask)))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # ... while the words do change them.
    other = shipped["captions"].lookup(np.array([62, 50, 117]))
    c = f(Captions(jnp.asarray(other.features), jnp.asarray(other.mask)))
    assert float(jnp.abs(c[0] - a[0]).max()) > 1e-3


def test_shipped_samples_show_the_captioned_digit(shipped):
    meta = _meta()
    vq_meta = json.load(open(digits_teacher_paths()["meta"]))["vq"]
    vcfg = vq_lib.vq_config(vq_meta["variant"], **vq_meta["model"])
    vq = load_vq(digits_teacher_paths()["vq"], vcfg)
    s = meta["sampling"]
    settings = SamplingSettings(cfg_scale=s["cfg_scale"], top_k=s["top_k"],
                                temperature=s["temperature"])
    ids = np.concatenate([dc.caption_ids_of_digit(d)[:3] for d in range(10)])  # 30 samples
    images, _ = sample_images(shipped["gpt"], shipped["gcfg"], vq, vcfg, shipped["captions"], ids,
                              jax.random.PRNGKey(0), settings, batch=30)
    pred = classify_digits(digits_classifier(), images)
    assert (pred == shipped["captions"].classes[ids]).mean() >= 0.7


# -- the modes, tiny ---------------------------------------------------------------------------------
def test_tiny_modes_train_and_export(tmp_path):
    import importlib.util

    from ddjax.app import run

    spec = importlib.util.spec_from_file_location("digits_cfg", os.path.join(ROOT, "configs", "digits.py"))
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    work, export = str(tmp_path / "w"), str(tmp_path / "export")
    run(digits.get_config("train_vq,tiny=True"), work)  # the tiny VQ the t2i GPT tokenizes with
    cfg = digits.get_config("train_t2i_teacher,tiny=True")
    cfg.export_dir = export
    out = run(cfg, work)
    assert np.isfinite(out["val_nll"]) and len(out["samples"]["cfg_sweep"]) == 2
    for name in ("gpt.safetensors", "text_encoder.npz", "captions.npz", "meta.json"):
        assert os.path.isfile(os.path.join(export, name)), name
    assert os.path.isfile(os.path.join(work, "t2i_samples.png"))
    meta = json.load(open(os.path.join(export, "meta.json")))
    gcfg = gpt_lib.gpt_config(meta["gpt"]["variant"], **meta["gpt"]["model"])
    load_gpt(os.path.join(export, "gpt.safetensors"), gcfg)
    caps = CaptionSet.load(os.path.join(export, "captions.npz"))
    enc = TextEncoder.load(os.path.join(export, "text_encoder.npz"))
    np.testing.assert_array_equal(enc.encode(caps.texts).features, caps.features)
    cfg = digits.get_config("evaluate_t2i_teacher,tiny=True")
    again = run(cfg, work)  # re-measures without retraining: the same NLL
    assert again["val_nll"] == pytest.approx(out["val_nll"], abs=1e-6)


def test_config_agrees_with_the_shipped_meta_json():
    import importlib.util

    from ddjax.demo.digits_t2i import t2i_gpt_config_from, text_encoder_config_from

    spec = importlib.util.spec_from_file_location("digits_cfg", os.path.join(ROOT, "configs", "digits.py"))
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    config, meta = digits.get_config("train_t2i_teacher"), _meta()
    assert t2i_gpt_config_from(config) == gpt_lib.gpt_config(meta["gpt"]["variant"], **meta["gpt"]["model"])
    assert text_encoder_config_from(config).to_json() == meta["text_encoder"]["config"]
    for k in ("num_steps", "batch_size", "lr", "max_shift", "caption_seed", "seed"):
        assert config.train_t2i_teacher[k] == meta["train_t2i_teacher"][k], k
