"""The embedded VAR teacher (configs/var.py, ddjax/assets/var_digits): its training forward
against the parity-tested quantiser, the training modes, the shipped weights and the entry."""

from __future__ import annotations

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import var as var_configs  # configs/var.py (configs/ is on sys.path via conftest)

from ddjax.app import read_settings, run
from ddjax.app.build import build_teacher, vae_config, var_config
from ddjax.demo import var_digits
from ddjax.demo.common import classify_digits, digits_classifier
from ddjax.teacher.var import VQVAE, load_var, load_vqvae, vqvae_config
from ddjax.teacher.var.sampling import VARSamplingSettings
from ddjax.teacher.var.vqvae import init_params as vae_init
from ddjax.utils.paths import resolve_path

ACCURACY_FLOOR = 0.8  # the shipped teacher's sample accuracy at its settings, with margin


def test_training_forward_is_the_inference_quantiser():
    """The straight-through forward's value and ids are VQVAE.img_to_idxBl / idxBl_to_img's
    (which equal VAR's, tests/test_var_vqvae.py); gradients reach encoder, codebook and phi."""
    cfg = vqvae_config(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                       patch_nums=(1, 2, 4))
    params = vae_init(cfg, jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 3), minval=-1, maxval=1)
    m = VQVAE(cfg)
    rec, vq, ids, zs = m.apply({"params": params}, x, 0.25, method=var_digits._vae_forward)
    want_ids = jnp.concatenate(m.apply({"params": params}, x, method=VQVAE.img_to_idxBl), axis=1)
    np.testing.assert_array_equal(ids, want_ids)
    f_hat = m.apply({"params": params}, want_ids, method=VQVAE.idxBl_to_fhat)
    want_rec = m.apply({"params": params}, f_hat, method=lambda mod, f: mod.decoder(mod.post_quant_conv(f)))
    np.testing.assert_allclose(rec, want_rec, atol=1e-5)
    chex.assert_shape(zs, (2 * (1 + 4 + 16), 8))
    f = m.apply({"params": params}, x, method=VQVAE.encode_f)
    fhats = m.apply({"params": params}, f, True, method=VQVAE.f_to_idxBl_or_fhat)
    want_vq = np.mean([1.25 * float(jnp.mean((h - f) ** 2)) for h in fhats])
    np.testing.assert_allclose(vq, want_vq, rtol=1e-5)

    def loss(p):
        r, q, _, _ = m.apply({"params": p}, x, 0.25, method=var_digits._vae_forward)
        return jnp.mean((r - x) ** 2) + q

    g = jax.grad(loss)(params)
    norm = lambda t: float(sum(jnp.sum(a ** 2) for a in jax.tree_util.tree_leaves(t)))
    assert norm(g["encoder"]) > 0 and norm(g["quantize"]["quant_resi"]) > 0
    used = np.unique(np.asarray(ids))
    code_grads = np.abs(np.asarray(g["quantize"]["embedding"]["embedding"])).sum(1)
    assert (code_grads[used] > 0).all() and (np.delete(code_grads, used) == 0).all()


def test_tiny_training_modes_write_strict_checkpoints(tmp_path):
    out = run(var_configs.get_config("tiny,mode=train_vae"), str(tmp_path))
    assert np.isfinite(out["val"]["mse"]) and os.path.exists(out["png"])
    config = var_configs.get_config("tiny,mode=train_var")
    config.export_dir = str(tmp_path / "export")
    out = run(config, str(tmp_path))
    uniform = np.log(config.teacher.model.vocab_size)
    assert out["val_nll"] < uniform + 0.5 and np.isfinite(out["samples"]["fid_vs_data"])
    meta = json.load(open(tmp_path / "export" / "meta.json"))
    assert [r["cfg"] for r in meta["samples"]["cfg_sweep"]] == list(config.train_var.cfg_sweep)
    # the files load strictly as VAR checkpoints of the config's shapes
    load_vqvae(str(tmp_path / "export" / "vae.safetensors"), vae_config(config))
    load_var(str(tmp_path / "export" / "var.safetensors"), var_config(config))
    with pytest.raises(Exception, match="missing|unexpected|shape"):
        bigger = var_configs.get_config("tiny")
        bigger.teacher.model.embed_dim = 64
        load_var(str(tmp_path / "var.safetensors"), var_config(bigger))


def test_shipped_teacher_matches_its_config_and_meta():
    config = var_configs.get_config("digits")
    meta = json.load(open(resolve_path(f"{var_configs.common.VAR_DIGITS_ASSETS}/meta.json")))
    for key, cfg in (("vae", vae_config(config)), ("var", var_config(config))):
        for k, v in meta[key]["config"].items():
            if k in ("dtype", "param_dtype"):
                continue
            got = getattr(cfg, k)
            assert (list(got) if isinstance(got, tuple) else got) == v, (key, k)
    settings = read_settings(config).sampling
    assert isinstance(settings, VARSamplingSettings)
    assert {k: getattr(settings, k) for k in meta["sampling"]} == meta["sampling"]
    teacher = build_teacher(config)
    assert teacher.family == "var" and teacher.seq_len == 130 and teacher.image_size == 32
    assert teacher.boundaries == (0, 1, 5, 14, 30, 66)


def test_sample_teacher_through_main_draws_the_requested_digits(tmp_path):
    """mode=sample_teacher on the shipped weights: 100 samples (labels 0..9 cycled), which the
    digits classifier reads as the requested class (an untrained VAR gives chance, 0.1)."""
    config = var_configs.get_config("digits,mode=sample_teacher")
    out = run(config, str(tmp_path))
    chex.assert_shape(out["tokens"], (100, 130))
    assert os.path.exists(out["grid"])
    np.testing.assert_array_equal(out["labels"], np.tile(np.arange(10), 10))
    images = build_teacher(config).decode_ids(out["tokens"])
    accuracy = float((classify_digits(digits_classifier(), images) == out["labels"]).mean())
    assert accuracy > ACCURACY_FLOOR, accuracy


def test_bad_var_configs_are_named():
    config = var_configs.get_config("digits")
    with config.unlocked():
        config.sampling.temperature = 1.0  # a LlamaGen field
    with pytest.raises(ValueError, match=r"config\.sampling has unknown fields \['temperature'\]"):
        read_settings(config)
    with pytest.raises(ValueError, match="unknown preset"):
        var_configs.get_config("d17")
    config = var_configs.get_config("d16")
    config.teacher.checkpoint = "/nonexistent/var_d16.pth"
    with pytest.raises(FileNotFoundError, match="var_d16.pth"):
        build_teacher(config)
