r"""Why multi-process CPU loops wait for each step: a bare jitted all-reduce loop on 2 processes
x 4 CPU devices (Gloo), run with asynchronous dispatch and with `ddjax.sharding.settle` after
each step, interleaved, counting the runs that hang.

    python benchmarks/multiprocess_cpu_dispatch.py --tries=6

A run hangs when neither process logs progress for --stall_s seconds; its processes are then
killed (and, with --stacks, each thread's native stack is written by gdb next to the logs).
Prints one line per run and the hang counts of both modes; the load average goes in the header.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def worker(pid: int, port: int, steps: int, mode: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    sys.path.insert(0, ROOT)
    from ddjax import sharding

    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    mesh = sharding.make_mesh({"data": -1})
    w_sh, x_sh = NamedSharding(mesh, P()), sharding.batch_sharding(mesh, 2)

    @jax.jit
    def step(w, x):  # a data-parallel gradient step: one all-reduce of [256, 256] per call
        def loss(w):
            h = x
            for _ in range(5):
                h = jnp.tanh(h @ w)
            return jnp.mean(h ** 2)
        val, g = jax.value_and_grad(loss)(w)
        return w - 0.01 * g, val

    w = jax.device_put(jnp.eye(256) * 0.5, w_sh)
    rng = np.random.default_rng(pid)
    for i in range(steps):
        x = jax.make_array_from_process_local_data(
            x_sh, rng.standard_normal((256, 256), dtype=np.float32), (512, 256))
        out = step(w, x)
        w, val = sharding.settle(out) if mode == "settle" else out
        if i % 25 == 0:
            print(f"step {i}", flush=True)
    print(f"done {float(val):.6f}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(mode: str, steps: int, stall_s: float, logdir: str, stacks: bool) -> tuple[str, float]:
    """('ok' | 'hang' | 'error', seconds) of one 2-process run."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    port, procs, logs = free_port(), [], []
    for p in range(2):
        path = os.path.join(logdir, f"{mode}_p{p}.log")
        logs.append(path)
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", str(p), "--port", str(port), "--steps", str(steps),
             "--mode", mode], env=env, stdout=open(path, "w"), stderr=subprocess.STDOUT))
    t0, last, last_size = time.time(), time.time(), -1
    while any(p.poll() is None for p in procs):
        time.sleep(1.0)
        size = sum(os.path.getsize(f) for f in logs)
        if size != last_size:
            last, last_size = time.time(), size
        elif time.time() - last > stall_s:
            if stacks:
                for p, f in zip(procs, logs):
                    with open(f + ".gdb", "w") as out:
                        subprocess.run(["gdb", "-p", str(p.pid), "-batch", "-ex", "thread apply all bt"],
                                       stdout=out, stderr=subprocess.STDOUT, check=False)
            for p in procs:
                p.kill()
                p.wait()
            return "hang", time.time() - t0
    ok = all(p.returncode == 0 for p in procs)
    return ("ok" if ok else "error"), time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tries", type=int, default=6, help="runs per mode")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--stall_s", type=float, default=20.0)
    ap.add_argument("--stacks", action="store_true", help="gdb stacks of hung processes")
    ap.add_argument("--logdir", default="")
    ap.add_argument("--worker", type=int, default=-1)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--mode", default="async", choices=("async", "settle"))
    a = ap.parse_args()
    if a.worker >= 0:
        worker(a.worker, a.port, a.steps, a.mode)
        return
    logdir = a.logdir or tempfile.mkdtemp(prefix="cpu_dispatch_")
    os.makedirs(logdir, exist_ok=True)
    print(f"# 2 processes x 4 CPU devices, {a.steps} steps per run, hang = {a.stall_s:.0f} s without "
          f"progress; load average {os.getloadavg()}; logs in {logdir}")
    counts = {"async": [0, 0], "settle": [0, 0]}
    for t in range(a.tries):
        for mode in ("async", "settle"):
            result, sec = one_run(mode, a.steps, a.stall_s, logdir, a.stacks)
            counts[mode][0] += result == "hang"
            counts[mode][1] += 1
            print(f"run {t + 1} {mode:6s}: {result} after {sec:.0f} s", flush=True)
    for mode, (hung, n) in counts.items():
        print(f"{mode:6s}: {hung}/{n} runs hung")
    print(f"# load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
