"""Attention benchmark: the Pallas kernels vs XLA vs cuDNN at the teacher's shapes.

    python benchmarks/attention.py                   # GPT-B and GPT-L, batch 32, 257 tokens
    python benchmarks/attention.py --repeats 50 --batch 16

Rows: teacher forcing (T = S = 257, causal) forward and forward+backward, and one decoding step
(T = 1 against a 257-row cache at position 200), in bfloat16 and float32, for every
implementation `attention()` offers on this backend. Each time is the median of --repeats runs
after --warmup runs (compilation excluded), each ending in block_until_ready; ratios are
against XLA from the same run. On the CPU the shape shrinks, repeats drop to 3, and the Pallas
kernels run in the interpreter: those numbers only show that the script works.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ddjax.kernels.attention import attention, available_implementations

SHAPES = {"GPT-B": (12, 64), "GPT-L": (16, 64)}  # name -> (heads, head dim)


def median_seconds(fn: Callable, args: tuple, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_fn(impl: str, mode: str) -> Callable:
    """A jitted callable for one (implementation, mode); mode: fwd | fwd+bwd | decode."""
    if mode == "decode":
        return jax.jit(lambda q, k, v, off: attention(q, k, v, q_offset=off, implementation=impl))

    def forward(q, k, v):
        return attention(q, k, v, causal=True, implementation=impl)

    if mode == "fwd":
        return jax.jit(forward)

    def loss(q, k, v):
        return jnp.sum(forward(q, k, v).astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def inputs(mode: str, batch: int, seq: int, heads: int, head_dim: int, dtype) -> tuple:
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    t = 1 if mode == "decode" else seq
    q = jax.random.normal(kq, (batch, t, heads, head_dim), dtype)
    k = jax.random.normal(kk, (batch, seq, heads, head_dim), dtype)
    v = jax.random.normal(kv, (batch, seq, heads, head_dim), dtype)
    return (q, k, v, jnp.int32(min(200, seq - 1))) if mode == "decode" else (q, k, v)


def run(batch: int, seq: int, shapes: dict, warmup: int, repeats: int) -> None:
    impls = available_implementations()
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}); "
          f"implementations available: {', '.join(impls)}")
    print(f"batch {batch}, {seq} tokens, median of {repeats} after {warmup} warm-up runs\n")
    header = f"{'shape':<7} {'dtype':<9} {'mode':<8}" + "".join(f"{i:>14}" for i in impls)
    print(header + "   ratios vs xla")
    print("-" * (len(header) + 20))
    for name, (heads, head_dim) in shapes.items():
        for dtype in (jnp.bfloat16, jnp.float32):
            for mode in ("fwd", "fwd+bwd", "decode"):
                args = inputs(mode, batch, seq, heads, head_dim, dtype)
                times: dict[str, float | str] = {}
                for impl in impls:
                    if impl == "cudnn" and dtype == jnp.float32:
                        times[impl] = "n/a"  # cuDNN flash attention is bf16/f16 only
                        continue
                    try:
                        times[impl] = median_seconds(make_fn(impl, mode), args, warmup, repeats)
                    except Exception as e:  # report and keep going: one row per failure
                        times[impl] = f"error: {type(e).__name__}"
                        print(f"  {name} {jnp.dtype(dtype).name} {mode} {impl}: "
                              f"{str(e).splitlines()[0][:160]}")
                cells = "".join(
                    f"{t * 1e3:>11.3f} ms" if isinstance(t, float) else f"{t:>14}"
                    for t in times.values()
                )
                base = times.get("xla")
                ratios = ", ".join(
                    f"{impl} {base / t:.2f}x"
                    for impl, t in times.items()
                    if impl != "xla" and isinstance(t, float) and isinstance(base, float)
                )
                print(f"{name:<7} {jnp.dtype(dtype).name:<9} {mode:<8}{cells}   {ratios}")
    print("\nratio = xla time / implementation time (> 1: faster than XLA)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=257, help="1 class token + 256 image tokens")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    shapes = SHAPES
    if jax.default_backend() == "cpu":
        print("CPU: tiny shapes and 3 repeats; Pallas runs interpreted, so its times mean nothing.")
        args.batch, args.seq, args.warmup, args.repeats = 1, 40, 1, 3
        shapes = {"tiny": (2, 16)}
    run(args.batch, args.seq, shapes, args.warmup, args.repeats)


if __name__ == "__main__":
    main()
