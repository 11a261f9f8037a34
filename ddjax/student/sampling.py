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

from ddjax.student.families import family_of_config
from ddjax.student.model import final_sequence, nearest_code, pass_through, perturb
from ddjax.teacher.base import Teacher, row_key_inputs, row_keyed_multinomial

# teacher_start -> split_t of the official teacher-involved runs (LlamaGen-L, t_list 0,80).
OFFICIAL_TEACHER_SPLIT_T = {60: 180, 40: 180, 0: 220}


@dataclasses.dataclass(frozen=True)
class DDSettings:
    """How the student samples (config.dd holds the same fields).

    t_list: the timesteps of the student's steps ((0,) is 1-step, (0, t1) 2-step).
    split_t: positions < split_t snap to codes, the rest stay continuous (1-/2-step).
    teacher_start / teacher_split_t: teacher-involved sampling keeps the first teacher_start
    tokens of the student's first step, the teacher samples up to t_list[1], and the final
    student step uses teacher_split_t; -1 takes the official recipe's value for teacher_start
    (`OFFICIAL_TEACHER_SPLIT_T`: 180 for teacher_start 60 and 40, 220 for 0; LlamaGen-L's
    README in microsoft/distilled_decoding). teacher_start < 0 turns it off.
    num_images / batch_size: `--config.mode=sample`.
    """

    t_list: tuple[int, ...] = (0, 80)
    split_t: int = 80
    teacher_start: int = 60
    teacher_split_t: int = -1
    num_images: int = 16
    batch_size: int = 8

    @property
    def resolved_teacher_split_t(self) -> int:
        if self.teacher_split_t >= 0:
            return self.teacher_split_t
        if self.teacher_start not in OFFICIAL_TEACHER_SPLIT_T:
            raise ValueError(
                f"config.dd.teacher_split_t=-1 takes the official value for teacher_start, which "
                f"is published for teacher_start in {sorted(OFFICIAL_TEACHER_SPLIT_T)} only; "
                f"teacher_start={self.teacher_start}: set config.dd.teacher_split_t")
        return OFFICIAL_TEACHER_SPLIT_T[self.teacher_start]

    def check(self, teacher: Teacher) -> None:
        """Raises a ValueError naming the first bad `config.dd` field."""
        try:
            _check_t_list(self.t_list, teacher.seq_len)
        except ValueError as e:
            raise ValueError(f"config.dd.t_list: {e}") from e
        teacher.check_timesteps(self.t_list, "config.dd.t_list")
        if not 0 <= self.split_t <= teacher.seq_len:
            raise ValueError(f"config.dd.split_t={self.split_t} must be in [0, {teacher.seq_len}]")
        if self.teacher_involved:
            teacher.check_timesteps((self.teacher_start,), "config.dd.teacher_start")
            if not 0 <= self.resolved_teacher_split_t <= teacher.seq_len:
                raise ValueError(f"config.dd.teacher_split_t={self.teacher_split_t} must be in "
                                 f"[0, {teacher.seq_len}] (or -1)")
        elif self.teacher_start >= 0 and len(self.t_list) == 2:
            raise ValueError(f"config.dd.teacher_start={self.teacher_start} must be below "
                             f"t_list[1]={self.t_list[1]} (or -1 to turn teacher-involved sampling off)")
        if self.num_images <= 0 or self.batch_size <= 0:
            raise ValueError("config.dd.num_images and config.dd.batch_size must be positive")

    @property
    def teacher_involved(self) -> bool:
        return len(self.t_list) == 2 and 0 <= self.teacher_start < self.t_list[1]


# student(params, x_t [B, L, d], labels [B], t [B]) -> (continuous [B, L, d], logits [B, L, V]);
# hashable (it is a static argument of the compiled step).
StudentFn = Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class StudentApply:
    """The DD network for a config of any family (DDConfig, VARDDConfig):
    StudentApply(cfg)(params, x_t, labels, t)."""

    config: Any

    def __call__(self, params, x_t, labels, t):
        return family_of_config(self.config).module(self.config).apply({"params": params}, x_t, labels, t)


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
    teacher: Teacher,
    noise: jax.Array,
    labels: jax.Array,
    row_keys: jax.Array,
    *,
    t_list: Sequence[int] = (0, 80),
    teacher_start: int = 60,
    split_t: int = 180,
    settings: Any = None,
    mesh: Any = None,
) -> jax.Array:
    """Student step, snap, keep `teacher_start` tokens, the teacher samples up to t_list[1],
    then a final student step at t = t_list[1] with the original noise after it.

    row_keys [B, 2]: one raw PRNG key per row (`ddjax.teacher.base.row_keys(key, global_rows)`);
    the teacher's draws of a row depend on its key alone, not on the batch it is sampled in.
    teacher_start = 0 skips the first student step (the teacher starts from scratch).
    Steps: 1 + (t_list[1] - teacher_start) + 1 (or t_list[1] + 1 when teacher_start = 0).
    The teacher's guidance interval (settings.cfg_interval) counts from teacher_start, as in
    the official intermediate_generate.
    """
    if len(t_list) != 2:
        raise ValueError(f"teacher-involved sampling needs t_list = (0, t1), got {tuple(t_list)}")
    _check_t_list(t_list, noise.shape[1])
    t1 = t_list[1]
    if not 0 <= teacher_start < t1:
        raise ValueError(f"teacher_start must be in [0, {t1}), got {teacher_start}")
    b = noise.shape[0]
    if row_keys.shape != (b, 2):
        raise ValueError(f"row_keys must be [{b}, 2] raw PRNG keys, got {row_keys.shape}")
    codebook = jnp.asarray(teacher.codebook)
    prefix = None
    if teacher_start > 0:
        x = dd_step(student, params, noise, noise, labels, jnp.zeros((b,), jnp.int32), codebook, split_t)
        prefix = nearest_code(x, codebook)
    greedy = bool(getattr(settings, "greedy", False))  # the family's own argmax rule
    tokens = teacher.sample(labels, jax.random.PRNGKey(0), settings,
                            rule=None if greedy else row_keyed_multinomial,
                            rule_inputs=None if greedy else row_key_inputs(row_keys, t1),
                            prefix_ids=prefix,
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


def steps_of(t_list: Sequence[int], teacher_start: int | None = None,
             boundaries: Sequence[int] | None = None) -> int:
    """Network evaluations per image; the teacher's steps between teacher_start and t_list[1]
    are its step boundaries there (one per token for LlamaGen, one per scale for VAR)."""
    if teacher_start is None:
        return len(t_list)
    t1 = t_list[1]
    teacher_steps = (t1 - teacher_start if boundaries is None
                     else sum(teacher_start <= b < t1 for b in boundaries))
    return (1 if teacher_start > 0 else 0) + teacher_steps + 1
