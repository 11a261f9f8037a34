"""The renaming between Flax parameter trees and PyTorch state dicts.

ddjax modules carry the PyTorch attribute names, so the map is mechanical:
  * path segments `name_<i>` are list entries `name.<i>` (`layers_3` -> `layers.3`);
  * leaves `kernel`, `embedding` and `scale` are `weight`;
  * Dense kernels [in, out] are Linear weights [out, in]; Conv kernels [kh, kw, in, out] are
    Conv2d weights [out, in, kh, kw].
Every key and shape is checked; a mismatch raises one error listing all problems. A model whose
torch names do not follow the rule (VAR's `mid.block_1`) passes its own `key_fn(path) -> key`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from ddjax.utils.torch_io import CheckpointError, StateDict

_LIST_ENTRY = re.compile(r"^(.*)_(\d+)$")
_LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight"}
# Buffers PyTorch may save that are not parameters (RoPE tables, masks, KV caches, VQ usage).
IGNORED_TORCH_KEYS = (
    r"(^|\.)freqs_cis$",
    r"(^|\.)causal_mask$",
    r"(^|\.)kv_cache\.[kv]_cache$",
    r"(^|\.)codebook_used$",
)


def torch_key(path: tuple[str, ...]) -> str:
    """Flax param path -> PyTorch state-dict key."""
    parts = []
    for seg in path[:-1]:
        m = _LIST_ENTRY.match(seg)
        parts.extend([m.group(1), m.group(2)] if m else [seg])
    parts.append(_LEAF_NAMES.get(path[-1], path[-1]))
    return ".".join(parts)


def _to_torch_layout(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        if x.ndim == 2:
            return x.T
        if x.ndim == 4:
            return x.transpose(3, 2, 0, 1)
    return x


def _to_flax_layout(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        if x.ndim == 2:
            return x.T
        if x.ndim == 4:
            return x.transpose(2, 3, 1, 0)
    return x


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    if path[-1] == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def _ignored(key: str, extra: Iterable[str]) -> bool:
    return any(re.search(p, key) for p in (*IGNORED_TORCH_KEYS, *extra))


def _raise_on_mismatch(expected: dict[str, tuple], got: dict[str, tuple], source: str,
                       ignore: Iterable[str] = ()) -> None:
    """Compares {torch key: shape} maps; raises one CheckpointError listing every problem."""
    missing = sorted(k for k in expected if k not in got)
    unexpected = sorted(k for k in got if k not in expected and not _ignored(k, ignore))
    misshaped = [
        f"{k}: checkpoint {tuple(got[k])} != model {tuple(want)}"
        for k, want in sorted(expected.items())
        if k in got and tuple(got[k]) != tuple(want)
    ]
    if missing or unexpected or misshaped:
        lines = [f"{source} does not match the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        if misshaped:
            lines.append(f"  mis-shaped keys ({len(misshaped)}):\n    " + "\n    ".join(misshaped))
        raise CheckpointError("\n".join(lines))


KeyFn = Callable[[tuple[str, ...]], str]


def _torch_shapes(tree: Any, key_fn: KeyFn | None = None) -> dict[str, tuple]:
    key_fn = key_fn or torch_key
    return {key_fn(p): _torch_shape(p, np.shape(x))
            for p, x in traverse_util.flatten_dict(tree).items()}


def torch_to_flax(state: StateDict, template: Any, *, source: str = "checkpoint",
                  ignore: Iterable[str] = (), dtype: Any = None, key_fn: KeyFn | None = None) -> Any:
    """Maps a PyTorch state dict onto the structure of `template` (params or their shapes).

    Args:
      state: {torch key: array}.
      template: a Flax params tree (arrays or jax.ShapeDtypeStruct) giving names and shapes.
      source: named in errors (the file).
      ignore: extra regexes of torch keys to skip.
      dtype: cast every leaf to this dtype (default: the template leaf's dtype).
      key_fn: Flax path -> torch key (default `torch_key`).
    Raises:
      CheckpointError listing every missing, unexpected and mis-shaped key; nothing is
      returned half-loaded.
    """
    key_fn = key_fn or torch_key
    _raise_on_mismatch(_torch_shapes(template, key_fn), {k: v.shape for k, v in state.items()},
                       source, ignore)
    out = {}
    for p, leaf in traverse_util.flatten_dict(template).items():
        leaf_dtype = dtype if dtype is not None else leaf.dtype
        out[p] = np.asarray(_to_flax_layout(p, np.asarray(state[key_fn(p)]))).astype(leaf_dtype)
    return traverse_util.unflatten_dict(out)


def check_params(params: Any, template: Any, source: str = "params",
                 key_fn: KeyFn | None = None) -> None:
    """Raises CheckpointError if `params` (arrays or shapes) differs from `template`."""
    _raise_on_mismatch(_torch_shapes(template, key_fn), _torch_shapes(params, key_fn), source)


def flax_to_torch(params: Any, key_fn: KeyFn | None = None) -> StateDict:
    """Flax params -> {torch key: numpy array}, dtypes preserved."""
    key_fn = key_fn or torch_key
    flat = traverse_util.flatten_dict(jax.device_get(params))
    return {key_fn(p): np.ascontiguousarray(_to_torch_layout(p, np.asarray(x)))
            for p, x in flat.items()}


__all__ = ["CheckpointError", "torch_key", "torch_to_flax", "flax_to_torch", "check_params"]
