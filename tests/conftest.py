"""Shared tiny models for the tests (session-scoped so each compiles once)."""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import sys
import tempfile

# One persistent compilation cache for the whole run, inherited by every subprocess the tests
# start (multi-process workers, the 8-device suite, notebooks): identical programs compiled
# again (per module, per run of a stage, per process) load from it instead. It is a fresh
# directory unless the caller names one.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddjax-test-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402
from helpers import random_params, teacher_of, tiny_gpt_config  # noqa: E402, F401  (re-exported)

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


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops every compiled program after each test module. Each one keeps memory maps of its
    JIT-compiled code, and a whole suite in one process would otherwise pass the kernel's
    vm.max_map_count (65530) and crash the next compile with a segmentation fault."""
    yield
    jax.clear_caches()
    gc.collect()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
sys.path.insert(0, os.path.join(ROOT, "configs"))

# The 8-device suite runs in a process of its own (tests/test_multidevice.py).
collect_ignore = ["multidevice"]


@pytest.fixture(scope="session")
def tiny_gpt():
    from ddjax.teacher.llamagen.gpt import init_params

    cfg = tiny_gpt_config()
    params = random_params(init_params(cfg, jax.random.PRNGKey(0)))
    return cfg, params

