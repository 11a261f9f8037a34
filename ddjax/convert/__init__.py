"""Checkpoint conversion between PyTorch (LlamaGen / official DD) and ddjax.

    python -m ddjax.convert to-jax   --kind gpt --model GPT-B --input c2i_B_256.pt --output DIR
    python -m ddjax.convert to-torch --kind gpt --input DIR --output gpt_b.safetensors
"""

from ddjax.convert.api import export_torch, import_torch, load_jax, save_jax
from ddjax.utils.state_dict import check_params, flax_to_torch, torch_key, torch_to_flax
from ddjax.utils.torch_io import (
    CheckpointError,
    read_state_dict,
    unwrap_state_dict,
    write_state_dict,
)

__all__ = [
    "export_torch",
    "import_torch",
    "load_jax",
    "save_jax",
    "CheckpointError",
    "check_params",
    "flax_to_torch",
    "read_state_dict",
    "torch_key",
    "torch_to_flax",
    "unwrap_state_dict",
    "write_state_dict",
]
