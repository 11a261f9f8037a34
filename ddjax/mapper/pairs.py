"""The noise -> token pair dataset: deterministic, checksummed, resumable shards.

Format (readable with numpy alone, no ddjax needed):
  DIR/dataset.json          what was generated: seed, sizes, label policy, teacher, settings
  DIR/pairs-00012.npz       noise float32 [n, L, d], tokens [n, L] (uint16/int32), labels int32 [n],
                            index int64 [n] (global pair index)
  DIR/pairs-00012.json      sidecar written after the shard: {"num_pairs", "sha256", ...}
A shard counts as done only when its sidecar exists and the checksum matches, so a run killed
at any moment resumes by regenerating the unfinished shards; shard i's content depends only on
(seed, i), so the result equals an uninterrupted run pair by pair. With several processes,
process p writes only the shards i with i % process_count == p.

Uncompressed .npz: the noise is incompressible floats, np.load reads a shard at disk speed, and
every language with a zip and .npy reader can use it (see README).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from ddjax.sharding import batch_sharding, put_global

FORMAT = "ddjax-pairs-v1"
LABEL_POLICIES = ("uniform", "balanced")


@dataclasses.dataclass(frozen=True)
class PairSpec:
    """Everything that determines the dataset's content."""

    seed: int
    num_pairs: int
    shard_size: int
    seq_len: int
    noise_dim: int
    num_classes: int
    label_policy: str = "balanced"
    generator: dict = dataclasses.field(default_factory=dict)  # teacher/sampling/flow description

    def __post_init__(self):
        if self.label_policy not in LABEL_POLICIES:
            raise ValueError(f"label_policy must be one of {LABEL_POLICIES}, got {self.label_policy!r}")
        for name in ("num_pairs", "shard_size", "seq_len", "noise_dim", "num_classes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_pairs // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_pairs)

    def to_json(self) -> dict:
        return {"format": FORMAT, **dataclasses.asdict(self)}


def _differences(have: dict, want: dict, prefix: str = "") -> list[str]:
    """The dotted names of the fields that differ (nested dicts descended into)."""
    out = []
    for k in set(have) | set(want):
        a, b = have.get(k), want.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def shard_name(shard: int) -> str:
    return f"pairs-{shard:05d}"


def shard_noise(spec: PairSpec, shard: int) -> np.ndarray:
    """The shard's noise, float32 [n, L, d]; a function of (seed, shard) only."""
    start, end = spec.shard_range(shard)
    key = jax.random.fold_in(jax.random.PRNGKey(spec.seed), shard)
    noise = jax.random.normal(key, (spec.shard_size, spec.seq_len, spec.noise_dim), np.float32)
    return np.asarray(noise)[: end - start]


def shard_labels(spec: PairSpec, shard: int) -> np.ndarray:
    """Class labels int32 [n]: uniform draws, or balanced (pair g gets class g mod C, shuffled)."""
    start, end = spec.shard_range(shard)
    rng = np.random.default_rng([spec.seed, shard, 1])
    if spec.label_policy == "uniform":
        labels = rng.integers(0, spec.num_classes, spec.shard_size)[: end - start]
    else:
        labels = rng.permutation(np.arange(start, end) % spec.num_classes)
    return labels.astype(np.int32)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    tmp = path + ".tmp"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_done(directory: str, shard: int, verify: bool = True) -> bool:
    """True when the shard and its sidecar exist (and, with verify, the checksum matches)."""
    data = os.path.join(directory, shard_name(shard) + ".npz")
    side = os.path.join(directory, shard_name(shard) + ".json")
    if not (os.path.exists(data) and os.path.exists(side)):
        return False
    if not verify:
        return True
    with open(side) as f:
        meta = json.load(f)
    return meta.get("sha256") == _sha256(data)


def write_shard(directory: str, shard: int, arrays: dict[str, np.ndarray]) -> dict:
    """Writes the shard atomically, then its sidecar; returns the sidecar."""
    path = os.path.join(directory, shard_name(shard) + ".npz")
    _atomic_write(path, lambda f: np.savez(f, **arrays))
    meta = {"shard": shard, "num_pairs": int(len(arrays["labels"])), "sha256": _sha256(path),
            "first_index": int(arrays["index"][0]) if len(arrays["index"]) else 0}
    _atomic_write(os.path.join(directory, shard_name(shard) + ".json"),
                  lambda f: f.write(json.dumps(meta).encode()))
    return meta


# dataset.json fields that record checks made before writing, not the dataset's content.
CHECK_FIELDS = ("flow_check",)


def read_checks(directory: str) -> dict:
    """The recorded pre-write checks of DIR/dataset.json ({} when there is none yet)."""
    path = os.path.join(directory, "dataset.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        have = json.load(f)
    return {k: have[k] for k in CHECK_FIELDS if k in have}


def prepare_directory(directory: str, spec: PairSpec, checks: dict | None = None) -> None:
    """Creates DIR/dataset.json, or checks that an existing one describes the same dataset.

    checks: results of pre-write checks (`CHECK_FIELDS`) recorded beside the spec; they are not
    part of the dataset's identity.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "dataset.json")
    want = spec.to_json()
    if os.path.exists(path):
        with open(path) as f:
            have = {k: v for k, v in json.load(f).items() if k not in CHECK_FIELDS}
        diff = sorted(_differences(have, want))
        if diff:
            raise ValueError(
                f"{directory} already holds a different pair dataset (fields differ: {diff}); "
                "use a new directory or the original settings to resume"
            )
        if not checks or read_checks(directory) == checks:
            return
    if jax.process_index() == 0:
        out = {**want, **(checks or {})}
        _atomic_write(path, lambda f: f.write(json.dumps(out, indent=2, default=str).encode()))


def generate_pairs(
    directory: str,
    spec: PairSpec,
    map_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    verify_existing: bool = True,
    log_every_s: float = 10.0,
    checks: dict | None = None,
) -> list[int]:
    """Writes this process's missing shards; returns the shard indices written now.

    map_fn(noise [b, L, d] float32, labels [b] int32) -> tokens [b, L]; called with exactly
    `batch_size` rows (the last batch of a shard is padded with zero noise and dropped after).
    checks: pre-write check results recorded in dataset.json (see `prepare_directory`).
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    prepare_directory(directory, spec, checks)
    mine = [s for s in range(spec.num_shards) if s % process_count == process_index]
    for s in mine:  # writes of this process cut short by a kill (the others' are theirs)
        for suffix in (".npz.tmp", ".json.tmp"):
            path = os.path.join(directory, shard_name(s) + suffix)
            if os.path.exists(path):
                os.remove(path)
    todo = [s for s in mine if not shard_done(directory, s, verify_existing)]
    total = sum(spec.shard_range(s)[1] - spec.shard_range(s)[0] for s in todo)
    logging.info("pairs: %d/%d shards of this process to write (%d pairs)", len(todo), len(mine), total)
    token_dtype = np.uint16 if spec.generator.get("vocab_size", 1 << 20) <= 65536 else np.int32
    done_pairs, t0, last_log = 0, time.time(), 0.0
    for shard in todo:
        start, end = spec.shard_range(shard)
        noise, labels = shard_noise(spec, shard), shard_labels(spec, shard)
        tokens = np.zeros((end - start, spec.seq_len), np.int64)
        for b0 in range(0, end - start, batch_size):
            nb = min(batch_size, end - start - b0)
            pad = batch_size - nb
            bn = np.concatenate([noise[b0:b0 + nb], np.zeros((pad, *noise.shape[1:]), np.float32)])
            bl = np.concatenate([labels[b0:b0 + nb], np.zeros(pad, np.int32)])
            tokens[b0:b0 + nb] = np.asarray(map_fn(bn, bl))[:nb]
            done_pairs += nb
            now = time.time()
            if now - last_log > log_every_s or done_pairs == total:
                rate = done_pairs / max(now - t0, 1e-9)
                logging.info("pairs %d/%d  %.1f pairs/s  ETA %.0f s", done_pairs, total, rate,
                             (total - done_pairs) / max(rate, 1e-9))
                last_log = now
        write_shard(directory, shard, {"noise": noise, "tokens": tokens.astype(token_dtype),
                                       "labels": labels, "index": np.arange(start, end, dtype=np.int64)})
    return todo


class PairDataset:
    """Reads a finished pair directory; yields deterministic, resumable (sharded) batches."""

    def __init__(self, directory: str, verify: bool = True):
        path = os.path.join(directory, "dataset.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{directory} is not a pair dataset: dataset.json is missing")
        with open(path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
        meta.pop("format")
        self.directory = directory
        self.checks = {k: meta.pop(k) for k in CHECK_FIELDS if k in meta}
        self.spec = PairSpec(**meta)
        missing = [s for s in range(self.spec.num_shards) if not shard_done(directory, s, verify)]
        if missing:
            raise ValueError(
                f"{directory}: {len(missing)} of {self.spec.num_shards} shards are missing or corrupt "
                f"(first: {[shard_name(s) for s in missing[:5]]}); rerun the generate mode to finish"
            )
        self.sizes = [self.spec.shard_range(s)[1] - self.spec.shard_range(s)[0]
                      for s in range(self.spec.num_shards)]

    def __len__(self) -> int:
        return self.spec.num_pairs

    def load_shard(self, shard: int) -> dict[str, np.ndarray]:
        with np.load(os.path.join(self.directory, shard_name(shard) + ".npz")) as z:
            out = {k: z[k] for k in z.files}
        out["tokens"] = out["tokens"].astype(np.int32)
        return out

    def load_all(self) -> dict[str, np.ndarray]:
        """Every pair in index order: noise [N, L, d], tokens [N, L], labels [N], index [N]."""
        shards = [self.load_shard(s) for s in range(self.spec.num_shards)]
        return {k: np.concatenate([s[k] for s in shards]) for k in shards[0]}

    def _windows(self, epoch: int, seed: int, window: int) -> list[list[int]]:
        order = np.random.default_rng([seed, epoch, 7]).permutation(self.spec.num_shards)
        return [list(order[i:i + window]) for i in range(0, len(order), window)]

    def steps_per_epoch(self, batch_size: int, seed: int = 0, window: int = 16) -> int:
        return sum(sum(self.sizes[s] for s in w) // batch_size
                   for w in self._windows(0, seed, window))

    def batches(self, batch_size: int, *, seed: int = 0, start_step: int = 0, window: int = 16,
                mesh: Any = None) -> Iterator[dict[str, Any]]:
        """Endless shuffled batches; batch k is the same whatever `start_step` skipped to it.

        Shards are visited in a seeded order, `window` shards at a time, and the pairs of a
        window are shuffled together; a window's last partial batch is dropped. With `mesh`,
        each batch is placed on the mesh split over its batch axes (each process contributes
        its slice of the global batch).
        """
        if batch_size > min(sum(self.sizes[s] for s in w) for w in self._windows(0, seed, window)):
            raise ValueError(f"batch_size {batch_size} exceeds the pairs in a shuffle window")
        step, epoch = 0, 0
        while True:
            for w_idx, shards in enumerate(self._windows(epoch, seed, window)):
                n = sum(self.sizes[s] for s in shards)
                nb = n // batch_size
                if step + nb <= start_step:
                    step += nb
                    continue
                data = [self.load_shard(s) for s in shards]
                data = {k: np.concatenate([d[k] for d in data]) for k in data[0]}
                perm = np.random.default_rng([seed, epoch, w_idx, 11]).permutation(n)
                for b in range(nb):
                    if step >= start_step:
                        idx = perm[b * batch_size:(b + 1) * batch_size]
                        batch = {k: v[idx] for k, v in data.items()}
                        yield _place(batch, mesh) if mesh is not None else batch
                    step += 1
            epoch += 1


def _place(batch: dict[str, np.ndarray], mesh: Any) -> dict[str, jax.Array]:

    return {k: put_global(v, batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
