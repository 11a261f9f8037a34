"""The student's training objective (method.md §5) and its per-position measurements.

For a pair (noise ε, tokens q, class) and a timestep t the student sees X_t = (c_{q_1..q_t},
ε_{t+1..L}) and is trained, at positions ≥ t only, to output q:
  * cross-entropy of the logits head against q                       (weight `ce_weight`);
  * a loss of the continuous head against the codes c_q              (weight `cont_weight`):
      "mse"    mean over the d code dimensions of (out - c_q)², the default;
      "lpips"  LPIPS between the VQ-decoded images of the continuous output (positions < t
               passed through from X_t) and of the target codes, as the official
               `--loss_norm lpips`; the trainer is handed the image loss (`terms["image"]`, [B])
               by the entry layer, which builds the frozen decoder and the LPIPS network.
Means are token-level: the sum over every position ≥ t in the batch divided by their number;
the image loss is a mean over images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from ddjax.student.model import nearest_code

CONT_LOSSES = ("mse", "lpips")


def check_cont_loss(cont_loss: str, lpips_weights: str = "") -> None:
    """Raises a ValueError unless `cont_loss` is known (and LPIPS has its VGG16 weights)."""
    if cont_loss not in CONT_LOSSES:
        raise ValueError(f"config.train.cont_loss={cont_loss!r}; choose one of {CONT_LOSSES}")
    if cont_loss == "lpips" and not lpips_weights:
        raise ValueError(
            "config.train.cont_loss='lpips' needs config.train.lpips_weights: a torchvision VGG16 "
            "state dict (.pth, .safetensors or .npz; see README, 'LPIPS'); or use cont_loss='mse'")


def target_mask(t: jax.Array, length: int) -> jax.Array:
    """[B, L] bool: True at the positions the student is trained on (position ≥ t)."""
    return jnp.arange(length)[None, :] >= jnp.asarray(t).reshape(-1, 1)


def per_position(cont: jax.Array, logits: jax.Array, tokens: jax.Array, codebook: jax.Array
                 ) -> dict[str, jax.Array]:
    """Per-position terms, each [B, L] float32.

    cont [B, L, d] continuous head, logits [B, L, K], tokens [B, L] targets, codebook [K, d].
    Returns ce and mse (differentiable) and, without gradient, acc (argmax of the logits ==
    target) and cont_acc (nearest code of the continuous output == target).
    """
    target = codebook[tokens]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens)
    mse = jnp.mean(jnp.square(cont.astype(jnp.float32) - target), axis=-1)
    acc = (jnp.argmax(logits, axis=-1) == tokens).astype(jnp.float32)
    cont_acc = (nearest_code(jax.lax.stop_gradient(cont), codebook) == tokens).astype(jnp.float32)
    return {"ce": ce, "mse": mse, "acc": jax.lax.stop_gradient(acc), "cont_acc": cont_acc}


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """sum(x * mask) / max(sum(mask), 1), in float32."""
    m = mask.astype(jnp.float32)
    return jnp.sum(x.astype(jnp.float32) * m) / jnp.maximum(jnp.sum(m), 1.0)


def dd_loss(terms: Mapping[str, jax.Array], mask: jax.Array, *, ce_weight: float,
            cont_weight: float, cont_loss: str = "mse") -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted objective over the masked positions: (loss, {"ce", "cont_loss"})."""
    check_cont_loss(cont_loss, "given" if cont_loss == "lpips" else "")
    ce = masked_mean(terms["ce"], mask)
    cont = jnp.mean(terms["image"]) if cont_loss == "lpips" else masked_mean(terms["mse"], mask)
    return ce_weight * ce + cont_weight * cont, {"ce": ce, "cont_loss": cont}


def sums_and_counts(terms: Mapping[str, jax.Array], mask: jax.Array, t: jax.Array,
                    t_list: Sequence[int]) -> dict[str, tuple[jax.Array, jax.Array]]:
    """(masked sum, count) of every term, overall and per training timestep (`name_t{t}`), for
    token-level averages that merge exactly across steps and devices."""
    m = mask.astype(jnp.float32)
    out = {}
    for name, x in terms.items():
        if x.ndim == 1:  # per image
            out[name] = (jnp.sum(x), jnp.asarray(x.shape[0], jnp.float32))
        else:
            out[name] = (jnp.sum(x * m), jnp.sum(m))
    for tv in t_list:
        mt = m * (jnp.asarray(t).reshape(-1, 1) == tv)
        for name in ("ce", "acc", "cont_acc"):
            out[f"{name}_t{tv}"] = (jnp.sum(terms[name] * mt), jnp.sum(mt))
    return out
