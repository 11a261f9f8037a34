r"""One process of a CPU multi-process run of ddjax, launched by tests/test_multihost.py.

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 \
        python tests/multihost/worker.py --process_id=0 --num_processes=2 --port=PORT \
        --workdir=DIR --out=DIR/process0.json --set mode=train --set train.num_steps=12

Runs `ddjax.app.run` on the `tiny` preset (of configs/llamagen.py, or configs/var.py with
--family=var) with the `--set` overrides, joined to the other
processes by `jax.distributed.initialize` on 127.0.0.1:PORT (with --num_processes=1 it runs
alone, no coordinator), and writes what the mode returned to --out as JSON.
--kill_at_checkpoint=N: this process kills itself (SIGKILL) as soon as training checkpoint N is
finalised, to test how the others notice a lost peer. --dump_checkpoint=NPZ: after the mode,
process 0 writes the latest checkpoint's params and EMA params (flattened) to NPZ.
The JSON also holds what each stage returned (mode=all returns only the evaluation's) and the
files the evaluation wrote from this process (`record_stages`).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
from absl import logging

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "configs"))

import llamagen  # noqa: E402  (configs/llamagen.py)
import var  # noqa: E402  (configs/var.py)

from ddjax import sharding  # noqa: E402
from ddjax.app import modes  # noqa: E402
from ddjax.app import run as app_run  # noqa: E402
from ddjax.configs_path import apply_overrides  # noqa: E402
from ddjax.evaluate import report as report_lib  # noqa: E402
from ddjax.student.loading import CKPT_DIR, STUDENT_DIR, load_training_run  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.add_argument("--kill_at_checkpoint", type=int, default=-1)
    p.add_argument("--dump_checkpoint", default="")
    p.add_argument("--heartbeat_timeout_s", type=int, default=10)
    p.add_argument("--family", default="llamagen", choices=("llamagen", "var"),
                   help="whose tiny preset: configs/llamagen.py or configs/var.py")
    return p.parse_args(argv)


def tiny_config(overrides: list[str], family: str = "llamagen") -> Any:
    """The family's tiny preset with key=value overrides (values parsed as Python literals)."""
    return apply_overrides({"llamagen": llamagen, "var": var}[family].get_config("tiny"), overrides)


def kill_when_checkpointed(workdir: str, step: int) -> None:
    """A daemon thread that SIGKILLs this process once checkpoint `step` is finalised."""
    path = os.path.join(workdir, STUDENT_DIR, CKPT_DIR, str(step))

    def watch():
        while not os.path.isdir(path):
            time.sleep(0.02)
        print(f"worker {jax.process_index()}: checkpoint {step} written, killing myself at "
              f"{time.time():.3f}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


def record_stages() -> dict[str, Any]:
    """Wraps the stages `ddjax.app.modes` calls so their results, and the report files this
    process writes, are recorded in the returned dict (filled while the mode runs)."""
    seen: dict[str, Any] = {"written_files": []}

    def recording(name: str, fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            seen[name] = summary(out)
            return out
        return wrapper

    def writing(fn, path_of):
        def wrapper(*args, **kwargs):
            seen["written_files"].append(os.path.basename(path_of(*args, **kwargs)))
            return fn(*args, **kwargs)
        return wrapper

    modes.write_pairs = recording("generate", modes.write_pairs)
    modes.train_lib.train = recording("train", modes.train_lib.train)
    report_lib.save_grid = writing(report_lib.save_grid, lambda path, *a, **k: path)
    report_lib.write_report = writing(report_lib.write_report,
                                      lambda out_dir, *a, **k: os.path.join(out_dir, "report.md"))
    return seen


def summary(result: Any) -> Any:
    """The JSON-able part of a mode's result (train: losses by step, start/end step)."""
    if isinstance(result, dict) and "losses" in result:
        return {"losses": {str(k): v for k, v in sorted(result["losses"].items())},
                "start_step": result["start_step"], "step": result["step"],
                "latest_checkpoint": result["latest_checkpoint"]}
    if isinstance(result, dict) and "results" in result:
        return {"results": result["results"], "report": result["report"]}
    return json.loads(json.dumps(result, default=str))


def dump_checkpoint(workdir: str, path: str) -> None:
    """Process 0 writes the latest checkpoint's params/EMA params, flattened, to `path`."""
    arrays = {}
    for ema in (False, True):
        _, params, meta = load_training_run(workdir, ema=ema)
        for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            name = ("ema/" if ema else "params/") + "/".join(str(getattr(k, "key", k)) for k in keys)
            arrays[name] = np.asarray(leaf)
    if jax.process_index() == 0:
        np.savez(path, step=meta["step"], **arrays)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    # The log says which stage a run reached, and SIGUSR1 (sent by the test to a hung worker)
    # prints every thread's stack into it.
    logging.set_verbosity(logging.INFO)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    jax.config.update("jax_disable_most_optimizations", True)  # tiny models: compile time rules
    if args.num_processes > 1:
        sharding.initialize_distributed(f"127.0.0.1:{args.port}", args.num_processes, args.process_id,
                                        heartbeat_timeout_s=args.heartbeat_timeout_s,
                                        shutdown_timeout_s=30, initialization_timeout_s=60)
    print(f"worker {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local, "
          f"{jax.device_count()} global devices", flush=True)
    if args.kill_at_checkpoint >= 0:
        kill_when_checkpointed(args.workdir, args.kill_at_checkpoint)
    t0 = time.time()
    stages = record_stages()
    result = app_run(tiny_config(args.set, args.family), args.workdir)
    out = {"process": jax.process_index(), "process_count": jax.process_count(),
           "seconds": time.time() - t0, "result": summary(result), "stages": stages}
    if args.dump_checkpoint:
        dump_checkpoint(args.workdir, args.dump_checkpoint)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=float)


if __name__ == "__main__":
    main(sys.argv[1:])
