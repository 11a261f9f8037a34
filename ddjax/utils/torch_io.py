"""Reading and writing PyTorch-style state dicts (`.pt` and `.safetensors`) as numpy arrays.

`.safetensors` never needs torch. `.pt` needs the `torch` extra; it is imported lazily and
loaded with `weights_only=True` (no arbitrary pickles are executed).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

# Where training scripts nest the weights, in the order we prefer them when several exist
# (EMA weights are the ones to sample with).
WRAPPER_KEYS = ("ema", "model", "module", "state_dict")
# Key prefixes added by DistributedDataParallel and torch.compile.
_STRIP_PREFIXES = ("module.", "_orig_mod.")

StateDict = dict[str, np.ndarray]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model."""


def require_torch(purpose: str):
    try:
        import torch  # optional (the torch extra): imported only to read or write .pt
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise ImportError(
            f"{purpose} needs PyTorch: `pip install -e .[torch]` "
            "(or use a .safetensors file, which needs no torch)"
        ) from e
    return torch


def _tensor_to_numpy(t: Any) -> np.ndarray:
    torch = require_torch("reading .pt tensors")
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


def _load_raw(path: str) -> Mapping[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path} as a safetensors file (truncated or "
                                  f"corrupt?): {e}") from e
    if path.endswith((".pt", ".pth", ".bin", ".ckpt")):
        torch = require_torch(f"reading {os.path.basename(path)}")
        try:
            # Training checkpoints often pickle their argparse.Namespace beside the weights;
            # allow that one harmless class, nothing else.
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {e}") from e
    raise CheckpointError(f"unknown checkpoint format for {path}: expected .pt/.pth or .safetensors")


def _is_tensor_dict(d: Mapping[str, Any]) -> bool:
    return bool(d) and all(hasattr(v, "shape") for v in d.values())


def _unwrap_path(raw: Mapping[str, Any], weights_key: str, source: str) -> Mapping[str, Any]:
    parts = weights_key.split(".")
    if not _is_tensor_dict(raw) and parts[0] in raw:  # a nested pickle
        node: Any = raw
        for i, part in enumerate(parts):
            if not isinstance(node, Mapping) or part not in node:
                where = ".".join(parts[:i]) or "the top level"
                keys = sorted(node)[:20] if isinstance(node, Mapping) else type(node).__name__
                raise CheckpointError(f"{source} has no weights under {weights_key!r}: no {part!r} "
                                      f"in {where} (keys: {keys})")
            node = node[part]
        if not isinstance(node, Mapping) or not _is_tensor_dict(node):
            raise CheckpointError(f"{source}: {weights_key!r} holds no tensors")
        return node
    prefix = weights_key + "."
    flat = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    if not flat:
        raise CheckpointError(f"{source} has no weights under {weights_key!r}; top-level keys: "
                              f"{sorted(raw)[:20]}")
    return flat


def unwrap_state_dict(raw: Mapping[str, Any], weights_key: str | None = None,
                      source: str = "checkpoint") -> tuple[Mapping[str, Any], str]:
    """Finds the weights in a checkpoint: under `weights_key`, one of WRAPPER_KEYS, or top level.

    Flat files (safetensors) may carry the nesting as a key prefix ("ema.layers.0..."). A
    dotted `weights_key` walks nested dicts ("trainer.ema_parameters", as VAR's trainer saves).
    Returns (state dict, where it was found).
    """
    if weights_key is not None and "." in weights_key:
        return _unwrap_path(raw, weights_key, source), weights_key
    if _is_tensor_dict(raw):
        prefixes = {k.split(".", 1)[0] for k in raw}
        if weights_key is not None or (prefixes & set(WRAPPER_KEYS) and prefixes <= set(WRAPPER_KEYS)):
            nested: dict[str, dict[str, Any]] = {}
            for k, v in raw.items():
                head, _, rest = k.partition(".")
                nested.setdefault(head, {})[rest] = v
            if weights_key is None or weights_key in nested:
                raw = nested
    if weights_key is not None:
        if weights_key not in raw or not isinstance(raw[weights_key], Mapping):
            raise CheckpointError(
                f"{source} has no weights under {weights_key!r}; top-level keys: {sorted(raw)[:20]}"
            )
        return raw[weights_key], weights_key
    for key in WRAPPER_KEYS:
        if key in raw and isinstance(raw[key], Mapping) and _is_tensor_dict(raw[key]):
            found = [k for k in WRAPPER_KEYS if k in raw and isinstance(raw[k], Mapping)]
            if len(found) > 1:
                logging.info("%s holds weights under %s; using %r", source, found, key)
            return raw[key], key
    if _is_tensor_dict(raw):
        return raw, "<top level>"
    raise CheckpointError(
        f"no state dict found in {source}: expected tensors at the top level or under one of "
        f"{WRAPPER_KEYS}; top-level keys: {sorted(raw)[:20]}"
    )


def read_state_dict(path: str, weights_key: str | None = None) -> StateDict:
    """Reads a state dict from `.pt`/`.safetensors` as {torch key: numpy array}.

    Weights may sit under `ema`, `model`, `module`, `state_dict` or at the top level;
    DDP's `module.` and torch.compile's `_orig_mod.` key prefixes are stripped.
    """
    state, _ = unwrap_state_dict(_load_raw(path), weights_key, source=path)
    out: StateDict = {}
    for k, v in state.items():
        for p in _STRIP_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v if isinstance(v, np.ndarray) else _tensor_to_numpy(v)
    return out


def write_state_dict(path: str, state: StateDict, nest_under: tuple[str, ...] = ("model",)) -> None:
    """Writes {torch key: array} to `.safetensors` (flat, no torch) or `.pt` (nested, needs torch).

    For `.pt` the weights are stored under each key of `nest_under` (e.g. ("model", "ema"); a
    dotted key nests deeper) as the official loaders expect; safetensors stores them flat. Written atomically.
    """
    tmp = path + ".tmp"
    if path.endswith(".safetensors"):
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp)
    elif path.endswith((".pt", ".pth")):
        torch = require_torch("writing .pt files")
        tensors = {}
        for k, v in state.items():
            if v.dtype.name == "bfloat16":
                tensors[k] = torch.from_numpy(np.asarray(v, np.float32)).to(torch.bfloat16)
            else:
                tensors[k] = torch.from_numpy(np.array(v, copy=True))  # writable, contiguous
        nested: dict[str, Any] = {}
        for key in nest_under:  # "trainer.ema_parameters" nests {"trainer": {"ema_parameters": ...}}
            node = nested
            *heads, last = key.split(".")
            for h in heads:
                node = node.setdefault(h, {})
            node[last] = tensors
        torch.save(nested if nest_under else tensors, tmp)
    else:
        raise CheckpointError(f"unknown output format for {path}: use .pt/.pth or .safetensors")
    os.replace(tmp, path)
