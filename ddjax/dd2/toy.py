"""Proposition 1 on an enumerable teacher (DD2 §3.2.2): CSD on three positions over four codes
in 2-D, with small MLP networks in place of transformers, and exact total variation.

The teacher's joint `toy_joint()` couples the positions (token 2 repeats token 1, token 3 is
their sum mod 4, each with probability `keep`), so every generator that draws positions
independently is far from it in total variation (`independent_tv_bound`). `train_toy` runs the
same pieces as `ddjax.dd2.train` — the closed-form teacher mean (`mixture_mean`), the CSD loss
in x_0 form with the stop-gradient prefix, denoising score matching for the guidance network
in velocity form, K guidance updates per generator update — and `snapped_joint` measures the
generator's joint after snapping to the nearest code.
"""

from __future__ import annotations

import dataclasses
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddjax.dd2 import losses
from ddjax.dd2.functional import mixture_mean
from ddjax.dd2.model import time_embedding
from ddjax.student.model import nearest_code

CODES = np.array([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]], np.float32)
N_POS, K, D = 3, 4, 2


def toy_joint(keep: float = 0.9) -> np.ndarray:
    """p[a, b, c]: a uniform; b = a w.p. keep (else uniform over the other 3); c = (a + b) mod 4
    w.p. keep (else uniform over the other 3)."""
    p = np.zeros((K, K, K))
    for a, b, c in itertools.product(range(K), repeat=3):
        pb = keep if b == a else (1 - keep) / 3
        pc = keep if c == (a + b) % K else (1 - keep) / 3
        p[a, b, c] = 0.25 * pb * pc
    return p


def independent_tv_bound(keep: float = 0.9) -> float:
    """A lower bound on TV(p, r) for every r = r1 x r2 x r3: with F = {b = a}, p(F) = keep and
    r(F) = sum_a r1(a) r2(a) <= max_a r2(a) <= 1/4 + TV (p's second marginal is uniform), while
    r(F) >= keep - TV; so TV >= (keep - 1/4) / 2."""
    return (keep - 0.25) / 2


def conditionals(joint: np.ndarray) -> np.ndarray:
    """log p(token i = k | snapped prefix) as a table [3, K, K, K] indexed [i, a, b, k]
    (positions i > 0 read a, b; position 0 ignores them)."""
    out = np.zeros((N_POS, K, K, K))
    m1 = joint.sum((1, 2))
    m12 = joint.sum(2)
    out[0] = np.log(m1)[None, None, :]
    out[1] = np.log(m12 / m12.sum(1, keepdims=True))[:, None, :]
    out[2] = np.log(joint / joint.sum(2, keepdims=True))
    return out.astype(np.float32)


def teacher_log_p(table: jax.Array, prefix: jax.Array) -> jax.Array:
    """The teacher's distribution at every position given the snapped prefix: [B, 3, K]."""
    ids = nearest_code(prefix, jnp.asarray(CODES))  # [B, 3]
    a, b = ids[:, 0], ids[:, 1]
    return jnp.stack([table[0, 0, 0][None].repeat(ids.shape[0], 0), table[1, a, 0], table[2, a, b]], 1)


class ToyNet(nn.Module):
    """(x [B, 3, d], t [B, 3], context [B, 3, d]) -> velocity [B, 3, d]; position i sees
    context[:, :i] only (a strictly causal mask) and a position embedding."""

    width: int = 128

    @nn.compact
    def __call__(self, x, t, context):
        b = x.shape[0]
        mask = (jnp.arange(N_POS)[None, :] < jnp.arange(N_POS)[:, None]).astype(x.dtype)  # [i, j]
        ctx = (mask[None, :, :, None] * context[:, None, :, :]).reshape(b, N_POS, N_POS * D)
        pos = jnp.broadcast_to(jnp.eye(N_POS, dtype=x.dtype)[None], (b, N_POS, N_POS))
        h = jnp.concatenate([x, ctx, pos, time_embedding(t, 32)], -1)
        for _ in range(3):
            h = nn.silu(nn.Dense(self.width)(h))
        return nn.Dense(D, kernel_init=nn.initializers.zeros)(h)


@dataclasses.dataclass(frozen=True)
class ToySettings:
    steps: int = 1500  # generator updates
    guide_steps: int = 3  # K
    warmup_guide_steps: int = 300  # FCS updates on the initial generator before CSD starts
    batch: int = 256
    draws: int = 4
    lr_gen: float = 1e-3
    lr_guide: float = 1e-3
    t_min: float = 0.02
    csd_t_max: float = 0.98
    alpha: float = 1.0
    seed: int = 0


def train_toy(s: ToySettings, joint: np.ndarray):
    """Trains a CSD generator against the toy teacher; returns (generate(eps) -> q, history)."""
    table = jnp.asarray(conditionals(joint))
    codebook = jnp.asarray(CODES)
    gen_net, guide_net = ToyNet(), ToyNet()
    key = jax.random.PRNGKey(s.seed)
    z = jnp.zeros((1, N_POS, D))
    gen = gen_net.init(jax.random.fold_in(key, 1), z, jnp.ones((1, N_POS)), z)["params"]
    guide = guide_net.init(jax.random.fold_in(key, 2), z, jnp.ones((1, N_POS)), z)["params"]
    tx_gen, tx_guide = optax.adam(s.lr_gen, 0.9, 0.95), optax.adam(s.lr_guide, 0.9, 0.95)

    def generate(p, eps):
        # The generator's backbone reads the shifted noise: q_i = eps_i - v(eps_i, 1 | eps_<i).
        return eps - gen_net.apply({"params": p}, eps, jnp.ones(eps.shape[:2]), eps)

    def guide_mean(p, x, t, prefix):
        return x - t[..., None] * guide_net.apply({"params": p}, x, t, prefix)

    def fcs(p, q, k):
        k1, k2 = jax.random.split(k)
        eps = jax.random.normal(k1, (s.draws, *q.shape))
        t = jax.random.uniform(k2, (s.draws, *q.shape[:2]), minval=s.t_min, maxval=1.0)
        x = (1 - t[..., None]) * q + t[..., None] * eps
        v = jax.vmap(lambda xx, tt: guide_net.apply({"params": p}, xx, tt, q))(x, t)
        return losses.velocity_loss(v, eps - q)

    def guide_update(carry, k):
        gen, guide, opt = carry
        eps = jax.random.normal(jax.random.fold_in(k, 0), (s.batch, N_POS, D))
        q = jax.lax.stop_gradient(generate(gen, eps))
        loss, g = jax.value_and_grad(fcs)(guide, q, jax.random.fold_in(k, 1))
        u, opt = tx_guide.update(g, opt, guide)
        return (gen, optax.apply_updates(guide, u), opt), loss

    def gen_loss(p, guide, k):
        k0, k1, k2 = jax.random.split(k, 3)
        q = generate(p, jax.random.normal(k0, (s.batch, N_POS, D)))
        eps = jax.random.normal(k1, q.shape)
        t = jax.random.uniform(k2, q.shape[:2], minval=s.t_min, maxval=s.csd_t_max)
        guide = jax.lax.stop_gradient(guide)
        tm = lambda x, tt, prefix: mixture_mean(x, tt, teacher_log_p(table, prefix), codebook)  # noqa: E731
        fm = lambda x, tt, prefix: guide_mean(guide, x, tt, prefix)  # noqa: E731
        return losses.csd_loss_x0(q, eps, t, tm, fm, alpha=s.alpha)

    @jax.jit
    def warm(gen, guide, opt, k):
        (_, guide, opt), _ = jax.lax.scan(guide_update, (gen, guide, opt),
                                          jax.random.split(k, s.warmup_guide_steps))
        return guide, opt

    @jax.jit
    def iteration(gen, guide, gopt, opt, k):
        (_, guide, opt), fl = jax.lax.scan(guide_update, (gen, guide, opt),
                                           jax.random.split(jax.random.fold_in(k, 0), s.guide_steps))
        loss, g = jax.value_and_grad(gen_loss)(gen, guide, jax.random.fold_in(k, 1))
        u, gopt = tx_gen.update(g, gopt, gen)
        return optax.apply_updates(gen, u), guide, gopt, opt, loss, fl.mean()

    opt, gopt = tx_guide.init(guide), tx_gen.init(gen)
    guide, opt = warm(gen, guide, opt, jax.random.fold_in(key, 3))
    history = []
    for i in range(s.steps):
        gen, guide, gopt, opt, loss, fl = iteration(gen, guide, gopt, opt, jax.random.fold_in(key, 100 + i))
        if (i + 1) % 100 == 0:
            history.append((i + 1, float(loss), float(fl)))
    return jax.jit(lambda eps: generate(gen, eps)), history


def snapped_joint(generate, n: int = 200_000, seed: int = 1) -> np.ndarray:
    """The generator's joint over (a, b, c) after snapping, from n samples: [K, K, K]."""
    eps = jax.random.normal(jax.random.PRNGKey(seed), (n, N_POS, D))
    ids = np.asarray(nearest_code(generate(eps), jnp.asarray(CODES)))
    flat = ids[:, 0] * K * K + ids[:, 1] * K + ids[:, 2]
    return np.bincount(flat, minlength=K**3).reshape(K, K, K) / n


def tv(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(p - q).sum())


__all__ = ["toy_joint", "independent_tv_bound", "conditionals", "ToySettings", "train_toy",
           "snapped_joint", "tv", "CODES"]
