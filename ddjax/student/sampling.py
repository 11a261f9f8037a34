"""Sampling with the DD student: 1 step, several steps (t_list), and teacher-involved.

method.md, section 6. A step at timestep t builds X_t (the current sequence before t, the
ORIGINAL noise from t on), runs the student with positions < t passed through, and forms the
next sequence: codebook[argmax logits] before `split_t`, the continuous head's vectors after.
The result is a continuous latent [B, L, d] that the VQ decoder decodes without snapping.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ddjax.student.model import DDConfig, DDModel, final_sequence, nearest_code, pass_through, perturb
from ddjax.teacher.gpt import GPTConfig
from ddjax.teacher.sampling import SamplingSettings, sample

# student(params, x_t [B, L, d], labels [B], t [B]) -> (continuous [B, L, d], logits [B, L, V]);
# hashable (it is a static argument of the compiled step).
StudentFn = Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class StudentApply:
    """The DD network for a config: StudentApply(cfg)(params, x_t, labels, t)."""

    config: DDConfig

    def __call__(self, params, x_t, labels, t):
        return DDModel(self.config).apply({"params": params}, x_t, labels, t)


@functools.partial(jax.jit, static_argnames=("student", "split_t"))
def dd_step(student: StudentFn, params: Any, x: jax.Array, noise: jax.Array, labels: jax.Array,
            t: jax.Array, codebook: jax.Array, split_t: int) -> jax.Array:
    """One student step at timesteps t [B]: returns the next sequence [B, L, d]."""
    x_t = perturb(x, t, noise)
    cont, logits = student(params, x_t, labels, t)
    cont, logits = pass_through(cont, logits, x_t, t, codebook)
    return final_sequence(cont, logits, codebook, split_t)


def sample_dd(student: StudentFn, params: Any, noise: jax.Array, labels: jax.Array, codebook: jax.Array,
              t_list: Sequence[int] = (0,), split_t: int = 80) -> jax.Array:
    """Few-step DD sampling: one student step per entry of t_list (t_list[0] must be 0).

    noise [B, L, d] ~ N(0, I), labels [B] -> latents [B, L, d].
    """
    _check_t_list(t_list, noise.shape[1])
    x = noise
    for t in t_list:
        x = dd_step(student, params, x, noise, labels, jnp.full((noise.shape[0],), t, jnp.int32), codebook,
                    split_t)
    return x


def sample_teacher_involved(
    student: StudentFn,
    params: Any,
    teacher_params: Any,
    teacher_config: GPTConfig,
    noise: jax.Array,
    labels: jax.Array,
    codebook: jax.Array,
    key: jax.Array,
    *,
    t_list: Sequence[int] = (0, 80),
    teacher_start: int = 60,
    split_t: int = 180,
    settings: SamplingSettings = SamplingSettings(),
    mesh: Any = None,
) -> jax.Array:
    """Student step, snap, keep `teacher_start` tokens, the teacher samples up to t_list[1],
    then a final student step at t = t_list[1] with the original noise after it.

    teacher_start = 0 skips the first student step (the teacher starts from scratch).
    Steps: 1 + (t_list[1] - teacher_start) + 1 (or t_list[1] + 1 when teacher_start = 0).
    """
    if len(t_list) != 2:
        raise ValueError(f"teacher-involved sampling needs t_list = (0, t1), got {tuple(t_list)}")
    _check_t_list(t_list, noise.shape[1])
    t1 = t_list[1]
    if not 0 <= teacher_start < t1:
        raise ValueError(f"teacher_start must be in [0, {t1}), got {teacher_start}")
    b = noise.shape[0]
    prefix = None
    if teacher_start > 0:
        x = dd_step(student, params, noise, noise, labels, jnp.zeros((b,), jnp.int32), codebook, split_t)
        prefix = nearest_code(x, codebook)
    tokens = sample(teacher_params, teacher_config, labels, key, settings, prefix_ids=prefix,
                    prefix_len=teacher_start, num_tokens=t1, mesh=mesh)
    x = jnp.concatenate([codebook[tokens], noise[:, t1:]], axis=1)
    if t1 >= noise.shape[1]:
        return x
    return dd_step(student, params, x, noise, labels, jnp.full((b,), t1, jnp.int32), codebook, split_t)


def _check_t_list(t_list: Sequence[int], length: int) -> None:
    t_list = tuple(t_list)
    if not t_list or t_list[0] != 0:
        raise ValueError(f"t_list must start at 0 (the first step sees only noise), got {t_list}")
    if any(b <= a for a, b in zip(t_list, t_list[1:])) or t_list[-1] >= length + (len(t_list) == 1):
        raise ValueError(f"t_list must increase within [0, {length}), got {t_list}")


def steps_of(t_list: Sequence[int], teacher_start: int | None = None) -> int:
    """Network evaluations per image."""
    if teacher_start is None:
        return len(t_list)
    t1 = t_list[1]
    return (1 if teacher_start > 0 else 0) + (t1 - teacher_start) + 1
