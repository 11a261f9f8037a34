"""Where a teacher sampling step's time goes: one call under `jax.profiler`, time per model op.

    python benchmarks/profile_step.py --batch 32 --tokens 64              # GPT-B, f32
    python benchmarks/profile_step.py --batch 8 --tokens 128 --dtype bfloat16 --trace /tmp/tr
    python benchmarks/profile_step.py --batch 32 --tokens 64 --variant windows   # the loop before
                                      # the head-major cache and the fast draw (sampler_variants.py)

Same model and settings as benchmarks/teacher_sampling.py (GPT-B dimensions, random weights,
CFG 2.0, top-k 8000). The trace is written to --trace (TensorBoard's or XProf's profile tab
shows it); with the `xprof` package installed (`pip install -e .[bench]`) the script also prints the
device time of each HLO op summed over the call, grouped by the model operation it comes from
(the op_name metadata with layer indices folded: `L/feed_forward/w1/dot_general` sums all 12
layers), with the share of the total. On the CPU, XLA runs independent ops concurrently (w1 and
w3 of a layer on one core each), so op times add up to more than the wall time and two
concurrent matmuls each show about twice their solo time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402

from benchmarks._common import print_environment, table  # noqa: E402
from benchmarks.sampler_variants import patched, variant  # noqa: E402
from benchmarks.teacher_sampling import (  # noqa: E402
    ddjax_sampler,
    labels,
    make_config,
    random_params,
    settings_for,
)
from ddjax.teacher.llamagen.sampling import weight_major_params  # noqa: E402

_RUNTIME = ("Thread", "Thunk", "$", "Slinky", "end:", "while")


def op_names(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (model op with layer indices folded, result shape)."""
    out = {}
    for m in re.finditer(r"%([\w.\-]+) = (\S+) [^\n]*?op_name=\"([^\"]+)\"", hlo_text):
        name, shape, op = m.groups()
        op = re.sub(r"layers_\d+", "L", op)
        op = op.split("closed_call/")[-1]
        out[name] = (op[-72:], shape.split("{")[0][:32])
    return out


def op_times(trace_dir: str, names: dict[str, tuple[str, str]]) -> list[dict]:
    from xprof.convert import raw_to_tool_data

    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
    events = json.loads(raw_to_tool_data.xspace_to_tool_data([path], "trace_viewer", {})[0])
    total, count = collections.Counter(), collections.Counter()
    for e in events["traceEvents"]:
        if e.get("ph") == "X" and "dur" in e and not e["name"].startswith(_RUNTIME):
            k = names.get(e["name"], (re.sub(r"\.\d+$", "", e["name"]), ""))
            total[k] += e["dur"]
            count[k] += 1
    whole = sum(total.values())
    return [{"ms": v / 1e3, "%": 100 * v / whole, "calls": count[k], "shape": k[1], "op": k[0]}
            for k, v in total.most_common()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--top", type=int, default=25, help="rows of the per-op table")
    p.add_argument("--small", action="store_true")
    p.add_argument("--variant", default="new",
                   help="a variant of the loop from benchmarks/sampler_variants.py (default new)")
    p.add_argument("--trace", default=None, help="trace directory (default: a temporary one)")
    p.add_argument("--weight-major", choices=("on", "off"), default="on",
                   help="kernels applied as kernel^T x^T (sample()'s CPU default) or x @ kernel")
    args = p.parse_args(argv)
    config = make_config(args.small, args.dtype)
    params = random_params(make_config(args.small))
    settings = settings_for(config)
    cond, key = labels(args.batch, config), jax.random.PRNGKey(args.batch)
    print_environment({"batch": args.batch, "tokens": args.tokens, "dtype": args.dtype,
                       "variant": args.variant, "weight-major": args.weight_major})
    wm = args.weight_major == "on"
    params = weight_major_params(params) if wm else params
    with patched(variant(args.variant)):
        compiled = ddjax_sampler(config, settings, args.tokens, wm).lower(params, cond, key).compile()
    jax.block_until_ready(compiled(params, cond, key))
    trace = args.trace or tempfile.mkdtemp(prefix="ddjax_trace_")
    t0 = time.perf_counter()
    with jax.profiler.trace(trace):
        jax.block_until_ready(compiled(params, cond, key))
    wall = time.perf_counter() - t0
    steps = args.tokens - 1
    print(f"# one call: {wall:.2f} s wall ({1e3 * wall / steps:.1f} ms per decoding step); "
          f"trace in {trace}")
    try:
        rows = op_times(trace, op_names(compiled.as_text()))
    except ImportError:
        print("# install xprof (pip install xprof) for the per-op table, or open the trace in "
              "TensorBoard's profile tab")
        return
    for r in rows:
        r["ms/step"] = r["ms"] / steps
    print(f"\nop time summed over the call (all ops: {sum(r['ms'] for r in rows):.0f} ms):\n")
    print(table(rows[: args.top], ["ms", "ms/step", "%", "calls", "shape", "op"]))


if __name__ == "__main__":
    main()
