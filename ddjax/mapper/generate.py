"""The pair-generation stage: the teacher's flow map over seeded noise, written as a dataset.

    settings = PairSettings(num_pairs=100_000)
    written = write_pairs(teacher, "out/pairs", settings, sampling, flow, mesh=mesh)

Before the first shard it checks the flow settings on the actual teacher (`check_teacher_flow`):
a few hundred tokens of the teacher's own processed distributions are mapped with the
configured solver and with a fine reference integration; the agreement goes into
dataset.json, and below `flow_check_threshold` the run stops with an error naming the settings
to change — before any GPU-days are spent on a map that is wrong for this codebook.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ddjax import sharding
from ddjax.mapper import check as check_lib
from ddjax.mapper.flow import FlowSettings
from ddjax.mapper.pairs import LABEL_POLICIES, PairSpec, generate_pairs, read_checks
from ddjax.mapper.sequence import map_noise_to_tokens
from ddjax.teacher.base import Teacher


@dataclasses.dataclass(frozen=True)
class PairSettings:
    """What the pair writer reads (config.data holds the same fields)."""

    dir: str = ""  # "" = WORKDIR/pairs (resolved by the entry layer)
    num_pairs: int = 100_000
    shard_size: int = 1024
    batch_size: int = 32  # pairs mapped per compiled call (multiple of the batch shards)
    label_policy: str = "balanced"  # or "uniform"
    seed: int = 0
    verify_existing: bool = True  # checksum finished shards when resuming
    flow_check_tokens: int = 256  # teacher tokens checked against a reference map (0 = skip)
    flow_check_threshold: float = 0.999  # minimum agreement with the reference

    def check(self, batch_shards: int) -> None:
        for name in ("num_pairs", "shard_size", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config.data.{name} must be positive, got {getattr(self, name)}")
        if self.batch_size % batch_shards:
            raise ValueError(f"config.data.batch_size={self.batch_size} must be a multiple of the "
                             f"{batch_shards} local batch shards")
        if self.label_policy not in LABEL_POLICIES:
            raise ValueError(f"config.data.label_policy={self.label_policy!r}; choose one of "
                             f"{LABEL_POLICIES}")
        if self.flow_check_tokens < 0 or not 0.0 <= self.flow_check_threshold <= 1.0:
            raise ValueError("config.data.flow_check_tokens must be >= 0 and "
                             "config.data.flow_check_threshold in [0, 1]")


def pair_spec(teacher: Teacher, settings: PairSettings, sampling: Any, flow: FlowSettings) -> PairSpec:
    """The dataset's identity: sizes, seed, label policy and how the tokens were made."""
    return PairSpec(
        seed=settings.seed, num_pairs=settings.num_pairs, shard_size=settings.shard_size,
        seq_len=teacher.seq_len, noise_dim=teacher.code_dim, num_classes=max(teacher.num_classes, 1),
        label_policy=settings.label_policy,
        generator={"teacher": teacher.variant, "family": teacher.family,
                   "checkpoint": teacher.checkpoint, "vocab_size": teacher.vocab_size,
                   "sampling": dataclasses.asdict(sampling), "flow": dataclasses.asdict(flow),
                   **_caption_fingerprint(teacher)})


def _caption_fingerprint(teacher: Teacher) -> dict:
    """{"captions": fingerprint} for a t2i teacher: its pair labels are ids into that set."""
    captions = getattr(teacher, "captions", None)
    return {"captions": captions.fingerprint()} if teacher.caption_conditioned and captions else {}


def teacher_distributions(teacher: Teacher, sampling: Any, num_tokens: int, seed: int,
                          batch_size: int = 8) -> np.ndarray:
    """log-probs [num_tokens, V] of the teacher's processed distributions along its own
    samples, spread over positions and classes (seeded)."""
    rng = np.random.default_rng(seed)
    per_seq = min(teacher.seq_len, max(1, num_tokens // batch_size))
    rows: list[np.ndarray] = []
    key = jax.random.PRNGKey(seed)
    while sum(len(r) for r in rows) < num_tokens:
        labels = jnp.asarray(rng.integers(0, max(teacher.num_classes, 1), batch_size), jnp.int32)
        key, k = jax.random.split(key)
        tokens = teacher.sample(labels, k, sampling)
        logp = np.asarray(teacher.log_probs(tokens, labels, sampling))  # [b, L, V]
        for b in range(batch_size):
            pos = rng.choice(teacher.seq_len, per_seq, replace=False)
            rows.append(logp[b, pos])
    return np.concatenate(rows)[:num_tokens]


def check_teacher_flow(teacher: Teacher, sampling: Any, flow: FlowSettings, settings: PairSettings
                       ) -> check_lib.FlowCheck:
    """Agreement of `flow` with a converged reference on the teacher's own distributions."""
    logp = teacher_distributions(teacher, sampling, settings.flow_check_tokens, settings.seed + 7919)
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(settings.seed + 7919),
                                         (len(logp), teacher.code_dim), jnp.float32))
    return check_lib.check_flow(logp, teacher.codebook, flow, noise=noise,
                                threshold=settings.flow_check_threshold)


def write_pairs(teacher: Teacher, directory: str, settings: PairSettings, sampling: Any,
                flow: FlowSettings, *, mesh: Any) -> list[int]:
    """Writes this process's missing shards of the pair dataset; returns the shards written.
    With several processes it returns when every process has written its shards.

    mesh: this process's local devices (each process maps its own shards).
    """
    settings.check(sharding.batch_size_per_step(mesh))
    top_k = getattr(sampling, "top_k", 0)
    if flow.support_k is not None and not 0 < top_k <= flow.support_k:
        logging.warning("config.flow.support_k=%d with config.sampling.top_k=%d: rows with more "
                        "finite codes than support_k are integrated over all codes after the "
                        "compaction; set support_k to top_k, or to None", flow.support_k, top_k)
    spec = pair_spec(teacher, settings, sampling, flow)
    checks = read_checks(directory)
    recorded = checks.get("flow_check")
    if settings.flow_check_tokens and (recorded is None or recorded.get("flow") != dataclasses.asdict(flow)):
        result = check_teacher_flow(teacher, sampling, flow, settings)
        logging.info("flow check: %.4f agreement with the reference map on %d teacher tokens",
                     result.agreement, result.num_tokens)
        checks = {"flow_check": {**result.to_json(), "flow": dataclasses.asdict(flow)}}
        check_lib.require_flow(result)
    elif recorded is not None:
        logging.info("flow check recorded in %s: %.4f agreement", directory, recorded["agreement"])
    placed = teacher.with_params(jax.device_put(teacher.params, sharding.replicated(mesh)))

    def map_fn(noise: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return map_noise_to_tokens(placed, jnp.asarray(noise), jnp.asarray(labels), sampling, flow,
                                   mesh=mesh)

    written = generate_pairs(directory, spec, map_fn, settings.batch_size,
                             verify_existing=settings.verify_existing, checks=checks or None)
    sharding.barrier("ddjax pairs written")  # every process's shards exist past this point
    logging.info("pairs in %s: wrote %d shards now, %d in total", directory, len(written),
                 spec.num_shards)
    return written
