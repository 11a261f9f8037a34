"""DD2's generator started from DD1's one-step student (config.dd2.generator = "student").

The paper starts the generator from the AR-diffusion-tuned score network fed the shifted
noise (generator "score", `ddjax.dd2.functional.generate`). With a DD1 student at hand, the
generator can instead be that student: DD1's network (`ddjax.student`, either family) run at
t = 0 on the noise, its code choice per position passed straight through:

    logits = student(eps, labels, t = 0)                        [B, L, V]
    q      = C[argmax logits] + p C - sg(p C),  p = softmax(logits / gen_tau)

The forward value is DD1's 1-step sample (so CSD starts from it, not from noise); the CSD
gradient reaches the logits through the soft codes p C (the straight-through estimator).
Output j depends on eps_<=j only (the student's causal mask), as the paper's generator.

The student's parameters keep DD1's layout, so the generator exports as a DD1 student does.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ddjax.dd2 import var_model
from ddjax.student import families as student_families
from ddjax.student import model as dd_model
from ddjax.student import var_model as var_dd_model

Array = jax.Array


def student_config(cfg: Any) -> Any:
    """The DD1 student config (DDConfig or VARDDConfig) of a DD2 config's teacher."""
    if isinstance(cfg, var_model.VARDD2Config):
        return var_dd_model.var_dd_config(cfg.var)
    return dd_model.dd_config(cfg.gpt, cfg.code_dim)


def generate(params: Any, cfg: Any, eps: Array, labels: Array, codebook: Array) -> Array:
    """eps [B, L, d], labels [B] -> q [B, L, d] on the codes (module docstring)."""
    scfg = student_config(cfg)
    fam = student_families.family_of_config(scfg)
    t = jnp.zeros(eps.shape[:1], jnp.int32)
    _, logits = fam.module(scfg).apply({"params": params}, eps, labels, t)
    c = jnp.asarray(codebook, jnp.float32)
    soft = jax.nn.softmax(logits / cfg.gen_tau, axis=-1) @ c
    hard = c[jnp.argmax(logits, axis=-1)]
    return hard + soft - jax.lax.stop_gradient(soft)


def init_params(cfg: Any, rng: Array) -> Any:
    scfg = student_config(cfg)
    return student_families.family_of_config(scfg).init_params(scfg, rng)


def from_student(cfg: Any, student: tuple[Any, Any]) -> Any:
    """The generator's start: DD1's (student config, params), checked against this DD2 config
    (the same teacher); the params as float32 arrays."""
    scfg, params = student
    want = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    got_tree, want_tree = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(want)
    if got_tree != want_tree:
        raise ValueError("the DD1 student's parameters do not fit DD2's student generator for this "
                         f"teacher (student config {type(scfg).__name__}); was it trained on another "
                         "teacher?")
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(params),
                          jax.tree_util.tree_leaves(want)):
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"the DD1 student's {jax.tree_util.keystr(path[0])} has shape "
                             f"{tuple(a.shape)}, DD2's student generator wants {tuple(b.shape)}")
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)


__all__ = ["student_config", "generate", "init_params", "from_student"]
