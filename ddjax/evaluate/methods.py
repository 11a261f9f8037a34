"""The samplers the DD report compares, each as (noise, labels, rows) -> latents [B, L, d].

  teacher             the teacher's ordinary ancestral sampler (what users compare against);
                      row r draws with fold_in(key, r), independent of the batch it is in
  teacher (flow map)  the teacher's deterministic flow map of the same noise: its tokens are
                      the reference of the token-agreement column
  DD 1-step, DD n-step, teacher-involved   the student (method.md §6)
  onestep*            every token drawn independently from its per-class, per-position
                      marginal of the teacher's samples (the pair dataset): the paper's baseline
`rows` [B] are the global indices of the batch's samples (their randomness keys).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddjax.mapper.flow import FlowSettings
from ddjax.mapper.pairs import PairDataset
from ddjax.mapper.sequence import map_noise_to_tokens
from ddjax.student.sampling import DDSettings, StudentApply, sample_dd, sample_teacher_involved, steps_of
from ddjax.teacher.base import Teacher, row_key_inputs, row_keyed_multinomial, row_keys

TEACHER = "teacher"
FLOW_MAP = "teacher (flow map)"
ONESTEP = "onestep*"


@dataclasses.dataclass(frozen=True)
class Method:
    steps: int  # network evaluations per image
    fn: Callable[[np.ndarray, np.ndarray, np.ndarray], jax.Array]  # -> latents [B, L, d]


def marginals(dataset: PairDataset, teacher: Teacher) -> np.ndarray:
    """Per-class, per-position token frequencies of the pairs' tokens: [C, L, K] float32 with
    add-1/K smoothing."""
    data = dataset.load_all()
    c, n, k = max(teacher.num_classes, 1), teacher.seq_len, teacher.vocab_size
    counts = np.zeros((c, n, k), np.float64)
    np.add.at(counts, (data["labels"][:, None], np.arange(n)[None, :], data["tokens"]), 1)
    counts += 1.0 / k
    return (counts / counts.sum(-1, keepdims=True)).astype(np.float32)


def onestep_baseline(marg: np.ndarray, codebook: np.ndarray, seed: int) -> Method:
    """Each row's tokens drawn from marg[label] with fold_in(PRNGKey(seed), row)."""
    logm, cb = jnp.log(jnp.asarray(marg)), jnp.asarray(codebook)

    @jax.jit
    def draw(labels: jax.Array, keys: jax.Array) -> jax.Array:
        ids = jax.vmap(lambda k, lp: jax.random.categorical(k, lp, axis=-1))(keys, logm[labels])
        return cb[ids]

    key = jax.random.PRNGKey(seed)
    return Method(1, lambda noise, labels, rows: draw(jnp.asarray(labels), row_keys(key, rows)))


def build_methods(teacher: Teacher, student: tuple[Any, Any], dd: DDSettings, sampling: Any,
                  flow: FlowSettings, *, seed: int, marg: np.ndarray | None, mesh: Any = None
                  ) -> dict[str, Method]:
    """name -> Method for the report (see the module docstring); `student` is (DDConfig, params).

    marg: the `marginals` of the pair dataset for the onestep* row (None: no such row; the
    report itself requires it).
    """
    scfg, sparams = student
    codebook = jnp.asarray(teacher.codebook)
    net = StudentApply(scfg)
    t_list, split_t = tuple(dd.t_list), dd.split_t
    teacher_key = jax.random.PRNGKey(seed + 1)
    involved_key = jax.random.PRNGKey(seed + 3)
    length = teacher.seq_len

    def cond(labels):
        """labels (or a t2i teacher's caption ids) -> what the networks take, on device."""
        return jax.tree_util.tree_map(jnp.asarray, teacher.resolve_cond(np.asarray(labels)))

    def ancestral(noise, labels, rows):
        keys = row_keys(teacher_key, rows)
        tokens = teacher.sample(cond(labels), jax.random.PRNGKey(0), sampling,
                                rule=row_keyed_multinomial, rule_inputs=row_key_inputs(keys, length),
                                mesh=mesh)
        return codebook[tokens]

    methods = {
        TEACHER: Method(len(teacher.boundaries), ancestral),
        FLOW_MAP: Method(len(teacher.boundaries), lambda n, lab, rows: codebook[map_noise_to_tokens(
            teacher, jnp.asarray(n), cond(lab), sampling, flow, mesh=mesh)]),
        "DD 1-step": Method(1, lambda n, lab, rows: sample_dd(
            net, sparams, jnp.asarray(n), cond(lab), codebook, (0,), split_t)),
        f"DD {len(t_list)}-step": Method(len(t_list), lambda n, lab, rows: sample_dd(
            net, sparams, jnp.asarray(n), cond(lab), codebook, t_list, split_t)),
    }
    if dd.teacher_involved:
        ts, tsplit = dd.teacher_start, dd.resolved_teacher_split_t

        def involved(noise, labels, rows):
            return sample_teacher_involved(
                net, sparams, teacher, jnp.asarray(noise), cond(labels),
                row_keys(involved_key, rows), t_list=t_list, teacher_start=ts, split_t=tsplit,
                settings=sampling, mesh=mesh)

        methods["teacher-involved"] = Method(steps_of(t_list, ts, teacher.boundaries), involved)
    if marg is not None:
        methods[ONESTEP] = onestep_baseline(marg, teacher.codebook, seed + 2)
    return methods
