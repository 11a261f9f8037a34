"""DD2's networks and pipeline on tiny LlamaGen teachers: the adapted teacher equals the teacher
at the codes, the generator and guidance network are causal as DD2 wires them, the CSD loss in
x_0 form is the score form with weight t^4 / (1 - t)^2, and the stages resume to the
uninterrupted run."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import llamagen
import numpy as np
import pytest
from helpers import random_params, read_scalars, seed_workdir, unit_codebook_teacher

from ddjax.app import build
from ddjax.app.settings import read_settings
from ddjax.dd2 import functional as F
from ddjax.dd2 import losses
from ddjax.dd2 import model as M
from ddjax.dd2 import score as score_lib
from ddjax.dd2 import train as T
from ddjax.dd2.settings import settings_from_dict
from ddjax.teacher.llamagen.sampling import SamplingSettings


@pytest.fixture(scope="module")
def teacher(tiny_gpt):
    return unit_codebook_teacher(tiny_gpt)


def test_the_adapted_teacher_equals_the_teacher_at_the_codes(teacher):
    cfg = M.dd2_config(teacher.config, teacher.code_dim)
    adapted = M.adapt_teacher(cfg, teacher.params, jnp.asarray(teacher.codebook), jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, teacher.vocab_size, (3, teacher.seq_len)).astype(np.int32)
    labels = np.array([0, 4, 9], np.int32)
    for settings in (SamplingSettings(), SamplingSettings(cfg_scale=2.0, top_k=20)):
        want = np.asarray(teacher.log_probs(ids, labels, settings))
        got = np.asarray(F.teacher_log_probs(adapted, cfg, jnp.asarray(teacher.codebook)[ids],
                                             jnp.asarray(labels), settings))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
        fin = np.isfinite(want)
        np.testing.assert_allclose(got[fin], want[fin], rtol=0, atol=1e-4)
    # Between codes the embedding interpolates: a point half-way between two codes gets a mix.
    c = jnp.asarray(teacher.codebook)
    e = M.DD2Transformer(cfg, "teacher").apply({"params": adapted}, 0.5 * (c[0] + c[1])[None],
                                               method=M.DD2Transformer.embed)
    table = teacher.params["tok_embeddings"]["embedding"]
    assert float(jnp.linalg.norm(e[0] - table[0])) > 1e-3 or float(jnp.linalg.norm(e[0] - table[1])) > 1e-3


def test_generator_and_guidance_are_causal(teacher):
    cfg = M.dd2_config(teacher.config, teacher.code_dim, head_depth=1)
    params = random_params(M.init_params(cfg, "score", jax.random.PRNGKey(1)), scale=0.1)
    n, d = teacher.seq_len, teacher.code_dim
    eps = jax.random.normal(jax.random.PRNGKey(2), (1, n, d))
    lab = jnp.array([3])
    jac = jax.jacobian(lambda e: F.generate(params, cfg, e, lab)[0])(eps)[:, :, 0]  # [n, d, n, d]
    dep = np.abs(np.asarray(jac)).sum((1, 3))  # [i, j]: d q_i / d eps_j
    assert np.all(dep[np.triu_indices(n, 1)] == 0), "q_i depends on later noise"
    assert np.all(np.diag(dep) > 0) and dep[n - 1, 0] > 0  # its own noise (head) and earlier (backbone)

    x = jax.random.normal(jax.random.PRNGKey(4), (1, n, d))
    t = jnp.full((1, n), 0.5)
    jp = jax.jacobian(lambda q: F.velocity(params, cfg, q, lab, x, t)[0])(eps)[:, :, 0]
    dp = np.abs(np.asarray(jp)).sum((1, 3))
    assert np.all(dp[np.triu_indices(n)] == 0), "the guidance at i reads prefix tokens >= i"
    assert dp[n - 1, 0] > 0
    jx = jax.jacobian(lambda xx: F.velocity(params, cfg, eps, lab, xx, t)[0])(x)[:, :, 0]
    dx = np.abs(np.asarray(jx)).sum((1, 3))
    np.testing.assert_array_equal(dx != 0, np.eye(n, dtype=bool))  # x_t only at its own position


def test_csd_x0_form_is_the_score_form_with_weight_t4_over_1_minus_t_squared():
    rng = np.random.default_rng(0)
    b, n, d, k = 2, 3, 2, 5
    q = jnp.asarray(rng.standard_normal((b, n, d)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((b, n, d)), jnp.float32)
    t = jnp.asarray(rng.uniform(0.2, 0.8, (b, n)), jnp.float32)
    codebook = jnp.asarray(rng.standard_normal((k, d)), jnp.float32)

    def mean_fn(shift):
        def f(x, tt, prefix):
            lp = jax.nn.log_softmax(jnp.cumsum(prefix, 1)[..., :1] * shift + jnp.arange(k) * shift, -1)
            return F.mixture_mean(x, tt, jnp.broadcast_to(lp, (b, n, k)), codebook)
        return f

    def as_score(mf):
        return lambda x, tt, prefix: -(x - (1 - tt[..., None]) * mf(x, tt, prefix)) / tt[..., None] ** 2

    tm, fm = mean_fn(0.7), mean_fn(-0.4)
    for alpha in (1.0, 1.2):
        x0 = lambda q, a=alpha: losses.csd_loss_x0(q, eps, t, tm, fm, alpha=a)  # noqa: E731
        sc = lambda q, a=alpha: losses.csd_loss(q, eps, t, as_score(tm), as_score(fm), alpha=a,  # noqa: E731
                                                weight=lambda tt: tt**4 / (1 - tt) ** 2) / n
        np.testing.assert_allclose(float(x0(q)), float(sc(q)), rtol=1e-4)
        np.testing.assert_allclose(np.asarray(jax.grad(x0)(q)), np.asarray(jax.grad(sc)(q)), rtol=1e-3,
                                   atol=1e-5)
    # The closed-form teacher mean of a row is `score.posterior_mean`'s.
    lp = jax.nn.log_softmax(jnp.asarray(rng.standard_normal((b, n, k)), jnp.float32))
    got = F.mixture_mean(q, t, lp, codebook)
    want = score_lib.posterior_mean(q.reshape(-1, d), t.reshape(-1), lp.reshape(-1, k), codebook)
    np.testing.assert_allclose(np.asarray(got).reshape(-1, d), np.asarray(want), rtol=1e-6)
    # R noise draws per sequence: the mean of the R one-draw losses (value and gradient).
    r = 3
    eps_r = jnp.asarray(rng.standard_normal((b, r, n, d)), jnp.float32)
    t_r = jnp.asarray(rng.uniform(0.2, 0.8, (b, r, n)), jnp.float32)

    def tm_r(x, tt, prefix):  # the same teacher mean, for x_t [B, R, n, d]
        lp = jax.nn.log_softmax(jnp.cumsum(prefix, 1)[..., :1] * 0.7 + jnp.arange(k) * 0.7, -1)
        return F.mixture_mean(x, tt, jnp.broadcast_to(lp, (b, n, k)), codebook)

    def fm_r(x, tt, prefix):
        lp = jax.nn.log_softmax(jnp.cumsum(prefix, 1)[..., :1] * -0.4 + jnp.arange(k) * -0.4, -1)
        return F.mixture_mean(x, tt, jnp.broadcast_to(lp, (b, n, k)), codebook)

    many = lambda q: losses.csd_loss_x0(q, eps_r, t_r, tm_r, fm_r)  # noqa: E731
    ones = lambda q: sum(losses.csd_loss_x0(q, eps_r[:, j], t_r[:, j], tm, fm) for j in range(r)) / r  # noqa: E731
    np.testing.assert_allclose(float(many(q)), float(ones(q)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.grad(many)(q)), np.asarray(jax.grad(ones)(q)), rtol=1e-4,
                               atol=1e-6)


def test_code_distances_in_chunks_equal_the_full_distance_matrix():
    """embed_tau and code_spacing (host-side, chunked) against scipy's full [K, K] matrix."""
    from scipy.spatial.distance import cdist

    c = np.random.default_rng(3).standard_normal((37, 5)).astype(np.float32)
    c[20] = c[4] + 1e-3  # a near-duplicate pair sets the smallest distance
    full = cdist(c.astype(np.float64), c.astype(np.float64))
    np.fill_diagonal(full, np.inf)
    got = M.nearest_code_distances(c, chunk=8)
    np.testing.assert_allclose(got, full.min(1), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(M.embed_tau(c, 0.2), 0.2 * full.min(), rtol=1e-9)
    np.testing.assert_allclose(M.code_spacing(c, chunk=8), np.median(full.min(1)), rtol=1e-9)
    with pytest.raises(ValueError, match=r"\[K >= 2, d\], got \(1, 5\)"):
        M.nearest_code_distances(c[:1])


def test_settings_name_the_bad_key():
    with pytest.raises(ValueError, match="unknown fields.*'bogus'"):
        settings_from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="config.dd2.gen_opt has unknown fields"):
        settings_from_dict({"gen_opt": {"lrr": 1}})
    with pytest.raises(ValueError, match="config.dd2.csd_t_min"):
        settings_from_dict({"csd_t_min": 0.5, "csd_t_max": 0.4}).check()
    with pytest.raises(ValueError, match="config.dd2.batch_size=6 must be a positive multiple"):
        settings_from_dict({"batch_size": 6}).check(4)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny config's DD2 stages, run once uninterrupted."""
    config = llamagen.get_config("tiny,method=dd2")
    teacher = build.build_teacher(config)
    s = read_settings(config)
    mesh = build.make_mesh(config)
    wd = str(tmp_path_factory.mktemp("dd2_full"))
    out = T.train(teacher, s.dd2, s.sampling, workdir=wd, mesh=mesh)
    return config, teacher, s, mesh, wd, out


def test_the_tiny_pipeline_writes_every_stage_and_a_loadable_generator(tiny_run):
    config, teacher, s, _, wd, out = tiny_run
    assert set(out["stages"]) == {"adapt", "tune", "csd"}
    assert out["adapt_embedding_error"] < 1e-3
    for name in ("adapt", "tune", "csd"):
        assert T.latest_step(f"{wd}/dd2/{name}") == getattr(s.dd2, f"{name}_steps")
    cfg, params = T.load_generator(wd)
    assert cfg == out["config"]
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           params, jax.device_get(out["final_state"]["gen_ema"]))
    assert len(read_scalars(f"{wd}/dd2/csd/logs")["csd"]) == s.dd2.csd_steps // s.dd2.log_every


def assert_trees_close(a, b, atol: float = 1e-6) -> None:
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0,
                                                                   atol=atol), a, b)


def assert_resumed_like(rerun: dict, out: dict) -> None:
    """The rerun's generator EMA and guidance network equal the uninterrupted run's."""
    for name in ("gen_ema", "guide"):
        assert_trees_close(jax.device_get(rerun["final_state"][name]),
                           jax.device_get(out["final_state"][name]))


def logged(workdir, tag: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one scalar of the csd stage's logs, in step order."""
    got = dict(read_scalars(f"{workdir}/dd2/csd/logs")[tag])
    return sorted(got), [got[k] for k in sorted(got)]


def test_an_interrupted_run_resumes_to_the_uninterrupted_one(tiny_run, tmp_path):
    config, teacher, s, mesh, wd, out = tiny_run
    seed_workdir(wd, tmp_path)
    # Stopped after 2 of the 4 CSD iterations (the learning rates do not depend on the length)...
    T.train(teacher, dataclasses.replace(s.dd2, csd_steps=2), s.sampling, workdir=str(tmp_path), mesh=mesh)
    rerun = T.train(teacher, s.dd2, s.sampling, workdir=str(tmp_path), mesh=mesh)
    assert rerun["stages"]["csd"]["start_step"] == 2 and rerun["stages"]["tune"]["start_step"] == 4
    assert_resumed_like(rerun, out)
    (got_steps, got), (want_steps, want) = logged(tmp_path, "csd"), logged(wd, "csd")
    assert got_steps == want_steps
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # A later stage started from other weights is not silently continued.
    with pytest.raises(ValueError, match="dd2/csd was started from .*tune step 4.*now .*tune step 6"):
        T.train(teacher, dataclasses.replace(s.dd2, tune_steps=6), s.sampling, workdir=str(tmp_path),
                mesh=mesh)


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {configs!r})
import llamagen
from ddjax.app import build
from ddjax.app.settings import read_settings
from ddjax.dd2 import stages
from ddjax.dd2 import train as T

real = stages.checkpoint_manager


def dying_manager(directory, keep):
    mngr = real(directory, keep)
    save = mngr.save

    def save_then_die(step, *a, **k):
        out = save(step, *a, **k)
        if step == 2 and os.sep + "csd" + os.sep in directory:
            mngr.wait_until_finished()
            os.kill(os.getpid(), signal.SIGKILL)  # mid-stage: nothing is closed or flushed after this
        return out

    mngr.save = save_then_die
    return mngr


stages.checkpoint_manager = dying_manager
config = llamagen.get_config("tiny,method=dd2")
s = read_settings(config)
T.train(build.build_teacher(config), s.dd2, s.sampling, workdir=sys.argv[1], mesh=build.make_mesh(config))
"""


def test_a_sigkilled_run_resumes_to_the_same_losses_and_weights(tiny_run, tmp_path):
    config, teacher, s, mesh, wd, out = tiny_run
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "die.py"
    script.write_text(KILL_SCRIPT.format(configs=os.path.join(root, "configs")))
    killed = str(tmp_path / "killed")
    seed_workdir(wd, killed)
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(script), killed], env=env, timeout=600,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert T.latest_step(f"{killed}/dd2/csd") == 2 and not os.path.exists(f"{killed}/dd2/generator")
    rerun = T.train(teacher, s.dd2, s.sampling, workdir=killed, mesh=mesh)
    assert rerun["stages"]["csd"]["start_step"] == 2 and rerun["stages"]["tune"]["start_step"] == 4
    assert_resumed_like(rerun, out)
    for tag in ("csd", "fcs"):  # the killed run's logs up to its checkpoint, then the rerun's
        (got_steps, got), (want_steps, want) = logged(killed, tag), logged(wd, tag)
        assert got_steps == want_steps == list(range(2, s.dd2.csd_steps + 1, s.dd2.log_every))
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_the_generator_exports_to_pytorch_and_back(tiny_run, tmp_path):
    from ddjax.convert import api
    from ddjax.utils.torch_io import CheckpointError, read_state_dict

    _, _, _, _, wd, _ = tiny_run
    gen_dir = f"{wd}/dd2/generator"
    params, cfg = api.load_jax(gen_dir, "dd2")
    for name in ("generator.safetensors", "generator.pt"):
        path = api.jax_to_torch(gen_dir, str(tmp_path / name), "dd2")
        state = read_state_dict(path, "model" if path.endswith(".pt") else None)
        # The documented layout: the teacher's names for the backbone, the head under head.*.
        assert {"cls_embedding.embedding_table.weight", "tok_embeddings.centers", "tok_embeddings.table",
                "tok_embeddings.log_tau", "tok_proj.weight", "layers.0.attention.wqkv.weight", "norm.weight",
                "head.input_proj.weight", "head.final_fc.bias"} <= set(state)
        back = api.import_torch(path, "dd2", cfg)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                               back, params)
    with pytest.raises(CheckpointError, match="missing keys"):
        api.torch_to_flax({k: v for k, v in state.items() if k != "norm.weight"},
                          api.abstract_params("dd2", cfg), source="x")


def test_with_teacher_keeps_the_generators_prefix_and_lets_the_teacher_finish(teacher):
    from ddjax.dd2 import sampling
    from ddjax.teacher.base import row_keys

    cfg = M.dd2_config(teacher.config, teacher.code_dim, head_depth=1)
    params = random_params(M.init_params(cfg, "score", jax.random.PRNGKey(5)), scale=0.1)
    noise = jax.random.normal(jax.random.PRNGKey(6), (4, teacher.seq_len, teacher.code_dim))
    labels = jnp.array([1, 2, 3, 4])
    codebook = jnp.asarray(teacher.codebook)
    own = np.asarray(sampling.nearest_code(F.generate(params, cfg, noise, labels), codebook))
    keys = row_keys(jax.random.PRNGKey(7), np.arange(4))
    settings = SamplingSettings(cfg_scale=1.5)
    k = 5
    ids = np.asarray(sampling.with_teacher(teacher, params, cfg, noise, labels, k, settings, keys))
    np.testing.assert_array_equal(ids[:, :k], own[:, :k])
    assert (ids[:, k:] != own[:, k:]).any()  # the teacher, not the generator, drew the rest
    # Each row's continuation depends on its own key only (rows 2-3 alone give the same tokens).
    alone = np.asarray(sampling.with_teacher(teacher, params, cfg, noise[2:], labels[2:], k, settings,
                                             keys[2:]))
    np.testing.assert_array_equal(alone, ids[2:])
    np.testing.assert_array_equal(np.asarray(sampling.one_step(params, cfg, noise, labels, codebook)),
                                  np.asarray(codebook)[own])


def test_performance_alignment_freezes_the_generator_then_csd_continues(tiny_run, tmp_path):
    import orbax.checkpoint as ocp

    config, teacher, s, mesh, wd, out = tiny_run
    dd2 = dataclasses.replace(s.dd2, align_steps=2, align_csd_steps=2)
    seed_workdir(wd, tmp_path, ("adapt", "tune", "csd"))
    got = T.train(teacher, dd2, s.sampling, workdir=str(tmp_path), mesh=mesh)
    assert set(got["stages"]) == {"adapt", "tune", "csd", "align", "csd_after"}

    def ckpt(stage, step):
        return ocp.StandardCheckpointer().restore(str(tmp_path / "dd2" / stage / "checkpoints" / str(step)
                                                      / "default"))

    csd, align = ckpt("csd", s.dd2.csd_steps), ckpt("align", 2)
    # the plain run up to here
    assert_trees_close(csd["gen_ema"], jax.device_get(out["final_state"]["gen_ema"]))
    assert_trees_close(align["gen"], csd["gen_ema"])  # the generator is its EMA, frozen during alignment
    moved = jax.tree_util.tree_map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()),
                                   align["guide"], csd["guide"])
    assert max(jax.tree_util.tree_leaves(moved)) > 0  # while the guidance network trains
    assert "csd" not in read_scalars(str(tmp_path / "dd2" / "align" / "logs"))
    assert "csd" in read_scalars(str(tmp_path / "dd2" / "csd_after" / "logs"))


def test_guide_warm_trains_the_guidance_alone_before_csd(tiny_run, tmp_path):
    import orbax.checkpoint as ocp

    config, teacher, s, mesh, wd, out = tiny_run
    seed_workdir(wd, tmp_path)
    got = T.train(teacher, dataclasses.replace(s.dd2, guide_warm_steps=2), s.sampling,
                  workdir=str(tmp_path), mesh=mesh)
    assert list(got["stages"]) == ["adapt", "tune", "guide_warm", "csd"]
    warm = ocp.StandardCheckpointer().restore(str(tmp_path / "dd2" / "guide_warm" / "checkpoints" / "2"
                                                  / "default"))
    tuned = jax.device_get(out["tuned"])
    for name in ("gen", "gen_ema"):  # the generator starts CSD as it was (here: the tuned network)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                               warm[name], tuned)
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                   warm["guide"], tuned)
    assert max(jax.tree_util.tree_leaves(moved)) > 0
    assert int(warm["gen_step"]) == 0
    assert "csd" not in read_scalars(str(tmp_path / "dd2" / "guide_warm" / "logs"))
    # CSD then starts from that guidance, so a changed guide_warm is not silently continued.
    with pytest.raises(ValueError, match="dd2/csd was started from .*guide_warm step 2.*now .*"
                                         "guide_warm step 3"):
        T.train(teacher, dataclasses.replace(s.dd2, guide_warm_steps=3), s.sampling,
                workdir=str(tmp_path), mesh=mesh)
