"""Loading teacher weights: PyTorch `.pt`/`.safetensors` files or ddjax (Orbax) directories."""

from __future__ import annotations

import os
from typing import Any

import jax

from ddjax.teacher.llamagen import gpt as gpt_lib
from ddjax.teacher.llamagen import vq as vq_lib
from ddjax.utils.checkpoint import load_params
from ddjax.utils.state_dict import torch_to_flax
from ddjax.utils.torch_io import read_state_dict


def abstract_params(init_fn, config: Any) -> Any:
    """Shapes and dtypes of `init_fn(config, rng)` without allocating the weights."""
    return jax.eval_shape(lambda: init_fn(config, jax.random.PRNGKey(0)))


def load_weights(path: str, template: Any, kind: str, weights_key: str | None = None) -> Any:
    """Params for `template` from a ddjax directory or a PyTorch checkpoint file.

    Raises a CheckpointError naming every missing, unexpected or mis-shaped key.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{kind} checkpoint not found: {path!r} (convert one with "
            f"`python -m ddjax.convert to-jax --kind {kind} ...` or point the config at a .pt file)"
        )
    if os.path.isdir(path):
        params, _ = load_params(path, template, kind=kind)
        return params
    return torch_to_flax(read_state_dict(path, weights_key), template, source=path)


def load_gpt(path: str, config: Any, weights_key: str | None = None) -> Any:
    """LlamaGen GPT params for `config` from `.pt`, `.safetensors` or a ddjax directory."""
    return load_weights(path, abstract_params(gpt_lib.init_params, config), "gpt", weights_key)


def load_vq(path: str, config: Any, weights_key: str | None = None) -> Any:
    """LlamaGen VQ params for `config` from `.pt`, `.safetensors` or a ddjax directory."""
    return load_weights(path, abstract_params(vq_lib.init_params, config), "vq", weights_key)
