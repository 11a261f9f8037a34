"""Where the one-token flow map's time goes: `map_token` on one chunk of rows under `jax.profiler`.

    python benchmarks/flow_profile.py                        # FlowSettings(), 8 rows, K = 16384
    python benchmarks/flow_profile.py --flow early_steps=10  # configs/llamagen.py's grid
    (pip install -e .[bench] for the per-op table: xprof)

The rows are LlamaGen-like: K = 16384 L2-normalised codes of dimension 8, log p = top-k 8000 of
logits 0.3 N(0, 1) (a random-weight teacher's nearly flat distribution, the hard case for
pruning). `--repeats` maps run inside one compiled loop; per-op device time is summed over the
trace and divided by the repeats. Ops inside `lax.cond` branches are also counted in the cond
op itself, so the column adds up to more than the wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks._common import print_environment, table  # noqa: E402
from benchmarks.pairs import parse_overrides  # noqa: E402
from benchmarks.profile_step import op_names, op_times  # noqa: E402
from ddjax.mapper.flow import FlowSettings, map_token  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--codes", type=int, default=16384)
    p.add_argument("--top-k", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--top", type=int, default=20, help="rows of the per-op table")
    p.add_argument("--flow", default="", help="FlowSettings overrides, e.g. 'early_steps=10'")
    args = p.parse_args(argv)
    s = dataclasses.replace(FlowSettings(), **parse_overrides(args.flow))
    n, k = args.rows, args.codes
    code = jax.random.normal(jax.random.PRNGKey(2), (k, 8))
    code = code / jnp.linalg.norm(code, axis=1, keepdims=True)
    logits = 0.3 * jax.random.normal(jax.random.PRNGKey(5), (n, k))
    cut = jax.lax.top_k(logits, min(args.top_k, k))[0][:, -1:]
    log_p = jax.nn.log_softmax(jnp.where(logits >= cut, logits, -jnp.inf))
    noise = jax.random.normal(jax.random.PRNGKey(3), (n, 8))
    print_environment({"flow": s, "rows": n, "codes": k})
    reps = args.repeats

    def body(i, acc):  # the carry feeds the noise and log p so that XLA cannot hoist any of it
        zero = 0.0 * acc[:, None].astype(noise.dtype)
        return acc + map_token(noise + zero, log_p + zero, code, s).sum()

    fn = jax.jit(lambda: jax.lax.fori_loop(0, reps, body, jnp.zeros(n, jnp.int32)))
    compiled = fn.lower().compile()
    jax.block_until_ready(compiled())
    t0 = time.perf_counter()
    jax.block_until_ready(compiled())
    print(f"# {1e3 * (time.perf_counter() - t0) / reps:.2f} ms per map of {n} rows (no profiler)")
    trace = tempfile.mkdtemp(prefix="ddjax_flow_trace_")
    with jax.profiler.trace(trace):
        jax.block_until_ready(compiled())
    try:
        rows = op_times(trace, op_names(compiled.as_text()))
    except ImportError:
        print("# install xprof (pip install xprof) for the per-op table; trace in", trace)
        return
    for r in rows:
        r["ms/map"] = r["ms"] / reps
        r["calls/map"] = r["calls"] / reps
    print(f"\nop time per map (all ops {sum(r['ms/map'] for r in rows):.2f} ms):\n")
    print(table(rows[: args.top], ["ms/map", "%", "calls/map", "shape", "op"]))


if __name__ == "__main__":
    main()
