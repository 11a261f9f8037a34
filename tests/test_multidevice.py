"""Runs tests/multidevice (8 simulated CPU devices) in a pytest process of its own: XLA_FLAGS
must be set before JAX's CPU client starts, which this process's JAX already did."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT


def test_the_8_device_suite_passes():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                           os.path.join(ROOT, "tests", "multidevice")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"8-device suite failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
