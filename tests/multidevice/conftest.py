"""Tests on 8 simulated CPU devices. XLA reads XLA_FLAGS when its CPU client starts, so this
folder runs in a pytest process of its own with the flag set before JAX starts
(tests/test_multidevice.py launches it; `XLA_FLAGS=--xla_force_host_platform_device_count=8
pytest tests/multidevice` runs it directly)."""

from __future__ import annotations

import os
import sys

import jax
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "configs"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

jax.config.update("jax_disable_most_optimizations", True)


def pytest_configure(config):
    if jax.device_count() != 8:
        raise pytest.UsageError(
            f"tests/multidevice needs 8 devices, got {jax.device_count()}: run it with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_multidevice.py does)")
