"""The DD student (the official `DDTransformer`, LlamaGen/autoregressive/models/dd.py) in Flax.

Inputs are continuous: x_t [B, L, d] holds codebook vectors at the first t positions and noise
after. The sequence [class token, x_1..x_L] gets `n_d_embed` (1 for the class token and the
first t data positions, 0 for noise) and runs through the teacher's blocks with causal
attention and 2-D RoPE; output i predicts token i (no shift) through two heads: the teacher's
logits head and the adaLN continuous head `final_layer_conti`. Parameter names and shapes are
those of the PyTorch module, so checkpoints convert by the generic renaming.

Text-conditional (t2i) students: the official class builds a `CaptionEmbedder` for
model_type="t2i" but marks the branch unfinished, and its forward cannot run (its n_d
embedding has L + 1 rows for cls_token_num + L positions; its final layer adds [B, 120, dim] to
[1, 2, dim]). ddjax completes it in the way the c2i case already implies: the caption tokens
(left-padded, padding masked as in the teacher) take the class token's place and all count as
data for `n_d_embed`; the continuous head is modulated by the mean of the real caption tokens'
embeddings (for one class token, that token itself). The parameter names are the official ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddjax.teacher.llamagen.captions import Captions, check_captions, is_captions
from ddjax.teacher.llamagen.captions import key_mask as caption_key_mask
from ddjax.teacher.llamagen.gpt import CaptionEmbedder, GPTConfig, LabelEmbedder
from ddjax.teacher.llamagen.layers import RMSNorm, TransformerBlock, ffn_hidden_dim, rope_table_2d


@dataclasses.dataclass(frozen=True)
class DDConfig:
    """The student: the teacher's GPTConfig (c2i with one class token, or t2i) plus the code
    dimension."""

    gpt: GPTConfig
    codebook_dim: int = 8

    def __post_init__(self):
        if self.gpt.model_type == "c2i" and self.gpt.cls_token_num != 1:
            raise ValueError("a class-conditional DD student has one class token "
                             f"(cls_token_num=1), got {self.gpt.cls_token_num}")

    @property
    def is_t2i(self) -> bool:
        return self.gpt.model_type == "t2i"

    @property
    def block_size(self) -> int:
        return self.gpt.block_size


def dd_config(teacher: GPTConfig, codebook_dim: int = 8, **overrides: Any) -> DDConfig:
    """The student config for a teacher: same sizes, no dropout (the official defaults)."""
    gpt = dataclasses.replace(teacher, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0,
                              drop_path_rate=0.0, class_dropout_prob=0.0, **overrides)
    return DDConfig(gpt, codebook_dim)


class FinalLayer(nn.Module):
    """LayerNorm (no affine, eps 1e-6), x * (1 + scale) + shift with (shift, scale) =
    scale_shift_table + the class embedding, then Linear(dim -> d)."""

    dim: int
    out_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        """x [B, T, dim], cond [B, 1, dim] -> [B, T, out_dim]."""
        table = self.param("scale_shift_table",
                           lambda k, s, d: jax.random.normal(k, s, d) / self.dim**0.5, (2, self.dim),
                           self.param_dtype)
        mod = table[None].astype(self.dtype) + cond.astype(self.dtype)  # [B, 2, dim]
        shift, scale = mod[:, :1], mod[:, 1:]
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        h = ((xf - mean) * jax.lax.rsqrt(var + 1e-6)).astype(self.dtype)
        h = h * (1 + scale) + shift
        return nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=nn.initializers.normal(0.02), name="linear")(h)


class DDModel(nn.Module):
    """The DD student. `__call__(x_t, cond, t) -> (continuous [B, L, d], logits [B, L, V])`;
    cond: class labels [B] (c2i) or `Captions` (t2i)."""

    config: DDConfig

    def setup(self):
        c = self.config.gpt
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        if self.config.is_t2i:
            self.cls_embedding = CaptionEmbedder(c.caption_dim, c.dim, 0.0, **kw)
        else:
            # The official student always keeps the null row (num_classes + 1), dropout off.
            self.cls_embedding = LabelEmbedder(c.num_classes, c.num_classes + 1, c.dim, 0.0, **kw)
        self.tok_embeddings = nn.Dense(c.dim, kernel_init=nn.initializers.normal(0.02), **kw)
        hidden = ffn_hidden_dim(c.dim, c.multiple_of, c.ffn_dim_multiplier)
        self.layers = [
            TransformerBlock(c.dim, c.n_head, c.kv_heads, hidden, c.norm_eps,
                             attention_impl=c.attention_impl, **kw)
            for _ in range(c.n_layer)
        ]
        self.norm = RMSNorm(c.dim, c.norm_eps, **kw)
        self.output = nn.Dense(c.vocab_size, use_bias=False, kernel_init=nn.initializers.zeros, **kw)
        self.final_layer_conti = FinalLayer(c.dim, self.config.codebook_dim, **kw)
        self.n_d_embed = nn.Embed(2, c.dim, embedding_init=nn.initializers.normal(0.02), **kw)
        self.rope = jnp.asarray(rope_table_2d(c.grid_size, c.head_dim, c.rope_base, c.cls_token_num))

    def embed_cond(self, cond: Any) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """-> (condition tokens [B, cls, dim], the final layer's condition [B, 1, dim],
        caption mask [B, cls] or None)."""
        c = self.config.gpt
        if not self.config.is_t2i:
            if is_captions(cond):
                raise ValueError("a class-conditional DD student takes labels [B], got Captions")
            emb = self.cls_embedding(cond, None, False)  # [B, 1, dim]
            return emb, emb, None
        if not is_captions(cond):
            cond = Captions(cond, jnp.ones(cond.shape[:2], bool))
        check_captions(cond, c.cls_token_num, c.caption_dim)
        mask = jnp.asarray(cond.mask).astype(bool)
        feats = cond.features * mask[..., None].astype(cond.features.dtype)
        emb = self.cls_embedding(feats, None, False)  # [B, cls, dim]
        w = mask[..., None].astype(jnp.float32)
        total = (emb.astype(jnp.float32) * w).sum(1, keepdims=True)
        pooled = total / jnp.maximum(w.sum(1, keepdims=True), 1.0)
        return emb, pooled.astype(emb.dtype), mask

    def __call__(self, x: jax.Array, cond: Any, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, L, d] (codes before t, noise after), cond labels [B] int or Captions, t [B] int
        -> (continuous predictions [B, L, d] float32, logits [B, L, vocab] float32)."""
        c = self.config.gpt
        b, n, _ = x.shape
        if n != c.block_size:
            raise ValueError(f"x must hold block_size={c.block_size} positions, got {n}")
        k = c.cls_token_num
        emb, final_cond, mask = self.embed_cond(cond)
        h = jnp.concatenate([emb.astype(c.dtype), self.tok_embeddings(x.astype(c.dtype))], axis=1)
        # Condition tokens and the first t data positions are "data" (1), the rest noise (0).
        is_data = jnp.arange(k + n)[None, :] <= jnp.asarray(t).reshape(b, 1) + (k - 1)
        h = h + self.n_d_embed(is_data.astype(jnp.int32))
        rope = self.rope[: k + n]
        km = None if mask is None else caption_key_mask(Captions(emb, mask), k + n)
        for layer in self.layers:
            h, _ = layer(h, rope, None, 0, True, km)
        logits = self.output(self.norm(h)).astype(jnp.float32)[:, k:]
        cont = self.final_layer_conti(h, final_cond).astype(jnp.float32)[:, k:]
        return cont, logits


def dummy_cond(config: DDConfig, batch: int = 1) -> Any:
    """A condition of the right kind and shape: labels [B] or empty-caption Captions."""
    g = config.gpt
    if config.is_t2i:
        return Captions(jnp.zeros((batch, g.cls_token_num, g.caption_dim), jnp.float32),
                        jnp.ones((batch, g.cls_token_num), bool))
    return jnp.zeros((batch,), jnp.int32)


def init_params(config: DDConfig, rng: jax.Array) -> Any:
    """Random student parameters (the official init: normal(0.02), zero logits head)."""
    x = jnp.zeros((1, config.block_size, config.codebook_dim), jnp.float32)
    return jax.jit(lambda k: DDModel(config).init(k, x, dummy_cond(config),
                                                  jnp.zeros((1,), jnp.int32))["params"])(rng)


def init_from_teacher(student: Any, teacher: Any) -> Any:
    """Copies what the official `init_with_teacher` copies: the class table, every block, the
    final norm and the logits head. The rest (tok_embeddings, n_d_embed, final_layer_conti)
    keeps its fresh initialisation."""
    out = dict(student)
    if "embedding_table" in student["cls_embedding"]:
        t_rows = teacher["cls_embedding"].get("embedding_table", {}).get("embedding")
        s_rows = student["cls_embedding"]["embedding_table"]["embedding"]
        if t_rows is None or t_rows.shape != s_rows.shape:
            shape = None if t_rows is None else t_rows.shape
            raise ValueError(f"teacher class table {shape} != student {s_rows.shape} "
                             "(the teacher needs its null-class row)")
    else:  # t2i: the caption MLP and the null caption (the official init would fail here)
        got = jax.tree_util.tree_map(jnp.shape, teacher["cls_embedding"])
        want = jax.tree_util.tree_map(jnp.shape, student["cls_embedding"])
        if got != want:
            raise ValueError(f"teacher caption embedder {got} != student {want}")
    out["cls_embedding"] = teacher["cls_embedding"]
    for name in student:
        if name.startswith("layers_") or name in ("norm", "output"):
            if name not in teacher:
                raise ValueError(f"teacher params have no {name!r}")
            out[name] = teacher[name]
    return jax.tree_util.tree_map(lambda s, v: jnp.asarray(v, jnp.asarray(s).dtype), student, out)


# -- the sampling-side pieces of the official module ---------------------------------------
def perturb(data: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """X_t: data at positions < t, noise at positions >= t. data/noise [B, L, d], t [B]."""
    keep = jnp.arange(data.shape[1])[None, :, None] < jnp.asarray(t).reshape(-1, 1, 1)
    return jnp.where(keep, data, noise)


def nearest_code(x: jax.Array, codebook: jax.Array) -> jax.Array:
    """argmin_k |x - c_k|^2 via |c|^2 - 2 x.c (never a [K, B, L, d] tensor). x [..., d] -> [...]."""
    d2 = jnp.sum(codebook * codebook, -1) - 2.0 * jnp.einsum("...d,kd->...k", x, codebook)
    return jnp.argmin(d2, axis=-1).astype(jnp.int32)


def pass_through(cont: jax.Array, logits: jax.Array, x_t: jax.Array, t: jax.Array,
                 codebook: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Replaces the predictions at positions < t by the input: its vectors, and one-hot logits
    (0 at the input's nearest code, -inf elsewhere)."""
    given = jnp.arange(x_t.shape[1])[None, :] < jnp.asarray(t).reshape(-1, 1)  # [B, L]
    idx = nearest_code(x_t, codebook)
    onehot = jnp.where(jax.nn.one_hot(idx, logits.shape[-1], dtype=bool), 0.0, -jnp.inf)
    logits = jnp.where(given[..., None], onehot, logits)
    cont = jnp.where(given[..., None], x_t.astype(jnp.float32), cont)
    return cont, logits


def final_predict(params: Any, config: DDConfig, x_t: jax.Array, labels: jax.Array, t: jax.Array,
                  codebook: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The student's prediction with positions < t passed through (the official `final_predict`).

    Returns (continuous [B, L, d], logits [B, L, V]).
    """
    cont, logits = DDModel(config).apply({"params": params}, x_t, labels, t)
    return pass_through(cont, logits, x_t, t, codebook)


def final_sequence(cont: jax.Array, logits: jax.Array, codebook: jax.Array, split_t: int) -> jax.Array:
    """Positions < split_t: codebook[argmax logits]; positions >= split_t: the continuous head."""
    discrete = codebook[jnp.argmax(logits, axis=-1)]
    pos = jnp.arange(cont.shape[1])[None, :, None]
    return jnp.where(pos < split_t, discrete, cont)


def param_count(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
