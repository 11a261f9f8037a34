"""The DD student for VAR teachers (the official `DD_Model(VAR)`, VAR/models/dd.py) in Flax.

The teacher's transformer over an extra first level: patch_nums (1,) + the teacher's, so
L' = 1 + L positions and S + 1 levels (681 and 11 for VAR's pyramid). Position 0 is the SOS
(class embedding + pos_start); position 1 + j holds the raw per-token input x_t[j] [Cvae]: the
codebook vector E[q_j] for data, N(0, I) noise after (not the teacher's f_hat map). Then

    h += n_d_embed(pos <= t)                       t = tokens given (a scale boundary)
    block i:  h += g1 * attn(...);  h += layerwise_n_d_embed_i(n);  h += g2 * ffn(...)
    hh = h + layerwise_n_d_embed_depth(n)
    logits = head(head_nm(hh, c))[:, 1:];  cont = final_layer_conti(hh, c)[:, 1:]

with the attention mask "strictly earlier levels, plus self": a token sees the SOS, the scales
before its own and its own input, so the tokens of one scale are predicted independently, as
the teacher draws them. Output j is token j (no shift). t counts tokens: the official code
takes scale indices and converts them to cum(t) = sum of pn^2 over the first t scales; every
function here works on that count, so `ddjax.student.model.perturb` / `pass_through` /
`final_sequence` and `ddjax.student.sampling.sample_dd` (with `StudentApply(config)`) serve
both families.

Parameter names follow the PyTorch module (`n_d_embed`, `layerwise_n_d_embed.{0..depth}`,
`final_layer_conti.{scale_shift_table,linear}`, the teacher's `blocks.*`, `class_emb`,
`pos_1LC` [1, 681, C], `lvl_embed` [11, C], ...).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddjax.student.model import FinalLayer, pass_through
from ddjax.teacher.var.model import AdaLNBeforeHead, AdaLNSelfAttn, VARConfig


@dataclasses.dataclass(frozen=True)
class VARDDConfig:
    """The student of a VAR teacher: the teacher's VARConfig (its patch_nums, without the extra
    SOS level) and the official switches."""

    var: VARConfig
    n_d_embed: bool = True
    layerwise_n_d_embed: bool = True

    def __post_init__(self):
        if self.layerwise_n_d_embed and not self.n_d_embed:
            raise ValueError("layerwise_n_d_embed needs n_d_embed")

    @property
    def seq_len(self) -> int:
        """Tokens L (680); the network runs over L + 1 positions."""
        return self.var.seq_len

    @property
    def levels(self) -> np.ndarray:
        """[L + 1] int32: 0 for the SOS, k + 1 for the tokens of scale k."""
        return np.concatenate([[0], self.var.levels() + 1]).astype(np.int32)

    def mask(self) -> np.ndarray:
        """[L + 1, L + 1] bool: query q sees key k iff level(q) >= level(k) + 1 or q == k."""
        lvl = self.levels
        return (lvl[:, None] >= lvl[None, :] + 1) | np.eye(len(lvl), dtype=bool)

    @property
    def boundaries(self) -> tuple[int, ...]:
        """cum(t) for t = 0 .. S - 1: the token counts a timestep may take."""
        return tuple(start for start, _ in self.var.begin_ends)


def var_dd_config(teacher: VARConfig, **overrides: Any) -> VARDDConfig:
    """The student config for a teacher: same sizes, no class dropout (the student is never
    run with CFG)."""
    return VARDDConfig(dataclasses.replace(teacher, cond_drop_rate=0.0), **overrides)


class VARDDModel(nn.Module):
    """`__call__(x_t [B, L, Cvae], labels [B], t [B] tokens) -> (cont [B, L, Cvae], logits [B, L, V])`."""

    config: VARDDConfig

    def setup(self):
        c = self.config.var
        std = math.sqrt(1 / c.embed_dim / 3)
        init = nn.initializers.truncated_normal(std)
        f32 = dict(dtype=jnp.float32, param_dtype=c.param_dtype)
        dense = lambda n, name, **kw: nn.Dense(n, kernel_init=nn.initializers.truncated_normal(0.02),
                                               name=name, **kw)
        self.word_embed = dense(c.embed_dim, "word_embed", **f32)
        self.class_emb = nn.Embed(c.num_classes + 1, c.embed_dim, embedding_init=init, **f32)
        self.pos_start = self.param("pos_start", init, (1, 1, c.embed_dim), c.param_dtype)
        self.pos_1LC = self.param("pos_1LC", init, (1, c.seq_len + 1, c.embed_dim), c.param_dtype)
        self.lvl_embed = nn.Embed(c.num_scales + 1, c.embed_dim, embedding_init=init, **f32)
        rates = np.linspace(0.0, c.drop_path_rate, c.depth)
        self.blocks = [AdaLNSelfAttn(c, float(rates[i])) for i in range(c.depth)]
        self.head_nm = AdaLNBeforeHead(c.embed_dim, c.norm_eps, c.param_dtype)
        self.head = dense(c.vocab_size, "head", dtype=c.dtype, param_dtype=c.param_dtype)
        if self.config.n_d_embed:
            self.n_d_embed = nn.Embed(2, c.embed_dim, embedding_init=nn.initializers.truncated_normal(0.02),
                                      **f32)
        if self.config.layerwise_n_d_embed:
            self.layerwise_n_d_embed = [dense(c.embed_dim, f"layerwise_n_d_embed_{i}", **f32)
                                        for i in range(c.depth + 1)]
        self.final_layer_conti = FinalLayer(c.embed_dim, c.cvae)

    def __call__(self, x: jax.Array, labels: jax.Array, t: jax.Array, *,
                 train: bool = False) -> tuple[jax.Array, jax.Array]:
        c = self.config.var
        b, n, _ = x.shape
        if n != c.seq_len:
            raise ValueError(f"x must be [B, {c.seq_len}, {c.cvae}], got {x.shape}")
        cond = self.class_emb(labels)  # [B, C]
        sos = cond[:, None] + self.pos_start.astype(jnp.float32)
        lvl = self.lvl_embed(jnp.asarray(self.config.levels))[None]
        h = jnp.concatenate([sos, self.word_embed(x.astype(jnp.float32))], axis=1)
        h = h + lvl + self.pos_1LC.astype(jnp.float32)
        nd, is_data = None, None
        if self.config.n_d_embed:
            is_data = (jnp.arange(n + 1)[None, :] <= jnp.asarray(t).reshape(b, 1)).astype(jnp.int32)
            nd = self.n_d_embed(is_data)  # [B, L + 1, C]
            h = h + nd
        table = self.n_d_embed.embedding if self.config.n_d_embed else None  # [2, C]

        def layerwise(i: int) -> jax.Array:
            # The projection of n_d_embed(is_data): computed on the two rows, then gathered
            # (the same values as projecting every position; B x (L + 1) times less work).
            return jnp.take(self.layerwise_n_d_embed[i](table.astype(jnp.float32)), is_data, axis=0)

        h = h.astype(c.dtype)
        mask = jnp.asarray(self.config.mask())
        for i, block in enumerate(self.blocks):
            between = layerwise(i) if self.config.layerwise_n_d_embed else nd
            h, _ = block(h, cond, mask, None, 0, train, between)
        hh = h.astype(jnp.float32)
        if self.config.layerwise_n_d_embed:
            hh = hh + layerwise(c.depth)
        elif nd is not None:
            hh = hh + nd
        logits = self.head(self.head_nm(hh, cond)).astype(jnp.float32)[:, 1:]
        cont = self.final_layer_conti(hh, cond[:, None]).astype(jnp.float32)[:, 1:]
        return cont, logits


def init_params(config: VARDDConfig, rng: jax.Array) -> Any:
    """Random student parameters (truncated normal; the official `init_weights` is not reproduced:
    `init_from_teacher` is how a student starts)."""
    x = jnp.zeros((1, config.seq_len, config.var.cvae), jnp.float32)
    zeros = jnp.zeros((1,), jnp.int32)
    return jax.jit(lambda k: VARDDModel(config).init(k, x, zeros, zeros)["params"])(rng)


def init_from_teacher(student: Any, teacher: Any, rng: jax.Array, init_std: float = 0.02) -> Any:
    """The official `init_with_teacher`: word_embed, class_emb, pos_start, every block, head_nm
    and head from the teacher; lvl_embed and pos_1LC row 0 from the teacher's row 0, rows 2..
    from its rows 1.., and row 1 (the first token level, new) truncated normal(init_std);
    n_d_embed truncated normal(init_std); the layerwise projections and final_layer_conti
    keep their fresh initialisation.

    The official code re-initialises `class_emb.weight[1]` (class 1's trained row) where it
    means `lvl_embed.weight[1]`; ddjax re-initialises lvl_embed row 1 and keeps every class row.
    """
    out = dict(student)
    for name in ("word_embed", "class_emb", "head_nm", "head"):
        out[name] = teacher[name]
    out["pos_start"] = teacher["pos_start"]
    for name in student:
        if name.startswith("blocks_"):
            out[name] = teacher[name]
    k_lvl, k_pos, k_nd = jax.random.split(rng, 3)
    tn = lambda k, shape: init_std * jax.random.truncated_normal(k, -2.0 / init_std, 2.0 / init_std, shape)
    lvl_t = jnp.asarray(teacher["lvl_embed"]["embedding"])
    c = lvl_t.shape[1]
    lvl = jnp.concatenate([lvl_t[:1], tn(k_lvl, (1, c)), lvl_t[1:]])
    pos_t = jnp.asarray(teacher["pos_1LC"])
    pos = jnp.concatenate([pos_t[:, :1], tn(k_pos, (1, 1, c)), pos_t[:, 1:]], axis=1)
    out["lvl_embed"] = {"embedding": lvl}
    out["pos_1LC"] = pos
    if "n_d_embed" in student:
        out["n_d_embed"] = {"embedding": tn(k_nd, student["n_d_embed"]["embedding"].shape)}
    shapes = jax.tree_util.tree_map(jnp.shape, student)
    got = jax.tree_util.tree_map(jnp.shape, out)
    if shapes != got:
        raise ValueError("teacher parameters do not fit the student (different VAR sizes?)")
    return jax.tree_util.tree_map(lambda s, v: jnp.asarray(v, jnp.asarray(s).dtype), student, out)


def final_predict(params: Any, config: VARDDConfig, x_t: jax.Array, labels: jax.Array, t: jax.Array,
                  codebook: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The official `final_predict`: positions < t (tokens) pass the input through (its vector,
    and logits 0 at its nearest code, -inf elsewhere; a matmul, never a [V, B, L, Cvae] tensor)."""
    cont, logits = VARDDModel(config).apply({"params": params}, x_t, labels, t)
    return pass_through(cont, logits, x_t, t, codebook)


def param_count(config: VARDDConfig) -> int:
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))


__all__ = ["VARDDConfig", "VARDDModel", "var_dd_config", "init_params",
           "init_from_teacher", "final_predict", "param_count"]
