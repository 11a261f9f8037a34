"""DD1 on VAR: the flow map's push-forward against the exact joint of an enumerable VAR, the
whole-scale draws, the stopped sampler, and the pipeline (pairs -> student -> report) on the
tiny VAR config."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import var as var_configs  # configs/var.py
from conftest import ROOT
from helpers import kill_when, read_scalars

from ddjax.app import run
from ddjax.mapper.flow import FlowSettings
from ddjax.mapper.sequence import map_noise_to_tokens
from ddjax.student.loading import load_student
from ddjax.student.var_model import VARDDConfig
from ddjax.teacher.base import row_key_inputs, row_keyed_multinomial, row_keys
from ddjax.teacher.var import model as var_model
from ddjax.teacher.var import vqvae as vqvae_lib
from ddjax.teacher.var.family import VARTeacher
from ddjax.teacher.var.sampling import VARSamplingSettings

K, PN = 3, (1, 2)  # vocabulary 3, scales 1x1 and 2x2: 3^5 = 243 sequences to enumerate
L = sum(p * p for p in PN)


@pytest.fixture(scope="module")
def micro():
    vcfg = vqvae_lib.vqvae_config(vocab_size=K, z_channels=4, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                                  patch_nums=PN)
    cfg = var_model.var_config(2, embed_dim=32, num_heads=2, num_classes=4, vocab_size=K, cvae=4,
                               patch_nums=PN, drop_path_rate=0.0)
    params = var_model.init_params(cfg, jax.random.PRNGKey(1))
    # scale the weights up so that the conditionals are far from uniform
    params = jax.tree_util.tree_map(lambda x: 3.0 * x, params)
    vparams = vqvae_lib.init_params(vcfg, jax.random.PRNGKey(2))
    return VARTeacher(cfg, params, vcfg, vparams, variant="micro")


def exact_joint(teacher, label, settings):
    seqs = np.array(list(itertools.product(range(K), repeat=L)), np.int32)
    logp = np.asarray(teacher.log_probs(seqs, np.full((len(seqs),), label), settings), np.float64)
    return np.exp(np.take_along_axis(logp, seqs[..., None], -1)[..., 0].sum(-1))


def empirical(tokens):
    codes = (tokens * K ** np.arange(L - 1, -1, -1)).sum(-1)
    return np.bincount(codes, minlength=K**L) / len(tokens)


def tv_bound(p, n, delta=1e-4, solver_slack=0.004):
    return 0.5 * np.sqrt(p * (1 - p) / n).sum() + np.sqrt(np.log(1 / delta) / (2 * n)) + solver_slack


def test_flow_map_push_forward_is_the_exact_joint(micro):
    """Whole-scale flow maps inside the compiled sampler give sequences distributed as the
    product of the teacher's processed per-scale conditionals (CFG ramp and top-k included);
    the teacher's own ancestral sampler agrees, and another class's joint is rejected."""
    settings = VARSamplingSettings(cfg=2.0, top_k=2, top_p=0.0)
    n, label = 20000, 1
    joint = exact_joint(micro, label, settings)
    assert abs(joint.sum() - 1) < 1e-5 and joint.max() < 0.5
    noise = jax.random.normal(jax.random.PRNGKey(11), (n, L, 4))
    labels = jnp.full((n,), label)
    mapped = np.asarray(map_noise_to_tokens(micro, noise, labels, settings, FlowSettings()))
    tv = 0.5 * np.abs(empirical(mapped) - joint).sum()
    assert tv < tv_bound(joint, n), (tv, tv_bound(joint, n))
    other = exact_joint(micro, 3, settings)
    assert 0.5 * np.abs(empirical(mapped) - other).sum() > tv_bound(other, n)
    keys = row_keys(jax.random.PRNGKey(5), np.arange(n))
    anc = np.asarray(micro.sample(labels, jax.random.PRNGKey(0), settings, rule=row_keyed_multinomial,
                                  rule_inputs=row_key_inputs(keys, L)))
    assert 0.5 * np.abs(empirical(mapped) - empirical(anc)).sum() < 2 * tv_bound(joint, n)


def test_row_keyed_draws_of_one_step_are_independent():
    """A step of n tokens with the same distribution: one row's tokens differ (a shared key per
    step would draw n copies of one token), and a row's draws do not depend on its batch."""
    logp = jnp.full((2, 64, 1000), -np.log(1000.0))
    keys = row_keys(jax.random.PRNGKey(0), np.array([7, 8]))
    ids = np.asarray(row_keyed_multinomial(None, logp, 3, row_key_inputs(keys, 64)))
    assert len(np.unique(ids[0])) > 50 and not np.array_equal(ids[0], ids[1])
    alone = row_keyed_multinomial(None, logp[1:], 3, row_key_inputs(keys[1:], 64))
    np.testing.assert_array_equal(ids[1:], alone)


def test_stopped_sampler_is_the_prefix_of_the_full_one(micro):
    settings = VARSamplingSettings(cfg=1.5)
    labels = jnp.array([0, 2, 3])
    full = np.asarray(micro.sample(labels, jax.random.PRNGKey(3), settings))
    part = np.asarray(micro.sample(labels, jax.random.PRNGKey(3), settings, num_tokens=1))
    np.testing.assert_array_equal(part, full[:, :1])
    with pytest.raises(ValueError, match="num_tokens"):
        micro.sample(labels, jax.random.PRNGKey(3), settings, num_tokens=3)


def test_tiny_var_pipeline_through_main(tmp_path):
    """generate -> train -> evaluate on the tiny VAR config, then a rerun that resumes (skips)."""
    config = var_configs.get_config("tiny,mode=all")
    out = run(config, str(tmp_path))
    assert os.path.exists(out["report"])
    cfg, params, meta = load_student(str(tmp_path))
    assert isinstance(cfg, VARDDConfig) and meta["family"] == "var" and meta["step"] == config.train.num_steps
    assert cfg.seq_len == 21 and params["pos_1LC"].shape == (1, 22, 32)
    text = open(out["report"]).read()
    for row in ("teacher", "DD 1-step", "DD 2-step", "teacher-involved", "onestep*"):
        assert f"| {row} |" in text
    # teacher-involved counts scales: a student step, scales 1 (teacher_start) .. 4, a student step
    assert "| teacher-involved | 3 |" in text
    again = run(config, str(tmp_path))  # pairs complete, student trained: evaluation only
    assert os.path.exists(again["report"])


STAGE_SCRIPT = """
import sys, time
import jax
# Tiny models: compile time rules. Every stage (and the reference) compiles the same way, and
# the later stages reuse the first one's executables from the shared cache.
jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_compilation_cache_dir", {cache!r})
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
sys.path.insert(0, {configs!r})
import var
from ddjax.app import run
from ddjax.mapper import generate
from ddjax.mapper.pairs import PairDataset

# Slow each mapped batch and each training batch so that the parent can kill mid-stage; the
# work itself is unchanged.
_map, _batches = generate.map_noise_to_tokens, PairDataset.batches
def slow_map(*a, **k):
    time.sleep(0.15)
    return _map(*a, **k)
def slow_batches(self, *a, **k):
    for b in _batches(self, *a, **k):
        time.sleep(0.15)
        yield b
generate.map_noise_to_tokens, PairDataset.batches = slow_map, slow_batches
config = var.get_config("tiny")
config.data.update(num_pairs=192, shard_size=32, batch_size=8)
config.train.update(num_steps=24, checkpoint_every=4, log_every=4, keep_checkpoints=2)
for mode in sys.argv[2:]:
    config.mode = mode
    run(config, sys.argv[1])
"""


def _stage(script, workdir, *modes, wait=None, timeout=300):
    """Runs the stage script; with `wait` (a predicate on workdir) SIGKILLs it once wait() holds."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    args = [sys.executable, str(script), workdir, *modes]
    if wait is None:
        subprocess.run(args, env=env, check=True, timeout=timeout, stdout=subprocess.DEVNULL)
        return
    kill_when(args, env, wait, timeout, stdout=subprocess.DEVNULL)


def test_sigkill_while_writing_pairs_and_while_training_resumes_to_the_same_run(tmp_path):
    """VAR pairs and VAR training through the entry layer: SIGKILL mid-shard and mid-training,
    rerun, and the dataset, the losses and the (EMA) weights equal an uninterrupted run's."""
    from ddjax.mapper.pairs import PairDataset, shard_name
    from ddjax.student.loading import load_training_run

    script = tmp_path / "stage.py"
    script.write_text(STAGE_SCRIPT.format(configs=os.path.join(ROOT, "configs"),
                                          cache=str(tmp_path / "jax_cache")))
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    _stage(script, ref, "generate", "train")

    pairs = os.path.join(killed, "pairs")
    _stage(script, killed, "generate", wait=lambda: os.path.exists(
        os.path.join(pairs, shard_name(1) + ".json")))
    done = [f for f in os.listdir(pairs) if f.startswith("pairs-") and f.endswith(".json")]
    assert 2 <= len(done) < 6, done
    ckpts = os.path.join(killed, "student", "checkpoints")

    def mid_training():
        steps = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
        return any(s >= 8 for s in steps)

    _stage(script, killed, "generate", "train", wait=mid_training)
    steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
    assert steps and steps[-1] < 24, steps
    _stage(script, killed, "generate", "train")

    a, b = PairDataset(os.path.join(ref, "pairs")).load_all(), PairDataset(pairs).load_all()
    assert sorted(a) == sorted(b) and len(a["tokens"]) == 192
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    for ema in (False, True):
        _, pa, ma = load_training_run(ref, ema=ema)
        _, pb, mb = load_training_run(killed, ema=ema)
        assert ma["step"] == mb["step"] == 24
        for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)
    la, lb = (read_scalars(os.path.join(d, "student", "logs")) for d in (ref, killed))
    assert [s for s, _ in la["loss"]] == [4, 8, 12, 16, 20, 24]
    resumed = {s: v for s, v in lb["loss"]}
    for s, v in la["loss"]:
        if s > steps[-1]:  # the steps the rerun computed
            assert abs(resumed[s] - v) <= 1e-6, (s, resumed[s], v)

