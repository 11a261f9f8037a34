"""CLI: python -m ddjax.convert {to-jax,to-torch} --kind {gpt,vq,dd,var,var_vae,var_dd} ...

to-jax reads a PyTorch checkpoint (.pt needs torch; .safetensors does not), checks every key
and shape against the model built from --model and the overrides, and writes an Orbax
directory (DIR/params + DIR/ddjax.json) that configs can point at. For --kind dd, --model is
the teacher variant (GPT-B, GPT-L, ...) and `--set codebook_dim=8` the code dimension; released
Distilled Decoding checkpoints hold the weights under "ema" and "model" (ema is preferred).
to-torch writes the parameters of such a directory back under the official key names:
`.safetensors` flat (no torch needed), `.pt` as {"model": sd} (gpt, vq) or
{"model": sd, "ema": sd} (dd), ready for `load_state_dict(..., strict=True)`.

    python -m ddjax.convert to-jax --kind dd --model GPT-B --input dd_ckpt.pt --output ckpt/dd \\
        --set vocab_size=16384 --set block_size=256
    python -m ddjax.convert to-torch --kind dd --input ckpt/dd --output student.pt

VAR (FoundationVision/VAR): --kind var with --model d16 | d20 | d24 | d30, --kind var_vae for
vae_ch160v4096z32.pth; exports are bare state dicts with VAR's buffers (strict=True loading).

    python -m ddjax.convert to-jax --kind var --model d16 --input var_d16.pth --output ckpt/var_d16
    python -m ddjax.convert to-jax --kind var_vae --input vae_ch160v4096z32.pth --output ckpt/vae
VAR-DD students (microsoft/distilled_decoding VAR-DD/var-d16.pth, ...): --kind var_dd with
--model d16 | d20 | d24 (weights from trainer.ema_parameters, else trainer.var_wo_ddp; to-torch
writes both, as the official sample.py reads them):
    python -m ddjax.convert to-jax --kind var_dd --model d16 --input var-d16.pth --output ckpt/var_dd16
    python -m ddjax.convert to-torch --kind var_dd --input ckpt/var_dd16 --output var-d16.pth
"""

from __future__ import annotations

import argparse
import ast
import logging
import sys
from typing import Any

from ddjax.convert import api
from ddjax.utils.torch_io import CheckpointError

KINDS = api.KINDS
build_config = api.build_config
config_from_meta = api.config_from_meta


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def to_jax(kind: str, model: str | None, src: str, dst: str, overrides: dict[str, Any],
           weights_key: str | None = None, overwrite: bool = False,
           ignore: tuple[str, ...] = ()) -> str:
    """PyTorch checkpoint -> ddjax Orbax directory; returns the directory."""
    config = api.build_config(kind, model, overrides)
    return api.torch_to_jax(src, dst, kind, config, weights_key, ignore=ignore, overwrite=overwrite)


def to_torch(kind: str, src: str, dst: str, nest_under: tuple[str, ...] | None = None,
             vq_codebook_used: bool = True) -> str:
    """ddjax Orbax directory -> `.safetensors` or `.pt` with the official key names."""
    return api.jax_to_torch(src, dst, kind, nest_under=nest_under, vq_codebook_used=vq_codebook_used)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddjax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("to-jax", help="PyTorch checkpoint -> ddjax Orbax directory")
    a.add_argument("--kind", required=True, choices=KINDS)
    a.add_argument("--model", help="variant: GPT-B, GPT-L, ... (gpt and dd), VQ-16, VQ-8 (vq) or "
                   "d16, d20, d24, d30 (var)")
    a.add_argument("--input", required=True, help=".pt/.pth or .safetensors file")
    a.add_argument("--output", required=True, help="directory to write")
    a.add_argument("--weights-key", help="where the weights sit (ema, model, ...); default: detect, "
                   "preferring ema")
    a.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="model config override, e.g. --set vocab_size=16384 --set block_size=576 "
                   "(dd: also --set codebook_dim=8)")
    a.add_argument("--ignore", action="append", default=[], metavar="REGEX",
                   help="checkpoint keys to skip (beyond the known buffers)")
    a.add_argument("--overwrite", action="store_true")
    b = sub.add_parser("to-torch", help="ddjax Orbax directory -> official PyTorch key names")
    b.add_argument("--kind", required=True, choices=KINDS)
    b.add_argument("--input", required=True, help="ddjax directory (from to-jax or training)")
    b.add_argument("--output", required=True, help=".safetensors (no torch needed) or .pt")
    b.add_argument("--nest-under", metavar="KEYS",
                   help=".pt only: comma-separated top-level keys for the weights (default: model "
                   "for gpt/vq, model,ema for dd, bare for var/var_vae; '' for a bare state dict)")
    b.add_argument("--no-codebook-used", action="store_true",
                   help="vq: leave out the quantize.codebook_used buffer (for VQModels built with "
                   "codebook_show_usage=False)")
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
                         args.weights_key, args.overwrite, tuple(args.ignore))
        else:
            nest = None
            if args.nest_under is not None:
                nest = tuple(k for k in args.nest_under.split(",") if k)
            out = to_torch(args.kind, args.input, args.output, nest, not args.no_codebook_used)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
