"""DD2's samplers: the one-step generator, and the generator's prefix continued by the teacher
(DD2 Table 2's multi-step sampling with the pre-trained model).

    latents = one_step(gen_params, cfg, noise [B, L, d], labels [B], codebook, aux=family_aux(teacher))

Tokens are snapped to their nearest code (the teacher's tokenizer decodes codes; `snap=False`
keeps the continuous output). The report's methods come from `methods`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddjax.dd2 import functional as F
from ddjax.dd2.model import DD2Config
from ddjax.dd2.var_model import VARDD2Config
from ddjax.evaluate.methods import Method
from ddjax.student.model import nearest_code
from ddjax.teacher.base import Teacher, row_key_inputs, row_keyed_multinomial, row_keys

DD2_ONE_STEP = "DD2 1-step"


@functools.partial(jax.jit, static_argnames=("cfg", "snap"))
def one_step(params: Any, cfg: DD2Config | VARDD2Config, noise: jax.Array, labels: jax.Array,
             codebook: jax.Array, snap: bool = True, aux: Any = None) -> jax.Array:
    """G(noise): [B, L, d] continuous tokens, snapped to the codebook unless snap=False (aux:
    `F.family_aux(teacher)`, needed for VAR and for a student generator)."""
    q = F.generate(params, cfg, noise, labels, aux)
    return codebook[nearest_code(q, codebook)] if snap else q


def with_teacher(teacher: Teacher, params: Any, cfg: DD2Config, noise: jax.Array, labels: jax.Array,
                 prefix_len: int, settings: Any, keys: jax.Array) -> jax.Array:
    """The generator's first prefix_len tokens (snapped), the rest drawn by the teacher with
    per-row keys [B, 2]: token ids [B, L]."""
    codebook = jnp.asarray(teacher.codebook)
    ids = nearest_code(F.generate(params, cfg, noise, labels, F.family_aux(teacher)), codebook)
    return teacher.sample(labels, jax.random.PRNGKey(0), settings, rule=row_keyed_multinomial,
                          rule_inputs=row_key_inputs(keys, teacher.seq_len), prefix_ids=ids,
                          prefix_len=prefix_len)


def methods(teacher: Teacher, generator: tuple[DD2Config, Any], settings: Any, *, seed: int,
            teacher_from: int = 0) -> dict[str, Method]:
    """name -> Method: "DD2 1-step", and with teacher_from = k > 0 "DD2 + teacher (k-L)"."""
    cfg, params = generator
    codebook = jnp.asarray(teacher.codebook)
    params = jax.device_put(params)
    aux = F.family_aux(teacher)
    out = {DD2_ONE_STEP: Method(1, lambda n, lab, rows: one_step(
        params, cfg, jnp.asarray(n), jnp.asarray(lab), codebook, aux=aux))}
    if teacher_from > 0:
        key = jax.random.PRNGKey(seed + 5)
        length = teacher.seq_len

        def fn(n, lab, rows):
            ids = with_teacher(teacher, params, cfg, jnp.asarray(n), jnp.asarray(lab), teacher_from,
                               settings, row_keys(key, np.asarray(rows)))
            return codebook[ids]

        out[f"DD2 + teacher ({teacher_from}-{length})"] = Method(1 + length - teacher_from, fn)
    return out


__all__ = ["one_step", "with_teacher", "methods", "DD2_ONE_STEP"]


@functools.partial(jax.jit, static_argnames=("cfg", "num_steps"))
def ar_diffusion(params: Any, cfg: DD2Config | VARDD2Config, labels: jax.Array, noise: jax.Array,
                 num_steps: int = 10, aux: Any = None) -> jax.Array:
    """The tuned score network as an AR-diffusion sampler (dd2.md Table 7): token by token
    (VAR: scale by scale), num_steps Euler steps of its velocity from t = 1 to 0 given the
    tokens so far; noise [B, L, d] -> continuous tokens [B, L, d]."""
    ts = jnp.linspace(1.0, 0.0, num_steps + 1)

    def denoise(q, sl):
        def euler(x, k):
            t = jnp.full(q.shape[:2], ts[k])
            v = F.velocity(params, cfg, q, labels, q.at[:, sl].set(x), t, aux)[:, sl]
            return x + (ts[k + 1] - ts[k]) * v, None

        x, _ = jax.lax.scan(euler, noise[:, sl], jnp.arange(num_steps))
        return q.at[:, sl].set(x)

    q = jnp.zeros_like(noise)
    if F.is_var(cfg):  # one scale's tokens are independent given the earlier scales
        for a, b in cfg.var.begin_ends:
            q = denoise(q, slice(a, b))
        return q
    q, _ = jax.lax.scan(lambda q, i: (denoise(q, i), None), q, jnp.arange(noise.shape[1]))
    return q
