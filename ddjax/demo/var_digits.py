r"""The embedded VAR teacher: VAR's multi-scale VQVAE and a class-conditional VAR transformer,
small, trained on scikit-learn's bundled digits (configs/var.py, preset `digits`).

The 1797 8x8 digits are upsampled to 32x32 RGB in [-1, 1] as for the LlamaGen demo teacher
(`ddjax.demo.common.digits_data`); the VQVAE downsamples by 4, so f is an 8x8 map quantised
residually over the scales of `patch_nums` (1, 2, 3, 4, 6, 8: 130 tokens per image). Both models
are VAR's architectures (`ddjax.teacher.var`), only small, written as `.safetensors` with VAR's
key names and buffers, so they load through `load_vqvae` / `load_var` like the released files
(and with `strict=True` into VAR's own classes).

    python -m ddjax.main --config=configs/var.py:digits,mode=train_vae --workdir=/tmp/var_digits
    python -m ddjax.main --config=configs/var.py:digits,mode=train_var --workdir=/tmp/var_digits \
        --config.export_dir=ddjax/assets/var_digits

`train_vae` writes WORKDIR/vae.safetensors, vae_reconstructions.png and vae_metrics.json;
`train_var` tokenizes the digits with that VQVAE and writes WORKDIR/var.safetensors,
teacher_samples.png, teacher_metrics.json and meta.json (shipped beside the weights);
`evaluate_var` re-measures a workdir (FID by the demo's protocol: the digits classifier's
features against all 1797 digits; class accuracy by the 8x8 SVC) without retraining.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
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
    classify_digits,
    code_usage,
    digits_classifier,
    digits_data,
    digits_fid,
    fields,
    optimizer,
    shift_fixed,
    shift_images,
    tokenizer_checkpoint,
    write_json,
)
from ddjax.teacher.var import loading as var_loading
from ddjax.teacher.var import model as var_model
from ddjax.teacher.var import sampling as var_sampling
from ddjax.teacher.var import vqvae as vqvae_lib
from ddjax.teacher.var.resize import area
from ddjax.utils import optim
from ddjax.utils.checkpoint import config_to_dict
from ddjax.utils.images import save_grid
from ddjax.utils.paths import resolve_path
from ddjax.utils.torch_io import write_state_dict

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                         "var_digits")
FILES = ("vae.safetensors", "var.safetensors", "meta.json")


# -- configs --------------------------------------------------------------------------------------
def vae_config_from(config: Any) -> vqvae_lib.VQVAEConfig:
    return vqvae_lib.vqvae_config(dtype=config.vae.dtype, **fields(config.vae.model))


def var_config_from(config: Any) -> var_model.VARConfig:
    t = config.teacher
    return var_model.var_config(t.depth, dtype=t.dtype, param_dtype=t.param_dtype, **fields(t.model))


def sampling_from(config: Any) -> var_sampling.VARSamplingSettings:
    s = config.sampling
    return var_sampling.VARSamplingSettings(cfg=float(s.cfg), top_k=int(s.top_k),
                                            top_p=float(s.top_p), greedy=bool(s.greedy))


def _save(path: str, state: dict[str, np.ndarray], dtype: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {k: (v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v) for k, v in state.items()}
    write_state_dict(path, state)
    return path


# -- the VQVAE --------------------------------------------------------------------------------------
def _vae_forward(m: vqvae_lib.VQVAE, images: jax.Array, beta: float):
    """VAR's `VectorQuantizer2.forward` in training: residual quantisation over the scales with
    the straight-through estimator. Returns (reconstruction [B, H, W, 3] unclamped, vq loss,
    per-scale ids concatenated [B, L], the quantiser's inputs [N, Cvae] for code restarts)."""
    c = m.config
    f = m.encode_f(images)
    f_ng = jax.lax.stop_gradient(f)
    b, _, _, cv = f.shape
    f_rest, f_hat = f_ng, jnp.zeros_like(f_ng)
    vq_loss, ids_all, zs = 0.0, [], []
    for si, pn in enumerate(c.patch_nums):
        z = f_rest if si == c.num_scales - 1 else area(f_rest, pn)
        ids = m.nearest(jax.lax.stop_gradient(z).reshape(-1, cv)).reshape(b, pn * pn)
        h = m.scale_residual(m.embed(ids), si)
        f_hat = f_hat + h
        f_rest = f_rest - h
        vq_loss = vq_loss + beta * jnp.mean(jnp.square(jax.lax.stop_gradient(f_hat) - f)) \
            + jnp.mean(jnp.square(f_hat - f_ng))
        ids_all.append(ids)
        zs.append(jax.lax.stop_gradient(z).reshape(-1, cv))
    vq_loss = vq_loss / c.num_scales
    f_st = jax.lax.stop_gradient(f_hat) - f_ng + f
    rec = m.decoder(m.post_quant_conv(f_st.astype(c.dtype))).astype(jnp.float32)
    return rec, vq_loss, jnp.concatenate(ids_all, axis=1), jnp.concatenate(zs)


@functools.lru_cache(maxsize=8)
def _encode_fn(cfg: vqvae_lib.VQVAEConfig):
    return jax.jit(lambda p, x: jnp.concatenate(
        vqvae_lib.VQVAE(cfg).apply({"params": p}, x, method=vqvae_lib.VQVAE.img_to_idxBl), axis=1))


@functools.lru_cache(maxsize=8)
def _decode_fn(cfg: vqvae_lib.VQVAEConfig):
    return jax.jit(lambda p, t: var_sampling.ids_to_image(p, cfg, t))


def encode_images(params: Params, cfg: vqvae_lib.VQVAEConfig, images: np.ndarray,
                  batch: int = 256) -> np.ndarray:
    """Token ids [N, L] int32 (scales concatenated) of images [N, H, W, 3] in [-1, 1]."""
    return batched(lambda x: _encode_fn(cfg)(params, jnp.asarray(x)), images, batch).astype(np.int32)


def decode_tokens(params: Params, cfg: vqvae_lib.VQVAEConfig, ids: np.ndarray,
                  batch: int = 256) -> np.ndarray:
    """Images [N, H, W, 3] in [-1, 1] from token ids [N, L]."""
    return batched(lambda t: _decode_fn(cfg)(params, jnp.asarray(t)), ids, batch)


def train_vae(config: Any, workdir: str) -> dict[str, Any]:
    """Trains the multi-scale VQVAE on the digits; writes WORKDIR/vae.safetensors.

    Loss: MSE reconstruction + VAR's quantiser loss, mean over scales of
    beta * |sg(f_hat_s) - f|^2 + |f_hat_s - sg(f)|^2 (codebook and phi learn through the second
    term). VAR's released tokenizer was also trained with perceptual and GAN losses; digits do
    not need them. Codes unused for `restart_every` steps are re-seeded from quantiser inputs.
    """
    t0, c0 = time.time(), time.process_time()
    tc = config.train_vae
    cfg = vae_config_from(config)
    tr_x, _, va_x, _ = digits_data(config)
    if config.digits.image_size != cfg.image_size:
        raise ValueError(f"config.digits.image_size={config.digits.image_size} but the VQVAE maps "
                         f"{cfg.image_size} px images (patch_nums[-1] * 2^(len(ch_mult) - 1))")
    model = vqvae_lib.VQVAE(cfg)
    key = jax.random.PRNGKey(tc.seed)
    params = jax.jit(lambda k: vqvae_lib.init_params(cfg, k))(jax.random.fold_in(key, 0))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    logging.info("train_vae: %d train / %d val images, %d parameters, %s", len(tr_x), len(va_x),
                 n_params, cfg)
    tx, sched = optimizer(tc)
    opt_state = tx.init(params)
    k = cfg.vocab_size

    def loss_fn(p, x):
        rec, vq, ids, zs = model.apply({"params": p}, x, tc.beta, method=_vae_forward)
        mse = jnp.mean(jnp.square(rec - x))
        return mse + vq, ({"loss": mse + vq, "mse": mse, "vq": vq}, ids, zs)

    @jax.jit
    def step(p, s, usage, data, idx, k_aug):
        x = shift_images(data[idx], k_aug, tc.max_shift)
        (_, (m, ids, zs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, x)
        updates, s = tx.update(grads, s, p)
        usage = usage + jnp.bincount(ids.ravel(), length=k)
        return optax.apply_updates(p, updates), s, usage, m, zs

    @jax.jit
    def restart(p, usage, zs, k_pick):
        pick = zs[jax.random.randint(k_pick, (k,), 0, zs.shape[0])]
        pick = pick + 0.01 * jnp.std(zs) * jax.random.normal(jax.random.fold_in(k_pick, 1), pick.shape)
        table = p["quantize"]["embedding"]["embedding"]
        dead = usage == 0
        new = jnp.where(dead[:, None], pick.astype(table.dtype), table)
        return {**p, "quantize": {**p["quantize"], "embedding": {"embedding": new}}}, jnp.sum(dead)

    data = jnp.asarray(tr_x)
    rng = np.random.default_rng(tc.seed)
    usage = jnp.zeros((k,), jnp.int32)
    progress = Progress("train_vae", tc.num_steps, tc.log_every)
    reseeded = 0
    for i in range(1, tc.num_steps + 1):
        idx = jnp.asarray(rng.choice(len(tr_x), tc.batch_size, replace=False))
        params, opt_state, usage, m, zs = step(params, opt_state, usage, data, idx,
                                               jax.random.fold_in(key, i))
        if tc.restart_every and i % tc.restart_every == 0 and i <= tc.num_steps * tc.restart_until:
            params, n_dead = restart(params, usage, zs, jax.random.fold_in(key, 10**6 + i))
            reseeded += int(n_dead)
            usage = jnp.zeros((k,), jnp.int32)
        progress(i, {**m, "lr": sched(i)})
    path = _save(os.path.join(workdir, "vae.safetensors"),
                 var_loading.vqvae_state_dict(jax.device_get(params), cfg), config.export_dtype)
    write_json(os.path.join(workdir, "vae_metrics.json"),
               {"parameters": int(n_params), "steps": tc.num_steps, "codes_reseeded": reseeded,
                "checkpoint": path, "train_seconds": round(time.time() - t0, 1),
                "train_cpu_seconds": round(time.process_time() - c0, 1)})
    return evaluate_vae(config, workdir)


def evaluate_vae(config: Any, workdir: str) -> dict[str, Any]:
    """Reconstruction MSE / PSNR on the held-out digits and code usage of WORKDIR/vae.safetensors
    as written; writes vae_reconstructions.png (originals above reconstructions)."""
    cfg = vae_config_from(config)
    params = var_loading.load_vqvae(os.path.join(workdir, "vae.safetensors"), cfg)
    tr_x, _, va_x, _ = digits_data(config)
    ids = encode_images(params, cfg, va_x)
    rec = decode_tokens(params, cfg, ids)
    mse = float(np.mean((rec - va_x) ** 2))
    val = {"mse": mse, "psnr": float(10 * np.log10(4.0 / max(mse, 1e-12))),
           **code_usage(encode_images(params, cfg, np.concatenate([tr_x, va_x])), cfg.vocab_size)}
    show = va_x[:16]
    png = save_grid(os.path.join(workdir, "vae_reconstructions.png"),
                    np.concatenate([show, rec[:16]]), nrow=16, scale=2)
    path = os.path.join(workdir, "vae_metrics.json")
    info = json.load(open(path)) if os.path.exists(path) else {}
    out = {**info, "val": val, "png": png}
    write_json(path, out)
    logging.info("evaluate_vae: val mse %.4f (psnr %.2f dB), codes used %d/%d (perplexity %.1f)",
                 mse, val["psnr"], val["codes_used"], cfg.vocab_size, val["perplexity"])
    return out


# -- the transformer ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _var_input_fn(cfg: vqvae_lib.VQVAEConfig):
    return jax.jit(lambda p, ids: vqvae_lib.VQVAE(cfg).apply(
        {"params": p}, ids, method=vqvae_lib.VQVAE.idxBl_to_var_input))


@functools.lru_cache(maxsize=8)
def _nll_fn(cfg: var_model.VARConfig):
    def nll(p, x, ids, y):
        logits = var_model.VAR(cfg).apply({"params": p}, y, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids).mean(axis=1)
    return jax.jit(nll)


def token_nll(params: Params, cfg: var_model.VARConfig, x: np.ndarray, ids: np.ndarray,
              labels: np.ndarray, batch: int = 256) -> float:
    """Mean teacher-forcing NLL per token (nats) given the VAR inputs x [N, L - 1, Cvae]."""
    out = []
    for s in range(0, len(ids), batch):
        out.append(np.asarray(_nll_fn(cfg)(params, jnp.asarray(x[s:s + batch]),
                                           jnp.asarray(ids[s:s + batch]), jnp.asarray(labels[s:s + batch]))))
    return float(np.mean(np.concatenate(out)))


def _vae_checkpoint(config: Any, workdir: str) -> str:
    return tokenizer_checkpoint(resolve_path(config.train_var.vae_checkpoint), workdir, "vae.safetensors",
                                resolve_path(config.vae.checkpoint), "VQVAE", "train_vae")


def train_var(config: Any, workdir: str) -> dict[str, Any]:
    """Trains the class-conditional VAR on the VQVAE's multi-scale tokens of the digits (and of
    their +-max_shift px translations): cross-entropy over all scales with VAR's label smoothing
    and class dropout (the null class for CFG). Writes WORKDIR/var.safetensors and meta.json."""
    t0, c0 = time.time(), time.process_time()
    tc = config.train_var
    vcfg, cfg = vae_config_from(config), var_config_from(config)
    if cfg.patch_nums != vcfg.patch_nums or cfg.vocab_size != vcfg.vocab_size or cfg.cvae != vcfg.z_channels:
        raise ValueError("config.teacher.model and config.vae.model disagree on patch_nums, "
                         f"vocab_size or Cvae: {cfg.patch_nums}/{vcfg.patch_nums}, "
                         f"{cfg.vocab_size}/{vcfg.vocab_size}, {cfg.cvae}/{vcfg.z_channels}")
    vae_path = _vae_checkpoint(config, workdir)
    vae = var_loading.load_vqvae(vae_path, vcfg)
    tr_x, tr_y, va_x, va_y = digits_data(config)
    r = range(-tc.max_shift, tc.max_shift + 1)
    shifts = [(dy, dx) for dy in r for dx in r]
    tr_ids = np.concatenate([encode_images(vae, vcfg, shift_fixed(tr_x, dy, dx)) for dy, dx in shifts])
    tr_lab = np.tile(tr_y, len(shifts)).astype(np.int32)
    tr_in = batched(lambda t: _var_input_fn(vcfg)(vae, jnp.asarray(t)), tr_ids, 256)
    va_ids = encode_images(vae, vcfg, va_x)
    va_in = batched(lambda t: _var_input_fn(vcfg)(vae, jnp.asarray(t)), va_ids, 256)
    model = var_model.VAR(cfg)
    key = jax.random.PRNGKey(tc.seed)
    params = jax.jit(lambda k: var_model.init_params(cfg, k))(jax.random.fold_in(key, 0))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    logging.info("train_var: %d sequences (%d shifts), %d parameters, %s", len(tr_ids), len(shifts),
                 n_params, cfg)
    tx, sched = optimizer(tc)
    opt_state = tx.init(params)
    ema = params if tc.ema_decay else None

    def loss_fn(p, x, ids, y, k):
        logits = model.apply({"params": p}, y, x, train=True, rngs={"dropout": k})
        target = optax.smooth_labels(jax.nn.one_hot(ids, cfg.vocab_size), tc.label_smoothing)
        return optax.softmax_cross_entropy(logits, target).mean()

    @jax.jit
    def step(p, s, e, xs, ids, labs, idx, k):
        loss, grads = jax.value_and_grad(loss_fn)(p, xs[idx], ids[idx], labs[idx], k)
        updates, s = tx.update(grads, s, p)
        p = optax.apply_updates(p, updates)
        if e is not None:
            e = optim.ema_update(e, p, tc.ema_decay)
        return p, s, e, {"loss": loss}

    xs_d, ids_d, labs_d = jnp.asarray(tr_in), jnp.asarray(tr_ids), jnp.asarray(tr_lab)
    rng = np.random.default_rng(tc.seed)
    progress = Progress("train_var", tc.num_steps, tc.log_every)
    history = []
    for i in range(1, tc.num_steps + 1):
        idx = jnp.asarray(rng.choice(len(tr_ids), tc.batch_size, replace=False))
        params, opt_state, ema, m = step(params, opt_state, ema, xs_d, ids_d, labs_d, idx,
                                         jax.random.fold_in(key, i))
        if tc.eval_every and (i % tc.eval_every == 0 or i == tc.num_steps):
            m = {**m, "val_nll": token_nll(ema if ema is not None else params, cfg, va_in, va_ids, va_y)}
            history.append({"step": i, "loss": float(m["loss"]), "val_nll": float(m["val_nll"])})
        progress(i, {**m, "lr": sched(i)})
    final = jax.device_get(ema if ema is not None else params)
    path = _save(os.path.join(workdir, "var.safetensors"), var_loading.var_state_dict(final, cfg),
                 config.export_dtype)
    write_json(os.path.join(workdir, "teacher_metrics.json"),
               {"parameters": int(n_params), "steps": tc.num_steps, "sequences": int(len(tr_ids)),
                "val_nll_history": history, "train_seconds": round(time.time() - t0, 1),
                "train_cpu_seconds": round(time.process_time() - c0, 1), "checkpoint": path,
                "vae_checkpoint": vae_path})
    return evaluate_var(config, workdir)


def sample_images(var_params: Params, cfg: var_model.VARConfig, vae: Params,
                  vcfg: vqvae_lib.VQVAEConfig, labels: np.ndarray, key: jax.Array,
                  settings: var_sampling.VARSamplingSettings, batch: int = 100):
    """Teacher samples -> (images [N, H, W, 3] in [-1, 1], ids [N, L]); batch b draws with
    fold_in(key, b)."""
    labels = np.asarray(labels, np.int32)
    out = []
    for s in range(0, len(labels), batch):
        lab = labels[s:s + batch]
        n = len(lab)
        lab = np.concatenate([lab, np.zeros(batch - n, np.int32)])
        ids = var_sampling.sample(var_params, cfg, vae, vcfg, jnp.asarray(lab), jax.random.fold_in(key, s),
                                  settings)
        out.append(np.asarray(ids)[:n])
    ids = np.concatenate(out)
    return decode_tokens(vae, vcfg, ids), ids


def evaluate_var(config: Any, workdir: str) -> dict[str, Any]:
    """Measures WORKDIR/var.safetensors as written: val/train NLL, and samples at config.sampling
    (eval_samples_per_class per class): class accuracy by the digits SVC and FID by the demo's
    protocol, also at each guidance ratio of train_var.cfg_sweep. Writes teacher_samples.png
    and meta.json."""
    tc = config.train_var
    vcfg, cfg = vae_config_from(config), var_config_from(config)
    vae_path = _vae_checkpoint(config, workdir)
    vae = var_loading.load_vqvae(vae_path, vcfg)
    params = var_loading.load_var(os.path.join(workdir, "var.safetensors"), cfg)
    tr_x, tr_y, va_x, va_y = digits_data(config)
    nll = {}
    for name, x, y in (("val_nll", va_x, va_y), ("train_nll", tr_x, tr_y)):
        ids = encode_images(vae, vcfg, x)
        nll[name] = token_nll(params, cfg, batched(lambda t: _var_input_fn(vcfg)(vae, jnp.asarray(t)),
                                                   ids, 256), ids, y)
    settings = sampling_from(config)
    labels = np.repeat(np.arange(cfg.num_classes, dtype=np.int32), tc.eval_samples_per_class)
    svc = digits_classifier()
    fid_of, protocol = digits_fid(int(config.digits.image_size))
    key = jax.random.PRNGKey(tc.sample_seed)
    t0 = time.time()
    images, _ = sample_images(params, cfg, vae, vcfg, labels, key, settings)
    seconds = time.time() - t0
    acc = float((classify_digits(svc, images) == labels).mean())
    fid = fid_of(images)
    sweep = []
    for ratio in tuple(tc.cfg_sweep):
        if float(ratio) == settings.cfg:
            sweep.append({"cfg": float(ratio), "fid_vs_data": fid, "class_accuracy": acc})
            continue
        imgs, _ = sample_images(params, cfg, vae, vcfg, labels, key,
                                dataclasses.replace(settings, cfg=float(ratio)))
        sweep.append({"cfg": float(ratio), "fid_vs_data": fid_of(imgs),
                      "class_accuracy": float((classify_digits(svc, imgs) == labels).mean())})
        logging.info("evaluate_var: cfg %.2f -> FID %.2f, class accuracy %.3f", ratio,
                     sweep[-1]["fid_vs_data"], sweep[-1]["class_accuracy"])
    show = np.concatenate([images[labels == c][:10] for c in range(cfg.num_classes)])
    png = save_grid(os.path.join(workdir, "teacher_samples.png"), show, nrow=10, scale=2)
    samples = {"class_accuracy": acc, "fid_vs_data": fid, "fid_protocol": protocol,
               "num_samples": int(len(labels)), "seed": int(tc.sample_seed),
               "seconds": round(seconds, 1), "cfg_sweep": sweep}
    path = os.path.join(workdir, "teacher_metrics.json")
    info = json.load(open(path)) if os.path.exists(path) else {}
    vae_info_path = os.path.join(os.path.dirname(os.path.abspath(vae_path)), "vae_metrics.json")
    vae_info = json.load(open(vae_info_path)) if os.path.exists(vae_info_path) else {}
    out = {**info, **nll, "samples": samples, "png": png}
    write_json(path, out)
    meta = {
        "description": "VAR multi-scale VQVAE + class-conditional VAR trained on sklearn's digits "
                       f"(32x32 RGB in [-1, 1], patch_nums {list(cfg.patch_nums)}: {cfg.seq_len} tokens)",
        "weights_dtype": config.export_dtype,
        "vae": {"file": "vae.safetensors", "config": config_to_dict(vcfg), **vae_info},
        "var": {"file": "var.safetensors", "config": config_to_dict(cfg), **nll,
                **{k: info[k] for k in ("parameters", "steps", "train_seconds", "train_cpu_seconds",
                                        "val_nll_history") if k in info}},
        "sampling": dataclasses.asdict(settings), "samples": samples,
        "train_vae": dict(config.train_vae), "train_var": dict(tc),
    }
    write_json(os.path.join(workdir, "meta.json"), json.loads(json.dumps(meta, default=_json)))
    logging.info("evaluate_var: val NLL %.4f (train %.4f), class accuracy %.3f, FID %.2f (%d samples, "
                 "%.1f s) at %s", nll["val_nll"], nll["train_nll"], acc, fid, len(labels), seconds,
                 settings)
    return out


def _json(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    return list(x) if isinstance(x, tuple) else str(x)


def export_assets(workdir: str, dest: str = ASSET_DIR) -> dict[str, str]:
    """Copies WORKDIR's vae.safetensors, var.safetensors and meta.json to `dest`."""
    os.makedirs(dest, exist_ok=True)
    for name in FILES:
        shutil.copyfile(os.path.join(workdir, name), os.path.join(dest, name))
    return {name: os.path.join(dest, name) for name in FILES}


MODES = {"train_vae": train_vae, "evaluate_vae": evaluate_vae, "train_var": train_var,
         "evaluate_var": evaluate_var}
