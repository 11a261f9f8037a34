"""Shared config helpers: `parse_arg` for `--config=configs/x.py:ARG` strings."""

from __future__ import annotations

import ast
from typing import Any


def parse_arg(arg: str | None, lazy: bool = False, **spec: Any) -> dict[str, Any]:
    """Parses 'preset' or 'key=value,key=value' (or 'preset,key=value') against `spec` defaults.

    The first bare word sets the key named by the first entry of `spec` (the preset).
    Values are parsed as Python literals when possible (`runlocal=True`, `steps=100`).
    Unknown keys raise unless `lazy`.
    """
    out = dict(spec)
    if not arg:
        return out
    first_key = next(iter(spec)) if spec else None
    for i, item in enumerate(p for p in arg.split(",") if p):
        if "=" in item:
            k, v = item.split("=", 1)
        elif i == 0 and first_key is not None:
            k, v = first_key, item
        else:
            raise ValueError(f"config argument {item!r} must be key=value")
        if k not in spec and not lazy:
            raise ValueError(f"unknown config argument {k!r}; known: {sorted(spec)}")
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out
