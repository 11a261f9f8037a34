"""CLI: python -m ddjax.convert {to-jax,to-torch} --kind {gpt,vq} ...

to-jax reads a PyTorch checkpoint (.pt needs torch; .safetensors does not), checks every key
and shape against the model built from --model and the overrides, and writes an Orbax
directory (DIR/params + DIR/ddjax.json) that configs can point at.
to-torch writes the parameters of such a directory back under LlamaGen's key names.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import logging
import sys
from typing import Any

from ddjax.convert.mapping import flax_to_torch, torch_to_flax
from ddjax.convert.torch_io import CheckpointError, read_state_dict, write_state_dict
from ddjax.utils.checkpoint import load_params, save_params

KINDS = ("gpt", "vq")


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def build_config(kind: str, model: str | None, overrides: dict[str, Any]) -> Any:
    """The model config for `kind` from a variant name and field overrides."""
    if kind == "gpt":
        from ddjax.teacher.gpt import gpt_config  # noqa: PLC0415

        return gpt_config(model or "GPT-B", **overrides)
    if kind == "vq":
        from ddjax.teacher.vq import vq_config  # noqa: PLC0415

        return vq_config(model or "VQ-16", **overrides)
    raise ValueError(f"unknown --kind {kind!r}; choose one of {KINDS}")


def _init_fn(kind: str):
    if kind == "gpt":
        from ddjax.teacher.gpt import init_params  # noqa: PLC0415
    else:
        from ddjax.teacher.vq import init_params  # noqa: PLC0415
    return init_params


def config_from_meta(kind: str, meta: dict[str, Any]) -> Any:
    cfg = dict(meta["model_config"])
    if kind == "gpt":
        from ddjax.teacher.gpt import GPTConfig as cls  # noqa: PLC0415
    else:
        from ddjax.teacher.vq import VQConfig as cls  # noqa: PLC0415
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in names})


def to_jax(kind: str, model: str | None, src: str, dst: str, overrides: dict[str, Any],
           weights_key: str | None = None, overwrite: bool = False) -> str:
    """PyTorch checkpoint -> ddjax Orbax directory; returns the directory."""
    import jax  # noqa: PLC0415

    from ddjax.teacher.loading import abstract_params  # noqa: PLC0415

    config = build_config(kind, model, overrides)
    template = abstract_params(_init_fn(kind), config)
    params = torch_to_flax(read_state_dict(src, weights_key), template, source=src)
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    logging.info("converted %s: %d tensors, %.1fM parameters", src,
                 len(jax.tree_util.tree_leaves(params)), n / 1e6)
    return save_params(dst, params, kind=kind, model_config=config, source=src, overwrite=overwrite)


def to_torch(kind: str, src: str, dst: str) -> str:
    """ddjax Orbax directory -> `.safetensors` or `.pt` (under "model") with PyTorch key names."""
    params, meta = load_params(src, kind=kind)
    write_state_dict(dst, flax_to_torch(params), nest_under=("model",))
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddjax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("to-jax", help="PyTorch checkpoint -> ddjax Orbax directory")
    a.add_argument("--kind", required=True, choices=KINDS)
    a.add_argument("--model", help="variant: GPT-B, GPT-L, ... or VQ-16, VQ-8")
    a.add_argument("--input", required=True, help=".pt/.pth or .safetensors file")
    a.add_argument("--output", required=True, help="directory to write")
    a.add_argument("--weights-key", help="where the weights sit (ema, model, ...); default: detect")
    a.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="model config override, e.g. --set vocab_size=16384 --set block_size=576")
    a.add_argument("--overwrite", action="store_true")
    b = sub.add_parser("to-torch", help="ddjax Orbax directory -> PyTorch key names")
    b.add_argument("--kind", required=True, choices=KINDS)
    b.add_argument("--input", required=True, help="ddjax directory (from to-jax or training)")
    b.add_argument("--output", required=True, help=".safetensors (no torch needed) or .pt")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "to-jax":
            overrides = {}
            for item in args.set:
                if "=" not in item:
                    p.error(f"--set expects FIELD=VALUE, got {item!r}")
                k, v = item.split("=", 1)
                overrides[k] = _parse_value(v)
            out = to_jax(args.kind, args.model, args.input, args.output, overrides,
                         args.weights_key, args.overwrite)
        else:
            out = to_torch(args.kind, args.input, args.output)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
