"""The CSD loss: the prefix is stop-gradient (q reaches the loss only through its own noised copy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ddjax.dd2.losses import csd_loss

B, N, D = 3, 4, 2


def causal_mean(prefix):
    """[B, n, d] -> the mean of the strictly earlier tokens (0 for position 0)."""
    c = jnp.cumsum(prefix, axis=1) - prefix
    return c / jnp.maximum(jnp.arange(prefix.shape[1]), 1)[None, :, None]


def teacher(x, t, prefix):
    return -(x - 0.7 * causal_mean(prefix)) / (t[..., None] ** 2 + 0.1)


def fake(x, t, prefix):
    return -jnp.tanh(x + 0.3 * causal_mean(prefix)) / (t[..., None] + 0.2)


def inputs():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((B, N, D)), jnp.float32),
            jnp.asarray(rng.standard_normal((B, N, D)), jnp.float32),
            jnp.asarray(rng.uniform(0.1, 0.9, (B, N)), jnp.float32))


def test_gradient_reaches_each_token_only_through_its_own_noised_copy():
    q, eps, t = inputs()
    got = jax.grad(lambda q: csd_loss(q, eps, t, teacher, fake))(q)

    # The same loss with the prefix an explicit constant (the values of q): differentiating
    # only the noised copies must give the same gradient.
    def frozen(qq, prefix):
        ts = lambda x, tt, _: teacher(x, tt, prefix)
        fs = lambda x, tt, _: fake(x, tt, prefix)
        return csd_loss(qq, eps, t, ts, fs)

    want = jax.grad(frozen)(q, q)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)

    # Without the stop-gradient the prefix path contributes: the test can tell the two apart.
    def leaky(qq):
        ts = lambda x, tt, _: teacher(x, tt, qq)
        fs = lambda x, tt, _: fake(x, tt, qq)
        return csd_loss(qq, eps, t, ts, fs)

    assert np.abs(np.asarray(jax.grad(leaky)(q)) - np.asarray(got)).max() > 1e-3


def test_the_gradient_at_position_i_uses_only_position_i_terms():
    q, eps, t = inputs()
    g = jax.grad(lambda q: csd_loss(q, eps, t, teacher, fake))(q)
    # Per-position loss terms: d(term_j)/d(q_i) = 0 for j != i.
    for i in range(N):
        mask = jnp.zeros((B, N)).at[:, i].set(1.0)
        gi = jax.grad(lambda q, m=mask: csd_loss(q, eps, t, teacher, fake, weight=lambda _: m))(q)
        np.testing.assert_allclose(np.asarray(gi[:, [j for j in range(N) if j != i]]), 0.0, atol=1e-7)
        np.testing.assert_allclose(np.asarray(gi[:, i]), np.asarray(g[:, i]), rtol=1e-5, atol=1e-6)


def test_equal_scores_give_zero_loss_and_zero_gradient():
    q, eps, t = inputs()
    loss, grad = jax.value_and_grad(lambda q: csd_loss(q, eps, t, teacher, teacher))(q)
    assert float(loss) == 0.0
    np.testing.assert_allclose(np.asarray(grad), 0.0, atol=1e-7)


def test_the_warm_starts_code_cross_entropy_and_code_distance():
    from ddjax.dd2.losses import code_ce
    from ddjax.dd2.model import code_spacing

    rng = np.random.default_rng(1)
    codes = rng.standard_normal((7, 3)).astype(np.float32)
    q = rng.standard_normal((2, 5, 3)).astype(np.float32)
    tokens = rng.integers(0, 7, (2, 5))
    tau = 0.7
    d2 = ((q[:, :, None, :] - codes[None, None]) ** 2).sum(-1)  # [2, 5, 7]
    logits = -d2 / (2 * tau * tau)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = -np.mean(np.take_along_axis(logp, tokens[..., None], -1))
    got = float(code_ce(jnp.asarray(q), jnp.asarray(tokens), jnp.asarray(codes), tau))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    c64 = codes.astype(np.float64)
    pair = np.sqrt(((c64[:, None] - c64[None]) ** 2).sum(-1)) + np.diag(np.full(7, np.inf))
    np.testing.assert_allclose(code_spacing(codes, chunk=3), np.median(pair.min(1)), rtol=1e-9)
