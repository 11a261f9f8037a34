"""Shared tiny models for the tests (session-scoped so each compiles once)."""

from __future__ import annotations

import os
import sys

import jax
import pytest

# Tiny models: compile time dominates, so trade run-time optimisation for faster compiles.
jax.config.update("jax_disable_most_optimizations", True)



@pytest.fixture
def optimised_xla():
    """XLA optimisations on for one test that trains for real (run time, not compile time,
    dominates there), then back to the suite's setting."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
sys.path.insert(0, os.path.join(ROOT, "configs"))


def tiny_gpt_config(**overrides):
    from ddjax.teacher.llamagen.gpt import gpt_config

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


@pytest.fixture(scope="session")
def tiny_gpt():
    from ddjax.teacher.llamagen.gpt import init_params

    cfg = tiny_gpt_config()
    params = random_params(init_params(cfg, jax.random.PRNGKey(0)))
    return cfg, params
