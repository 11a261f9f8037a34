"""DD2 on VAR teachers: DD2's teacher is VAR itself (its processed distribution given a
continuous prefix equals the teacher's at the codes), the generator and the guidance network
read only the earlier scales through VAR's input map, the AR-diffusion sampler goes scale by
scale, and the stages run, resume and export as on LlamaGen."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import var as var_configs  # configs/var.py
from helpers import random_params, seed_workdir

from ddjax.app import build
from ddjax.app.settings import read_settings
from ddjax.dd2 import functional as F
from ddjax.dd2 import sampling as dd2_sampling
from ddjax.dd2 import train as T
from ddjax.dd2 import var_model as VM
from ddjax.student.model import nearest_code
from ddjax.teacher.base import row_keys
from ddjax.teacher.var.family import VARTeacher
from ddjax.teacher.var.sampling import VARSamplingSettings
from ddjax.teacher.var.vqvae import VQVAE


@pytest.fixture(scope="module")
def teacher():
    """The tiny VAR teacher of configs/var.py with weights away from their init (so every
    block, the AdaLN heads and the phi convolutions matter)."""
    t = build.build_teacher(var_configs.get_config("tiny"))
    return VARTeacher(t.config, random_params(t.params, seed=1, scale=0.2), t.tokenizer_config,
                      t.tokenizer_params, variant="tiny")


@pytest.fixture(scope="module")
def cfg(teacher):
    return VM.var_dd2_config(teacher.config, teacher.tokenizer_config, head_depth=1)


def test_var_input_of_codes_is_the_teachers_input(teacher):
    ids = np.random.default_rng(0).integers(0, teacher.vocab_size, (2, teacher.seq_len)).astype(np.int32)
    vae = VQVAE(teacher.tokenizer_config)
    want = vae.apply({"params": teacher.tokenizer_params}, jnp.asarray(ids), method=VQVAE.idxBl_to_var_input)
    got = VM.var_input(VM.var_dd2_config(teacher.config, teacher.tokenizer_config),
                       teacher.tokenizer_params["quantize"], jnp.asarray(teacher.codebook)[ids])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"latents must be \[B, 21, Cvae\]"):
        vae.apply({"params": teacher.tokenizer_params}, jnp.zeros((1, 20, 8)),
                  method=VQVAE.latents_to_var_input)


def test_dd2s_teacher_is_the_var_teacher_at_the_codes(teacher, cfg):
    adapted = VM.adapt_teacher(cfg, teacher.params, jax.random.PRNGKey(0))
    ids = np.random.default_rng(1).integers(0, teacher.vocab_size, (3, teacher.seq_len)).astype(np.int32)
    labels = np.array([0, 4, 10], np.int32)  # 10: the null class
    aux = F.family_aux(teacher)
    for settings in (VARSamplingSettings(cfg=0.0), VARSamplingSettings(cfg=1.5, top_k=5, top_p=0.9)):
        want = np.asarray(teacher.log_probs(ids, labels, settings))
        got = np.asarray(F.teacher_log_probs(adapted, cfg, jnp.asarray(teacher.codebook)[ids],
                                             jnp.asarray(labels), settings, aux))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
        fin = np.isfinite(want)
        np.testing.assert_allclose(got[fin], want[fin], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="need aux = family_aux"):
        F.teacher_log_probs(adapted, cfg, jnp.zeros((1, teacher.seq_len, 8)), jnp.zeros(1, jnp.int32),
                            VARSamplingSettings(cfg=0.0))


def test_generator_and_guidance_read_only_earlier_scales(teacher, cfg):
    adapted = VM.adapt_teacher(cfg, teacher.params, jax.random.PRNGKey(0))
    net = random_params(F.score_from_teacher(cfg, adapted, jax.random.PRNGKey(1)), seed=2, scale=0.2)
    aux = F.family_aux(teacher)
    key = jax.random.PRNGKey(3)
    eps = jax.random.normal(key, (2, cfg.seq_len, cfg.code_dim))
    labels = jnp.array([1, 2])
    q = F.generate(net, cfg, eps, labels, aux)
    chex.assert_shape(q, (2, cfg.seq_len, cfg.code_dim))
    begin_ends = cfg.var.begin_ends  # tiny: (0, 1), (1, 5), (5, 21)
    for si, (a, b) in enumerate(begin_ends):
        # Another token of the same scale, or any later scale, leaves token a unchanged...
        moved = eps.at[:, a + 1:].add(1.0) if b - a > 1 else eps.at[:, b:].add(1.0)
        np.testing.assert_allclose(np.asarray(F.generate(net, cfg, moved, labels, aux)[:, a]),
                                   np.asarray(q[:, a]), rtol=0, atol=1e-5)
        # ...an earlier scale's noise does not.
        if si > 0:
            earlier = eps.at[:, begin_ends[si - 1][0]].add(1.0)
            assert float(jnp.abs(F.generate(net, cfg, earlier, labels, aux)[:, a] - q[:, a]).max()) > 1e-4
    # The guidance network's features at scale k see the prefix of scales < k only.
    f = F.features(net, cfg, q, labels, aux)
    a, b = begin_ends[1]
    g = F.features(net, cfg, q.at[:, a:].add(1.0), labels, aux)
    np.testing.assert_allclose(np.asarray(g[:, :b]), np.asarray(f[:, :b]), rtol=0, atol=1e-5)
    assert float(jnp.abs(g[:, b:] - f[:, b:]).max()) > 1e-4


def test_the_tuned_network_starts_with_the_teachers_backbone(teacher, cfg):
    adapted = VM.adapt_teacher(cfg, teacher.params, jax.random.PRNGKey(0))
    net = F.score_from_teacher(cfg, adapted, jax.random.PRNGKey(1))
    assert set(net) - set(adapted) == {"score_head"} and set(adapted) - set(net) == {"head"}
    for name in VM.backbone_names(net):
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                               net[name], adapted[name])


def test_ar_diffusion_goes_scale_by_scale(teacher, cfg):
    """Each scale's tokens are denoised given the earlier scales: changing the noise of one scale
    changes that scale and the later ones only."""
    adapted = VM.adapt_teacher(cfg, teacher.params, jax.random.PRNGKey(0))
    net = random_params(F.score_from_teacher(cfg, adapted, jax.random.PRNGKey(1)), seed=4, scale=0.2)
    aux = F.family_aux(teacher)
    noise = jax.random.normal(jax.random.PRNGKey(5), (2, cfg.seq_len, cfg.code_dim))
    labels = jnp.array([3, 7])
    q = dd2_sampling.ar_diffusion(net, cfg, labels, noise, 4, aux)
    a, b = cfg.var.begin_ends[1]
    moved = dd2_sampling.ar_diffusion(net, cfg, labels, noise.at[:, a:b].add(1.0), 4, aux)
    np.testing.assert_allclose(np.asarray(moved[:, :a]), np.asarray(q[:, :a]), rtol=0, atol=1e-6)
    assert float(jnp.abs(moved[:, a:] - q[:, a:]).max()) > 1e-4


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    config = var_configs.get_config("tiny,method=dd2")
    teacher = build.build_teacher(config)
    s = read_settings(config)
    mesh = build.make_mesh(config)
    wd = str(tmp_path_factory.mktemp("var_dd2"))
    return config, teacher, s, mesh, wd, T.train(teacher, s.dd2, s.sampling, workdir=wd, mesh=mesh)


def test_the_tiny_var_pipeline_resumes_and_its_generator_loads_and_exports(tiny_run, tmp_path):
    from ddjax.convert import api

    config, teacher, s, mesh, wd, out = tiny_run
    assert set(out["stages"]) == {"adapt", "tune", "csd"} and out["stages"]["adapt"]["history"] == []
    assert T.latest_step(f"{wd}/dd2/tune") == s.dd2.tune_steps
    cfg, params = T.load_generator(wd)
    assert cfg == out["config"] and isinstance(cfg, VM.VARDD2Config)
    # Stopped after 2 of the 4 CSD iterations, then rerun: the uninterrupted run's weights
    # (the tune stage copied from the run above, so only CSD reruns).
    seed_workdir(wd, tmp_path / "r", ("tune",))
    T.train(teacher, dataclasses.replace(s.dd2, csd_steps=2), s.sampling, workdir=str(tmp_path / "r"),
            mesh=mesh)
    rerun = T.train(teacher, s.dd2, s.sampling, workdir=str(tmp_path / "r"), mesh=mesh)
    assert rerun["stages"]["csd"]["start_step"] == 2
    for name in ("gen_ema", "guide"):
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6),
            jax.device_get(rerun["final_state"][name]), jax.device_get(out["final_state"][name]))
    # The one-step generator through the report's method, and the PyTorch round trip.
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, cfg.seq_len, cfg.code_dim)))
    method = dd2_sampling.methods(teacher, (cfg, params), s.sampling, seed=0)[dd2_sampling.DD2_ONE_STEP]
    latents = np.asarray(method.fn(noise, np.array([1, 2]), np.arange(2)))
    codes = np.asarray(teacher.codebook)
    assert np.all(np.min(np.abs(latents[:, :, None] - codes[None, None]).sum(-1), -1) < 1e-6)
    # DD2 + teacher: the generator's first scales (5 tokens), the teacher's after them.
    ids = dd2_sampling.with_teacher(teacher, params, cfg, jnp.asarray(noise), jnp.array([1, 2]), 5,
                                    s.sampling, row_keys(jax.random.PRNGKey(1), np.arange(2)))
    gen_ids = nearest_code(jnp.asarray(latents), jnp.asarray(codes))
    np.testing.assert_array_equal(np.asarray(ids[:, :5]), np.asarray(gen_ids[:, :5]))
    path = api.jax_to_torch(f"{wd}/dd2/generator", str(tmp_path / "g.safetensors"), "dd2")
    back = api.import_torch(path, "dd2", cfg)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           back, params)
    with pytest.raises(ValueError, match="adapt_steps=3: VAR reads continuous tokens"):
        T.train(teacher, dataclasses.replace(s.dd2, adapt_steps=3), s.sampling,
                workdir=str(tmp_path / "bad"), mesh=mesh)


def test_head_only_tuning_moves_the_score_head_alone(teacher, cfg):
    """VAR's recipe tunes the MLP head first (tune_head_steps), then the whole network."""
    from ddjax.dd2.settings import settings_from_dict

    s = settings_from_dict({"noise_draws": 2, "adapt_steps": 0, "tune_steps": 3, "tune_head_steps": 1,
                            "tune_opt": {"lr": 1e-3, "warmup_steps": 0}})
    adapted = VM.adapt_teacher(cfg, teacher.params, jax.random.PRNGKey(0))
    p0 = F.score_from_teacher(cfg, adapted, jax.random.PRNGKey(1))
    tx = s.tune_opt.make(s.tune_steps)
    step = jax.jit(T.tune_step(cfg, tx, VARSamplingSettings(cfg=1.0), s, s.tune_head_steps))
    ids = np.random.default_rng(2).integers(0, teacher.vocab_size, (4, teacher.seq_len)).astype(np.int32)
    batch = {"ids": jnp.asarray(ids), "labels": jnp.arange(4)}
    state = {"step": jnp.zeros((), jnp.int32), "params": p0, "opt": tx.init(p0)}
    codebook, aux = jnp.asarray(teacher.codebook), F.family_aux(teacher)
    for i in range(3):
        state, m = step(state, batch, jax.random.PRNGKey(3), adapted, codebook, aux)
        assert float(m["l2_grads"]) > 0
        leaves = jax.tree_util.tree_leaves
        moved = {k: max(float(jnp.abs(a - b).max())
                        for a, b in zip(leaves(state["params"][k]), leaves(p0[k]))) for k in p0}
        assert moved["score_head"] > 0
        backbone = max(v for k, v in moved.items() if k != "score_head")
        # The head's zero-initialised output and modulation layers pass gradient to the
        # backbone from its third update on.
        assert (backbone == 0) if i < 2 else (backbone > 0), (i, moved)
