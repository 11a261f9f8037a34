"""Small models shared by the test suites (tests/ and tests/multidevice/)."""

from __future__ import annotations

import jax

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
