"""The sequence map and the pair dataset: exact joints, determinism, kill-and-resume."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, random_params, teacher_of, tiny_gpt_config
from helpers import kill_when

from ddjax.mapper.flow import FlowSettings
from ddjax.mapper.pairs import PairDataset, PairSpec, generate_pairs, shard_name
from ddjax.mapper.sequence import map_noise_to_tokens
from ddjax.teacher.llamagen.gpt import GPT, init_params
from ddjax.teacher.llamagen.sampling import SamplingSettings, guide, process_logits, sample

K, L, D = 4, 4, 8  # vocab, tokens (2x2 grid), code dim: 4^4 = 256 sequences to enumerate


@pytest.fixture(scope="module")
def micro():
    cfg = tiny_gpt_config(vocab_size=K, block_size=L, dim=16, n_head=2, n_kv_head=1)
    params = random_params(init_params(cfg, jax.random.PRNGKey(1)), seed=2, scale=0.8)
    code = np.array(jax.random.normal(jax.random.PRNGKey(3), (K, D)))
    code /= np.linalg.norm(code, axis=1, keepdims=True)
    return cfg, params, code


def exact_joint(cfg, params, label, settings):
    """p(sequence) for all K^L sequences: the product of the processed per-step conditionals."""
    seqs = np.array(list(itertools.product(range(K), repeat=L)), np.int32)
    model = GPT(cfg)
    lab = jnp.full((len(seqs),), label)
    cond = model.apply({"params": params}, jnp.asarray(seqs), lab)
    if settings.use_cfg:
        unc = model.apply({"params": params}, jnp.asarray(seqs), jnp.full_like(lab, cfg.num_classes))
        cond = guide(cond, unc, settings.cfg_scale)
    logp = process_logits(cond.reshape(-1, K), settings).reshape(len(seqs), L, K)
    joint = np.exp(np.take_along_axis(np.asarray(logp), seqs[..., None], -1)[..., 0].sum(-1))
    return seqs, joint


def empirical(tokens):
    codes = (tokens * K ** np.arange(L - 1, -1, -1)).sum(-1)
    return np.bincount(codes, minlength=K**L) / len(tokens)


def tv_bound(p, n, delta=1e-4, solver_slack=0.004):
    """E TV(empirical, p) <= 1/2 sum sqrt(p(1-p)/n); McDiarmid adds sqrt(log(1/delta)/(2n))
    (one sample moves TV by <= 1/n); the ODE solver's residual disagreement adds a little."""
    return 0.5 * np.sqrt(p * (1 - p) / n).sum() + np.sqrt(np.log(1 / delta) / (2 * n)) + solver_slack


def test_sequence_frequencies_match_the_exact_joint_and_ancestral_sampling(micro):
    cfg, params, code = micro
    settings = SamplingSettings(cfg_scale=1.5, top_k=3)
    n, label = 20000, 4
    _, joint = exact_joint(cfg, params, label, settings)
    noise = jax.random.normal(jax.random.PRNGKey(11), (n, L, D))
    labels = jnp.full((n,), label)
    mapped = np.asarray(map_noise_to_tokens(teacher_of(cfg, params, code), noise, labels, settings))
    tv = 0.5 * np.abs(empirical(mapped) - joint).sum()
    assert tv < tv_bound(joint, n), (tv, tv_bound(joint, n))
    # A wrong joint (another class) is rejected by the same bound.
    _, other = exact_joint(cfg, params, 7, settings)
    assert 0.5 * np.abs(empirical(mapped) - other).sum() > tv_bound(other, n)
    # The teacher's own multinomial sampler: two empirical distributions, twice the slack.
    anc = np.asarray(sample(params, cfg, labels, jax.random.PRNGKey(5), settings))
    tv2 = 0.5 * np.abs(empirical(mapped) - empirical(anc)).sum()
    assert tv2 < 2 * tv_bound(joint, n), tv2


def test_same_noise_same_tokens_across_runs_and_batch_sizes(micro):
    cfg, params, code = micro
    s = SamplingSettings(cfg_scale=2.0, top_k=3)
    noise = jax.random.normal(jax.random.PRNGKey(0), (64, L, D))
    labels = jnp.arange(64) % cfg.num_classes
    full = np.asarray(map_noise_to_tokens(teacher_of(cfg, params, code), noise, labels, s))
    again = np.asarray(map_noise_to_tokens(teacher_of(cfg, params, code), noise, labels, s))
    np.testing.assert_array_equal(full, again)
    for b in (1, 8):
        part = np.asarray(map_noise_to_tokens(teacher_of(cfg, params, code), noise[:b], labels[:b], s))
        np.testing.assert_array_equal(part, full[:b])


def test_top_k_1_gives_the_argmax_whatever_the_noise(micro):
    cfg, params, code = micro
    labels = jnp.arange(16) % cfg.num_classes
    greedy = np.asarray(sample(params, cfg, labels, jax.random.PRNGKey(0), SamplingSettings(greedy=True)))
    for seed in range(3):
        noise = 3.0 * jax.random.normal(jax.random.PRNGKey(seed), (16, L, D))
        got = map_noise_to_tokens(teacher_of(cfg, params, code), noise, labels, SamplingSettings(top_k=1))
        np.testing.assert_array_equal(np.asarray(got), greedy)


def test_bad_noise_shape(micro):
    cfg, params, code = micro
    with pytest.raises(ValueError, match=r"noise must be \[B, L, 8\]"):
        map_noise_to_tokens(teacher_of(cfg, params, code), jnp.zeros((2, L, 3)), jnp.zeros(2, jnp.int32),
                            SamplingSettings())


# -- the dataset ---------------------------------------------------------------------------
def _fake_map(noise, labels):
    """A cheap deterministic stand-in for the teacher map (the format tests need no model)."""
    return (np.abs(noise).argmax(-1) + labels[:, None]) % 7


def _spec(**kw):
    base = dict(seed=3, num_pairs=50, shard_size=16, seq_len=4, noise_dim=8, num_classes=5,
                generator={"vocab_size": 7})
    base.update(kw)
    return PairSpec(**base)


def test_dataset_round_trip_labels_and_checksums(tmp_path):
    d = str(tmp_path / "p")
    spec = _spec()
    assert generate_pairs(d, spec, _fake_map, batch_size=8) == [0, 1, 2, 3]
    ds = PairDataset(d)
    data = ds.load_all()
    assert data["noise"].shape == (50, 4, 8) and data["tokens"].shape == (50, 4)
    np.testing.assert_array_equal(data["index"], np.arange(50))
    np.testing.assert_array_equal(data["tokens"], _fake_map(data["noise"], data["labels"]))
    # balanced: each class appears 10 times in 50 pairs
    np.testing.assert_array_equal(np.bincount(data["labels"], minlength=5), [10] * 5)
    # readable with numpy alone
    with np.load(os.path.join(d, "pairs-00003.npz")) as z:
        assert z["noise"].shape == (2, 4, 8)
    # a rerun writes nothing; another spec in the same directory is refused
    assert generate_pairs(d, spec, _fake_map, batch_size=8) == []
    with pytest.raises(ValueError, match="seed"):
        generate_pairs(d, _spec(seed=4), _fake_map, batch_size=8)
    # a corrupted shard is detected, named, and regenerated identically
    path = os.path.join(d, "pairs-00001.npz")
    raw = bytearray(open(path, "rb").read())
    raw[-100] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match="pairs-00001"):
        PairDataset(d)
    assert generate_pairs(d, spec, _fake_map, batch_size=8) == [1]
    np.testing.assert_array_equal(PairDataset(d).load_all()["noise"], data["noise"])


def test_multi_process_shards_are_disjoint(tmp_path):
    d = str(tmp_path / "p")
    spec = _spec(label_policy="uniform")
    a = generate_pairs(d, spec, _fake_map, 8, process_index=0, process_count=2)
    b = generate_pairs(d, spec, _fake_map, 8, process_index=1, process_count=2)
    assert a == [0, 2] and b == [1, 3]
    one = str(tmp_path / "q")
    generate_pairs(one, spec, _fake_map, 16)
    for k, v in PairDataset(one).load_all().items():
        np.testing.assert_array_equal(PairDataset(d).load_all()[k], v)


def test_batches_are_deterministic_and_resume_at_a_step(tmp_path):
    d = str(tmp_path / "p")
    generate_pairs(d, _spec(num_pairs=100), _fake_map, 16)
    ds = PairDataset(d)
    it = ds.batches(8, seed=1, window=2)
    first = [next(it)["index"] for _ in range(20)]  # spans an epoch boundary
    resumed = ds.batches(8, seed=1, window=2, start_step=13)
    for k in range(13, 20):
        np.testing.assert_array_equal(next(resumed)["index"], first[k])
    epoch = np.concatenate(first[: ds.steps_per_epoch(8, seed=1, window=2)])
    assert len(np.unique(epoch)) == len(epoch)  # no pair twice within an epoch


KILL_SCRIPT = """
import sys, time, numpy as np
sys.path.insert(0, {tests!r})
from ddjax.mapper.pairs import PairSpec, generate_pairs
def slow_map(noise, labels):
    time.sleep(0.05)
    return (np.abs(noise).argmax(-1) + labels[:, None]) % 7
spec = PairSpec(seed=9, num_pairs=120, shard_size=16, seq_len=4, noise_dim=8, num_classes=5,
                generator={{"vocab_size": 7}})
generate_pairs(sys.argv[1], spec, slow_map, batch_size=4)
"""


def test_kill_mid_shard_and_resume_equals_uninterrupted_run(tmp_path):
    script = tmp_path / "gen.py"
    script.write_text(KILL_SCRIPT.format(tests=os.path.join(ROOT, "tests")))
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    subprocess.run([sys.executable, str(script), ref], env=env, check=True, timeout=300)
    # kill once two shards are final and the third is being mapped
    kill_when([sys.executable, str(script), killed], env,
              lambda: os.path.exists(os.path.join(killed, shard_name(1) + ".json")), 240, delay=0.1)
    done = sorted(f for f in os.listdir(killed) if f.endswith(".json") and f != "dataset.json")
    assert 2 <= len(done) < 8, done
    subprocess.run([sys.executable, str(script), killed], env=env, check=True, timeout=300)
    a, b = PairDataset(ref).load_all(), PairDataset(killed).load_all()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert sorted(os.listdir(ref)) == sorted(os.listdir(killed))
    with open(os.path.join(killed, "dataset.json")) as f:
        assert json.load(f)["num_pairs"] == 120


def test_generate_mode_end_to_end(tmp_path):
    import llamagen

    from ddjax.app import build, run

    config = llamagen.get_config("tiny,mode=generate")
    config.data.num_pairs = 40
    config.data.shard_size = 20
    config.data.batch_size = 8
    run(config, str(tmp_path))
    ds = PairDataset(str(tmp_path / "pairs"))
    data = ds.load_all()
    teacher = build.build_teacher(config)
    want = map_noise_to_tokens(teacher, jnp.asarray(data["noise"][:8]), jnp.asarray(data["labels"][:8]),
                               SamplingSettings(**{k: config.sampling[k] for k in (
                                   "cfg_scale", "cfg_interval", "temperature", "top_k", "top_p")}),
                               FlowSettings(**dict(config.flow)))
    np.testing.assert_array_equal(data["tokens"][:8], np.asarray(want))
    # The flow check ran on the teacher before the first shard and is recorded.
    check = ds.checks["flow_check"]
    assert check["num_tokens"] == config.data.flow_check_tokens
    assert check["agreement"] >= config.data.flow_check_threshold
