"""DD2's networks on a LlamaGen teacher (dd2.md §3–4): one transformer, two heads.

`DD2Transformer` is the teacher's GPT with the token table replaced by a network on continuous
tokens (`tok_embeddings`, `CodebookEmbed`: the continuous-input adaptation, dd2.md §4), so it
can be conditioned on off-codebook tokens. The input sequence is [class token, x_1 .. x_{L-1}] with
causal attention, so the features at position i depend on the class and x_<i only. Two roles:

  * role "teacher": the teacher's logits head (`norm`, `output`): the adapted teacher,
    logits [B, L, V] of every position given the continuous prefix;
  * role "score": an MLP head (`head`) on (x_t [d], t, features_i) -> a velocity [d]. The
    generator and the guidance network both have this role:
      generator  q = eps - v(eps_i, t = 1 | eps_<i)        (the shifted noise in the backbone)
      guidance   m = x_t - t v(x_t, t | q_<i)              (the generated prefix in the backbone)

Role "score" also maps its backbone's inputs linearly (`tok_proj`, zero at the start), beside
`CodebookEmbed`, which nearly snaps an off-codebook input to its nearest code: the generator's
backbone reads noise.

Parameter names: the backbone's are the teacher's (`cls_embedding`, `layers_*`, `norm`), so
`adapt_teacher` and `score_from_teacher` copy them by name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddjax.teacher.llamagen.gpt import GPTConfig, LabelEmbedder
from ddjax.teacher.llamagen.layers import RMSNorm, TransformerBlock, ffn_hidden_dim, rope_table_2d

ROLES = ("teacher", "score")
# What DD2's generator is: "score", the paper's (a score network fed the shifted noise, started
# from the tuned network); "student", DD1's one-step student (`ddjax.dd2.student_generator`).
GENERATORS = ("score", "student")


def check_generator(generator: str, gen_tau: float) -> None:
    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}")
    if not gen_tau > 0:
        raise ValueError(f"gen_tau must be > 0, got {gen_tau}")


@dataclasses.dataclass(frozen=True)
class DD2Config:
    """The teacher's GPTConfig (c2i, one class token; dropout off) plus the DD2 pieces."""

    gpt: GPTConfig
    code_dim: int = 8
    head_width: int = 0  # the MLP head's width (0 = gpt.dim)
    head_depth: int = 3  # residual blocks in the MLP head
    generator: str = "score"  # GENERATORS
    gen_tau: float = 1.0  # generator "student": the softmax temperature of its gradient

    def __post_init__(self):
        if self.gpt.model_type != "c2i" or self.gpt.cls_token_num != 1:
            raise ValueError("DD2 supports class-conditional LlamaGen teachers with one class token")
        if self.head_depth < 1:
            raise ValueError(f"head_depth must be >= 1, got {self.head_depth}")
        check_generator(self.generator, self.gen_tau)

    @property
    def seq_len(self) -> int:
        return self.gpt.block_size

    @property
    def num_classes(self) -> int:
        return self.gpt.num_classes

    @property
    def width(self) -> int:
        return self.head_width or self.gpt.dim


def dd2_config(teacher: GPTConfig, code_dim: int, **overrides: Any) -> DD2Config:
    """The DD2 config of a teacher: its sizes, dropout off (the class table keeps its null row)."""
    gpt_fields = {f.name for f in dataclasses.fields(GPTConfig)}
    gpt_over = {k: v for k, v in overrides.items() if k in gpt_fields}
    own = {k: v for k, v in overrides.items() if k not in gpt_fields}
    gpt = dataclasses.replace(teacher, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0,
                              drop_path_rate=0.0, **gpt_over)
    return DD2Config(gpt, code_dim, **own)


def time_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features of t * 1000 (t in [0, 1]): [...] -> [..., dim]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (1000.0 * t.astype(jnp.float32))[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class CodebookEmbed(nn.Module):
    """A continuous token [.., d] -> [.., dim]: softmax(-|x - c_k|^2 / (2 tau^2)) @ table.

    A two-layer network (hidden units = distances to `centers` [K, d], output layer `table`
    [K, dim]) that replaces nn.Embed for continuous inputs. `adapt_teacher` starts it at the
    codebook and the teacher's token table, the exact minimiser of the adaptation objective
    sum_k |embed(c_k) - emb_k|^2 as tau -> 0 (an MLP fitted to a vocabulary-size table on d-dim
    codes stays far from it: a relative error of 0.3-0.5 on the digits teacher); tau
    (`log_tau`) sets how smoothly it interpolates between codes, and all three are trained.
    """

    vocab_size: int
    code_dim: int
    dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        centers = self.param("centers", nn.initializers.normal(1.0), (self.vocab_size, self.code_dim),
                             self.param_dtype)
        table = self.param("table", nn.initializers.normal(0.02), (self.vocab_size, self.dim),
                           self.param_dtype)
        # [1], not a scalar: state-dict formats (safetensors) store 0-d tensors as [1].
        log_tau = self.param("log_tau", nn.initializers.zeros, (1,), self.param_dtype)[0]
        xf = x.astype(jnp.float32)
        d2 = (jnp.sum(xf * xf, -1, keepdims=True) - 2.0 * xf @ centers.T.astype(jnp.float32)
              + jnp.sum(jnp.square(centers.astype(jnp.float32)), -1))
        w = jax.nn.softmax(-d2 / (2.0 * jnp.exp(2.0 * log_tau)), axis=-1)
        return (w.astype(self.dtype) @ table.astype(self.dtype)).astype(self.dtype)


class ScoreHead(nn.Module):
    """(x_t [.., d], t [..], features [.., dim]) -> velocity [.., d]: residual MLP blocks whose
    LayerNorm is modulated (shift, scale, gate) by features + time, as MAR's diffusion head."""

    width: int
    depth: int
    out_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, h: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dense = lambda n, name, init=nn.initializers.xavier_uniform(): nn.Dense(  # noqa: E731
            n, name=name, kernel_init=init, **kw)
        temb = dense(self.width, "time_fc2")(nn.silu(dense(self.width, "time_fc1")(
            time_embedding(t, 256).astype(self.dtype))))
        c = dense(self.width, "cond_proj")(h) + temb
        z = dense(self.width, "input_proj")(x.astype(self.dtype))
        for i in range(self.depth):
            mod = dense(3 * self.width, f"block_{i}_mod", nn.initializers.zeros)(nn.silu(c))
            shift, scale, gate = jnp.split(mod, 3, axis=-1)
            y = nn.LayerNorm(epsilon=1e-6, name=f"block_{i}_norm", **kw)(z) * (1 + scale) + shift
            y = dense(self.width, f"block_{i}_fc2")(nn.silu(dense(self.width, f"block_{i}_fc1")(y)))
            z = z + gate * y
        mod = dense(2 * self.width, "final_mod", nn.initializers.zeros)(nn.silu(c))
        shift, scale = jnp.split(mod, 2, axis=-1)
        y = nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, name="final_norm")(z)
        y = y * (1 + scale) + shift
        return dense(self.out_dim, "final_fc", nn.initializers.zeros)(y).astype(jnp.float32)


class DD2Transformer(nn.Module):
    """See the module docstring. `__call__` runs the role's head on every position."""

    config: DD2Config
    role: str = "score"

    def setup(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        c = self.config.gpt
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        self.cls_embedding = LabelEmbedder(c.num_classes, c.num_cond_rows, c.dim, 0.0, **kw)
        self.tok_embeddings = CodebookEmbed(c.vocab_size, self.config.code_dim, c.dim, **kw)
        hidden = ffn_hidden_dim(c.dim, c.multiple_of, c.ffn_dim_multiplier)
        self.layers = [TransformerBlock(c.dim, c.n_head, c.kv_heads, hidden, c.norm_eps,
                                        attention_impl=c.attention_impl, **kw)
                       for _ in range(c.n_layer)]
        self.norm = RMSNorm(c.dim, c.norm_eps, **kw)
        if self.role == "score":
            # CodebookEmbed nearly snaps an input to its nearest code; the generator's backbone
            # reads noise, whose every digit the tokens depend on, so it also gets it linearly
            # (zero at the start: the network starts as the adapted teacher's backbone).
            self.tok_proj = nn.Dense(c.dim, use_bias=False, kernel_init=nn.initializers.zeros, **kw)
        if self.role == "teacher":
            self.output = nn.Dense(c.vocab_size, use_bias=False, kernel_init=nn.initializers.zeros, **kw)
        else:
            self.head = ScoreHead(self.config.width, self.config.head_depth, self.config.code_dim, **kw)
        self.rope = jnp.asarray(rope_table_2d(c.grid_size, c.head_dim, c.rope_base, c.cls_token_num))

    def embed(self, x: jax.Array) -> jax.Array:
        """Continuous tokens [..., d] -> [..., dim] (the adapted token embedding, plus a linear
        map of x in role "score")."""
        x = x.astype(self.config.gpt.dtype)
        e = self.tok_embeddings(x)
        return e + self.tok_proj(x) if self.role == "score" else e

    def features(self, x: jax.Array, labels: jax.Array, drop: jax.Array | None = None) -> jax.Array:
        """x [B, L, d], labels [B] (drop [B] bool: the null class) -> normed features [B, L, dim];
        row i depends on the class and x[:, :i] only."""
        c = self.config.gpt
        if x.shape[1] != c.block_size:
            raise ValueError(f"x must hold block_size={c.block_size} positions, got {x.shape[1]}")
        h = jnp.concatenate([self.cls_embedding(labels, drop, False), self.embed(x[:, :-1])], axis=1)
        rope = self.rope[: h.shape[1]]
        for layer in self.layers:
            h, _ = layer(h, rope, None, 0, True)
        return self.norm(h)

    def logits(self, h: jax.Array) -> jax.Array:
        return self.output(h).astype(jnp.float32)

    def velocity(self, x_t: jax.Array, t: jax.Array, h: jax.Array) -> jax.Array:
        """x_t [..., d], t [...], features [..., dim] -> v [..., d] float32."""
        return self.head(x_t, t, h)

    def __call__(self, x: jax.Array, labels: jax.Array, x_t: jax.Array | None = None,
                 t: jax.Array | None = None, drop: jax.Array | None = None) -> jax.Array:
        """teacher: logits [B, L, V] given the prefixes of x; score: v(x_t, t | x_<i) [B, L, d]."""
        h = self.features(x, labels, drop)
        if self.role == "teacher":
            return self.logits(h)
        return self.velocity(x_t, t, h)


# -- parameters ---------------------------------------------------------------------------------
def init_params(config: DD2Config, role: str, rng: jax.Array) -> Any:
    x = jnp.zeros((1, config.seq_len, config.code_dim), jnp.float32)
    lab = jnp.zeros((1,), jnp.int32)
    t = jnp.ones((1, config.seq_len), jnp.float32)
    model = DD2Transformer(config, role)
    return jax.jit(lambda k: model.init(k, x, lab, x, t)["params"])(rng)


def _copy(dst: Any, src: Any, names: list[str], what: str) -> dict:
    out = dict(dst)
    for name in names:
        if name not in src:
            raise ValueError(f"{what} has no {name!r}")
        got = jax.tree_util.tree_structure(src[name])
        if got != jax.tree_util.tree_structure(dst[name]):
            raise ValueError(f"{what}[{name!r}] does not fit this DD2 network")
        bad = [(a.shape, b.shape) for a, b in zip(jax.tree_util.tree_leaves(src[name]),
                                                 jax.tree_util.tree_leaves(dst[name]))
               if a.shape != b.shape]
        if bad:
            raise ValueError(f"{what}[{name!r}] has shapes {bad[0][0]}, this network {bad[0][1]}")
        out[name] = jax.tree_util.tree_map(lambda s, d: jnp.asarray(s, d.dtype), src[name], dst[name])
    return out


def backbone_names(params: Any) -> list[str]:
    return [n for n in params if n == "cls_embedding" or n.startswith("layers_") or n == "norm"]


def nearest_code_distances(codebook: Any, chunk: int = 1024) -> np.ndarray:
    """[K] each code's distance to its nearest other code, codebook [K, d] (host-side float64,
    in chunks of rows: no [K, K] matrix, so a 16384-code codebook needs 128 MB, not 1 GB)."""
    c = np.asarray(codebook, np.float64)
    if c.ndim != 2 or len(c) < 2:
        raise ValueError(f"the codebook must be [K >= 2, d], got {c.shape}")
    sq = np.sum(c * c, -1)
    nearest = []
    for a in range(0, len(c), chunk):
        d2 = sq[a:a + chunk, None] - 2.0 * c[a:a + chunk] @ c.T + sq[None]
        d2[np.arange(d2.shape[0]), a + np.arange(d2.shape[0])] = np.inf
        nearest.append(d2.min(1))
    return np.sqrt(np.maximum(np.concatenate(nearest), 1e-24))


def embed_tau(codebook: Any, ratio: float) -> float:
    """tau = ratio x the smallest distance between two codes (so every code's embedding is
    its own row up to exp(-1 / (2 ratio^2)) of a neighbour's: 4e-6 at ratio 0.2)."""
    return ratio * float(np.min(nearest_code_distances(codebook)))


def code_spacing(codebook: np.ndarray, chunk: int = 1024) -> float:
    """The median over codes of the distance to the nearest other code, codebook [K, d]. A
    typical spacing: the smallest distance is set by a single near-duplicate pair."""
    return float(np.median(nearest_code_distances(codebook, chunk)))


def adapt_teacher(config: DD2Config, teacher_params: Any, codebook: jax.Array, rng: jax.Array,
                  tau_ratio: float = 0.2) -> Any:
    """The adapted teacher: the GPT's weights, and its token table behind `CodebookEmbed` at the
    codebook with tau = `embed_tau(codebook, tau_ratio)`."""
    fresh = init_params(config, "teacher", rng)
    out = _copy(fresh, teacher_params, [*backbone_names(fresh), "output"], "teacher params")
    table = jnp.asarray(teacher_params["tok_embeddings"]["embedding"], jnp.float32)
    if table.shape != fresh["tok_embeddings"]["table"].shape:
        raise ValueError(f"the teacher's token table is {table.shape}, this network's "
                         f"{fresh['tok_embeddings']['table'].shape}")
    out["tok_embeddings"] = {"centers": jnp.asarray(codebook, jnp.float32), "table": table,
                             "log_tau": jnp.full((1,), np.log(embed_tau(codebook, tau_ratio)), jnp.float32)}
    return out


def score_from_teacher(config: DD2Config, adapted: Any, rng: jax.Array) -> Any:
    """A score network whose backbone and input MLP are the adapted teacher's; a fresh head."""
    fresh = init_params(config, "score", rng)
    return _copy(fresh, adapted, [*backbone_names(fresh), "tok_embeddings"], "adapted teacher params")


__all__ = ["DD2Config", "DD2Transformer", "GENERATORS", "check_generator", "CodebookEmbed", "embed_tau",
           "dd2_config", "init_params",
           "adapt_teacher", "code_spacing", "nearest_code_distances",
           "score_from_teacher", "time_embedding", "ROLES"]
