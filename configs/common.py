"""Shared config pieces (plain data): `parse_arg`, the digits demo teacher's blocks, the flow
map's defaults. Config files load this file by path (`load_common()` in each), so no config
edits sys.path or imports the library."""

from __future__ import annotations

import ast
from typing import Any

import ml_collections as mlc

_none = mlc.config_dict.placeholder

# The shipped digits teacher (ddjax/assets/digits; its meta.json records the same values,
# tests/test_configs.py checks they agree). `ddjax:` paths resolve inside the package.
DIGITS_ASSETS = "ddjax:assets/digits"
DIGITS_GPT = {"vocab_size": 128, "block_size": 64, "num_classes": 10, "cls_token_num": 1,
              "n_layer": 4, "dim": 128, "n_head": 4, "multiple_of": 32,
              "class_dropout_prob": 0.1,  # the null class for CFG
              # No dropout: with the shift augmentation the short run does not overfit.
              "token_dropout_p": 0.0, "resid_dropout_p": 0.0, "ffn_dropout_p": 0.0}
DIGITS_VQ = {"codebook_size": 128, "codebook_embed_dim": 8, "codebook_l2_norm": True, "ch": 32,
             "encoder_ch_mult": (1, 1, 2), "decoder_ch_mult": (1, 1, 2), "z_channels": 32,
             "num_res_blocks": 1}  # ch_mult of length 3: 4x downsampling, 32 px -> 8x8 tokens
DIGITS_IMAGE_SIZE = 32
# The teacher's sampling settings, chosen by FID (experiments/digits_teacher).
DIGITS_SAMPLING = {"cfg_scale": 1.5, "cfg_interval": -1, "temperature": 1.0, "top_k": 32,
                   "top_p": 1.0, "greedy": False}

# ddjax.mapper.flow.FlowSettings' measured defaults (experiments/flow_solver; checked equal by
# tests/test_configs.py).
FLOW_DEFAULTS = {"solver": "rk4", "num_steps": 32, "t_min": 1e-3, "schedule": "cubic",
                 "support_k": _none(int), "prune_t": 0.1, "prune_k": 512, "prune_tol": 1e-6, "chunk": 8}


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


def model_block(fields: dict[str, Any]) -> mlc.ConfigDict:
    return mlc.ConfigDict(dict(fields))


def teacher_block(variant: str, checkpoint: str, model: dict[str, Any], family: str = "llamagen"
                  ) -> mlc.ConfigDict:
    """config.teacher: family, variant, weights and GPTConfig overrides (None keeps the variant's)."""
    return mlc.ConfigDict({
        "family": family, "variant": variant,
        "checkpoint": checkpoint,  # .pt / .safetensors / ddjax dir / ddjax:...; "" only with random_init
        "weights_key": _none(str),  # ema / model / ...; None = detect
        "random_init": False,  # allow a random teacher (tiny preset, benchmarks)
        "dtype": "float32",  # compute dtype
        "param_dtype": "float32",
        "model": model_block(model)})


def vq_block(variant: str, checkpoint: str, model: dict[str, Any], image_size: int) -> mlc.ConfigDict:
    """config.vq: the tokenizer's weights and VQConfig overrides."""
    return mlc.ConfigDict({"variant": variant, "checkpoint": checkpoint, "weights_key": _none(str),
                           "random_init": False, "dtype": "float32", "model": model_block(model),
                           "image_size": image_size})
