"""One batched loop for every stage: fixed-size batches (the last one padded), so each
compiled function sees one shape, and per-image seconds measured after a warm-up call."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import numpy as np


def pad_to(x: np.ndarray, size: int) -> np.ndarray:
    """x [n, ...] -> [size, ...] with zero rows appended (n <= size)."""
    x = np.asarray(x)
    if len(x) == size:
        return x
    return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])


def map_batches(fn: Callable[..., jax.Array], arrays: Sequence[np.ndarray], batch_size: int, *,
                warmup: bool = False, on_batch: Callable[[int, int], None] | None = None
                ) -> tuple[np.ndarray, float]:
    """fn(*batch) over rows of `arrays` (each [N, ...]) in batches of exactly `batch_size`.

    Returns (outputs [N, ...] concatenated, seconds per row of the timed calls). With `warmup`,
    one call on the first batch runs before the clock starts (compilation excluded).
    on_batch(done, total) is called after each batch (progress).
    """
    n = len(arrays[0])
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if any(len(a) != n for a in arrays):
        raise ValueError(f"arrays have different lengths: {[len(a) for a in arrays]}")
    if warmup and n:
        jax.block_until_ready(fn(*[pad_to(a[:batch_size], batch_size) for a in arrays]))
    outs = []
    t0 = time.perf_counter()
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        out = fn(*[pad_to(a[start:stop], batch_size) for a in arrays])
        outs.append(np.asarray(jax.block_until_ready(out))[: stop - start])
        if on_batch is not None:
            on_batch(stop, n)
    sec = (time.perf_counter() - t0) / max(n, 1)
    return np.concatenate(outs) if outs else np.zeros((0,)), sec
