"""The digits demo's VQ tokenizer: training (`train_vq`), re-measuring (`evaluate_vq`) and the
reconstruct / encode / decode helpers (configs/digits.py)."""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from ddjax.demo.common import (
    Params,
    Progress,
    batched,
    code_usage,
    digits_data,
    export_dtype,
    optimizer,
    overrides_json,
    save_state_dict,
    shift_images,
    vq_config_from,
    write_json,
)
from ddjax.teacher.llamagen import vq as vq_lib
from ddjax.teacher.llamagen.loading import load_vq
from ddjax.utils.images import save_grid


# -- VQ ------------------------------------------------------------------------------------------
def _vq_forward(module: vq_lib.VQModel, images: jax.Array, train: bool):
    """(reconstruction, z (l2-normalised), z_q, ids) with the straight-through estimator."""
    z, z_q, ids = module.quantize_(module.encode_latents(images, train))
    rec = module.decode_latents(z + jax.lax.stop_gradient(z_q - z), train)
    return rec, z, z_q, ids


@functools.lru_cache(maxsize=16)
def _reconstruct_fn(cfg: vq_lib.VQConfig):
    return jax.jit(lambda p, x: vq_lib.VQModel(cfg).apply({"params": p}, x))


def reconstruct(params: Params, cfg: vq_lib.VQConfig, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """VQ reconstructions (through the codebook) of images [N, H, W, 3] -> float32 [N, H, W, 3]."""
    return batched(lambda x: _reconstruct_fn(cfg)(params, jnp.asarray(x)), images, batch)


def encode_images(params: Params, cfg: vq_lib.VQConfig, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Token ids [N, h*w] int32 of images [N, H, W, 3]."""
    return batched(lambda x: vq_lib.encode(params, cfg, jnp.asarray(x)), images, batch).astype(np.int32)


def decode_tokens(params: Params, cfg: vq_lib.VQConfig, tokens: np.ndarray, batch: int = 256) -> np.ndarray:
    """Images [N, H, W, 3] float32 from token ids [N, h*w]."""
    return batched(lambda t: vq_lib.decode_ids(params, cfg, jnp.asarray(t)), tokens, batch)


def vq_metrics(params: Params, cfg: vq_lib.VQConfig, images: np.ndarray,
               usage_images: np.ndarray | None = None) -> dict[str, float]:
    """Reconstruction errors of `images` in [-1, 1] units (MSE, MAE; PSNR for a peak-to-peak of 2)
    and codebook usage over the tokens of `usage_images` (default `images`)."""
    rec = reconstruct(params, cfg, images)
    err = rec - images
    mse = float(np.mean(err**2))
    ids = encode_images(params, cfg, images if usage_images is None else usage_images)
    return {"mse": mse, "mae": float(np.mean(np.abs(err))),
            "psnr": float(10 * np.log10(4.0 / max(mse, 1e-12))),
            **code_usage(ids, cfg.codebook_size)}


def train_vq(config: Any, workdir: str) -> dict[str, Any]:
    """Trains the VQ tokenizer on the digits; writes WORKDIR/vq.safetensors (LlamaGen names),
    vq_reconstructions.png and vq_metrics.json, and returns the metrics.

    Loss: reconstruction (l2_weight * MSE + l1_weight * MAE) + codebook loss
    mean((z_q - sg(z))^2) + beta * mean((sg(z_q) - z)^2) with the straight-through estimator
    (LlamaGen's VectorQuantizer, l2-normalised codes). Codes unused for `restart_every` steps are
    re-seeded from random encoder outputs of the current batch (dead-code restart).
    """
    t_start, c_start = time.time(), time.process_time()
    tc = config.train_vq
    cfg = vq_config_from(config)
    tr_x, _, va_x, _ = digits_data(config)
    size = config.digits.image_size
    if size % cfg.downsample_factor:
        raise ValueError(f"image size {size} is not a multiple of the VQ factor {cfg.downsample_factor}")
    logging.info("train_vq: %d train / %d val images, %s", len(tr_x), len(va_x), cfg)
    model = vq_lib.VQModel(cfg)
    key = jax.random.PRNGKey(tc.seed)
    key, init_key, restart_key = jax.random.split(key, 3)
    params = jax.jit(lambda k: vq_lib.init_params(cfg, k, size))(init_key)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    logging.info("VQ parameters: %d", n_params)
    tx, sched = optimizer(tc)
    opt_state = tx.init(params)
    k = cfg.codebook_size

    def loss_fn(p, x):
        rec, z, z_q, ids = model.apply({"params": p}, x, True, method=_vq_forward)
        rec_l2 = jnp.mean(jnp.square(rec - x))
        rec_l1 = jnp.mean(jnp.abs(rec - x))
        codebook = jnp.mean(jnp.square(z_q - jax.lax.stop_gradient(z)))
        commit = jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - z))
        loss = tc.l2_weight * rec_l2 + tc.l1_weight * rec_l1 + codebook + tc.beta * commit
        return loss, (dict(loss=loss, l2=rec_l2, l1=rec_l1, codebook=codebook, commit=commit), ids, z)

    @jax.jit
    def step(p, s, usage, data, idx, k_aug):
        x = shift_images(data[idx], k_aug, tc.max_shift)
        (_, (m, ids, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, x)
        updates, s = tx.update(grads, s, p)
        usage = usage + jnp.bincount(ids.ravel(), length=k)
        return optax.apply_updates(p, updates), s, usage, m

    @jax.jit
    def restart(p, usage, data, idx, k_pick):
        """Re-seeds the codes unused since the last restart with random encoder outputs."""
        z = model.apply({"params": p}, data[idx], method=lambda mod, x: mod.quantize_(
            mod.encode_latents(x))[0])
        flat = z.reshape(-1, z.shape[-1])
        pick = flat[jax.random.randint(k_pick, (k,), 0, flat.shape[0])]
        pick = pick + 0.01 * jax.random.normal(jax.random.fold_in(k_pick, 1), pick.shape)
        table = p["quantize"]["embedding"]["embedding"]
        dead = usage == 0
        new = jnp.where(dead[:, None], pick.astype(table.dtype), table)
        p = {**p, "quantize": {"embedding": {"embedding": new}}}
        return p, jnp.sum(dead)

    data = jnp.asarray(tr_x)
    rng = np.random.default_rng(tc.seed)
    usage = jnp.zeros((k,), jnp.int32)
    progress = Progress("train_vq", tc.num_steps, tc.log_every)
    restarts = 0
    for i in range(1, tc.num_steps + 1):
        idx = jnp.asarray(rng.choice(len(tr_x), tc.batch_size, replace=False))
        params, opt_state, usage, m = step(params, opt_state, usage, data, idx, jax.random.fold_in(key, i))
        if tc.restart_every and i % tc.restart_every == 0 and i <= tc.num_steps * tc.restart_until:
            idx = jnp.asarray(rng.choice(len(tr_x), tc.batch_size, replace=False))
            params, n_dead = restart(params, usage, data, idx, jax.random.fold_in(restart_key, i))
            n_dead = int(n_dead)
            restarts += n_dead
            if n_dead:
                logging.info("train_vq step %d: re-seeded %d unused codes", i, n_dead)
            usage = jnp.zeros((k,), jnp.int32)
        progress(i, {**m, "lr": sched(i)})
    train_time, train_cpu = time.time() - t_start, time.process_time() - c_start

    path = save_state_dict(os.path.join(workdir, "vq.safetensors"), params, export_dtype(config))
    train_info = {"parameters": int(n_params), "steps": tc.num_steps, "codes_reseeded": int(restarts),
                  "train_seconds": round(train_time, 1), "train_cpu_seconds": round(train_cpu, 1),
                  "checkpoint": path}
    write_json(os.path.join(workdir, "vq_metrics.json"), train_info)
    out = evaluate_vq(config, workdir)
    out["total_seconds"] = round(time.time() - t_start, 1)
    out["total_cpu_seconds"] = round(time.process_time() - c_start, 1)
    write_json(os.path.join(workdir, "vq_metrics.json"), out)
    val = out["val"]
    logging.info("train_vq done in %.0fs (%.0f CPU-s): val mse %.4f psnr %.2f dB, codes used %d/%d "
                 "(perplexity %.1f); wrote %s, %s", out["total_seconds"], out["total_cpu_seconds"],
                 val["mse"], val["psnr"], val["codes_used"], k, val["perplexity"], path, out["png"])
    return out


def evaluate_vq(config: Any, workdir: str) -> dict[str, Any]:
    """Measures WORKDIR/vq.safetensors as written (export dtype included): reconstruction errors
    on the held-out digits, codebook usage over all digits' tokens; writes vq_reconstructions.png
    (held-out originals above their reconstructions) and merges the figures into vq_metrics.json."""
    cfg = vq_config_from(config)
    path = os.path.join(workdir, "vq.safetensors")
    params = load_vq(path, cfg)
    tr_x, _, va_x, _ = digits_data(config)
    val = vq_metrics(params, cfg, va_x, usage_images=np.concatenate([tr_x, va_x]))
    show = va_x[: config.train_vq.png_images]
    rec = reconstruct(params, cfg, show)
    rows = [np.concatenate([show[j:j + 16], rec[j:j + 16]]) for j in range(0, len(show), 16)]
    png = save_grid(os.path.join(workdir, "vq_reconstructions.png"), np.concatenate(rows), nrow=16,
                    scale=2)
    metrics_path = os.path.join(workdir, "vq_metrics.json")
    info: dict[str, Any] = {}
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            info = json.load(f)
    out = {**info, "val": val, "png": png, "checkpoint": path,
           "parameters": sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params)),
           "export_dtype": export_dtype(config),
           "vq": {"variant": config.vq.variant, "model": overrides_json(config.vq.model)}}
    write_json(metrics_path, out)
    logging.info("evaluate_vq: val mse %.4f (psnr %.2f dB), codes used %d/%d (perplexity %.1f)",
                 val["mse"], val["psnr"], val["codes_used"], cfg.codebook_size, val["perplexity"])
    return out
