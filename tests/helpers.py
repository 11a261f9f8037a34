"""Small models shared by the test suites (tests/ and tests/multidevice/)."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import struct
import subprocess
import time

import jax
import numpy as np

from ddjax.teacher.llamagen.family import LlamaGenTeacher
from ddjax.teacher.llamagen.gpt import gpt_config


def tiny_gpt_config(**overrides):
    base = dict(n_layer=2, dim=64, n_head=4, n_kv_head=2, vocab_size=64, block_size=16,
                num_classes=10, multiple_of=32)
    base.update(overrides)
    return gpt_config("GPT-B", **base)


def random_params(params, seed: int = 0, scale: float = 0.3):
    """Replaces every leaf by N(0, scale^2) noise (LlamaGen's zero output head would make
    every distribution uniform)."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [jax.random.normal(k, x.shape, x.dtype) * scale for k, x in zip(keys, leaves)]
    )


def teacher_of(cfg, params, codebook):
    """A LlamaGenTeacher over a given codebook (no tokenizer)."""
    return LlamaGenTeacher.from_codebook(cfg, params, codebook)


def unit_codebook_teacher(tiny_gpt):
    """The tiny GPT over a seeded codebook of unit 8-d codes (the DD2 tests' teacher)."""
    cfg, params = tiny_gpt
    codebook = np.array(jax.random.normal(jax.random.PRNGKey(3), (cfg.vocab_size, 8)))
    codebook /= np.linalg.norm(codebook, axis=-1, keepdims=True)
    return teacher_of(cfg, params, codebook)


def read_scalars(logdir):
    """{tag: [(step, value)]} from the TensorBoard event files (TFRecord of Event protos)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        data, i = open(path, "rb").read(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def kill_when(args, env, ready, timeout: float, delay: float = 0.0, **popen) -> None:
    """Starts `args` and SIGKILLs it `delay` seconds after ready() first holds; fails if the
    process ends (or `timeout` passes) before that."""
    proc = subprocess.Popen(args, env=env, **popen)
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None and time.time() < deadline, "the process ended before the kill"
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def seed_workdir(wd: str, dst, stages=("adapt", "tune")) -> None:
    """Copies a DD2 run (WORKDIR)'s finished stages into dst: a rerun there restores them (nothing is
    recompiled for them) and runs only the stages a test changes."""
    src, out = os.path.join(wd, "dd2"), os.path.join(str(dst), "dd2")
    os.makedirs(out, exist_ok=True)
    for name in ("samples.npz", "dd2.json"):
        shutil.copy(os.path.join(src, name), out)
    for name in (*stages, "teacher"):
        if os.path.isdir(os.path.join(src, name)):
            shutil.copytree(os.path.join(src, name), os.path.join(out, name))
