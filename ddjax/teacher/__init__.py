"""The teacher: LlamaGen's GPT and VQ tokenizer.

    from ddjax import teacher
    cfg = teacher.gpt_config("GPT-B", vocab_size=16384, block_size=256, num_classes=1000)
    params = teacher.load_gpt("c2i_B_256.pt", cfg)
    logits = teacher.GPT(cfg).apply({"params": params}, tokens, labels)  # [B, L, vocab]
"""

from ddjax.teacher.gpt import (
    GPT,
    VARIANTS,
    GPTConfig,
    gpt_config,
    init_cache,
    init_params,
)
from ddjax.teacher.loading import load_gpt, load_vq
from ddjax.teacher.vq import VQConfig, VQModel, vq_config

__all__ = [
    "GPT",
    "GPTConfig",
    "VARIANTS",
    "gpt_config",
    "init_cache",
    "init_params",
    "load_gpt",
    "load_vq",
    "VQConfig",
    "VQModel",
    "vq_config",
]
