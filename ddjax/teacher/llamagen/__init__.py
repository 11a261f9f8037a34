"""LlamaGen (class- and text-conditional GPT, VQ-16/VQ-8 tokenizer), the first teacher family.

    from ddjax.teacher import llamagen
    cfg = llamagen.gpt_config("GPT-B", vocab_size=16384, block_size=256, num_classes=1000)
    params = llamagen.load_gpt("c2i_B_256.pt", cfg)
    logits = llamagen.GPT(cfg).apply({"params": params}, tokens, labels)  # [B, L, vocab]

Text-conditional models take `Captions` (features with a padding mask) in place of labels.
`family.LlamaGenTeacher` wraps them in the `ddjax.teacher.Teacher` interface.
"""

from ddjax.teacher.llamagen.captions import Captions, CaptionSet, load_t5_feature
from ddjax.teacher.llamagen.gpt import GPT, VARIANTS, GPTConfig, gpt_config, init_cache, init_params
from ddjax.teacher.llamagen.loading import load_gpt, load_vq
from ddjax.teacher.llamagen.sampling import SamplingSettings, sample
from ddjax.teacher.llamagen.vq import VQConfig, VQModel, vq_config

__all__ = ["GPT", "GPTConfig", "VARIANTS", "CaptionSet", "Captions", "SamplingSettings",
           "gpt_config", "init_cache", "init_params", "load_gpt", "load_t5_feature", "load_vq",
           "sample", "VQConfig", "VQModel", "vq_config"]
