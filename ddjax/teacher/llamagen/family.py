"""LlamaGen as a `ddjax.teacher.Teacher`: GPT + VQ tokenizer, one token per step in raster order.

    teacher = LlamaGenTeacher.load(gpt_cfg, "c2i_B_256.pt", vq_cfg, "vq_ds16_c2i.pt")
    ids = teacher.sample(labels, key, SamplingSettings(cfg_scale=2.0, top_k=8000))  # [B, 256]
    images = teacher.decode_ids(ids)                                                # [B, 256, 256, 3]
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddjax.teacher.base import Teacher, TokenRule
from ddjax.teacher.llamagen import gpt as gpt_lib
from ddjax.teacher.llamagen import loading
from ddjax.teacher.llamagen import sampling as sampling_lib
from ddjax.teacher.llamagen import vq as vq_lib
from ddjax.teacher.llamagen.captions import Captions, CaptionSet, is_captions


def vq_codebook(vq_params: Any, vq_cfg: vq_lib.VQConfig) -> np.ndarray:
    """The VQ codebook [K, d] as the teacher's tokens index it (L2-normalised when configured)."""
    return np.asarray(vq_lib.VQModel(vq_cfg).apply({"params": vq_params}, method=vq_lib.VQModel.codebook))


@functools.partial(jax.jit, static_argnames=("config", "settings"))
def _log_probs(params: Any, tokens: jax.Array, cond: jax.Array, *, config: gpt_lib.GPTConfig,
               settings: sampling_lib.SamplingSettings) -> jax.Array:
    model = gpt_lib.GPT(config)
    if settings.use_cfg:
        b = tokens.shape[0]
        drop = jnp.concatenate([jnp.zeros(b, bool), jnp.ones(b, bool)])
        both = model.apply({"params": params}, jnp.concatenate([tokens, tokens]),
                           jax.tree_util.tree_map(lambda x: jnp.concatenate([x, x]), cond),
                           drop=drop)
        pos = jnp.arange(tokens.shape[1])
        use = (settings.cfg_interval < 0) | (pos <= settings.cfg_interval + 1)
        logits = sampling_lib.guide(both[:b], both[b:], settings.cfg_scale, use[None, :, None])
    else:
        logits = model.apply({"params": params}, tokens, cond)
    return sampling_lib.process_logits(logits, settings)


def _check_caption_set(config: gpt_lib.GPTConfig, captions: CaptionSet | None) -> None:
    """ValueError unless `captions` (if any) fits this GPT: t2i, [cls_token_num, caption_dim]."""
    if captions is None:
        return
    if config.model_type != "t2i":
        raise ValueError("a caption set is for a t2i teacher; this GPT is c2i")
    if (captions.max_len, captions.caption_dim) != (config.cls_token_num, config.caption_dim):
        raise ValueError(f"the caption set holds [{captions.max_len}, {captions.caption_dim}] "
                         f"captions, the GPT takes [{config.cls_token_num}, "
                         f"{config.caption_dim}] (cls_token_num, caption_dim)")


class LlamaGenTeacher(Teacher):
    """LlamaGen's class- (or text-) conditional GPT over VQ-16/VQ-8 tokens."""

    family = "llamagen"

    def __init__(self, config: gpt_lib.GPTConfig, params: Any, tokenizer_config: vq_lib.VQConfig | None,
                 tokenizer_params: Any, *, variant: str = "", checkpoint: str = "",
                 codebook: np.ndarray | None = None, captions: CaptionSet | None = None):
        """codebook: [K, d], only without a tokenizer (`from_codebook`); else the VQ's.
        captions: t2i only, the caption table that integer conditions index (`resolve_cond`)."""
        self.config, self.params = config, params
        _check_caption_set(config, captions)
        self.captions = captions
        self.tokenizer_config, self.tokenizer_params = tokenizer_config, tokenizer_params
        self.variant, self.checkpoint = variant or config.model_type, checkpoint
        if tokenizer_config is not None:
            codebook = vq_codebook(tokenizer_params, tokenizer_config)
        elif codebook is None:
            raise ValueError("a LlamaGenTeacher needs a VQ tokenizer or a codebook")
        self.codebook = np.asarray(codebook, np.float32)
        if self.codebook.shape[0] != config.vocab_size:
            raise ValueError(f"the VQ codebook has {self.codebook.shape[0]} codes but the GPT's "
                             f"vocab_size is {config.vocab_size}")
        if math.isqrt(config.block_size) ** 2 != config.block_size:
            raise ValueError(f"block_size {config.block_size} is not a square token grid")

    @classmethod
    def load(cls, config: gpt_lib.GPTConfig, checkpoint: str, tokenizer_config: vq_lib.VQConfig,
             tokenizer_checkpoint: str, *, variant: str = "", weights_key: str | None = None,
             tokenizer_weights_key: str | None = None) -> LlamaGenTeacher:
        """From `.pt`, `.safetensors` or ddjax directories (CheckpointError names bad keys)."""
        params = loading.load_gpt(checkpoint, config, weights_key)
        vparams = loading.load_vq(tokenizer_checkpoint, tokenizer_config, tokenizer_weights_key)
        return cls(config, params, tokenizer_config, vparams, variant=variant, checkpoint=checkpoint)

    @classmethod
    def from_codebook(cls, config: gpt_lib.GPTConfig, params: Any, codebook: np.ndarray, *,
                      variant: str = "") -> LlamaGenTeacher:
        """A teacher over a given codebook [K, d] without a tokenizer: it samples and maps noise
        but cannot decode images (studies of the flow map, tests)."""
        return cls(config, params, None, None, variant=variant, codebook=codebook)

    def _require_tokenizer(self) -> None:
        if self.tokenizer_config is None:
            raise ValueError("this teacher has no VQ tokenizer (built with from_codebook): it "
                             "cannot decode images")

    # -- shapes ------------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self.config.block_size

    @property
    def num_classes(self) -> int:
        """c2i: the classes. t2i: the captions of the caption set (0 without one)."""
        if self.config.model_type == "c2i":
            return self.config.num_classes
        return len(self.captions) if self.captions is not None else 0

    @property
    def caption_conditioned(self) -> bool:
        return self.config.model_type == "t2i"

    def with_captions(self, captions: CaptionSet | None) -> LlamaGenTeacher:
        """The same t2i teacher over another caption table."""
        _check_caption_set(self.config, captions)
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.captions = captions
        return out

    def resolve_cond(self, cond: Any) -> Any:
        """Labels [B] (c2i), Captions, or t2i caption ids [B] -> what the network takes:
        ids are looked up in the caption set on the host."""
        if self.config.model_type == "c2i" or is_captions(cond):
            return cond
        ids = np.asarray(cond)
        if ids.ndim == 1 and np.issubdtype(ids.dtype, np.integer):
            if self.captions is None:
                raise ValueError("integer conditions of a t2i teacher are caption ids: give the "
                                 "teacher a caption set (config.captions.path) or pass Captions")
            return self.captions.lookup(ids)
        if ids.ndim == 3:  # bare features: all tokens real
            return Captions(ids.astype(np.float32), np.ones(ids.shape[:2], bool))
        raise ValueError(f"a t2i condition must be Captions, caption ids [B] or features "
                         f"[B, N, caption_dim], got {ids.dtype} {ids.shape}")

    @property
    def boundaries(self) -> tuple[int, ...]:
        return tuple(range(self.config.block_size))

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.config.block_size)

    @property
    def image_size(self) -> int:
        self._require_tokenizer()
        return self.grid_size * self.tokenizer_config.downsample_factor

    @property
    def has_null_class(self) -> bool:
        return self.config.model_type != "c2i" or self.config.num_cond_rows > self.config.num_classes

    # -- the network -------------------------------------------------------------------------
    def sample(self, cond: jax.Array, key: jax.Array, settings: sampling_lib.SamplingSettings, *,
               rule: TokenRule | None = None, rule_inputs: Any = None,
               prefix_ids: jax.Array | None = None, prefix_len: int = 0,
               num_tokens: int | None = None, mesh: Any = None) -> jax.Array:
        return sampling_lib.sample(self.params, self.config, self.resolve_cond(cond), key,
                                   settings, rule=rule,
                                   rule_inputs=rule_inputs, prefix_ids=prefix_ids,
                                   prefix_len=prefix_len, num_tokens=num_tokens, mesh=mesh)

    def log_probs(self, tokens: jax.Array, cond: jax.Array,
                  settings: sampling_lib.SamplingSettings) -> jax.Array:
        cond = jax.tree_util.tree_map(jnp.asarray, self.resolve_cond(cond))
        return _log_probs(self.params, jnp.asarray(tokens, jnp.int32), cond,
                          config=self.config, settings=settings)

    # -- the tokenizer -----------------------------------------------------------------------
    def decode_latents(self, latents: jax.Array) -> np.ndarray:
        self._require_tokenizer()
        b, n, d = latents.shape
        if n != self.seq_len or d != self.code_dim:
            raise ValueError(f"latents must be [B, {self.seq_len}, {self.code_dim}], got {latents.shape}")
        g = self.grid_size
        images = vq_lib.decode_latents(self.tokenizer_params, self.tokenizer_config,
                                       jnp.asarray(latents, jnp.float32).reshape(b, g, g, d))
        return np.clip(np.asarray(images), -1.0, 1.0)  # as LlamaGen clamps decoded samples

    def latent_decoder(self):
        self._require_tokenizer()
        vcfg, g = self.tokenizer_config, self.grid_size

        def decode(vparams: Any, latents: jax.Array) -> jax.Array:
            b, _, d = latents.shape
            return vq_lib.VQModel(vcfg).apply({"params": vparams}, latents.reshape(b, g, g, d),
                                              method=vq_lib.VQModel.decode_latents)

        return decode

    def decode_ids(self, ids: jax.Array) -> np.ndarray:
        self._require_tokenizer()
        images = vq_lib.decode_ids(self.tokenizer_params, self.tokenizer_config, jnp.asarray(ids))
        return np.clip(np.asarray(images), -1.0, 1.0)
