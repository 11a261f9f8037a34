"""DD2's generator "student" (DD1's one-step student, its code choice passed straight through):
its forward value is DD1's 1-step sample, its gradient is the softmax relaxation's, it is
causal, the pipeline starts CSD from the student and keeps the tuned stages when the generator
changes, and it exports as a DD student (the official layout) on both families."""

from __future__ import annotations

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import llamagen
import numpy as np
import optax
import pytest
import var as var_configs
from helpers import random_params, unit_codebook_teacher

from ddjax.app import build
from ddjax.app.settings import read_settings
from ddjax.dd2 import functional as F
from ddjax.dd2 import model as M
from ddjax.dd2 import sampling
from ddjax.dd2 import student_generator as SG
from ddjax.dd2 import train as T
from ddjax.dd2.settings import settings_from_dict
from ddjax.student import families
from ddjax.student.sampling import StudentApply, sample_dd


@pytest.fixture(scope="module")
def teacher(tiny_gpt):
    return unit_codebook_teacher(tiny_gpt)


def _student(teacher, seed=1):
    scfg = families.LLAMAGEN.config_for(teacher)
    params = families.LLAMAGEN.init_params(scfg, jax.random.PRNGKey(seed))
    return scfg, random_params(params, scale=0.5, seed=seed)


def test_its_sample_is_dd1s_one_step_sample(teacher):
    cfg = M.dd2_config(teacher.config, teacher.code_dim, generator="student", gen_tau=0.7)
    scfg, params = _student(teacher)
    # the same network (DD2's config has no drop-path; the student runs without it here)
    assert (jax.tree_util.tree_map(jnp.shape, SG.init_params(cfg, jax.random.PRNGKey(0)))
            == jax.tree_util.tree_map(jnp.shape, params))
    codebook = jnp.asarray(teacher.codebook, jnp.float32)
    eps = jax.random.normal(jax.random.PRNGKey(2), (3, teacher.seq_len, teacher.code_dim))
    labels = jnp.array([0, 3, 7])
    q = F.generate(params, cfg, eps, labels, {"codebook": codebook})
    want = sample_dd(StudentApply(scfg), params, eps, labels, codebook, (0,), teacher.seq_len)
    np.testing.assert_allclose(np.asarray(q), np.asarray(want), atol=1e-6)
    with pytest.raises(ValueError, match="needs aux"):
        F.generate(params, cfg, eps, labels, None)


def test_its_gradient_is_the_softmax_relaxations(teacher):
    cfg = M.dd2_config(teacher.config, teacher.code_dim, generator="student", gen_tau=0.5)
    scfg, params = _student(teacher)
    codebook = jnp.asarray(teacher.codebook, jnp.float32)
    eps = jax.random.normal(jax.random.PRNGKey(4), (2, teacher.seq_len, teacher.code_dim))
    labels = jnp.array([1, 2])
    w = jax.random.normal(jax.random.PRNGKey(5), eps.shape)

    def soft(p):  # the relaxation: softmax(logits / tau) @ C
        _, logits = families.LLAMAGEN.module(scfg).apply({"params": p}, eps, labels,
                                                         jnp.zeros((2,), jnp.int32))
        return jnp.sum(w * (jax.nn.softmax(logits / 0.5, -1) @ codebook))

    got = jax.grad(lambda p: jnp.sum(w * F.generate(p, cfg, eps, labels, {"codebook": codebook})))(params)
    want = jax.grad(soft)(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), got, want)
    assert float(optax.global_norm(got)) > 0


def test_it_is_causal(teacher):
    cfg = M.dd2_config(teacher.config, teacher.code_dim, generator="student", gen_tau=1.0)
    _, params = _student(teacher)
    codebook = jnp.asarray(teacher.codebook, jnp.float32)
    n, d = teacher.seq_len, teacher.code_dim
    eps = jax.random.normal(jax.random.PRNGKey(6), (1, n, d))
    jac = jax.jacobian(lambda e: F.generate(params, cfg, e, jnp.array([2]), {"codebook": codebook})[0])(eps)
    dep = np.abs(np.asarray(jac[:, :, 0])).sum((1, 3))  # [i, j]: d q_i / d eps_j
    assert np.all(dep[np.triu_indices(n, 1)] == 0), "q_i depends on later noise"
    assert np.all(np.diag(dep) > 0) and dep[n - 1, 0] > 0


def test_settings_name_the_bad_key():
    base = dict(llamagen.get_config("tiny,method=dd2").dd2)
    with pytest.raises(ValueError, match="config.dd2.generator='flow'"):
        settings_from_dict({**base, "generator": "flow"}).check()
    with pytest.raises(ValueError, match="config.dd2.gen_tau"):
        settings_from_dict({**base, "gen_tau": 0.0}).check()
    with pytest.raises(ValueError, match="config.dd2.warm_steps=5"):
        settings_from_dict({**base, "generator": "student", "warm_steps": 5}).check()
    with pytest.raises(ValueError, match="config.dd2.guidance='ar' .* needs config.dd2.generator='student'"):
        settings_from_dict({**base, "guidance": "ar"}).check()
    with pytest.raises(ValueError, match="config.dd2.guidance='fake'"):
        settings_from_dict({**base, "guidance": "fake"}).check()


def test_the_ar_guidance_fits_the_generated_codes(teacher):
    """guidance "ar": cross-entropy updates on a generator's samples lower the guidance's CE on
    that generator's codes (fresh noise), starting from the teacher's network."""
    cfg = M.dd2_config(teacher.config, teacher.code_dim, generator="student", gen_tau=1.0)
    s = settings_from_dict({**dict(llamagen.get_config("tiny,method=dd2").dd2), "generator": "student",
                            "guidance": "ar", "guide_steps": 8,
                            "guide_opt": {"lr": 3e-3, "warmup_steps": 0}})
    codebook = jnp.asarray(teacher.codebook, jnp.float32)
    adapted = M.adapt_teacher(cfg, teacher.params, codebook, jax.random.PRNGKey(0))
    _, gen = _student(teacher)
    aux = F.family_aux(teacher)
    tx = s.guide_opt.make(100)
    state = {"gen": gen, "guide": adapted, "guide_opt": tx.init(adapted)}
    eps, labels = T.random_inputs(jax.random.PRNGKey(1), 16, cfg)
    q = F.generate(gen, cfg, eps, labels, aux)
    before = float(T.fake_ar_loss(adapted, cfg, q, labels, codebook, aux))
    guide, _, _ = jax.jit(lambda st: T.guide_updates(st, jax.random.PRNGKey(2), cfg, tx, s, 16, 8, aux,
                                                     codebook))(state)
    after = float(T.fake_ar_loss(guide, cfg, q, labels, codebook, aux))
    assert after < before - 0.1, (before, after)


@pytest.fixture(scope="module")
def tiny_student_run(tmp_path_factory):
    """The tiny config's DD2 stages with the score generator, then the student generator in a
    copy of that workdir (adapt and tune are restored)."""
    config = llamagen.get_config("tiny,method=dd2")
    teacher = build.build_teacher(config)
    s = read_settings(config)
    mesh = build.make_mesh(config)
    wd = str(tmp_path_factory.mktemp("dd2_score"))
    T.train(teacher, s.dd2, s.sampling, workdir=wd, mesh=mesh)
    student = _student(teacher, seed=3)
    sd = dataclasses.replace(s.dd2, generator="student", gen_tau=0.5)
    with pytest.raises(ValueError, match="needs DD1's trained student"):
        T.train(teacher, sd, s.sampling, workdir=wd, mesh=mesh)
    # the score run's csd stage is not reused for another generator
    with pytest.raises(ValueError, match="dd2/guide_warm was started from|dd2/csd was started from"):
        T.train(teacher, sd, s.sampling, workdir=wd, mesh=mesh, student=student)
    wd2 = str(tmp_path_factory.mktemp("dd2_student"))
    shutil.copytree(f"{wd}/dd2", f"{wd2}/dd2")
    for name in ("guide_warm", "csd", "align", "csd_after", "generator"):
        shutil.rmtree(f"{wd2}/dd2/{name}", ignore_errors=True)
    out = T.train(teacher, sd, s.sampling, workdir=wd2, mesh=mesh, student=student)
    return teacher, s, sd, student, wd2, out


def test_the_pipeline_starts_csd_from_the_student(tiny_student_run):
    teacher, s, sd, (scfg, sparams), wd, out = tiny_student_run
    assert out["stages"]["tune"]["start_step"] == s.dd2.tune_steps  # restored, not retrained
    first = "guide_warm" if sd.guide_warm_steps else "csd"
    assert out["stages"][first]["start_step"] == 0
    cfg, params = T.load_generator(wd)
    assert cfg.generator == "student" and cfg.gen_tau == 0.5
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.shape(a), np.shape(b)),
                           params, sparams)
    moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(sparams)))
    assert moved > 0, "CSD did not move the student generator"
    # the guidance network is a score network (from the tuned one), the generator DD1's student:
    # a few small CSD steps leave most of the student's 1-step tokens as they were
    final = out["final_state"]
    assert jax.tree_util.tree_structure(final["guide"]) == jax.tree_util.tree_structure(out["tuned"])
    codebook = jnp.asarray(teacher.codebook, jnp.float32)
    eps = jax.random.normal(jax.random.PRNGKey(9), (16, teacher.seq_len, teacher.code_dim))
    labels = jnp.arange(16) % teacher.num_classes
    aux = F.family_aux(teacher)
    ids = [np.asarray(sampling.nearest_code(F.generate(p, cfg, eps, labels, aux), codebook))
           for p in (params, sparams)]
    assert np.mean(ids[0] == ids[1]) > 0.5


def test_the_student_generator_exports_as_a_dd_student(tiny_student_run, tmp_path):
    from ddjax.convert import api

    teacher, _, _, (scfg, _), wd, _ = tiny_student_run
    gen_dir = f"{wd}/dd2/generator"
    params, cfg = api.load_jax(gen_dir, "dd2")
    path = api.jax_to_torch(gen_dir, str(tmp_path / "generator.safetensors"), "dd2")
    # the official DDTransformer's keys: the student's export of the same weights
    want = api.to_state_dict(params, "dd")
    from ddjax.utils.torch_io import read_state_dict
    got = read_state_dict(path)
    assert set(got) == set(want) and "final_layer_conti.linear.weight" in got
    back = api.import_torch(path, "dd2", cfg)
    as_dd = api.import_torch(path, "dd", scfg)
    for other in (back, as_dd):
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                               other, params)


def test_on_var_its_sample_is_dd1s_one_step_sample_and_it_exports_as_var_dd(tmp_path):
    from ddjax.convert import api
    from ddjax.dd2 import var_model

    config = var_configs.get_config("tiny,method=dd2")
    teacher = build.build_teacher(config)
    s = dataclasses.replace(read_settings(config).dd2, generator="student", gen_tau=0.5)
    from ddjax.dd2.settings import model_config
    cfg = model_config(teacher, s)
    assert isinstance(cfg, var_model.VARDD2Config) and cfg.generator == "student"
    fam = families.VAR
    scfg = fam.config_for(teacher)
    params = random_params(fam.init_params(scfg, jax.random.PRNGKey(0)), scale=0.3, seed=2)
    # the same network (DD2's config has no drop-path; the student runs without it here)
    assert (jax.tree_util.tree_map(jnp.shape, SG.init_params(cfg, jax.random.PRNGKey(0)))
            == jax.tree_util.tree_map(jnp.shape, params))
    aux = F.family_aux(teacher)
    eps = jax.random.normal(jax.random.PRNGKey(1), (2, teacher.seq_len, teacher.code_dim))
    labels = jnp.array([0, 1])
    q = F.generate(params, cfg, eps, labels, aux)
    want = sample_dd(StudentApply(scfg), params, eps, labels, aux["codebook"], (0,), teacher.seq_len)
    np.testing.assert_allclose(np.asarray(q), np.asarray(want), atol=1e-6)
    path = api.export_torch(params, "dd2", str(tmp_path / "g.safetensors"), config=cfg)
    back = api.import_torch(path, "var_dd", scfg)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           back, params)


def test_the_pipeline_runs_with_the_ar_guidance(tiny_student_run, tmp_path):
    from helpers import read_scalars

    teacher, s, sd, student, wd, _ = tiny_student_run
    shutil.copytree(f"{wd}/dd2", f"{tmp_path}/dd2")
    for name in ("guide_warm", "csd", "generator"):
        shutil.rmtree(f"{tmp_path}/dd2/{name}", ignore_errors=True)
    sa = dataclasses.replace(sd, guidance="ar")
    out = T.train(teacher, sa, s.sampling, workdir=str(tmp_path), mesh=build.make_mesh(
        llamagen.get_config("tiny,method=dd2")), student=student)
    logged = read_scalars(f"{tmp_path}/dd2/csd/logs")
    assert "fake_ce" in logged and "fcs" not in logged and "csd" in logged
    assert all(np.isfinite(v) for _, v in logged["csd"])
    # the guidance is the adapted teacher's network (role "teacher"), not a score network
    assert "output" in out["final_state"]["guide"] and "head" not in out["final_state"]["guide"]
