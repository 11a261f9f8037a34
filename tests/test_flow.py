"""Tests of the one-token flow-matching map (ddjax.mapper.flow) against closed forms."""

from __future__ import annotations

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ddjax.mapper import check, codes, flow, prune


def unit_codebook(rng: np.random.Generator, k: int, d: int = 8) -> np.ndarray:
    c = rng.normal(size=(k, d))
    return (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - np.max(z, axis=-1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def brute_logits(x, t, log_p, c):
    """float64 log p_k - |x - (1 - t) c_k|^2 / (2 t^2) with an explicit [N, K, d] difference."""
    t = np.broadcast_to(np.asarray(t, np.float64).reshape(-1, 1), (x.shape[0], 1))
    diff = x[:, None, :].astype(np.float64) - (1 - t)[:, :, None] * c[None].astype(np.float64)
    return log_p - np.sum(diff**2, axis=-1) / (2 * t**2)


# --- closed forms -------------------------------------------------------------------------------


def test_posterior_at_t1_is_p():
    rng = np.random.default_rng(0)
    c, x = unit_codebook(rng, 32), rng.normal(size=(5, 8)).astype(np.float32)
    log_p = log_softmax(2 * rng.normal(size=(5, 32))).astype(np.float32)
    w = jax.nn.softmax(flow.posterior_logits(x, 1.0, log_p, c), axis=-1)
    np.testing.assert_allclose(w, np.exp(log_p), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("t", [0.9, 0.3, 0.05, "per_row"])
def test_posterior_logits_closed_form(t):
    rng = np.random.default_rng(1)
    c = rng.normal(size=(64, 8)).astype(np.float32)  # not normalised: |c|^2 term matters
    x = rng.normal(size=(6, 8)).astype(np.float32)
    log_p = log_softmax(rng.normal(size=(6, 64))).astype(np.float32)
    t = np.linspace(0.05, 1.0, 6, dtype=np.float32) if t == "per_row" else t
    got = np.asarray(flow.posterior_logits(x, t, log_p, c))
    want = brute_logits(x, t, log_p, c)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.max(np.abs(want)))


def test_velocity_single_code_is_x_minus_c_over_t():
    rng = np.random.default_rng(2)
    c, x = rng.normal(size=(1, 8)).astype(np.float32), rng.normal(size=(7, 8)).astype(np.float32)
    t = np.linspace(0.01, 1.0, 7, dtype=np.float32)
    got = flow.velocity(x, t, np.zeros((7, 1), np.float32), c)
    np.testing.assert_allclose(got, (x - c) / t[:, None], rtol=1e-5, atol=1e-5)


def test_velocity_closed_form():
    rng = np.random.default_rng(3)
    c, x = unit_codebook(rng, 48), rng.normal(size=(9, 8)).astype(np.float32)
    log_p = log_softmax(3 * rng.normal(size=(9, 48))).astype(np.float32)
    for t in (1.0, 0.5, 0.1):
        lg = brute_logits(x, t, log_p, c)
        w = np.exp(lg - lg.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        want = np.einsum("nk,nkd->nd", w, (x[:, None, :] - c[None]) / t)
        np.testing.assert_allclose(flow.velocity(x, t, log_p, c), want, rtol=1e-4, atol=1e-4)


def test_removed_codes_get_zero_weight():
    rng = np.random.default_rng(4)
    c, x = unit_codebook(rng, 40), rng.normal(size=(6, 8)).astype(np.float32)
    log_p = log_softmax(rng.normal(size=(6, 40))).astype(np.float32)
    keep = rng.random(40) < 0.3
    log_p[:, ~keep] = -np.inf
    for t in (1.0, 0.4, 0.02):
        lg = flow.posterior_logits(x, t, log_p, c)
        w = np.asarray(jax.nn.softmax(lg, axis=-1))
        assert np.all(np.isfinite(w)) and np.all(w[:, ~keep] == 0.0)
        v = flow.velocity(x, t, log_p, c)
        v_kept = flow.velocity(x, t, log_p[:, keep], c[keep])  # same flow without those codes
        np.testing.assert_allclose(v, v_kept, rtol=1e-5, atol=1e-5)


def test_snap_matches_brute_force():
    rng = np.random.default_rng(5)
    for k in (3, 50, 500):
        c = rng.normal(size=(k, 8)).astype(np.float32)
        x = rng.normal(size=(4, 25, 8)).astype(np.float32)
        d2 = np.sum((x[..., None, :].astype(np.float64) - c) ** 2, axis=-1)
        got = flow.snap(x, c)
        assert got.shape == (4, 25) and got.dtype == jnp.int32
        np.testing.assert_array_equal(got, np.argmin(d2, axis=-1))
        log_p = np.where(rng.random((4, 25, k)) < 0.5, -np.inf, 0.0).astype(np.float32)
        log_p[..., 0] = 0.0
        want = np.argmin(np.where(np.isinf(log_p), np.inf, d2), axis=-1)
        np.testing.assert_array_equal(flow.snap(x, c, log_p), want)
        np.testing.assert_array_equal(flow.snap(x, c, log_p, chunk=16), want)


def test_time_grids():
    for schedule in flow.SCHEDULES:
        ts = flow.time_grid(12, 1e-3, schedule)
        assert ts.shape == (13,) and ts[0] == 1.0 and ts[-1] == np.float32(1e-3)
        assert np.all(np.diff(ts) < 0)
    steps = np.diff(flow.time_grid(12, 1e-3, "quadratic"))
    assert abs(steps[-1]) < abs(steps[0])  # concentrates near t = 0


def test_early_steps_respace_the_grid_above_early_t_only():
    base = flow.time_grid(32, 1e-3, "cubic", np.float64)
    late = base[base <= 0.1]
    ts = flow.time_grid(32, 1e-3, "cubic", np.float64, early_steps=10, early_t=0.1)
    assert ts.shape == (10 + len(late),) and ts[0] == 1.0
    np.testing.assert_array_equal(ts[10:], late)  # the cubic grid from its first time <= 0.1 on
    s = np.sqrt(1.0 / ts[:11] - 1.0)  # equally spaced in sqrt(lambda) from 1 to late[0]
    np.testing.assert_allclose(np.diff(s), s[-1] / 10, rtol=1e-9)
    assert np.all(np.diff(ts) < 0)
    # never more early steps than the schedule had above early_t (here 5 of 8)
    coarse = flow.time_grid(8, 1e-3, "cubic", np.float64)
    above = int(np.sum(coarse > 0.1))
    got = flow.time_grid(8, 1e-3, "cubic", np.float64, early_steps=10)
    assert len(got) == len(coarse) and np.all(got[above:] == coarse[above:])
    settings = flow.FlowSettings(early_steps=10)  # LlamaGen's configs: 10 early + 14 cubic steps
    assert len(flow.settings_grid(settings)) == 25
    plain = flow.FlowSettings()  # the default keeps the plain cubic grid
    assert plain.early_steps is None
    np.testing.assert_array_equal(flow.settings_grid(plain), flow.time_grid(32, 1e-3, "cubic"))
    for bad, match in [(dict(early_steps=0), "early_steps"), (dict(early_steps=4, early_t=1.0), "early_t"),
                       (dict(early_steps=4, early_t=1e-4), "early_t")]:
        with pytest.raises(ValueError, match=match):
            flow.time_grid(32, 1e-3, "cubic", **bad)


# --- the map ------------------------------------------------------------------------------------


def test_one_hot_p_returns_that_code_for_any_noise():
    rng = np.random.default_rng(6)
    c = unit_codebook(rng, 300)
    c[8] = c[7]  # a duplicated code must not steal the token
    noise = (rng.normal(size=(512, 8)) * rng.choice([0.1, 1.0, 10.0], size=(512, 1))).astype(
        np.float32
    )
    for j in (0, 8, 299):
        p = np.zeros((512, 300), np.float32)
        p[:, j] = 1.0
        with np.errstate(divide="ignore"):
            log_p = np.log(p)
        np.testing.assert_array_equal(flow.map_token(noise, log_p, c), np.full(512, j))
    # ending at t = 0 exactly: the last (Euler) step lands on the code itself
    x0 = flow.integrate(noise[:8], log_p[:8], c, t_min=0.0, schedule="linear")
    np.testing.assert_allclose(x0, np.broadcast_to(c[299], (8, 8)), atol=1e-5)


def distribution_cases():
    rng = np.random.default_rng(7)
    tail = 1.0 / np.arange(1, 256) ** 1.1  # one code with 0.95, a long tail with the rest
    peaked = np.concatenate([[0.95], 0.05 * tail / tail.sum()])
    lognormal = log_softmax(3 * rng.normal(size=1024))  # like LlamaGen's logits
    top50 = lognormal.copy()
    top50[np.argsort(top50)[:-50]] = -np.inf  # top-k 50: 974 removed codes
    return {
        "K16": log_softmax(1.5 * rng.normal(size=16)),
        "K256_peaked": np.log(rng.permutation(peaked)),
        "K1024": lognormal,
        "K1024_top50": log_softmax(top50),
    }


def chisquare_pvalue(counts: np.ndarray, p: np.ndarray) -> float:
    """Chi-square goodness of fit, bins with expected count < 5 pooled into one."""
    expected = p * counts.sum()
    small = expected < 5
    obs, exp = list(counts[~small]), list(expected[~small])
    if small.any():
        obs.append(counts[small].sum())
        exp.append(expected[small].sum())
    obs, exp = np.array(obs, np.float64), np.array(exp, np.float64)
    return float(stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


@pytest.mark.parametrize("case", ["K16", "K256_peaked", "K1024", "K1024_top50"])
def test_map_pushes_noise_to_p(case):
    log_p = distribution_cases()[case]
    k, n = log_p.shape[0], 20_000
    rng = np.random.default_rng(8)
    c = unit_codebook(rng, k)
    noise = rng.normal(size=(n, 8)).astype(np.float32)
    ids = flow.map_token(noise, np.broadcast_to(log_p.astype(np.float32), (n, k)), c)
    counts = np.bincount(np.asarray(ids), minlength=k)
    p = np.exp(log_p)
    assert counts[p == 0].sum() == 0  # never a removed code
    keep = p > 0
    assert chisquare_pvalue(counts[keep], p[keep]) > 1e-3
    # the same test has power: it rejects p with its largest and 5th largest entries swapped
    # (0.077 <-> 0.036 for K1024) and a tempered p (temperature 1.25)
    first, fifth = np.argsort(-p)[[0, 4]]
    swapped = p.copy()
    swapped[[first, fifth]] = p[[fifth, first]]
    tempered = np.exp(log_softmax(np.where(keep, log_p, -np.inf) / 1.25))
    for wrong in (swapped, tempered):
        assert chisquare_pvalue(counts[keep], wrong[keep]) < 1e-6


def test_batch_independence_and_jit():
    rng = np.random.default_rng(9)
    k, n = 1024, 1000
    c = unit_codebook(rng, k)
    log_p = log_softmax(3 * rng.normal(size=(n, k))).astype(np.float32)
    noise = rng.normal(size=(n, 8)).astype(np.float32)
    settings = flow.FlowSettings()
    mapped = jax.jit(lambda e, lp: flow.map_token(e, lp, c, settings))
    ids = np.asarray(mapped(noise, log_p))
    # floats too are bit-identical whatever the batch size (same compilation mode)
    integrated = jax.jit(lambda e, lp, cb: flow.integrate(e, lp, cb, settings))
    x = np.asarray(integrated(noise, log_p, c))
    for lo, hi in ((0, 1), (17, 18), (999, 1000), (100, 107), (993, 1000), (300, 364)):
        np.testing.assert_array_equal(mapped(noise[lo:hi], log_p[lo:hi]), ids[lo:hi])
        np.testing.assert_array_equal(integrated(noise[lo:hi], log_p[lo:hi], c), x[lo:hi])
    # without jit: same tokens (the last float bits may differ: XLA folds a closed-over
    # codebook as a constant under jit)
    np.testing.assert_array_equal(flow.map_token(noise, log_p, c, settings), ids)


@pytest.mark.parametrize("k", [1, 127, 128, 300, 16384])
def test_running_count_is_cumsum(k):
    mask = np.random.default_rng(k).random((3, k)) < 0.6
    got = codes.running_count(jnp.asarray(mask))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, np.cumsum(mask, axis=-1))


def test_compact_keeps_each_rows_finite_codes_in_order():
    rng = np.random.default_rng(12)
    c = rng.normal(size=(50, 3)).astype(np.float32)
    log_p = rng.normal(size=(4, 50)).astype(np.float32)
    keep = rng.random((4, 50)) < np.array([[0.3], [0.1], [0.0], [0.9]])
    keep[2, 7] = True  # a single finite code
    log_p = np.where(keep, log_p, -np.inf).astype(np.float32)
    lp, cb, slots, fits = codes.compact(jnp.asarray(log_p), jnp.asarray(c), 20)
    chex.assert_shape((lp, cb, slots, fits), ((4, 20), (4, 3, 20), (4, 20), (4,)))
    for r in range(4):
        ids = np.nonzero(keep[r])[0]
        np.testing.assert_array_equal(fits[r], len(ids) <= 20)
        m = min(len(ids), 20)
        np.testing.assert_array_equal(lp[r, :m], log_p[r, ids[:m]])
        np.testing.assert_array_equal(cb[r, :, :m], c[ids[:m]].T)
        np.testing.assert_array_equal(slots[r, :m], ids[:m])
        assert np.all(np.isneginf(lp[r, m:]))


def test_support_compaction_is_exact_under_top_k():
    rng = np.random.default_rng(10)
    k, n = 4096, 2000
    c = unit_codebook(rng, k)
    logits = 3 * rng.normal(size=(n, k))
    kth = np.sort(logits, axis=-1)[:, -300][:, None]
    log_p = log_softmax(np.where(logits >= kth, logits, -np.inf)).astype(np.float32)
    noise = rng.normal(size=(n, 8)).astype(np.float32)
    full = flow.map_token(noise, log_p, c, flow.FlowSettings(support_k=None))
    compacted = flow.map_token(noise, log_p, c, flow.FlowSettings(support_k=512))
    np.testing.assert_array_equal(compacted, full)


def test_support_compaction_falls_back_to_all_codes_row_by_row():
    # Rows with more finite codes than support_k (full p, top-k 1000 > 256) take the full-width
    # map; the rows that fit get the same result whether or not their block has such a row.
    rng = np.random.default_rng(13)
    k, n = 2048, 64
    c = unit_codebook(rng, k)
    logits = 2 * rng.normal(size=(n, k))
    top = np.sort(logits, axis=-1)[:, ::-1]
    kth = np.where(np.arange(n) % 3 == 0, top[:, 999], np.where(np.arange(n) % 3 == 1, top[:, 99], -np.inf))
    log_p = log_softmax(np.where(logits >= kth[:, None], logits, -np.inf)).astype(np.float32)
    noise = rng.normal(size=(n, 8)).astype(np.float32)
    s = flow.FlowSettings(support_k=256, chunk=8)
    full = flow.map_token(noise, log_p, c, dataclasses.replace(s, support_k=None))
    mixed = np.asarray(flow.map_token(noise, log_p, c, s))
    np.testing.assert_array_equal(mixed, full)
    fit = np.arange(n) % 3 == 1  # top-100 rows only: no block needs the fallback
    alone = flow.integrate(noise[fit], log_p[fit], c, s)
    together = flow.integrate(noise, log_p, c, s)[fit]
    np.testing.assert_array_equal(alone, together)


# --- pruning: exact up to integration error ------------------------------------------------------


def clustered_codebook(rng: np.random.Generator, centres: int, per: int, spread: float = 0.02):
    """centres x per near-duplicate codes (unit centres + spread * N(0, I), L2-normalised)."""
    c = unit_codebook(rng, centres).astype(np.float64)
    cb = np.repeat(c, per, axis=0) + spread * rng.normal(size=(centres * per, c.shape[1]))
    return (cb / np.linalg.norm(cb, axis=1, keepdims=True)).astype(np.float32)


def test_pruning_never_changes_a_token_on_a_clustered_codebook():
    # 16 groups of 256 near-duplicate codes, flat p: top-64 pruning at t = 0.1 without a bound
    # (the earlier behaviour) changed ~20% of these tokens.
    rng = np.random.default_rng(11)
    c = clustered_codebook(rng, 16, 256)
    n = 512
    log_p = log_softmax(rng.normal(size=(n, c.shape[0]))).astype(np.float32)
    noise = rng.normal(size=(n, 8)).astype(np.float32)
    every = (flow.FlowSettings(), flow.FlowSettings(num_steps=20, schedule="quadratic"),
             flow.FlowSettings(early_steps=10))
    full = [np.asarray(flow.map_token(noise, log_p, c, dataclasses.replace(s, prune_t=None)))
            for s in every]
    # A few rows end between two near-duplicate codes, where the unpruned grids themselves
    # disagree (row 7 here): a velocity error far below prune_tol may flip those, nothing else.
    stable = np.all(np.stack(full) == full[0], axis=0)
    assert stable.mean() > 0.97  # 505 of 512 here
    for settings, unpruned in zip(every, full):
        pruned = np.asarray(flow.map_token(noise, log_p, c, settings))
        np.testing.assert_array_equal(pruned[stable], unpruned[stable])
        assert np.sum(pruned != unpruned) <= 1
        never = len(flow.settings_grid(settings)) - 1
        assert np.mean(flow.pruned_at(noise, log_p, c, settings) < never) > 0.5


def fine_pruned_flow(x0, t0, t_end, log_p, c, keep, steps=600):
    """float64 RK4 (log grid) of the flow over the kept codes keep [N, S] from (x0, t0) to t_end;
    returns the largest log(w_j / W_kept) [N, K] and dropped mass / kept mass [N] on the way."""
    c = c.astype(np.float64)
    kept = np.zeros(log_p.shape, bool)
    np.put_along_axis(kept, keep, True, axis=1)
    ck, lk = c[keep], np.take_along_axis(log_p, keep, axis=1)  # [N, S, d], [N, S]
    ts = np.exp(np.linspace(np.log(t0), np.log(t_end), steps + 1))

    def logits(x, t, cb, lp):
        a = 1 - t
        dots = np.einsum("nd,nsd->ns", x, cb) if cb.ndim == 3 else x @ cb.T
        return lp + (2 * a * dots - a * a * np.sum(cb * cb, -1)) / (2 * t * t)

    def log_ratio(x, t):
        lg, lgk = logits(x, t, c, log_p), logits(x, t, ck, lk)
        top = lgk.max(-1, keepdims=True)
        return lg - top - np.log(np.sum(np.exp(lgk - top), -1, keepdims=True))

    def v(x, t):
        lg = logits(x, t, ck, lk)
        w = np.exp(lg - lg.max(-1, keepdims=True))
        return (x - np.einsum("ns,nsd->nd", w, ck) / w.sum(-1, keepdims=True)) / t

    x = x0.astype(np.float64)
    worst = log_ratio(x, t0)
    for t, s in zip(ts[:-1], ts[1:]):
        h = s - t
        k1 = v(x, t)
        k2 = v(x + 0.5 * h * k1, t + 0.5 * h)
        k3 = v(x + 0.5 * h * k2, t + 0.5 * h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + v(x + h * k3, s))
        worst = np.maximum(worst, log_ratio(x, s))
    dropped = np.sum(np.where(kept, 0.0, np.exp(worst)), axis=-1)
    return worst, dropped


@pytest.mark.parametrize("case", ["random", "clustered"])
def test_prune_bound_dominates_the_true_weights(case):
    rng = np.random.default_rng(12)
    c = unit_codebook(rng, 1024) if case == "random" else clustered_codebook(rng, 8, 128)
    n, t_end = 32, 1e-3
    log_p = log_softmax(rng.normal(size=(n, c.shape[0])))
    certified, grouped = 0, 0
    for t0 in (0.3, 0.1, 0.03):
        # points at time t0 drawn from the flow's own marginal (1 - t) x_0 + t eps
        idx = np.array([rng.choice(c.shape[0], p=np.exp(row)) for row in log_p])
        x0 = (1 - t0) * c[idx] + t0 * rng.normal(size=(n, 8))
        bound = prune.prune_bound(x0, t0, log_p, c, t_end, prune_k=256, prune_tol=1e-4)
        keep, claimed = map(np.asarray, prune.keep(bound, 256))
        ok = np.asarray(bound.certified)
        worst, dropped = fine_pruned_flow(x0[ok], t0, t_end, log_p[ok], c, keep[ok])
        # the claimed mass and every code's bound are upper bounds along the whole trajectory
        assert np.all(dropped <= claimed[ok] * (1 + 1e-3) + 1e-30)
        assert np.all(claimed[ok] < 1e-4)
        f = np.asarray(bound.log_ratio)[ok]
        outside = ~np.asarray(bound.core)[ok] & np.isfinite(f)
        assert np.all(worst[outside] <= f[outside] + 1e-3)  # the core's mass only adds to W_kept
        certified += ok.sum()
        grouped += np.sum(np.asarray(bound.core)[ok].sum(-1) > 1)
    assert 0 < certified < 3 * n  # not vacuous: rows certified and not (t0 = 0.3 is too early)
    assert (grouped > 0) == (case == "clustered")  # clustered rows certified with a group core


def test_map_token_accepts_leading_dims():
    rng = np.random.default_rng(13)
    c = unit_codebook(rng, 200)
    log_p = log_softmax(2 * rng.normal(size=(3, 5, 200))).astype(np.float32)
    noise = rng.normal(size=(3, 5, 8)).astype(np.float32)
    ids = flow.map_token(noise, log_p, c)
    assert ids.shape == (3, 5)
    np.testing.assert_array_equal(ids.reshape(-1), flow.map_token(noise.reshape(15, 8),
                                                                  log_p.reshape(15, 200), c))


# --- the pre-write check -------------------------------------------------------------------------


def test_check_flow_passes_a_good_setting_and_stops_a_bad_one():
    rng = np.random.default_rng(14)
    c = unit_codebook(rng, 512)
    log_p = log_softmax(3 * rng.normal(size=(128, 512))).astype(np.float32)
    good = check.check_flow(log_p, c, flow.FlowSettings(), key=jax.random.PRNGKey(3))
    assert good.agreement >= 0.99 and good.passed and good.num_tokens == 128
    assert good.reference == check.REFERENCE and good.reference.prune_t is None
    assert check.require_flow(good) is good
    assert json.loads(json.dumps(good.to_json()))["agreement"] == good.agreement
    assert jnp.zeros(1).dtype == jnp.float32  # float64 stayed inside the check

    coarse = flow.FlowSettings(solver="euler", num_steps=2)
    bad = check.check_flow(log_p, c, coarse, noise=rng.normal(size=(128, 8)), threshold=0.999)
    assert not bad.passed and bad.agreement < 0.9
    with pytest.raises(check.FlowCheckError) as err:
        check.require_flow(bad)
    assert isinstance(err.value, ValueError)
    for field in ("config.flow.num_steps", "config.flow.prune_t", "config.flow.solver",
                  "config.data.flow_check_threshold", f"{100 * bad.agreement:.2f}%", "99.90%"):
        assert field in str(err.value)


def test_reference_matches_exact_two_code_map():
    # Two codes: the exact map sends eps to code 1 iff eps . u > q, u = (c1 - c0)/|c1 - c0|,
    # q the p_0-quantile of N(0, 1) (the flow is monotone along u and constant across it).
    rng = np.random.default_rng(15)
    c = unit_codebook(rng, 2)
    p0 = 0.3
    log_p = np.log(np.broadcast_to([p0, 1 - p0], (400, 2))).astype(np.float32)
    u = (c[1] - c[0]) / np.linalg.norm(c[1] - c[0])
    z = rng.normal(size=(400, 8))
    q = stats.norm.ppf(p0)
    far = np.abs(z @ u - q) > 1e-3
    want = (z @ u > q).astype(np.int32)
    got = check.reference_tokens(z, log_p, c)
    np.testing.assert_array_equal(got[far], want[far])
