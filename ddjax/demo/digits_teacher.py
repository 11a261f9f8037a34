r"""Training the small real teacher shipped with the package: a LlamaGen VQ tokenizer and a
class-conditional LlamaGen GPT on scikit-learn's bundled handwritten digits.

The 1797 8x8 digits (`sklearn.datasets.load_digits`) are upsampled to 32x32 RGB in [-1, 1]
(`ddjax.evaluate.digits.digits_images`, bilinear); the VQ downsamples by 4, so every image is an
8x8 grid of 64 tokens. Both models are the LlamaGen architectures (`ddjax.teacher.llamagen.vq`,
`ddjax.teacher.llamagen.gpt`), only small, and both are written as `.safetensors` with LlamaGen's key
names, so they load through `load_vq` / `load_gpt` like the official checkpoints.

    python -m ddjax.main --config=configs/digits.py:train_vq --workdir=/tmp/digits
    python -m ddjax.main --config=configs/digits.py:train_teacher --workdir=/tmp/digits

`train_vq` writes WORKDIR/vq.safetensors, vq_reconstructions.png and vq_metrics.json;
`train_teacher` encodes the digits with that VQ and writes WORKDIR/gpt.safetensors,
teacher_samples.png, teacher_metrics.json and meta.json (the file shipped beside the weights in
ddjax/assets/digits/). Weights are stored in `config.export_dtype` and every figure is measured
on the weights as written (`evaluate_vq` / `evaluate_teacher`, also modes of their own, re-measure
a workdir without retraining). `digits_teacher_paths()` gives the shipped files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from ddjax.demo.common import (
    ASSET_DIR,
    Params,
    Progress,
    batched,
    classify_digits,
    digits_classifier,
    digits_data,
    digits_fid,
    export_dtype,
    gpt_config_from,
    optimizer,
    overrides_json,
    save_state_dict,
    shift_fixed,
    tokenizer_checkpoint,
    vq_config_from,
    write_json,
)
from ddjax.demo.digits_vq import (
    decode_tokens,
    encode_images,
    evaluate_vq,
    train_vq,
)
from ddjax.teacher.llamagen import gpt as gpt_lib
from ddjax.teacher.llamagen import sampling as sampling_lib
from ddjax.teacher.llamagen import vq as vq_lib
from ddjax.teacher.llamagen.loading import load_gpt, load_vq
from ddjax.utils import optim
from ddjax.utils.checkpoint import config_to_dict
from ddjax.utils.images import save_grid
from ddjax.utils.paths import resolve_path


# -- GPT ----------------------------------------------------------------------------------------
def _ce(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Per-token cross-entropy [B, L] (nats)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens)


@functools.lru_cache(maxsize=16)
def _nll_fn(cfg: gpt_lib.GPTConfig):
    return jax.jit(lambda p, t, y: _ce(gpt_lib.GPT(cfg).apply({"params": p}, t, y), t).mean(axis=1))


def token_nll(params: Params, cfg: gpt_lib.GPTConfig, tokens: np.ndarray, labels: np.ndarray,
              batch: int = 256) -> float:
    """Mean conditional negative log-likelihood per token (nats) under teacher forcing."""
    fn = _nll_fn(cfg)
    both = np.concatenate([tokens, labels[:, None]], axis=1).astype(np.int32)
    nll = batched(lambda b: fn(params, jnp.asarray(b[:, :-1]), jnp.asarray(b[:, -1])), both, batch)
    return float(np.mean(nll))


def sample_images(gpt_params: Params, gcfg: gpt_lib.GPTConfig, vq_params: Params,
                  vcfg: vq_lib.VQConfig, labels: np.ndarray, key: jax.Array,
                  settings: sampling_lib.SamplingSettings, batch: int = 100):
    """Teacher samples for `labels` -> (images [N, H, W, 3] float32, tokens [N, L] int32)."""
    toks = []
    labels = np.asarray(labels, np.int32)
    for s in range(0, len(labels), batch):
        lab = labels[s:s + batch]
        n = len(lab)
        if n < batch:
            lab = np.concatenate([lab, np.zeros(batch - n, np.int32)])
        t = sampling_lib.sample(gpt_params, gcfg, jnp.asarray(lab), jax.random.fold_in(key, s), settings)
        toks.append(np.asarray(t)[:n])
    tokens = np.concatenate(toks)
    return decode_tokens(vq_params, vcfg, tokens), tokens


def _augmented_tokens(vq_params: Params, vcfg: vq_lib.VQConfig, images: np.ndarray,
                      shifts: Iterable[tuple[int, int]]) -> np.ndarray:
    """Token ids of the images translated by each shift: [len(shifts) * N, L]."""
    return np.concatenate([encode_images(vq_params, vcfg, shift_fixed(images, dy, dx))
                           for dy, dx in shifts])


def _shift_set(max_shift: int) -> list[tuple[int, int]]:
    """(0, 0) first, then every other (dy, dx) with |dy|, |dx| <= max_shift."""
    r = range(-max_shift, max_shift + 1)
    return [(0, 0)] + [(dy, dx) for dy in r for dx in r if (dy, dx) != (0, 0)]


def _resolve_vq_checkpoint(config: Any, workdir: str) -> str:
    """train_teacher.vq_checkpoint, else WORKDIR/vq.safetensors (train_vq's), else config.vq.checkpoint."""
    return tokenizer_checkpoint(config.train_teacher.vq_checkpoint, workdir, "vq.safetensors",
                                resolve_path(config.vq.checkpoint), "VQ", "train_vq")


def train_teacher(config: Any, workdir: str) -> dict[str, Any]:
    """Trains the class-conditional GPT on VQ tokens of the digits.

    Writes WORKDIR/gpt.safetensors (LlamaGen names), teacher_samples.png (one row per class at
    config.sampling), teacher_metrics.json and meta.json (configs, sampling settings and the
    measured figures: the file shipped beside the weights); returns the metrics.
    """
    t_start, c_start = time.time(), time.process_time()
    tc = config.train_teacher
    vcfg = vq_config_from(config)
    gcfg = gpt_config_from(config)
    vq_path = _resolve_vq_checkpoint(config, workdir)
    logging.info("train_teacher: tokenizing with %s", vq_path)
    vq_params = load_vq(vq_path, vcfg)
    tr_x, tr_y, va_x, va_y = digits_data(config)
    grid = config.digits.image_size // vcfg.downsample_factor
    if grid * grid != gcfg.block_size:
        raise ValueError(f"block_size {gcfg.block_size} != {grid}x{grid} tokens per image")
    if gcfg.vocab_size != vcfg.codebook_size:
        raise ValueError(f"vocab_size {gcfg.vocab_size} != codebook_size {vcfg.codebook_size}")
    shifts = _shift_set(tc.max_shift)
    tr_tok = _augmented_tokens(vq_params, vcfg, tr_x, shifts)
    tr_lab = np.tile(tr_y, len(shifts)).astype(np.int32)
    va_tok = encode_images(vq_params, vcfg, va_x)
    n_orig = len(tr_x)
    logging.info("train_teacher: %d token sequences (%d shifts x %d images), %d val; %s",
                 len(tr_tok), len(shifts), n_orig, len(va_tok), gcfg)

    model = gpt_lib.GPT(gcfg)
    key = jax.random.PRNGKey(tc.seed)
    key, init_key = jax.random.split(key)
    params = jax.jit(lambda k: gpt_lib.init_params(gcfg, k))(init_key)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    logging.info("GPT parameters: %d", n_params)
    tx, sched = optimizer(tc)
    opt_state = tx.init(params)
    ema = params if tc.ema_decay else None

    def loss_fn(p, t, y, k_drop):
        logits = model.apply({"params": p}, t, y, train=True, rngs={"dropout": k_drop})
        return _ce(logits, t).mean()

    @jax.jit
    def step(p, s, e, toks, labs, idx, k_drop):
        loss, grads = jax.value_and_grad(loss_fn)(p, toks[idx], labs[idx], k_drop)
        updates, s = tx.update(grads, s, p)
        p = optax.apply_updates(p, updates)
        if e is not None:
            e = optim.ema_update(e, p, tc.ema_decay)
        return p, s, e, {"loss": loss}

    toks_d, labs_d = jnp.asarray(tr_tok), jnp.asarray(tr_lab)
    rng = np.random.default_rng(tc.seed)
    progress = Progress("train_teacher", tc.num_steps, tc.log_every)
    history = []
    for i in range(1, tc.num_steps + 1):
        idx = jnp.asarray(rng.choice(len(tr_tok), tc.batch_size, replace=False))
        params, opt_state, ema, m = step(params, opt_state, ema, toks_d, labs_d, idx,
                                         jax.random.fold_in(key, i))
        if tc.eval_every and (i % tc.eval_every == 0 or i == tc.num_steps):
            ev = ema if ema is not None else params
            m = {**m, "val_nll": token_nll(ev, gcfg, va_tok, va_y)}
            history.append({"step": i, "val_nll": float(m["val_nll"]), "loss": float(m["loss"])})
        progress(i, {**m, "lr": sched(i)})
    train_time = time.time() - t_start
    final = jax.device_get(ema if ema is not None else params)

    os.makedirs(workdir, exist_ok=True)
    path = save_state_dict(os.path.join(workdir, "gpt.safetensors"), final, export_dtype(config))
    train_info = {"val_nll_history": history, "parameters": int(n_params), "steps": tc.num_steps,
                  "sequences": int(len(tr_tok)), "shifts": len(shifts),
                  "train_seconds": round(train_time, 1),
                  "train_cpu_seconds": round(time.process_time() - c_start, 1),
                  "checkpoint": path, "vq_checkpoint": vq_path}
    write_json(os.path.join(workdir, "teacher_metrics.json"), train_info)
    # Measured on the weights as written (export dtype included), as they ship.
    out = evaluate_teacher(config, workdir, vq_path=vq_path, vq_params=vq_params)
    out["total_seconds"] = round(time.time() - t_start, 1)
    out["total_cpu_seconds"] = round(time.process_time() - c_start, 1)
    write_json(os.path.join(workdir, "teacher_metrics.json"), out)
    logging.info("train_teacher done in %.0fs (%.0f CPU-s): val NLL %.4f nats/token, sample class "
                 "accuracy %.3f; wrote %s, %s", out["total_seconds"], out["total_cpu_seconds"],
                 out["val_nll"], out["samples"]["class_accuracy"], path, out["png"])
    return out


def evaluate_teacher(config: Any, workdir: str, *, vq_path: str | None = None, params: Params = None,
                     vq_params: Params = None) -> dict[str, Any]:
    """Measures the GPT in WORKDIR/gpt.safetensors (or `params`) and writes meta.json.

    Validation / training NLL per token, and `train_teacher.eval_samples_per_class` samples per
    class at config.sampling (seed train_teacher.sample_seed) classified by `digits_classifier`;
    writes teacher_samples.png (ten per class, one row per class), merges the figures into
    teacher_metrics.json and writes meta.json (configs, sampling settings, measured figures: the
    file shipped beside the weights). Also re-measures new sampling settings without retraining.
    """
    tc = config.train_teacher
    vcfg = vq_config_from(config)
    gcfg = gpt_config_from(config)
    vq_path = vq_path or _resolve_vq_checkpoint(config, workdir)
    if vq_params is None:
        vq_params = load_vq(vq_path, vcfg)
    if params is None:
        params = load_gpt(os.path.join(workdir, "gpt.safetensors"), gcfg)
    metrics_path = os.path.join(workdir, "teacher_metrics.json")
    info: dict[str, Any] = {}
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            info = json.load(f)
    tr_x, tr_y, va_x, va_y = digits_data(config)
    val_nll = token_nll(params, gcfg, encode_images(vq_params, vcfg, va_x), va_y)
    train_nll = token_nll(params, gcfg, encode_images(vq_params, vcfg, tr_x), tr_y)
    # Samples at config.sampling, checked by the 8x8 classifier.
    settings = sampling_lib.settings_from_config(config.sampling)
    per_class = tc.eval_samples_per_class
    labels = np.repeat(np.arange(gcfg.num_classes, dtype=np.int32), per_class)
    t0 = time.time()
    images, _ = sample_images(params, gcfg, vq_params, vcfg, labels,
                              jax.random.PRNGKey(tc.sample_seed), settings)
    sample_seconds = time.time() - t0
    svc = digits_classifier()
    pred = classify_digits(svc, images)
    acc = float((pred == labels).mean())
    fid_of, fid_protocol = digits_fid(int(config.digits.image_size))
    fid = fid_of(images)
    per_class_acc = [round(float((pred[labels == c] == c).mean()), 4) for c in range(gcfg.num_classes)]
    show = np.concatenate([images[labels == c][:10] for c in range(gcfg.num_classes)])
    png = save_grid(os.path.join(workdir, "teacher_samples.png"), show, nrow=min(10, per_class), scale=2)
    samples = {"class_accuracy": acc, "per_class_accuracy": per_class_acc,
               "num_samples": int(len(labels)), "seed": int(tc.sample_seed),
               "classifier": "RBF-SVC on 8x8 average-pooled digits (digits_classifier)",
               "fid_vs_data": fid, "fid_protocol": fid_protocol,
               "seconds": round(sample_seconds, 1)}
    sweep = []
    for cfg_scale in tuple(tc.get("cfg_sweep", ())):
        if float(cfg_scale) == settings.cfg_scale:  # same labels and seed: the samples above
            row = {"cfg_scale": float(cfg_scale), "fid_vs_data": fid, "class_accuracy": acc}
        else:
            s_i = dataclasses.replace(settings, cfg_scale=float(cfg_scale))
            imgs, _ = sample_images(params, gcfg, vq_params, vcfg, labels,
                                    jax.random.PRNGKey(tc.sample_seed), s_i)
            row = {"cfg_scale": float(cfg_scale), "fid_vs_data": fid_of(imgs),
                   "class_accuracy": float((classify_digits(svc, imgs) == labels).mean())}
        logging.info("evaluate_teacher: cfg_scale %.2f -> FID %.2f, class accuracy %.3f", cfg_scale,
                     row["fid_vs_data"], row["class_accuracy"])
        sweep.append(row)
    if sweep:
        samples["cfg_sweep"] = sweep
    vq_m: dict[str, Any] = {}
    vq_metrics_path = os.path.join(os.path.dirname(os.path.abspath(vq_path)), "vq_metrics.json")
    if os.path.exists(vq_metrics_path):
        with open(vq_metrics_path) as f:
            vq_m = json.load(f)
    n_params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
    out = {**info, "val_nll": val_nll, "train_nll": train_nll, "samples": samples, "png": png,
           "parameters": n_params}
    write_json(metrics_path, out)
    timing = lambda m, keys: {k: m[k] for k in keys if k in m}
    vq_keys = ("train_seconds", "train_cpu_seconds", "total_seconds", "total_cpu_seconds",
               "process_wall_seconds", "process_cpu_seconds")
    meta = {
        "description": "LlamaGen VQ + class-conditional LlamaGen GPT trained on sklearn's digits "
                       "(32x32 RGB in [-1, 1], 8x8 = 64 tokens per image)",
        "image_size": int(config.digits.image_size),
        "weights_dtype": export_dtype(config),
        "data": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config.digits).items()},
        "vq": {"file": "vq.safetensors", "variant": config.vq.variant,
               "model": overrides_json(config.vq.model), "config": _config_json(vcfg),
               "parameters": vq_m.get("parameters"), "metrics": vq_m.get("val"),
               **timing(vq_m, vq_keys)},
        "gpt": {"file": "gpt.safetensors", "variant": config.teacher.variant,
                "model": overrides_json(config.teacher.model), "config": _config_json(gcfg),
                "parameters": n_params, "val_nll": val_nll, "train_nll": train_nll,
                "val_nll_history": info.get("val_nll_history"), **timing(info, vq_keys)},
        "sampling": {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)},
        "samples": samples,
        "train_vq": dict(config.train_vq) if "train_vq" in config else None,
        "train_teacher": dict(tc),
    }
    write_json(os.path.join(workdir, "meta.json"), json.loads(json.dumps(meta, default=_json_default)))
    logging.info("evaluate_teacher: val NLL %.4f nats/token (train %.4f), sample class accuracy %.3f, "
                 "FID %.2f (%d samples) at %s", val_nll, train_nll, acc, fid, len(labels), settings)
    return out


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, tuple):
        return list(x)
    return str(x)


def _config_json(cfg: Any) -> dict[str, Any]:
    return config_to_dict(cfg)


def export_assets(workdir: str, dest: str = ASSET_DIR) -> dict[str, str]:
    """Copies WORKDIR/{vq,gpt}.safetensors and meta.json to `dest` (the shipped asset folder)."""
    os.makedirs(dest, exist_ok=True)
    out = {}
    for name in ("vq.safetensors", "gpt.safetensors", "meta.json"):
        shutil.copyfile(os.path.join(workdir, name), os.path.join(dest, name))
        out[name] = os.path.join(dest, name)
    return out


MODES: dict[str, Callable[[Any, str], dict]] = {
    "train_vq": train_vq, "train_teacher": train_teacher,
    "evaluate_vq": evaluate_vq, "evaluate_teacher": evaluate_teacher,
}
