"""DD2's settings (config.dd2) and the JSON form of its model config.

`DD2Settings` is what every DD2 stage reads; `settings_from_dict` builds it from the config
block with errors that name the bad key.
"""

from __future__ import annotations

import dataclasses
import types

import jax.numpy as jnp
import optax

from ddjax.dd2 import model as model_lib
from ddjax.dd2 import var_model
from ddjax.teacher.base import Teacher
from ddjax.teacher.llamagen.gpt import GPTConfig, as_dtype
from ddjax.teacher.var.model import VARConfig
from ddjax.teacher.var.vqvae import VQVAEConfig
from ddjax.utils import optim
from ddjax.utils.checkpoint import config_to_dict

# -- settings ---------------------------------------------------------------------------------
WARM_LOSSES = ("mse", "code_ce")
GUIDANCES = ("score", "ar")

@dataclasses.dataclass(frozen=True)
class OptSettings:
    """Adam(b1, b2) with linear warmup to lr, then constant (dd2.md §5)."""

    lr: float = 1e-4
    warmup_steps: int = 0
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def make(self, num_steps: int) -> optax.GradientTransformation:
        ns = types.SimpleNamespace(**dataclasses.asdict(self), num_steps=max(num_steps, 1),
                                   min_lr_ratio=1.0)
        return optim.make_optimizer(ns)[0]


@dataclasses.dataclass(frozen=True)
class DD2Settings:
    """Everything DD2's stages read (config.dd2 holds the same fields, nested as here)."""

    batch_size: int = 32  # global, every stage
    num_samples: int = 4096  # teacher sequences for adapt and tune
    sample_batch_size: int = 256
    noise_draws: int = 4  # R noise draws per sequence in the diffusion losses (MAR)
    t_min: float = 0.02  # diffusion times of tune / FCS: U[t_min, 1]
    csd_t_min: float = 0.02  # CSD times: U[csd_t_min, csd_t_max]
    csd_t_max: float = 0.98
    csd_draws: int = 1  # noise draws (eps_i, t_i) per generated sequence in the CSD loss
    # The teacher score's CFG scale in CSD (0 = config.sampling's). The paper uses 2.0 in CSD
    # where its baselines sample at 1.5 (VAR; dd2.md §5).
    csd_cfg: float = 0.0
    alpha: float = 1.0  # SiD's alpha
    guide_steps: int = 5  # K guidance updates per generator update
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    head_width: int = 0  # 0 = the teacher's width
    head_depth: int = 3
    # The generator: "score" (the paper's: the tuned score network fed the shifted noise) or
    # "student" (DD1's one-step student, its code choice passed straight through with gradients
    # through softmax(logits / gen_tau); needs DD1's student, ddjax.dd2.student_generator).
    generator: str = "score"
    gen_tau: float = 1.0
    # The guidance network: "score" (the paper's: a score network from the tuned one, trained by
    # denoising score matching) or "ar" (generator "student" only: the adapted teacher's network
    # trained by AR cross-entropy on the generated codes; the fake score is then the closed-form
    # mixture score of its distribution, as the teacher's is).
    guidance: str = "score"
    embed_tau: float = 0.2  # the continuous embedding's tau / the smallest distance between codes
    compute_dtype: str = "float32"
    sharding: str = "data"  # or "fsdp"
    # stage lengths and optimisers
    adapt_steps: int = 200  # adapt: AR fine-tuning of the adapted teacher (0 = skip)
    adapt_opt: OptSettings = OptSettings(lr=1e-4, warmup_steps=20)
    tune_steps: int = 1000
    tune_head_steps: int = 0  # of those, the first train the head only (VAR's recipe)
    tune_opt: OptSettings = OptSettings(lr=1e-3, warmup_steps=50)
    warm_steps: int = 0  # generator warm start on DD1's pairs (not in the paper; 0 = off)
    warm_opt: OptSettings = OptSettings(lr=1e-3, warmup_steps=20)
    # The warm start's loss: "mse" |G - c_y|^2, or "code_ce": cross-entropy of the snapped code
    # with logits -|G - c_k|^2 / (2 tau^2), tau = warm_tau x the median nearest-code distance (the
    # nearest-code classification trained directly, as DD1's logits are: no averaging of modes).
    warm_loss: str = "mse"
    warm_tau: float = 0.5
    guide_warm_steps: int = 0  # guidance-only FCS updates on the starting generator before CSD
    csd_steps: int = 300  # generator updates
    guide_opt: OptSettings = OptSettings(lr=2e-4, warmup_steps=50)
    gen_opt: OptSettings = OptSettings(lr=1e-4, warmup_steps=10)
    align_steps: int = 0  # performance alignment: guidance-only updates (0 = off)
    align_csd_steps: int = 0  # CSD iterations after the alignment
    teacher_from: int = 0  # sampling: the report's "DD2 + teacher (k-L)" row (0 = off)
    log_every: int = 50
    checkpoint_every: int = 200
    keep_checkpoints: int = 2

    def check(self, batch_shards: int = 1) -> None:
        """Raises a ValueError naming the first bad config.dd2 field."""
        if self.batch_size <= 0 or self.batch_size % batch_shards:
            raise ValueError(f"config.dd2.batch_size={self.batch_size} must be a positive multiple of "
                             f"the {batch_shards} batch shards of the mesh")
        if self.csd_cfg < 0:
            raise ValueError(f"config.dd2.csd_cfg must be >= 0 (0 = config.sampling's), got {self.csd_cfg}")
        for name in ("num_samples", "sample_batch_size", "noise_draws", "csd_draws", "guide_steps",
                     "log_every",
                     "checkpoint_every", "keep_checkpoints", "head_depth"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config.dd2.{name} must be positive, got {getattr(self, name)}")
        if self.generator not in model_lib.GENERATORS:
            raise ValueError(f"config.dd2.generator={self.generator!r}; choose one of "
                             f"{model_lib.GENERATORS}")
        if not self.gen_tau > 0:
            raise ValueError(f"config.dd2.gen_tau must be > 0, got {self.gen_tau}")
        if self.guidance not in GUIDANCES:
            raise ValueError(f"config.dd2.guidance={self.guidance!r}; choose one of {GUIDANCES}")
        if self.guidance == "ar" and self.generator != "student":
            raise ValueError("config.dd2.guidance='ar' models generated codes: it needs "
                             f"config.dd2.generator='student' (got {self.generator!r})")
        if self.generator == "student" and self.warm_steps:
            raise ValueError(f"config.dd2.warm_steps={self.warm_steps}: the student generator is DD1's "
                             "student, already trained on the pairs; set warm_steps to 0")
        if self.warm_loss not in WARM_LOSSES:
            raise ValueError(f"config.dd2.warm_loss={self.warm_loss!r}; choose one of {WARM_LOSSES}")
        if self.warm_tau <= 0:
            raise ValueError(f"config.dd2.warm_tau must be > 0, got {self.warm_tau}")
        if self.embed_tau <= 0:
            raise ValueError(f"config.dd2.embed_tau must be > 0, got {self.embed_tau}")
        for name in ("adapt_steps", "warm_steps", "tune_steps", "tune_head_steps", "csd_steps",
                     "align_steps", "align_csd_steps", "guide_warm_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"config.dd2.{name} must be >= 0, got {getattr(self, name)}")
        if self.teacher_from < 0:
            raise ValueError(f"config.dd2.teacher_from must be >= 0, got {self.teacher_from}")
        if self.tune_head_steps > self.tune_steps:
            raise ValueError(f"config.dd2.tune_head_steps={self.tune_head_steps} exceeds tune_steps="
                             f"{self.tune_steps}")
        if not 0.0 < self.t_min < 1.0:
            raise ValueError(f"config.dd2.t_min={self.t_min} must be in (0, 1)")
        if not 0.0 < self.csd_t_min < self.csd_t_max < 1.0:
            raise ValueError(f"config.dd2.csd_t_min={self.csd_t_min}, csd_t_max={self.csd_t_max}: need "
                             "0 < csd_t_min < csd_t_max < 1")
        if self.sharding not in ("data", "fsdp"):
            raise ValueError(f"config.dd2.sharding={self.sharding!r}; choose 'data' or 'fsdp'")
        for name in ("adapt_opt", "tune_opt", "warm_opt", "guide_opt", "gen_opt"):
            o = getattr(self, name)
            if o.lr <= 0 or o.warmup_steps < 0:
                raise ValueError(f"config.dd2.{name}: lr={o.lr} must be > 0, warmup_steps >= 0")
        try:
            as_dtype(self.compute_dtype)
        except ValueError as e:
            raise ValueError(f"config.dd2.compute_dtype: {e}") from e

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def settings_from_dict(d: dict) -> DD2Settings:
    """DD2Settings from config.dd2 (a dict; the *_opt entries are dicts). Unknown keys raise."""
    d = dict(d)
    known = {f.name for f in dataclasses.fields(DD2Settings)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"config.dd2 has unknown fields {unknown}; known: {sorted(known)}")
    for name in ("adapt_opt", "tune_opt", "warm_opt", "guide_opt", "gen_opt"):
        if name in d and not isinstance(d[name], OptSettings):
            sub = dict(d[name])
            bad = sorted(set(sub) - {f.name for f in dataclasses.fields(OptSettings)})
            if bad:
                raise ValueError(f"config.dd2.{name} has unknown fields {bad}")
            d[name] = OptSettings(**sub)
    return DD2Settings(**d)


def model_config(teacher: Teacher, s: DD2Settings) -> model_lib.DD2Config | var_model.VARDD2Config:
    """The DD2 networks' config for a teacher (LlamaGen or VAR) and the settings' head."""
    dtype = as_dtype(s.compute_dtype)
    if teacher.family == "var":
        var = dataclasses.replace(teacher.config, dtype=dtype, param_dtype=jnp.float32)
        return var_model.var_dd2_config(var, teacher.tokenizer_config, head_width=s.head_width,
                                        head_depth=s.head_depth, generator=s.generator,
                                        gen_tau=s.gen_tau)
    if teacher.family != "llamagen":
        raise ValueError(f"DD2 runs on LlamaGen and VAR teachers, not on {teacher.family!r}")
    return model_lib.dd2_config(teacher.config, teacher.code_dim, dtype=dtype,
                                param_dtype=jnp.float32, head_width=s.head_width,
                                head_depth=s.head_depth, generator=s.generator, gen_tau=s.gen_tau)


def config_to_json(cfg: model_lib.DD2Config | var_model.VARDD2Config) -> dict:
    if isinstance(cfg, var_model.VARDD2Config):
        return {"var": config_to_dict(cfg.var), "vae": config_to_dict(cfg.vae),
                "head_width": cfg.head_width, "head_depth": cfg.head_depth,
                "generator": cfg.generator, "gen_tau": cfg.gen_tau}
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "gpt"}
    return {"gpt": config_to_dict(cfg.gpt), **out}


def _dataclass(cls, d: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def config_from_json(d: dict) -> model_lib.DD2Config | var_model.VARDD2Config:
    d = dict(d)
    if "var" in d:
        var, vae = _dataclass(VARConfig, d.pop("var")), _dataclass(VQVAEConfig, d.pop("vae"))
        return var_model.VARDD2Config(var, vae, **d)
    gpt = dict(d.pop("gpt"))
    return model_lib.DD2Config(GPTConfig(**gpt), **d)


__all__ = ["OptSettings", "DD2Settings", "settings_from_dict", "model_config", "config_to_json",
           "config_from_json"]
