"""Runs a check on 8 simulated CPU devices in a fresh process (XLA_FLAGS must precede jax)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_on_8_devices(code: str, timeout: int = 600) -> str:
    """Executes `code` with 8 host devices; raises with its output if it fails; returns stdout."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"),
                                         env.get("PYTHONPATH", "")])
    prelude = "import jax\nassert jax.device_count() == 8, jax.devices()\n"
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode:
        raise AssertionError(f"8-device check failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout
