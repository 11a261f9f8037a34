"""VAR as a `ddjax.teacher.Teacher`: next-scale prediction, one whole scale per step.

    teacher = VARTeacher(var_cfg, var_params, vae_cfg, vae_params, variant="d16")
    ids = teacher.sample(labels, key, VARSamplingSettings(cfg=1.5, top_k=900, top_p=0.96))  # [B, 680]
    images = teacher.decode_ids(ids)                                                      # [B, 256, 256, 3]

The step boundaries are the scales' first positions (0, 1, 5, 14, ... for patch_nums
1, 2, 3, ...): a prefix, a DD timestep or a teacher_start must be one of them. Continuous
tokens decode through the scale-by-scale f_hat replay (each scale's [pn, pn, Cvae] map is
upsampled, passed through its phi and summed), so codes and off-codebook vectors alike decode.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddjax.teacher.base import Teacher, TokenRule
from ddjax.teacher.var import sampling as sampling_lib
from ddjax.teacher.var.model import VAR, VARConfig
from ddjax.teacher.var.vqvae import VQVAE, VQVAEConfig


def _fhat_replay(vae: VQVAE, cfg: VQVAEConfig, latents: jax.Array) -> jax.Array:
    """Continuous tokens [B, L, Cvae] (scales concatenated) -> images [B, H, W, 3] in [-1, 1]."""
    b = latents.shape[0]
    f_hat = jnp.zeros((b, cfg.latent_size, cfg.latent_size, cfg.z_channels), jnp.float32)
    start = 0
    for si, pn in enumerate(cfg.patch_nums):
        code_map = latents[:, start:start + pn * pn].reshape(b, pn, pn, -1).astype(jnp.float32)
        f_hat, _ = vae.next_input(si, f_hat, code_map)
        start += pn * pn
    return vae.fhat_to_img(f_hat)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _decode(vae_params: Any, latents: jax.Array, *, cfg: VQVAEConfig) -> jax.Array:
    vae = VQVAE(cfg)
    return vae.apply({"params": vae_params}, latents, method=lambda m, z: _fhat_replay(m, cfg, z))


def processed_log_probs(var_params: Any, var_cfg: VARConfig, x: jax.Array, labels: jax.Array,
                        settings: sampling_lib.VARSamplingSettings) -> jax.Array:
    """The teacher's processed distribution (VAR's per-scale CFG ramp, top-k, top-p) of every
    position given the teacher-forcing input x [B, L - pn_0^2, Cvae]: [B, L, V] log-probs."""
    model = VAR(var_cfg)
    logits = model.apply({"params": var_params}, labels, x)
    if settings.cfg != 0:
        null = model.apply({"params": var_params}, jnp.full_like(labels, var_cfg.num_classes), x)
        s = var_cfg.num_scales
        weights = [sampling_lib.cfg_weight(settings.cfg, si, s) for si in range(s)]
        parts = [sampling_lib.guide(logits[:, a:b], null[:, a:b], w)
                 for w, (a, b) in zip(weights, var_cfg.begin_ends)]
        logits = jnp.concatenate(parts, axis=1)
    filtered = sampling_lib.filter_top_k_top_p(logits, settings.top_k, settings.top_p)
    return jax.nn.log_softmax(filtered.astype(jnp.float32), axis=-1)


@functools.partial(jax.jit, static_argnames=("var_cfg", "vae_cfg", "settings"))
def _log_probs(var_params: Any, vae_params: Any, ids: jax.Array, labels: jax.Array, *,
               var_cfg: VARConfig, vae_cfg: VQVAEConfig,
               settings: sampling_lib.VARSamplingSettings) -> jax.Array:
    x = VQVAE(vae_cfg).apply({"params": vae_params}, ids, method=VQVAE.idxBl_to_var_input)
    return processed_log_probs(var_params, var_cfg, x, labels, settings)


class VARTeacher(Teacher):
    """FoundationVision/VAR's class-conditional transformer over its multi-scale VQVAE."""

    family = "var"

    def __init__(self, config: VARConfig, params: Any, tokenizer_config: VQVAEConfig,
                 tokenizer_params: Any, *, variant: str = "", checkpoint: str = ""):
        if tuple(config.patch_nums) != tuple(tokenizer_config.patch_nums):
            raise ValueError(f"VAR patch_nums {config.patch_nums} != the VQVAE's "
                             f"{tokenizer_config.patch_nums}")
        self.config, self.params = config, params
        self.tokenizer_config, self.tokenizer_params = tokenizer_config, tokenizer_params
        self.variant, self.checkpoint = variant or f"d{config.depth}", checkpoint
        self.codebook = np.asarray(VQVAE(tokenizer_config).apply(
            {"params": tokenizer_params}, method=VQVAE.codebook), np.float32)

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def boundaries(self) -> tuple[int, ...]:
        return tuple(start for start, _ in self.config.begin_ends)

    @property
    def image_size(self) -> int:
        return self.tokenizer_config.latent_size * self.tokenizer_config.downsample

    def sample(self, cond: jax.Array, key: jax.Array, settings: sampling_lib.VARSamplingSettings, *,
               rule: TokenRule | None = None, rule_inputs: Any = None,
               prefix_ids: jax.Array | None = None, prefix_len: int = 0,
               num_tokens: int | None = None, mesh: Any = None) -> jax.Array:
        """rule(key, logp [B, n, V], scale index, inputs [B, n, ...]) draws a whole scale.
        num_tokens (a scale boundary, or seq_len) stops after the scales before it."""
        self.check_timesteps((prefix_len,), "prefix_len")
        stop = None
        if num_tokens not in (None, self.seq_len):
            self.check_timesteps((num_tokens,), "num_tokens")
            if num_tokens <= prefix_len:
                raise ValueError(f"num_tokens={num_tokens} must exceed prefix_len={prefix_len}")
            stop = self.boundaries.index(num_tokens)
        return sampling_lib.sample(self.params, self.config, self.tokenizer_params, self.tokenizer_config,
                                   cond, key, settings, rule=rule, rule_inputs=rule_inputs,
                                   prefix_ids=prefix_ids, prefix_scales=self.boundaries.index(prefix_len),
                                   mesh=mesh, stop_scales=stop)

    def log_probs(self, tokens: jax.Array, cond: jax.Array,
                  settings: sampling_lib.VARSamplingSettings) -> jax.Array:
        return _log_probs(self.params, self.tokenizer_params, jnp.asarray(tokens, jnp.int32),
                          jnp.asarray(cond, jnp.int32), var_cfg=self.config,
                          vae_cfg=self.tokenizer_config, settings=settings)

    def latent_decoder(self):
        cfg = self.tokenizer_config

        def decode(vae_params: Any, latents: jax.Array) -> jax.Array:
            return VQVAE(cfg).apply({"params": vae_params}, latents,
                                    method=lambda m, z: _fhat_replay(m, cfg, z))

        return decode

    def decode_latents(self, latents: jax.Array) -> np.ndarray:
        if latents.ndim != 3 or latents.shape[1:] != (self.seq_len, self.code_dim):
            raise ValueError(f"latents must be [B, {self.seq_len}, {self.code_dim}], got {latents.shape}")
        return np.asarray(_decode(self.tokenizer_params, jnp.asarray(latents), cfg=self.tokenizer_config))

    def decode_ids(self, ids: jax.Array) -> np.ndarray:
        return np.asarray(sampling_lib.ids_to_image(self.tokenizer_params, self.tokenizer_config,
                                                    jnp.asarray(ids)))
