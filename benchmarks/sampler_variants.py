"""Variants of the teacher's sampling loop, timed against each other in one process.

    python benchmarks/sampler_variants.py --small                                   # smoke run
    python benchmarks/sampler_variants.py --batches 8,32 --tokens 128               # original vs new
    python benchmarks/sampler_variants.py --batches 8 --variants new,cut,window32,window16
    python benchmarks/sampler_variants.py --batches 8 --variants new,bf16           # f32 vs bf16

Same model and settings as benchmarks/teacher_sampling.py (GPT-B dimensions, random weights,
CFG 2.0, top-k 8000). Each variant is built by setting, while its loop is traced, the knobs
of the sampling loop that the optimisations changed:

  original   lax.top_k for the top-k threshold; one loop over the whole block_size cache; the
             sequence-major [B, S, H, D] KV cache; jax.random.categorical / jnp.argmax draws
  topk       kth_largest (the exact bit search); otherwise as original
  cut        kth_largest; one loop over a cache of cls + num_tokens - 1 rows (no windows),
             sequence-major cache, jax draws
  windows    kth_largest, windows of DECODE_WINDOW (64) rows, sequence-major cache, jax draws
             (the loop before the head-major cache and the fast draw)
  seqmajor   `new` with the sequence-major cache
  jaxdraw    `new` with jax.random.categorical / jnp.argmax for the draw
  new        what sampling.py does: kth_largest, windows of DECODE_WINDOW rows, the head-major
             [B, H, S, D] cache (`ddjax.kernels.kv_cache_layout`), the two-reduction argmax
  windowN    `new` with N-row windows (window32, window128, ...)
  bf16       `new` with bfloat16 compute (float32 parameters, float32 accumulation)

Every variant is AOT-compiled (lower and compile times reported), then the executables are
called round-robin (interleaved), one warm-up each, median of --repeats. Before timing, each
float32 variant's tokens (multinomial, same key) are compared with the first variant's.
`--trace DIR` also writes a `jax.profiler` trace of one call per variant (TensorBoard or
Perfetto show where a step's time goes).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._common import compile_jitted, interleaved, print_environment, table  # noqa: E402
from benchmarks.teacher_sampling import labels, make_config, random_params, settings_for  # noqa: E402
from ddjax.teacher.llamagen import gpt as gpt_lib  # noqa: E402
from ddjax.teacher.llamagen import layers as layers_lib  # noqa: E402
from ddjax.teacher.llamagen import sampling as sampling_lib  # noqa: E402

FULL_CACHE = 0  # DECODE_WINDOW = 0: no windows, and the cache keeps all block_size rows
NO_WINDOWS = 10**9  # one window larger than any cache: the cut cache, one loop


def _top_k_sort(x, k):
    return jax.lax.top_k(x, k)[0][..., -1:]


def _jax_categorical(key, logp):
    return jax.random.categorical(key, logp, axis=-1).astype(np.int32)


def _jax_argmax(x):
    return jax.numpy.argmax(x, axis=-1).astype(np.int32)


def _seq_major(*args):
    return "bshd"


@dataclasses.dataclass(frozen=True)
class Variant:
    window: int
    exact_topk: bool = True
    dtype: str = "float32"
    head_major: bool = True
    fast_draw: bool = True


def variant(name: str) -> Variant:
    w = sampling_lib.DECODE_WINDOW
    old = dict(head_major=False, fast_draw=False)
    fixed = {"original": Variant(FULL_CACHE, exact_topk=False, **old),
             "topk": Variant(FULL_CACHE, **old), "cut": Variant(NO_WINDOWS, **old),
             "windows": Variant(w, **old), "seqmajor": Variant(w, head_major=False),
             "jaxdraw": Variant(w, fast_draw=False), "new": Variant(w),
             "bf16": Variant(w, dtype="bfloat16")}
    if name in fixed:
        return fixed[name]
    if name.startswith("window") and name[6:].isdigit():
        return Variant(int(name[6:]))
    raise SystemExit(f"unknown variant {name!r}")


@contextlib.contextmanager
def patched(v: Variant):
    """sampling.py's knobs set to the variant's while its loop is traced (and its cache of
    compiled loops cleared on both sides)."""
    saved = (sampling_lib.DECODE_WINDOW, sampling_lib.kth_largest, sampling_lib.categorical,
             sampling_lib.argmax, layers_lib.cache_layout, gpt_lib.cache_layout)
    sampling_lib.DECODE_WINDOW = v.window
    if not v.exact_topk:
        sampling_lib.kth_largest = _top_k_sort
    if not v.fast_draw:
        sampling_lib.categorical, sampling_lib.argmax = _jax_categorical, _jax_argmax
    if not v.head_major:
        layers_lib.cache_layout = gpt_lib.cache_layout = _seq_major
    sampling_lib._compiled.cache_clear()
    try:
        yield
    finally:
        (sampling_lib.DECODE_WINDOW, sampling_lib.kth_largest, sampling_lib.categorical,
         sampling_lib.argmax, layers_lib.cache_layout, gpt_lib.cache_layout) = saved
        sampling_lib._compiled.cache_clear()


def build(v: Variant, small: bool, params, batch: int, tokens: int | None, top_k: int | None):
    config = make_config(small, v.dtype)
    settings = settings_for(config, top_k)
    n = tokens or config.block_size
    cond, key = labels(batch, config), jax.random.PRNGKey(batch)
    with patched(v):
        fn = jax.jit(lambda p, c, k: sampling_lib.sample(p, config, c, k, settings, num_tokens=n))
        comp = compile_jitted(fn, params, cond, key)
    return comp, functools.partial(comp.executable, params, cond, key), n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="original,topk,cut,windows,seqmajor,jaxdraw,new")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--tokens", type=int, default=None, help="tokens per sequence (default block_size)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--small", action="store_true", help="tiny model: a smoke run in seconds")
    p.add_argument("--trace", metavar="DIR", default=None)
    args = p.parse_args(argv)
    names = args.variants.split(",")
    batches = args.batches or ([2] if args.small else [8])
    t0 = time.perf_counter()
    print_environment({"model": "GPT-B dims (small)" if args.small else "GPT-B",
                       "variants": {n: variant(n) for n in names}})
    params = random_params(make_config(args.small))
    rows = []
    for batch in batches:
        comps, fns, n = {}, {}, None
        for name in names:
            comps[name], fns[name], n = build(variant(name), args.small, params, batch, args.tokens,
                                              args.top_k)
            print(f"  batch {batch} {name}: lower {comps[name].lower_s:.1f} s, compile "
                  f"{comps[name].compile_s:.1f} s", flush=True)
        ref_name = names[0]
        ref = np.asarray(fns[ref_name]())
        same = {}
        for name in names:
            if variant(name).dtype == "float32":
                same[name] = f"{int((np.asarray(fns[name]()) == ref).all(1).sum())}/{batch}"
        if args.trace:
            for name in names:
                with jax.profiler.trace(os.path.join(args.trace, f"b{batch}_{name}")):
                    jax.block_until_ready(fns[name]())
        t = interleaved(fns, warmup=0, repeats=args.repeats)
        base = batch * n / t[ref_name].median
        for name in names:
            tps = batch * n / t[name].median
            rows.append({"variant": name, "batch": batch, "tokens": n, "s/call": t[name].median,
                         "tokens/s": tps, f"x {ref_name}": tps / base,
                         "lower s": comps[name].lower_s, "compile s": comps[name].compile_s,
                         f"rows = {ref_name}": same.get(name, "-")})
    print(f"\nsampler variants (interleaved calls, median of {args.repeats}):\n")
    print(table(rows))
    print(f"\n# total wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
