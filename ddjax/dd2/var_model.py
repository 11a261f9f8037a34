"""DD2's networks on a VAR teacher (dd2.md §3–4): VAR's transformer, two heads.

VAR already reads continuous inputs: scale si+1's teacher-forcing input is the area-downsampled
running f_hat of the tokens of scales <= si (`VQVAE.latents_to_var_input`), which is defined for
off-codebook vectors as for codes. So there is no continuous-input adaptation: the adapted
teacher is the teacher. With the block-causal mask, the features of a token of scale k depend
on the class and on the tokens of scales < k only, and one scale's tokens are predicted
independently, as VAR draws them. Two roles:

  * role "teacher": VAR itself (`head_nm`, `head`): logits [B, L, V] of every position;
  * role "score": an MLP head (`score_head`, `ddjax.dd2.model.ScoreHead`) on
    (x_t [Cvae], t, head_nm(h, cond)) -> a velocity [Cvae]:
      generator  q = eps - v(eps_l, t = 1 | var_input(eps))   (the noise of earlier scales
                                                                in the backbone: "shifted" by a scale)
      guidance   m = x_t - t v(x_t, t | var_input(q))

Parameter names are VAR's (`word_embed`, `class_emb`, `pos_start`, `pos_1LC`, `lvl_embed`,
`blocks_*`, `head_nm`, `head`), so `score_from_teacher` copies the backbone by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ddjax.dd2.model import ROLES, ScoreHead, _copy, check_generator
from ddjax.teacher.var.model import VAR, VARConfig
from ddjax.teacher.var.vqvae import VQVAE, VQVAEConfig


@dataclasses.dataclass(frozen=True)
class VARDD2Config:
    """The teacher's VARConfig and VQVAEConfig (its input map) plus the DD2 head."""

    var: VARConfig
    vae: VQVAEConfig
    head_width: int = 0  # the MLP head's width (0 = var.embed_dim)
    head_depth: int = 3  # residual blocks in the MLP head
    generator: str = "score"  # ddjax.dd2.model.GENERATORS
    gen_tau: float = 1.0  # generator "student": the softmax temperature of its gradient

    def __post_init__(self):
        check_generator(self.generator, self.gen_tau)
        if tuple(self.var.patch_nums) != tuple(self.vae.patch_nums):
            raise ValueError(f"VAR patch_nums {self.var.patch_nums} differ from the VQVAE's "
                             f"{self.vae.patch_nums}")
        if self.var.cvae != self.vae.z_channels:
            raise ValueError(f"VAR cvae={self.var.cvae} differs from the VQVAE's z_channels="
                             f"{self.vae.z_channels}")
        if self.head_depth < 1:
            raise ValueError(f"head_depth must be >= 1, got {self.head_depth}")

    @property
    def seq_len(self) -> int:
        return self.var.seq_len

    @property
    def code_dim(self) -> int:
        return self.var.cvae

    @property
    def num_classes(self) -> int:
        return self.var.num_classes

    @property
    def width(self) -> int:
        return self.head_width or self.var.embed_dim


def var_dd2_config(teacher: VARConfig, vae: VQVAEConfig, **overrides: Any) -> VARDD2Config:
    """The DD2 config of a VAR teacher: its sizes, no class dropout or drop-path (training
    draws the null class explicitly)."""
    var_fields = {f.name for f in dataclasses.fields(VARConfig)}
    var_over = {k: v for k, v in overrides.items() if k in var_fields}
    own = {k: v for k, v in overrides.items() if k not in var_fields}
    var = dataclasses.replace(teacher, cond_drop_rate=0.0, drop_path_rate=0.0, **var_over)
    return VARDD2Config(var, vae, **own)


class VARDD2Transformer(VAR):
    """VAR with a score head (role "score") or its own logits head (role "teacher")."""

    role: str = "score"
    head_width: int = 0
    head_depth: int = 3

    def setup(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        super().setup()
        if self.role == "score":
            c = self.config
            self.score_head = ScoreHead(self.head_width or c.embed_dim, self.head_depth, c.cvae,
                                        dtype=c.dtype, param_dtype=c.param_dtype)

    def features(self, x: jax.Array, labels: jax.Array, drop: jax.Array | None = None) -> jax.Array:
        """The score head's features head_nm(h, cond) [B, L, C] float32; row l depends on the
        class and the input rows of the scales up to l's (the tokens of earlier scales)."""
        h, cond = self.hidden(labels, x, drop=drop)
        return self.head_nm(h.astype(jnp.float32), cond)

    def velocity(self, x_t: jax.Array, t: jax.Array, f: jax.Array) -> jax.Array:
        """x_t [..., Cvae], t [...], features [..., C] -> v [..., Cvae] float32."""
        return self.score_head(x_t, t, f)

    def __call__(self, x: jax.Array, labels: jax.Array, x_t: jax.Array | None = None,
                 t: jax.Array | None = None, drop: jax.Array | None = None) -> jax.Array:
        """teacher: logits [B, L, V]; score: v(x_t, t | features) [B, L, Cvae]."""
        if self.role == "teacher":
            return self.logits(*self.hidden(labels, x, drop=drop))
        return self.velocity(x_t, t, self.features(x, labels, drop))


def module(cfg: VARDD2Config, role: str) -> VARDD2Transformer:
    return VARDD2Transformer(cfg.var, role=role, head_width=cfg.head_width, head_depth=cfg.head_depth)


def var_input(cfg: VARDD2Config, vae_quantize: Any, latents: jax.Array) -> jax.Array:
    """Continuous tokens [B, L, Cvae] -> VAR's teacher-forcing input [B, L - pn_0^2, Cvae];
    vae_quantize is the VQVAE's `quantize` params (its phi convolutions)."""
    return VQVAE(cfg.vae).apply({"params": {"quantize": vae_quantize}}, latents,
                                method=VQVAE.latents_to_var_input)


def init_params(cfg: VARDD2Config, role: str, rng: jax.Array) -> Any:
    c = cfg.var
    x = jnp.zeros((1, c.seq_len - c.first_l, c.cvae), jnp.float32)
    lab = jnp.zeros((1,), jnp.int32)
    xt = jnp.zeros((1, c.seq_len, c.cvae), jnp.float32)
    t = jnp.ones((1, c.seq_len), jnp.float32)
    return jax.jit(lambda k: module(cfg, role).init(k, x, lab, xt, t)["params"])(rng)


def backbone_names(params: Any) -> list[str]:
    return [n for n in params if n not in ("head", "score_head")]


def adapt_teacher(cfg: VARDD2Config, teacher_params: Any, rng: jax.Array) -> Any:
    """DD2's teacher for VAR: the teacher's own weights (checked against this config)."""
    fresh = init_params(cfg, "teacher", rng)
    return _copy(fresh, teacher_params, list(fresh), "teacher params")


def score_from_teacher(cfg: VARDD2Config, adapted: Any, rng: jax.Array) -> Any:
    """A score network whose backbone (and head_nm) is the teacher's; a fresh MLP head."""
    fresh = init_params(cfg, "score", rng)
    return _copy(fresh, adapted, backbone_names(fresh), "teacher params")


__all__ = ["VARDD2Config", "VARDD2Transformer", "var_dd2_config", "module", "var_input",
           "init_params", "adapt_teacher", "score_from_teacher"]
