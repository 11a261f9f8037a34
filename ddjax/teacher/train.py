r"""Training the small real teacher shipped with the package: a LlamaGen VQ tokenizer and a
class-conditional LlamaGen GPT on scikit-learn's bundled handwritten digits.

The 1797 8x8 digits (`sklearn.datasets.load_digits`) are upsampled to 32x32 RGB in [-1, 1]
(`ddjax.evaluate.digits.digits_images`, bilinear); the VQ downsamples by 4, so every image is an
8x8 grid of 64 tokens. Both models are the LlamaGen architectures (`ddjax.teacher.vq`,
`ddjax.teacher.gpt`), only small, and both are written as `.safetensors` with LlamaGen's key
names, so they load through `load_vq` / `load_gpt` like the official checkpoints.

    python -m ddjax.teacher.train --config=configs/digits.py:train_vq --workdir=/tmp/digits
    python -m ddjax.teacher.train --config=configs/digits.py:train_teacher --workdir=/tmp/digits

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

from ddjax.convert import flax_to_torch, write_state_dict
from ddjax.evaluate.digits import digits_split
from ddjax.teacher import gpt as gpt_lib
from ddjax.teacher import sampling as sampling_lib
from ddjax.teacher import vq as vq_lib
from ddjax.teacher.loading import load_gpt, load_vq
from ddjax.utils.images import save_grid

__all__ = [
    "ASSET_DIR",
    "classify_digits",
    "decode_tokens",
    "digits_classifier",
    "digits_data",
    "digits_teacher_paths",
    "encode_images",
    "evaluate_teacher",
    "evaluate_vq",
    "export_assets",
    "gpt_config_from",
    "pool_to_8x8",
    "reconstruct",
    "sample_images",
    "token_nll",
    "train_teacher",
    "train_vq",
    "vq_config_from",
]

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "digits")
Params = Any


def digits_teacher_paths() -> dict[str, str]:
    """The shipped digits teacher: {"vq", "gpt", "meta"} absolute paths in ddjax/assets/digits/."""
    return {
        "vq": os.path.join(ASSET_DIR, "vq.safetensors"),
        "gpt": os.path.join(ASSET_DIR, "gpt.safetensors"),
        "meta": os.path.join(ASSET_DIR, "meta.json"),
    }


# -- configs ------------------------------------------------------------------------------------
def _fields(block: Any) -> dict[str, Any]:
    """Config block -> dict without None values (None keeps the variant's default)."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(block).items() if v is not None}


def vq_config_from(config: Any) -> vq_lib.VQConfig:
    """VQConfig from `config.vq` (variant + model overrides + dtype)."""
    return vq_lib.vq_config(config.vq.variant, dtype=config.vq.get("dtype", "float32"),
                            **_fields(config.vq.model))


def gpt_config_from(config: Any) -> gpt_lib.GPTConfig:
    """GPTConfig from `config.teacher` (variant + model overrides + dtypes)."""
    t = config.teacher
    return gpt_lib.gpt_config(t.variant, dtype=t.get("dtype", "float32"),
                              param_dtype=t.get("param_dtype", "float32"), **_fields(t.model))


def _overrides_json(block: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in _fields(block).items()}


# -- data ---------------------------------------------------------------------------------------
def digits_data(config: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, val_x, val_y): the stratified split of the RGB digits in [-1, 1]
    (config.data: image_size, val_fraction, split_seed, max_images: 0 = all)."""
    d = config.data
    tr_x, tr_y, va_x, va_y = digits_split(seed=d.split_seed, holdout=d.val_fraction, size=d.image_size)
    limit = d.get("max_images", 0)
    if limit:  # smoke runs: a few images only
        tr_x, tr_y, va_x, va_y = tr_x[:limit], tr_y[:limit], va_x[:limit], va_y[:limit]
    return tr_x, tr_y, va_x, va_y


def shift_images(images: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
    """Random integer translation of each image by up to +-max_shift pixels (background fill -1)."""
    if max_shift <= 0:
        return images
    b, h, w, c = images.shape
    pad = jnp.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)), constant_values=-1.0)
    offs = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
    return jax.vmap(crop)(pad, offs)


def _shift_fixed(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate all images by (dy, dx) pixels, filling with background (-1)."""
    out = np.full_like(images, -1.0)
    h, w = images.shape[1:3]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[:, yd, xd] = images[:, ys, xs]
    return out


def pool_to_8x8(images: np.ndarray) -> np.ndarray:
    """[N, S, S, 3] in [-1, 1] -> [N, 64] grey 8x8 (average pooling), the classifier's input."""
    x = np.asarray(images, np.float32).mean(axis=-1)
    n, s = x.shape[:2]
    f = s // 8
    return x.reshape(n, 8, f, 8, f).mean(axis=(2, 4)).reshape(n, 64)


def digits_classifier(seed: int = 0, images: np.ndarray | None = None,
                      labels: np.ndarray | None = None, image_size: int = 32):
    """An RBF-SVC on 8x8-pooled digits (the pooled 32x32 images of all 1797 digits by default).

    Used to check that teacher samples show the requested class: `classify_digits(clf, images)`.
    """
    from sklearn.svm import SVC  # noqa: PLC0415

    if images is None:
        from ddjax.evaluate.digits import digits_images  # noqa: PLC0415

        images, labels = digits_images(image_size)
    clf = SVC(C=10.0, gamma="scale", random_state=seed)
    clf.fit(pool_to_8x8(images), np.asarray(labels))
    return clf


def classify_digits(clf: Any, images: np.ndarray) -> np.ndarray:
    """Predicted classes [N] of images [N, S, S, 3] in [-1, 1]."""
    return np.asarray(clf.predict(pool_to_8x8(images)), np.int32)


# -- logging ------------------------------------------------------------------------------------
class _Progress:
    """Logs step, losses, steps/s and ETA every `every` steps."""

    def __init__(self, name: str, total: int, every: int):
        self.name, self.total, self.every = name, total, max(1, every)
        self.t0 = time.time()
        self.t_first: float | None = None  # after the first (compiling) step

    def __call__(self, step: int, metrics: dict[str, Any]) -> None:
        if step == 1:
            self.t_first = time.time()
        if step % self.every and step != self.total:
            return
        now = time.time()
        if self.t_first is not None and step > 1:
            rate = (step - 1) / max(now - self.t_first, 1e-9)
        else:
            rate = step / max(now - self.t0, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        vals = " ".join(f"{k}={float(v):.4g}" for k, v in metrics.items())
        logging.info("%s step %d/%d %s | %.2f steps/s, elapsed %.0fs, ETA %.0fs", self.name, step,
                     self.total, vals, rate, now - self.t0, eta)


def _schedule(lr: float, warmup: int, total: int, min_lr_ratio: float) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(1, warmup), max(total, warmup + 1),
                                              end_value=lr * min_lr_ratio)


def _decay_mask(params: Params) -> Params:
    """Weight decay on matrices, conv kernels and embeddings only (LlamaGen: dim >= 2)."""
    return jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)


def _optimizer(tc: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(clip + AdamW chain, lr schedule) from a train_vq / train_teacher block."""
    sched = _schedule(tc.lr, tc.warmup_steps, tc.num_steps, tc.min_lr_ratio)
    tx = optax.chain(
        optax.clip_by_global_norm(tc.grad_clip) if tc.grad_clip else optax.identity(),
        optax.adamw(sched, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=_decay_mask),
    )
    return tx, sched


def _export_dtype(config: Any) -> str:
    return config.get("export_dtype", "float32")


def _save_state_dict(path: str, params: Params, dtype: str = "float32") -> str:
    """LlamaGen-named `.safetensors`, floating leaves stored as `dtype` (loaders cast back)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sd = flax_to_torch(params)
    sd = {k: (v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v) for k, v in sd.items()}
    write_state_dict(path, sd)
    return path


def _write_json(path: str, obj: Any) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def _batched(fn: Callable[[np.ndarray], Any], x: np.ndarray, batch: int) -> np.ndarray:
    """fn over x in chunks of `batch` (the last chunk padded to full size: one compilation)."""
    out = []
    for s in range(0, len(x), batch):
        chunk = x[s:s + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        out.append(np.asarray(fn(chunk))[:n])
    return np.concatenate(out)


# -- VQ -----------------------------------------------------------------------------------------
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
    return _batched(lambda x: _reconstruct_fn(cfg)(params, jnp.asarray(x)), images, batch)


def encode_images(params: Params, cfg: vq_lib.VQConfig, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Token ids [N, h*w] int32 of images [N, H, W, 3]."""
    return _batched(lambda x: vq_lib.encode(params, cfg, jnp.asarray(x)), images, batch).astype(np.int32)


def decode_tokens(params: Params, cfg: vq_lib.VQConfig, tokens: np.ndarray, batch: int = 256) -> np.ndarray:
    """Images [N, H, W, 3] float32 from token ids [N, h*w]."""
    return _batched(lambda t: vq_lib.decode_ids(params, cfg, jnp.asarray(t)), tokens, batch)


def _usage(ids: np.ndarray, k: int) -> dict[str, float]:
    counts = np.bincount(np.asarray(ids).ravel(), minlength=k)
    p = counts / counts.sum()
    nz = p[p > 0]
    return {"codes_used": int((counts > 0).sum()), "usage": float((counts > 0).mean()),
            "perplexity": float(np.exp(-(nz * np.log(nz)).sum()))}


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
            **_usage(ids, cfg.codebook_size)}


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
    size = config.data.image_size
    if size % cfg.downsample_factor:
        raise ValueError(f"image size {size} is not a multiple of the VQ factor {cfg.downsample_factor}")
    logging.info("train_vq: %d train / %d val images, %s", len(tr_x), len(va_x), cfg)
    model = vq_lib.VQModel(cfg)
    key = jax.random.PRNGKey(tc.seed)
    key, init_key, restart_key = jax.random.split(key, 3)
    params = jax.jit(lambda k: vq_lib.init_params(cfg, k, size))(init_key)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    logging.info("VQ parameters: %d", n_params)
    tx, sched = _optimizer(tc)
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
    progress = _Progress("train_vq", tc.num_steps, tc.log_every)
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

    path = _save_state_dict(os.path.join(workdir, "vq.safetensors"), params, _export_dtype(config))
    train_info = {"parameters": int(n_params), "steps": tc.num_steps, "codes_reseeded": int(restarts),
                  "train_seconds": round(train_time, 1), "train_cpu_seconds": round(train_cpu, 1),
                  "checkpoint": path}
    _write_json(os.path.join(workdir, "vq_metrics.json"), train_info)
    out = evaluate_vq(config, workdir)
    out["total_seconds"] = round(time.time() - t_start, 1)
    out["total_cpu_seconds"] = round(time.process_time() - c_start, 1)
    _write_json(os.path.join(workdir, "vq_metrics.json"), out)
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
           "export_dtype": _export_dtype(config),
           "vq": {"variant": config.vq.variant, "model": _overrides_json(config.vq.model)}}
    _write_json(metrics_path, out)
    logging.info("evaluate_vq: val mse %.4f (psnr %.2f dB), codes used %d/%d (perplexity %.1f)",
                 val["mse"], val["psnr"], val["codes_used"], cfg.codebook_size, val["perplexity"])
    return out


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
    nll = _batched(lambda b: fn(params, jnp.asarray(b[:, :-1]), jnp.asarray(b[:, -1])), both, batch)
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
    return np.concatenate([encode_images(vq_params, vcfg, _shift_fixed(images, dy, dx))
                           for dy, dx in shifts])


def _shift_set(max_shift: int) -> list[tuple[int, int]]:
    """(0, 0) first, then every other (dy, dx) with |dy|, |dx| <= max_shift."""
    r = range(-max_shift, max_shift + 1)
    return [(0, 0)] + [(dy, dx) for dy in r for dx in r if (dy, dx) != (0, 0)]


def _resolve_vq_checkpoint(config: Any, workdir: str) -> str:
    """train_teacher.vq_checkpoint, else WORKDIR/vq.safetensors (train_vq's), else config.vq.checkpoint."""
    explicit = config.train_teacher.vq_checkpoint
    if explicit:
        return explicit
    local = os.path.join(workdir, "vq.safetensors")
    if os.path.exists(local):
        return local
    if config.vq.checkpoint and os.path.exists(config.vq.checkpoint):
        return config.vq.checkpoint
    raise FileNotFoundError(
        f"no VQ to tokenize with: {local} does not exist (run mode=train_vq with this workdir "
        "first) and config.vq.checkpoint is unset or missing"
    )


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
    grid = config.data.image_size // vcfg.downsample_factor
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
    tx, sched = _optimizer(tc)
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
            e = jax.tree_util.tree_map(lambda a, b: tc.ema_decay * a + (1 - tc.ema_decay) * b, e, p)
        return p, s, e, {"loss": loss}

    toks_d, labs_d = jnp.asarray(tr_tok), jnp.asarray(tr_lab)
    rng = np.random.default_rng(tc.seed)
    progress = _Progress("train_teacher", tc.num_steps, tc.log_every)
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
    path = _save_state_dict(os.path.join(workdir, "gpt.safetensors"), final, _export_dtype(config))
    train_info = {"val_nll_history": history, "parameters": int(n_params), "steps": tc.num_steps,
                  "sequences": int(len(tr_tok)), "shifts": len(shifts),
                  "train_seconds": round(train_time, 1),
                  "train_cpu_seconds": round(time.process_time() - c_start, 1),
                  "checkpoint": path, "vq_checkpoint": vq_path}
    _write_json(os.path.join(workdir, "teacher_metrics.json"), train_info)
    # Measured on the weights as written (export dtype included), as they ship.
    out = evaluate_teacher(config, workdir, vq_path=vq_path, vq_params=vq_params)
    out["total_seconds"] = round(time.time() - t_start, 1)
    out["total_cpu_seconds"] = round(time.process_time() - c_start, 1)
    _write_json(os.path.join(workdir, "teacher_metrics.json"), out)
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
    fid_of, fid_protocol = _digits_fid(int(config.data.image_size))
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
    _write_json(metrics_path, out)
    timing = lambda m, keys: {k: m[k] for k in keys if k in m}
    vq_keys = ("train_seconds", "train_cpu_seconds", "total_seconds", "total_cpu_seconds",
               "process_wall_seconds", "process_cpu_seconds")
    meta = {
        "description": "LlamaGen VQ + class-conditional LlamaGen GPT trained on sklearn's digits "
                       "(32x32 RGB in [-1, 1], 8x8 = 64 tokens per image)",
        "image_size": int(config.data.image_size),
        "weights_dtype": _export_dtype(config),
        "data": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config.data).items()},
        "vq": {"file": "vq.safetensors", "variant": config.vq.variant,
               "model": _overrides_json(config.vq.model), "config": _config_json(vcfg),
               "parameters": vq_m.get("parameters"), "metrics": vq_m.get("val"),
               **timing(vq_m, vq_keys)},
        "gpt": {"file": "gpt.safetensors", "variant": config.teacher.variant,
                "model": _overrides_json(config.teacher.model), "config": _config_json(gcfg),
                "parameters": n_params, "val_nll": val_nll, "train_nll": train_nll,
                "val_nll_history": info.get("val_nll_history"), **timing(info, vq_keys)},
        "sampling": {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)},
        "samples": samples,
        "train_vq": dict(config.train_vq) if "train_vq" in config else None,
        "train_teacher": dict(tc),
    }
    _write_json(os.path.join(workdir, "meta.json"), json.loads(json.dumps(meta, default=_json_default)))
    logging.info("evaluate_teacher: val NLL %.4f nats/token (train %.4f), sample class accuracy %.3f, "
                 "FID %.2f (%d samples) at %s", val_nll, train_nll, acc, fid, len(labels), settings)
    return out


def _digits_fid(image_size: int) -> tuple[Callable[[np.ndarray], float], str]:
    """(fid, protocol): fid(images [N, H, W, 3] in [-1, 1]) is the FID against all 1797 digits on
    the digits classifier's features, the demo's FID protocol."""
    from ddjax.evaluate.digits import digits_images  # noqa: PLC0415
    from ddjax.evaluate.features import get_extractor  # noqa: PLC0415
    from ddjax.evaluate.fid import fid_from_features  # noqa: PLC0415

    extractor = get_extractor("digits")
    ref = extractor(digits_images(size=image_size)[0])

    def fid(images: np.ndarray) -> float:
        # clamped as LlamaGen clamps decoded samples (and as the demo's report does)
        return float(fid_from_features(extractor(np.clip(images, -1.0, 1.0)), ref))

    return fid, extractor.protocol


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, tuple):
        return list(x)
    return str(x)


def _config_json(cfg: Any) -> dict[str, Any]:
    from ddjax.utils.checkpoint import config_to_dict  # noqa: PLC0415

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


def _main(argv: list[str]) -> None:  # pragma: no cover - command line
    from absl import app, flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    cfg_flag = config_flags.DEFINE_config_file("config", None, "configs/digits.py:MODE")
    wd_flag = flags.DEFINE_string("workdir", None, "output directory")
    export_flag = flags.DEFINE_string("export", None, "after train_teacher, copy the weights and "
                                      "meta.json here (e.g. ddjax/assets/digits)")
    flags.mark_flags_as_required(["config", "workdir"])

    def main(args):
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {args[1:]}")
        config = cfg_flag.value
        if config.mode not in MODES:
            raise app.UsageError(f"mode {config.mode!r} is not a training mode: {sorted(MODES)}")
        MODES[config.mode](config, wd_flag.value)
        if export_flag.value and config.mode in ("train_teacher", "evaluate_teacher"):
            logging.info("exported %s", export_assets(wd_flag.value, export_flag.value))

    app.run(main, argv)


if __name__ == "__main__":  # pragma: no cover
    import sys

    _main(sys.argv)
