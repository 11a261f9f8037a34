"""LlamaGen's GPT (`autoregressive/models/gpt.py`) as a Flax Linen module.

Class-conditional (`c2i`, one class token, class table with a null row for CFG) and
text-conditional (`t2i`, caption features through an MLP, a learned unconditional caption;
the condition is a `captions.Captions` batch whose padding mask is applied as LlamaGen's
`emb_masks`). Three entry points share the weights:
  * `__call__`  teacher forcing: logits [B, L, vocab] aligned with the tokens;
  * `prefill`   the condition tokens into a KV cache, logits for the first image token;
  * `decode`    T new tokens against the cache, logits [B, T, vocab].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddjax.teacher.llamagen.captions import check_captions, is_captions
from ddjax.teacher.llamagen.captions import key_mask as caption_key_mask
from ddjax.teacher.llamagen.layers import (
    KVCache,
    RMSNorm,
    TransformerBlock,
    accumulating_dot,
    cache_layout,
    ffn_hidden_dim,
    rope_table_2d,
)

# name -> (n_layer, n_head, dim, default model_type); parameter counts as in LlamaGen.
VARIANTS: dict[str, tuple[int, int, int, str]] = {
    "GPT-B": (12, 12, 768, "c2i"),  # 111M
    "GPT-L": (24, 16, 1024, "c2i"),  # 343M
    "GPT-XL": (36, 20, 1280, "c2i"),  # 775M
    "GPT-XXL": (48, 24, 1536, "c2i"),  # 1.4B
    "GPT-XXXL": (48, 40, 2560, "c2i"),  # 3.9B
    "GPT-1B": (22, 32, 2048, "t2i"),  # 1.2B
    "GPT-3B": (24, 32, 3200, "t2i"),  # 3.1B
    "GPT-7B": (32, 32, 4096, "t2i"),  # 6.6B
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name: Any) -> Any:
    """'float32' | 'bfloat16' | 'float16' (or a dtype) -> jnp dtype."""
    if isinstance(name, str):
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}")
        return _DTYPES[name]
    return name


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """LlamaGen `ModelArgs`, with compute/param dtypes and the attention implementation."""

    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    num_classes: int = 1000
    caption_dim: int = 2048
    class_dropout_prob: float = 0.1
    model_type: str = "c2i"
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str | None = None

    def __post_init__(self):
        if self.model_type not in ("c2i", "t2i"):
            raise ValueError(f"model_type must be 'c2i' or 't2i', got {self.model_type!r}")
        if self.dim % self.n_head:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.kv_heads})")
        if math.isqrt(self.block_size) ** 2 != self.block_size:
            raise ValueError(f"block_size ({self.block_size}) must be a square (a 2-D token grid)")
        if (self.dim // self.n_head) % 4:
            raise ValueError(f"head dim ({self.dim // self.n_head}) must be a multiple of 4 for 2-D RoPE")
        if self.attn_dropout_p:
            raise ValueError("attn_dropout_p > 0 is not supported (LlamaGen trains with 0)")
        object.__setattr__(self, "dtype", as_dtype(self.dtype))
        object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype))

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def num_cond_rows(self) -> int:
        """Rows of the class table: the classes, plus the null class when CFG dropout is on."""
        return self.num_classes + (1 if self.class_dropout_prob > 0 else 0)

    @property
    def seq_len(self) -> int:
        """Condition tokens plus image tokens: the KV cache length."""
        return self.cls_token_num + self.block_size


def gpt_config(variant: str = "GPT-B", **overrides: Any) -> GPTConfig:
    """A config for a named LlamaGen variant (`VARIANTS`), e.g. gpt_config('GPT-B', vocab_size=16384)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown GPT variant {variant!r}; choose one of {sorted(VARIANTS)}")
    n_layer, n_head, dim, model_type = VARIANTS[variant]
    base: dict[str, Any] = dict(n_layer=n_layer, n_head=n_head, dim=dim, model_type=model_type)
    if overrides.get("model_type", model_type) == "t2i":
        base["cls_token_num"] = 120
    base.update(overrides)
    unknown = set(base) - {f.name for f in dataclasses.fields(GPTConfig)}
    if unknown:
        raise ValueError(f"unknown GPT config fields: {sorted(unknown)}")
    return GPTConfig(**base)


class LabelEmbedder(nn.Module):
    """Class table [num_classes (+1 null row), dim]; training drops labels to the null class."""

    num_classes: int
    num_rows: int
    dim: int
    dropout_prob: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, labels: jax.Array, drop: jax.Array | None, train: bool) -> jax.Array:
        """labels [B] int -> [B, 1, dim]. `drop` [B] bool forces the null class."""
        table = nn.Embed(self.num_rows, self.dim, embedding_init=nn.initializers.normal(0.02),
                         dtype=self.dtype, param_dtype=self.param_dtype, name="embedding_table")
        if (drop is not None or (train and self.dropout_prob > 0)) and self.num_rows == self.num_classes:
            raise ValueError("dropping to the null class needs class_dropout_prob > 0 (no null row)")
        if train and self.dropout_prob > 0:
            rand = jax.random.uniform(self.make_rng("dropout"), labels.shape) < self.dropout_prob
            drop = rand if drop is None else (drop | rand)
        if drop is not None:
            labels = jnp.where(drop, self.num_classes, labels)
        return table(labels)[:, None, :]


class CaptionEmbedder(nn.Module):
    """Caption features [B, N, caption_dim] -> MLP (GELU-tanh) -> [B, N, dim]."""

    caption_dim: int
    dim: int
    uncond_prob: float
    token_num: int = 120
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, caption: jax.Array, drop: jax.Array | None, train: bool) -> jax.Array:
        uncond = self.param(
            "uncond_embedding",
            lambda key, shape: jax.random.normal(key, shape) / self.caption_dim**0.5,
            (self.token_num, self.caption_dim),
        )
        if train and self.uncond_prob > 0:
            rand = jax.random.uniform(self.make_rng("dropout"), caption.shape[:1]) < self.uncond_prob
            drop = rand if drop is None else (drop | rand)
        if drop is not None:
            # LlamaGen always keeps 120 rows (and samples only 120-token captions): a shorter
            # caption uses the first rows.
            if caption.shape[1] > self.token_num:
                raise ValueError(f"captions of {caption.shape[1]} tokens exceed the "
                                 f"{self.token_num} rows of uncond_embedding")
            null = uncond[: caption.shape[1]].astype(caption.dtype)
            caption = jnp.where(drop[:, None, None], null, caption)
        return CaptionMLP(self.dim, self.dtype, self.param_dtype, name="cap_proj")(caption)


class CaptionMLP(nn.Module):
    """fc1 -> GELU(tanh) -> fc2, no biases (LlamaGen's `MLP`)."""

    dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel_init=nn.initializers.normal(0.02))
        h = nn.gelu(nn.Dense(self.dim, name="fc1", **kw)(x), approximate=True)
        return nn.Dense(self.dim, name="fc2", **kw)(h)


class GPT(nn.Module):
    """LlamaGen's `Transformer`. See the module docstring for the three entry points.

    weight_major: the Dense kernels arrive as transposes of [out, in] buffers
    (`sampling.weight_major_params`) and are applied as kernel^T x^T (`layers.accumulating_dot`):
    the same model, faster on the CPU at decoding's few rows. The sampler sets it.
    """

    config: GPTConfig
    weight_major: bool = False

    def setup(self):
        c = self.config
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        if c.model_type == "c2i":
            self.cls_embedding = LabelEmbedder(
                c.num_classes, c.num_cond_rows, c.dim, c.class_dropout_prob, **kw
            )
        else:
            self.cls_embedding = CaptionEmbedder(c.caption_dim, c.dim, c.class_dropout_prob, **kw)
        self.tok_embeddings = nn.Embed(
            c.vocab_size, c.dim, embedding_init=nn.initializers.normal(c.initializer_range), **kw
        )
        self.tok_dropout = nn.Dropout(c.token_dropout_p)
        hidden = ffn_hidden_dim(c.dim, c.multiple_of, c.ffn_dim_multiplier)
        rates = np.linspace(0.0, c.drop_path_rate, c.n_layer)
        self.layers = [
            TransformerBlock(
                c.dim, c.n_head, c.kv_heads, hidden, c.norm_eps, c.resid_dropout_p,
                c.ffn_dropout_p, float(rates[i]), attention_impl=c.attention_impl,
                weight_major=self.weight_major, **kw,
            )
            for i in range(c.n_layer)
        ]
        self.norm = RMSNorm(c.dim, c.norm_eps, **kw)
        # LlamaGen zero-initialises the output head.
        # Logits leave the head in float32 (accumulated in float32 for bf16 compute).
        self.output = nn.Dense(c.vocab_size, use_bias=False, kernel_init=nn.initializers.zeros,
                               dot_general=accumulating_dot(c.dtype, jnp.float32, self.weight_major),
                               **kw)
        self.rope = jnp.asarray(rope_table_2d(c.grid_size, c.head_dim, c.rope_base, c.cls_token_num))

    # -- pieces ---------------------------------------------------------------------------
    def embed_cond(self, cond: Any, drop: jax.Array | None = None, train: bool = False):
        """cond: labels [B] (c2i) or `Captions` [B, cls, caption_dim] (t2i; bare caption
        features [B, cls, caption_dim] are taken as unpadded) -> [B, cls, dim]."""
        c = self.config
        if c.model_type == "t2i":
            if is_captions(cond):
                check_captions(cond, c.cls_token_num, c.caption_dim)
                # Padding is zeroed as LlamaGen's sample_t2i does (c_indices = emb * mask): it
                # then cannot matter even for an empty caption, whose last (padded) position
                # sees only itself. The null caption replaces the zeroed rows whole.
                cond = cond.features * jnp.asarray(cond.mask)[..., None].astype(cond.features.dtype)
            elif (cond.ndim != 3 or cond.shape[1] < c.cls_token_num
                  or cond.shape[2] != c.caption_dim):
                # As LlamaGen, longer features are cut to their first cls_token_num tokens.
                raise ValueError(f"a t2i GPT takes caption features [B, {c.cls_token_num}, "
                                 f"{c.caption_dim}] (or Captions), got {tuple(cond.shape)}")
        elif is_captions(cond):
            raise ValueError("a c2i GPT takes class labels [B], got Captions")
        return self.cls_embedding(cond, drop, train)[:, : c.cls_token_num]

    def blocks(self, h: jax.Array, start: jax.Array | int, caches: list[KVCache] | None = None,
               train: bool = False, key_mask: jax.Array | None = None
               ) -> tuple[jax.Array, list[KVCache] | None]:
        """Runs all blocks on h [B, T, dim] at absolute positions start..start+T-1.
        key_mask [B, S] (S = T, or the cache length): keys hidden from other positions."""
        rope = jax.lax.dynamic_slice_in_dim(self.rope, start, h.shape[1], axis=0)
        new_caches = [] if caches is not None else None
        for i, layer in enumerate(self.layers):
            cache = caches[i] if caches is not None else None
            h, cache = layer(h, rope, cache, start, not train, key_mask)
            if new_caches is not None:
                new_caches.append(cache)
        return h, new_caches

    def head(self, h: jax.Array) -> jax.Array:
        """Final norm and output projection; logits in float32."""
        return self.output(self.norm(h)).astype(jnp.float32)

    # -- entry points ---------------------------------------------------------------------
    def __call__(self, tokens: jax.Array, cond: Any, *, drop: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        """Teacher forcing. tokens [B, L] int, cond as in `embed_cond` -> logits [B, L, vocab].

        logits[:, i] is the distribution of tokens[:, i] given the condition and tokens[:, :i]
        (LlamaGen feeds [cond, tokens[:, :-1]] and keeps outputs from the last cond token on).
        """
        c = self.config
        if tokens.shape[1] > c.block_size:
            raise ValueError(f"{tokens.shape[1]} tokens exceed block_size {c.block_size}")
        h = jnp.concatenate(
            [self.embed_cond(cond, drop, train), self.tok_embeddings(tokens[:, :-1])], axis=1
        )
        h = self.tok_dropout(h, deterministic=not train)
        h, _ = self.blocks(h, 0, None, train, caption_key_mask(cond, h.shape[1]))
        return self.head(h[:, c.cls_token_num - 1 :])

    def prefill(self, cond: Any, caches: list[KVCache], drop: jax.Array | None = None,
                key_mask: jax.Array | None = None):
        """Writes the condition tokens at positions 0..cls-1 -> (logits [B, vocab], caches).
        key_mask [B, cache length]: `captions.key_mask` of the cond (None: all visible)."""
        h, caches = self.blocks(self.embed_cond(cond, drop), 0, caches, key_mask=key_mask)
        return self.head(h[:, -1]), caches

    def decode(self, tokens: jax.Array, caches: list[KVCache], index: jax.Array | int,
               key_mask: jax.Array | None = None):
        """tokens [B, T] at absolute positions index.. (index >= cls_token_num) -> logits [B, T, vocab].
        key_mask [B, cache length] as in `prefill`."""
        h, caches = self.blocks(self.tok_embeddings(tokens), index, caches, key_mask=key_mask)
        return self.head(h), caches


def cache_seq_axis(config: GPTConfig) -> int:
    """The sequence axis of the KV cache arrays (`layers.cache_layout`): 2 head-major, else 1."""
    layout = cache_layout(config.attention_impl, config.dtype, config.n_head, config.head_dim)
    return 2 if layout == "bhsd" else 1


def init_cache(config: GPTConfig, batch: int, dtype: Any = None) -> list[KVCache]:
    """Zeroed KV caches, one {"k", "v"} per layer: [B, n_kv_head, S, head_dim] on the XLA
    attention path, [B, S, n_kv_head, head_dim] for the fused kernels (S = cls + block_size)."""
    if cache_seq_axis(config) == 2:
        shape = (batch, config.kv_heads, config.seq_len, config.head_dim)
    else:
        shape = (batch, config.seq_len, config.kv_heads, config.head_dim)
    dtype = as_dtype(dtype) if dtype is not None else config.dtype
    return [
        {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.n_layer)
    ]


def init_params(config: GPTConfig, rng: jax.Array) -> Any:
    """Random parameters (LlamaGen's init: normal(0.02), zero output head)."""
    b = 1
    cond = (
        jnp.zeros((b,), jnp.int32)
        if config.model_type == "c2i"
        else jnp.zeros((b, config.cls_token_num, config.caption_dim), jnp.float32)
    )
    tokens = jnp.zeros((b, 2), jnp.int32)
    return GPT(config).init(rng, tokens, cond)["params"]
