"""DD2's generic resumable stage (`run_stage`), as every stage of `ddjax.dd2.train` runs.

A stage keeps Orbax checkpoints in DIR/checkpoints and TensorBoard logs in DIR/logs; a rerun
restores a finished stage's last state, resumes an interrupted one from its latest checkpoint,
and refuses a stage that was started from other inputs (DIR/inputs.json).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from ddjax import sharding as sharding_lib
from ddjax.dd2.settings import DD2Settings
from ddjax.student.train import NonFiniteError, checkpoint_manager, state_shardings
from ddjax.utils.metrics import create_writer


def latest_step(directory: str) -> int | None:
    """The newest finished checkpoint step of a stage directory (None when there is none)."""
    path = os.path.join(directory, "checkpoints")
    steps = [int(n) for n in os.listdir(path) if n.isdigit()] if os.path.isdir(path) else []
    return max(steps) if steps else None


def check_inputs(name: str, directory: str, inputs: dict[str, int]) -> None:
    """Records which stage steps a stage started from (inputs.json) and refuses to continue it
    from others: a finished or half-done stage built on other weights is never reused."""
    path = os.path.join(directory, "inputs.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != inputs:
            was = ", ".join(f"{k} step {v}" for k, v in old.items())
            now = ", ".join(f"{k} step {v}" for k, v in inputs.items())
            raise ValueError(f"dd2/{name} was started from {was}, but now {now} comes before it; "
                             f"delete {directory} (and the stages after it) to redo it")
    elif sharding_lib.is_writer():
        os.makedirs(directory, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(inputs, f)
        os.replace(path + ".tmp", path)


def run_stage(name: str, directory: str, *, init: Callable[..., Any], init_args: tuple = (),
              step: Callable, args: tuple, num_steps: int, s: DD2Settings, mesh: Any, rng: jax.Array,
              batch: Callable[[int], Any] | None = None,
              inputs: dict[str, int] | None = None) -> tuple[Any, dict]:
    """Runs (or resumes, or restores when finished) one stage.

    init(*init_args) -> the initial state (a dict with an int32 "step"; jitted here onto the
    mesh; the weights it starts from come in as init_args, not as constants of the jit);
    step(state, batch, rng, *args) -> (state, metrics {name: scalar}); batch(i) -> the host
    batch of step i (or None). Returns (final state, {"history": [(step, metrics)], "seconds",
    "start_step"}). Raises NonFiniteError when a metric turns NaN/inf (nothing bad is saved).
    """
    check_inputs(name, directory, inputs or {})
    abstract = jax.eval_shape(init, *init_args)
    state_sh = state_shardings(abstract, mesh, s.sharding)
    repl = sharding_lib.replicated(mesh)
    mngr = checkpoint_manager(os.path.join(directory, "checkpoints"), s.keep_checkpoints)
    start = mngr.latest_step()
    if start is not None:
        target = jax.tree_util.tree_map(
            lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, state_sh)
        state = mngr.restore(start, args=ocp.args.StandardRestore(target))
        if start < num_steps:
            logging.info("dd2 %s: resuming from step %d", name, start)
    else:
        start = 0
        state = jax.jit(init, out_shardings=state_sh)(*init_args)
    state = sharding_lib.settle(state)
    out = {"history": [], "start_step": start, "seconds": 0.0}
    if start >= num_steps:
        if num_steps == 0:
            logging.info("dd2 %s: 0 steps configured, its initial state goes on unchanged", name)
        else:
            logging.info("dd2 %s: finished (step %d), restored", name, start)
        mngr.close()
        return state, out
    args = jax.device_put(args, repl)

    def bshard(x):
        return sharding_lib.batch_sharding(mesh, np.ndim(x))

    batch_sh = None
    if batch is not None:
        batch_sh = jax.tree_util.tree_map(bshard, batch(start))
    fn = jax.jit(step, in_shardings=(state_sh, batch_sh, repl, *[repl] * len(args)),
                 out_shardings=(state_sh, repl), donate_argnums=(0,))
    writer = create_writer(os.path.join(directory, "logs"))
    pending: list[tuple[int, Any]] = []
    t0 = time.time()
    last = (t0, start)
    try:
        for i in range(start, num_steps):
            b = None
            if batch is not None:
                b = jax.tree_util.tree_map(lambda x, sh: sharding_lib.put_global(x, sh), batch(i), batch_sh)
            state, m = sharding_lib.settle(fn(state, b, rng, *args))
            done = i + 1
            pending.append((done, m))
            if done % s.log_every == 0 or done == num_steps or done % s.checkpoint_every == 0:
                records = jax.device_get(pending)
                pending.clear()
                for st, vals in records:
                    for k, v in vals.items():
                        if not np.isfinite(v):
                            raise NonFiniteError(
                                f"dd2 {name} stopped: {k} = {float(v)} at step {st}; this state was not "
                                f"saved, the latest checkpoint stays step {mngr.latest_step()}")
                mean = {k: float(np.mean([r[1][k] for r in records])) for k in records[-1][1]}
                now = time.time()
                rate = (done - last[1]) / max(now - last[0], 1e-9)
                last = (now, done)
                writer.write_scalars(done, {**mean, "steps_per_sec": rate})
                out["history"].append((done, mean))
                if done % s.log_every == 0 or done == num_steps:
                    shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(mean.items()))
                    logging.info("dd2 %s %d/%d: %s (%.2f steps/s, ETA %.0f s)", name, done, num_steps,
                                 shown, rate, (num_steps - done) / max(rate, 1e-9))
            if done % s.checkpoint_every == 0 or done == num_steps:
                writer.flush()  # a killed run's logs then reach its last checkpoint
                mngr.save(done, args=ocp.args.StandardSave(state), force=True)
    finally:
        writer.close()
        mngr.wait_until_finished()
        mngr.close()
    out["seconds"] = time.time() - t0
    return state, out


__all__ = ["latest_step", "check_inputs", "run_stage"]
