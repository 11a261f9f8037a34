"""DD2's closed-form conditional score against autodiff of the smoothed mixture's log-density."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import logsumexp
from jax.scipy.stats import norm

from ddjax.dd2 import score as score_lib
from ddjax.mapper.flow import velocity

N, K, D = 16, 12, 3


def reference_log_density(x, t, log_p, codebook):
    """log sum_k p_k prod_j N(x_j; (1 - t) c_kj, t^2) for one row, written independently of
    the library (per-dimension normal log-pdfs, no posterior logits)."""
    comp = norm.logpdf(x[None, :], (1.0 - t) * codebook, t).sum(-1)  # [K]
    return logsumexp(log_p + comp)


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    codebook = rng.standard_normal((K, D))
    logits = 2.0 * rng.standard_normal((N, K))
    logits[:, :4] = -np.inf  # removed codes (top-k) stay at zero weight
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    x = 1.5 * rng.standard_normal((N, D))
    return x, log_p, codebook


@pytest.mark.parametrize("t", [0.05, 0.2, 0.5, 0.9, 1.0])
def test_score_is_the_gradient_of_the_log_density(case, t):
    x, log_p, codebook = case
    with jax.enable_x64(True):
        grad = jax.vmap(jax.grad(reference_log_density), in_axes=(0, None, 0, None))
        want = np.asarray(grad(jnp.asarray(x), t, jnp.asarray(log_p), jnp.asarray(codebook)))
        ref_logp = np.asarray(jax.vmap(reference_log_density, in_axes=(0, None, 0, None))(
            jnp.asarray(x), t, jnp.asarray(log_p), jnp.asarray(codebook)))
    got = np.asarray(score_lib.conditional_score(x, t, log_p, codebook))
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale)
    np.testing.assert_allclose(np.asarray(score_lib.log_density(x, t, log_p, codebook)), ref_logp,
                               rtol=1e-5, atol=1e-4)


def test_score_and_the_flow_velocity_share_the_posterior_mean(case):
    x, log_p, codebook = case
    t = jnp.linspace(0.05, 0.95, N)
    v = velocity(x, t, log_p, codebook)
    s = score_lib.conditional_score(x, t, log_p, codebook)
    np.testing.assert_allclose(np.asarray(score_lib.score_from_velocity(v, x, t)), np.asarray(s),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(score_lib.velocity_from_score(s, x, t)), np.asarray(v),
                               rtol=1e-4, atol=1e-4)


def test_at_t_1_the_score_is_the_standard_normal_one(case):
    x, log_p, codebook = case
    np.testing.assert_allclose(np.asarray(score_lib.conditional_score(x, 1.0, log_p, codebook)), -x,
                               rtol=1e-6, atol=1e-6)
