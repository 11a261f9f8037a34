"""Shared helpers for the benchmarks: timing, compile timing, matmul peak, environment, tables.

    from benchmarks._common import time_fn, compile_jitted, matmul_peak, environment, table

Timings are wall-clock medians of `repeats` calls after `warmup` calls; every result is passed
through `jax.block_until_ready`, so asynchronous dispatch does not hide work. Machines shared
with other jobs are noisy: compare two implementations by interleaving their calls within one
run (`interleaved`) rather than across runs.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call: the median, the fastest and every measured call."""

    median: float
    min: float
    times: tuple[float, ...]

    def __str__(self) -> str:
        return f"{self.median:.4g} s (min {self.min:.4g}, n={len(self.times)})"


def _timing(times: Sequence[float]) -> Timing:
    return Timing(statistics.median(times), min(times), tuple(times))


def block(x: Any) -> Any:
    """Waits for every array in x (a pytree; non-JAX leaves such as torch tensors pass through)."""
    return jax.block_until_ready(x)


def time_once(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call, waiting for the result."""
    t0 = time.perf_counter()
    out = block(fn())
    return time.perf_counter() - t0, out


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 3,
            warmup_below_s: float | None = None) -> Timing:
    """Median wall time of fn() over `repeats` calls after `warmup` discarded calls.

    With `warmup_below_s`, the warm-up is adaptive instead: the first call is discarded only
    if it took less than that (cheap calls benefit; a long call is already warm enough and
    counts as the first repeat).
    """
    times: list[float] = []
    if warmup_below_s is not None:
        first = time_once(fn)[0]
        if first >= warmup_below_s:
            times.append(first)
    else:
        for _ in range(warmup):
            block(fn())
    times += [time_once(fn)[0] for _ in range(max(repeats, 1) - len(times))]
    return _timing(times)


def interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int = 1,
                repeats: int = 3) -> dict[str, Timing]:
    """Times several callables round-robin (a, b, a, b, ...) so that machine noise hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            block(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(repeats, 1)):
        for name, fn in fns.items():
            times[name].append(time_once(fn)[0])
    return {name: _timing(t) for name, t in times.items()}


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A compiled executable and how long lowering (tracing included) and compiling took."""

    executable: Any
    lower_s: float
    compile_s: float

    @property
    def total_s(self) -> float:
        return self.lower_s + self.compile_s


def compile_jitted(jitted: Any, *args: Any, **kwargs: Any) -> Compiled:
    """AOT-compiles `jitted` (a jax.jit function) for these arguments, timing both stages.

    Call `.executable(*args)` afterwards: the steady-state cost with no compilation in it.
    """
    t0 = time.perf_counter()
    lowered = jitted.lower(*args, **kwargs)
    t1 = time.perf_counter()
    executable = lowered.compile()
    t2 = time.perf_counter()
    return Compiled(executable, t1 - t0, t2 - t1)


def matmul_peak(dtype: Any = jnp.float32, n: int = 2048, repeats: int = 5) -> float:
    """Measured GFLOP/s of an n x n x n jnp matmul in `dtype` (f32 accumulation for bf16/f16).

    A practical peak for model-FLOPs utilisation: what XLA's dot reaches on this machine, not
    the vendor's figure.
    """
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    t = time_fn(lambda: mm(a, b), warmup=2, repeats=repeats)
    return 2.0 * n**3 / t.min / 1e9


def environment() -> dict[str, str]:
    """What a benchmark result depends on: versions, devices, threads, XLA flags."""
    dev = jax.devices()[0]
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": f"{dev.device_kind} x{jax.device_count()}",
        "cpu": _cpu_name(),
        "cpu_count": str(os.cpu_count()),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_environment(extra: dict[str, Any] | None = None, file=sys.stdout) -> None:
    for k, v in {**environment(), **(extra or {})}.items():
        print(f"# {k}: {v}", file=file)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of rows (dicts); floats get 4 significant digits."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(columns), sep, *(line(r) for r in cells)])
