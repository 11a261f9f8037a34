"""The one optimiser / EMA helper of every trainer (the DD student, the digits demo teacher):
AdamW with a weight-decay mask, warmup + cosine decay, global-norm clipping, and an
exponential moving average (EMA) of the parameters.

Built from a settings object with these fields (config.train, configs/llamagen.py):
  lr, warmup_steps, num_steps, min_lr_ratio   the schedule (`lr_schedule`)
  b1, b2, weight_decay, grad_clip             AdamW and clipping (`make_optimizer`)
  ema_decay, ema_warmup                       the EMA (`ema_decay_at`, `ema_update`)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax


def lr_schedule(lr: float, warmup_steps: int, num_steps: int, min_lr_ratio: float) -> optax.Schedule:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `lr * min_lr_ratio` at
    `num_steps` (constant after).

    The warmup reaches lr·(n + 1)/warmup_steps at (0-based) step n, so the first update already
    moves the parameters and step warmup_steps - 1 uses the full rate.
    """
    if lr <= 0 or not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"need lr > 0 and 0 <= min_lr_ratio <= 1, got lr={lr}, min_lr_ratio={min_lr_ratio}")
    warmup_steps, num_steps = int(warmup_steps), int(num_steps)
    floor = lr * min_lr_ratio
    decay_steps = max(num_steps - warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = lr * jnp.minimum(1.0, (step + 1.0) / max(warmup_steps, 1))
        progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = floor + (lr - floor) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(step < warmup_steps, warm, cosine)

    return schedule


def decay_mask(params: Any) -> Any:
    """True for the leaves that get weight decay: the ≥2-D `kernel`s of dense layers.

    Norm scales, biases, embedding tables (class table, `n_d_embed`) and the continuous head's
    `scale_shift_table` are left alone.
    """
    def decays(path, leaf):
        name = getattr(path[-1], "key", getattr(path[-1], "name", None))
        return name == "kernel" and len(leaf.shape) >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def optax_schedule(lr: float, warmup_steps: int, num_steps: int, min_lr_ratio: float) -> optax.Schedule:
    """optax's warmup_cosine_decay_schedule from 0 (the digits demo teacher's schedule)."""
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(1, warmup_steps), max(num_steps, warmup_steps + 1),
                                              end_value=lr * min_lr_ratio)


def matrices_mask(params: Any) -> Any:
    """Weight decay on every >= 2-D leaf (matrices, conv kernels, embeddings), as LlamaGen's
    own training does."""
    return jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)


SCHEDULES = {"warmup_cosine": lr_schedule, "optax_warmup_cosine": optax_schedule}
DECAY_MASKS = {"kernels": decay_mask, "matrices": matrices_mask}


def make_optimizer(train_cfg: Any, *, schedule: str = "warmup_cosine", decay: str = "kernels"
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(AdamW chain, lr schedule) from settings with lr, warmup_steps, num_steps, min_lr_ratio,
    b1, b2, weight_decay, grad_clip: clip_by_global_norm(grad_clip) (skipped when grad_clip
    <= 0), then AdamW with the `decay` mask ("kernels": `decay_mask`, "matrices":
    `matrices_mask`) on the `schedule` ("warmup_cosine": `lr_schedule`, "optax_warmup_cosine")."""
    sched = SCHEDULES[schedule](train_cfg.lr, train_cfg.warmup_steps, train_cfg.num_steps,
                                train_cfg.min_lr_ratio)
    parts = []
    if train_cfg.grad_clip and train_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
    parts.append(optax.adamw(sched, b1=train_cfg.b1, b2=train_cfg.b2,
                             weight_decay=train_cfg.weight_decay, mask=DECAY_MASKS[decay]))
    return optax.chain(*parts), sched


def ema_decay_at(step: jax.Array, decay: float, warmup: bool = True) -> jax.Array:
    """The EMA decay used after update `step` (0-based): `decay`, or with warmup
    min(decay, (1 + step) / (10 + step)) so that short runs do not keep the initial weights."""
    decay = jnp.asarray(decay, jnp.float32)
    if not warmup:
        return decay
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema: Any, params: Any, decay: jax.Array) -> Any:
    """ema <- decay * ema + (1 - decay) * params, leaf by leaf (in the EMA's dtype)."""
    return jax.tree_util.tree_map(
        lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype), ema, params)
