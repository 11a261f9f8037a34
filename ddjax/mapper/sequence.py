"""The flow-matching map for a whole sequence: noise [B, L, d] -> the teacher's tokens [B, L].

Position i's distribution is the teacher's (same CFG, temperature, top-k, top-p as the sampler)
given the tokens mapped so far; the one-token map (`flow.map_token`) replaces the multinomial
draw inside the teacher's compiled sampling loop (method.md, section 3), for any `Teacher`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ddjax.mapper.flow import FlowSettings, map_token
from ddjax.teacher.base import Teacher


class FlowRule:
    """A sampler `TokenRule` that maps each position's noise [B, d] to a token.

    Hashable by the codebook's bytes and the settings, so the compiled loop is reused for the
    same codebook; the codebook is a compile-time constant (K x d floats).
    """

    def __init__(self, codebook: Any, settings: FlowSettings = FlowSettings()):
        self.codebook = np.asarray(codebook, np.float32)
        self.settings = settings
        digest = hashlib.sha256(self.codebook.tobytes()).hexdigest()
        self._key = (digest, self.codebook.shape, settings)

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlowRule) and self._key == other._key

    def __call__(self, key: jax.Array, logp: jax.Array, position: jax.Array, noise: jax.Array):
        """logp [B, V] and noise [B, d] (one position per step), or [B, n, V] and [B, n, d]
        (a whole scale per step) -> token ids [B] or [B, n]."""
        del key, position
        flat = map_token(noise.reshape(-1, noise.shape[-1]), logp.reshape(-1, logp.shape[-1]),
                         jnp.asarray(self.codebook), self.settings)
        return flat.reshape(logp.shape[:-1])


def map_noise_to_tokens(
    teacher: Teacher,
    noise: jax.Array,
    cond: jax.Array,
    settings: Any,
    flow: FlowSettings = FlowSettings(),
    *,
    prefix_ids: jax.Array | None = None,
    prefix_len: int = 0,
    mesh: Mesh | None = None,
) -> jax.Array:
    """The deterministic map F(noise, cond) -> token ids [B, L] int32.

    Args:
      teacher: the teacher (its compiled sampling loop and codebook).
      noise: [B, L, d] standard normal, d = the codebook's dimension; L <= teacher.seq_len.
      cond: class labels [B] (or caption features [B, N, caption_dim]).
      settings: the teacher's sampling settings (greedy is ignored: the map decides).
      flow: ODE solver settings for the one-token map.
      prefix_ids, prefix_len: keep the first tokens and map the rest (teacher-involved use).
      mesh: split the batch over the mesh's batch axes.
    """
    codebook = teacher.codebook
    if noise.ndim != 3 or noise.shape[-1] != codebook.shape[-1]:
        raise ValueError(f"noise must be [B, L, {codebook.shape[-1]}], got {noise.shape}")
    return teacher.sample(cond, jax.random.PRNGKey(0), settings, rule=FlowRule(codebook, flow),
                          rule_inputs=jnp.asarray(noise, jnp.float32), prefix_ids=prefix_ids,
                          prefix_len=prefix_len, num_tokens=noise.shape[1], mesh=mesh)
