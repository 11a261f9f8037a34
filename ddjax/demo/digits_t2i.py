r"""Training the small real TEXT-TO-IMAGE teacher shipped with the package: a LlamaGen t2i GPT on
scikit-learn's digits, conditioned on short captions ("a bold seven", "the thin digit zero").

It reuses the shipped digits VQ (ddjax/assets/digits/vq.safetensors: 32x32 px -> 8x8 = 64 tokens)
and adds
* the caption grammar of `ddjax.demo.digits_captions` (120 distinct captions: digit name, an
  ink-mass style word, one of four templates);
* the frozen text encoder of `ddjax.demo.text_encoder` (word tokenizer, left-padded to
  max_len = cls_token_num = 8 words, a seeded random 1-layer transformer, caption_dim = 32),
  playing LlamaGen's T5;
* a LlamaGen t2i GPT (`ddjax.teacher.llamagen.gpt`, model_type="t2i") the size of the c2i digits
  GPT, trained with caption dropout (class_dropout_prob: the learned null caption, for CFG).

    python -m ddjax.main --config=configs/digits.py:train_t2i_teacher --workdir=/tmp/digits_t2i \
        --config.export_dir=ddjax/assets/digits_t2i

`train_t2i_teacher` writes WORKDIR/text_encoder.npz, captions.npz (the `CaptionSet` of every
distinct caption, the table the DD pipeline conditions on by caption id), gpt.safetensors
(LlamaGen names, config.export_dtype), t2i_samples.png, t2i_metrics.json and meta.json;
`evaluate_t2i_teacher` re-measures a workdir (validation NLL; over config.train_t2i_teacher.cfg_sweep
the caption agreement, the style agreement and FID) and picks the shipped guidance scale.
`export_assets` (config.export_dir) copies the four shipped files.
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

from ddjax.demo import digits_captions as captions_lib
from ddjax.demo.common import (
    Params,
    Progress,
    classify_digits,
    digits_classifier,
    digits_data,
    digits_fid,
    export_dtype,
    fields,
    optimizer,
    save_state_dict,
    shift_fixed,
    tokenizer_checkpoint,
    vq_config_from,
    write_json,
)
from ddjax.demo.digits_vq import decode_tokens, encode_images
from ddjax.demo.text_encoder import T2I_ASSET_DIR, TextEncoder, TextEncoderConfig
from ddjax.teacher.llamagen import gpt as gpt_lib
from ddjax.teacher.llamagen import sampling as sampling_lib
from ddjax.teacher.llamagen.captions import Captions, CaptionSet
from ddjax.teacher.llamagen.loading import load_gpt, load_vq
from ddjax.utils import optim
from ddjax.utils.checkpoint import config_to_dict
from ddjax.utils.images import save_grid
from ddjax.utils.paths import resolve_path

SHIPPED_FILES = ("gpt.safetensors", "text_encoder.npz", "captions.npz", "meta.json")


# -- configs --------------------------------------------------------------------------------------
def t2i_gpt_config_from(config: Any) -> gpt_lib.GPTConfig:
    """GPTConfig from config.train_t2i_teacher (variant + model overrides), dtypes of config.teacher."""
    tc, t = config.train_t2i_teacher, config.teacher
    return gpt_lib.gpt_config(tc.variant, dtype=t.get("dtype", "float32"),
                              param_dtype=t.get("param_dtype", "float32"), **fields(tc.model))


def text_encoder_config_from(config: Any) -> TextEncoderConfig:
    """TextEncoderConfig from config.train_t2i_teacher.text_encoder over the caption grammar's vocab."""
    return TextEncoderConfig(vocab=captions_lib.VOCAB, **dict(config.train_t2i_teacher.text_encoder))


def _check_shapes(gcfg: gpt_lib.GPTConfig, ecfg: TextEncoderConfig, vcfg: Any, image_size: int):
    if gcfg.model_type != "t2i":
        raise ValueError(f"train_t2i_teacher.model.model_type must be 't2i', got {gcfg.model_type!r}")
    if ecfg.max_len != gcfg.cls_token_num or ecfg.dim != gcfg.caption_dim:
        raise ValueError(f"text encoder output [{ecfg.max_len}, {ecfg.dim}] != the GPT's "
                         f"[cls_token_num, caption_dim] = [{gcfg.cls_token_num}, {gcfg.caption_dim}]")
    grid = image_size // vcfg.downsample_factor
    if grid * grid != gcfg.block_size:
        raise ValueError(f"block_size {gcfg.block_size} != {grid}x{grid} tokens per image")
    if gcfg.vocab_size != vcfg.codebook_size:
        raise ValueError(f"vocab_size {gcfg.vocab_size} != codebook_size {vcfg.codebook_size}")


def _resolve_vq_checkpoint(config: Any, workdir: str) -> str:
    """train_t2i_teacher.vq_checkpoint, else WORKDIR/vq.safetensors, else config.vq.checkpoint
    (the shipped digits VQ)."""
    return tokenizer_checkpoint(config.train_t2i_teacher.vq_checkpoint, workdir, "vq.safetensors",
                                resolve_path(config.vq.checkpoint), "VQ", "train_vq")


def _shift_set(max_shift: int) -> list[tuple[int, int]]:
    r = range(-max_shift, max_shift + 1)
    return [(0, 0)] + [(dy, dx) for dy in r for dx in r if (dy, dx) != (0, 0)]


# -- the GPT ----------------------------------------------------------------------------------------
def _ce(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens)


@functools.lru_cache(maxsize=16)
def _nll_fn(cfg: gpt_lib.GPTConfig):
    return jax.jit(lambda p, t, f, m: _ce(gpt_lib.GPT(cfg).apply({"params": p}, t, Captions(f, m)),
                                          t).mean(axis=1))


def token_nll(params: Params, cfg: gpt_lib.GPTConfig, tokens: np.ndarray, caps: CaptionSet,
              ids: np.ndarray, batch: int = 256) -> float:
    """Mean caption-conditional NLL per token (nats) of tokens [N, L] given captions `ids` [N]."""
    fn = _nll_fn(cfg)
    out = []
    for s in range(0, len(tokens), batch):
        t, i = tokens[s:s + batch], ids[s:s + batch]
        n = len(t)
        if n < batch:  # one compilation: pad with repeats of the last row, then drop them
            t = np.concatenate([t, np.repeat(t[-1:], batch - n, axis=0)])
            i = np.concatenate([i, np.repeat(i[-1:], batch - n)])
        c = caps.lookup(i)
        out.append(np.asarray(fn(params, jnp.asarray(t, jnp.int32), jnp.asarray(c.features),
                                 jnp.asarray(c.mask)))[:n])
    return float(np.mean(np.concatenate(out)))


def sample_images(gpt_params: Params, gcfg: gpt_lib.GPTConfig, vq_params: Params, vcfg: Any,
                  caps: CaptionSet, ids: np.ndarray, key: jax.Array,
                  settings: sampling_lib.SamplingSettings, batch: int = 100):
    """Teacher samples for caption ids [N] -> (images [N, H, W, 3] float32, tokens [N, L])."""
    ids = np.asarray(ids, np.int32)
    toks = []
    for s in range(0, len(ids), batch):
        i = ids[s:s + batch]
        n = len(i)
        if n < batch:
            i = np.concatenate([i, np.zeros(batch - n, np.int32)])
        c = caps.lookup(i)
        t = sampling_lib.sample(gpt_params, gcfg, Captions(jnp.asarray(c.features), jnp.asarray(c.mask)),
                                jax.random.fold_in(key, s), settings)
        toks.append(np.asarray(t)[:n])
    tokens = np.concatenate(toks)
    return decode_tokens(vq_params, vcfg, tokens), tokens


def eval_caption_ids(per_digit: int) -> np.ndarray:
    """per_digit captions for each digit, cycling through that digit's captions: [10 * per_digit]."""
    return np.concatenate([np.resize(captions_lib.caption_ids_of_digit(d), per_digit)
                           for d in range(len(captions_lib.DIGIT_NAMES))]).astype(np.int32)


def _caption_style(ids: np.ndarray) -> np.ndarray:
    return (np.asarray(ids) // len(captions_lib.TEMPLATES)) % len(captions_lib.STYLES)


# -- training -------------------------------------------------------------------------------------
def train_t2i_teacher(config: Any, workdir: str) -> dict[str, Any]:
    """Trains the caption-conditional GPT on VQ tokens of the digits and their captions.

    Writes WORKDIR/text_encoder.npz, captions.npz, gpt.safetensors, then `evaluate_t2i_teacher`'s
    files (t2i_samples.png, t2i_metrics.json, meta.json); returns the metrics."""
    t_start, c_start = time.time(), time.process_time()
    tc = config.train_t2i_teacher
    vcfg = vq_config_from(config)
    gcfg = t2i_gpt_config_from(config)
    ecfg = text_encoder_config_from(config)
    _check_shapes(gcfg, ecfg, vcfg, int(config.digits.image_size))
    os.makedirs(workdir, exist_ok=True)

    # The frozen text encoder and the table of every distinct caption.
    encoder = TextEncoder.init(ecfg)
    encoder.save(os.path.join(workdir, "text_encoder.npz"))
    texts, classes = captions_lib.all_captions()
    caps = encoder.caption_set(texts, classes)
    caps.save(os.path.join(workdir, "captions.npz"))

    vq_path = _resolve_vq_checkpoint(config, workdir)
    logging.info("train_t2i_teacher: tokenizing with %s", vq_path)
    vq_params = load_vq(vq_path, vcfg)
    tr_x, tr_y, va_x, va_y = digits_data(config)
    shifts = _shift_set(tc.max_shift)
    # Shifted copy k gets its own template draw (seed caption_seed + k); the style word is the
    # unshifted image's.
    tr_tok = np.concatenate([encode_images(vq_params, vcfg, shift_fixed(tr_x, dy, dx))
                             for dy, dx in shifts])
    tr_cap = np.concatenate([captions_lib.image_captions(tr_x, tr_y, tc.caption_seed + k)[0]
                             for k in range(len(shifts))])
    va_tok = encode_images(vq_params, vcfg, va_x)
    va_cap = captions_lib.image_captions(va_x, va_y, tc.caption_seed)[0]
    logging.info("train_t2i_teacher: %d token sequences (%d shifts x %d images), %d val, %d "
                 "distinct captions; %s", len(tr_tok), len(shifts), len(tr_x), len(va_tok),
                 len(caps), gcfg)

    model = gpt_lib.GPT(gcfg)
    key = jax.random.PRNGKey(tc.seed)
    key, init_key = jax.random.split(key)
    params = jax.jit(lambda k: gpt_lib.init_params(gcfg, k))(init_key)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    logging.info("t2i GPT parameters: %d", n_params)
    tx, sched = optimizer(tc)
    opt_state = tx.init(params)
    ema = params if tc.ema_decay else None
    feats_d, mask_d = jnp.asarray(caps.features), jnp.asarray(caps.mask)

    def loss_fn(p, t, cid, k_drop):
        cond = Captions(feats_d[cid], mask_d[cid])
        logits = model.apply({"params": p}, t, cond, train=True, rngs={"dropout": k_drop})
        return _ce(logits, t).mean()

    @jax.jit
    def step(p, s, e, toks, cids, idx, k_drop):
        loss, grads = jax.value_and_grad(loss_fn)(p, toks[idx], cids[idx], k_drop)
        updates, s = tx.update(grads, s, p)
        p = optax.apply_updates(p, updates)
        if e is not None:
            e = optim.ema_update(e, p, tc.ema_decay)
        return p, s, e, {"loss": loss}

    toks_d, cids_d = jnp.asarray(tr_tok, jnp.int32), jnp.asarray(tr_cap, jnp.int32)
    rng = np.random.default_rng(tc.seed)
    progress = Progress("train_t2i_teacher", tc.num_steps, tc.log_every)
    history = []
    for i in range(1, tc.num_steps + 1):
        idx = jnp.asarray(rng.choice(len(tr_tok), tc.batch_size, replace=False))
        params, opt_state, ema, m = step(params, opt_state, ema, toks_d, cids_d, idx,
                                         jax.random.fold_in(key, i))
        if tc.eval_every and (i % tc.eval_every == 0 or i == tc.num_steps):
            ev = ema if ema is not None else params
            m = {**m, "val_nll": token_nll(ev, gcfg, va_tok, caps, va_cap)}
            history.append({"step": i, "val_nll": float(m["val_nll"]), "loss": float(m["loss"])})
        progress(i, {**m, "lr": sched(i)})
    train_time = time.time() - t_start
    final = jax.device_get(ema if ema is not None else params)
    path = save_state_dict(os.path.join(workdir, "gpt.safetensors"), final, export_dtype(config))
    info = {"val_nll_history": history, "parameters": int(n_params), "steps": int(tc.num_steps),
            "sequences": int(len(tr_tok)), "shifts": len(shifts),
            "train_seconds": round(train_time, 1),
            "train_cpu_seconds": round(time.process_time() - c_start, 1),
            "checkpoint": path, "vq_checkpoint": vq_path}
    write_json(os.path.join(workdir, "t2i_metrics.json"), info)
    out = evaluate_t2i_teacher(config, workdir, vq_path=vq_path, vq_params=vq_params)
    out["total_seconds"] = round(time.time() - t_start, 1)
    out["total_cpu_seconds"] = round(time.process_time() - c_start, 1)
    write_json(os.path.join(workdir, "t2i_metrics.json"), out)
    meta_path = os.path.join(workdir, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["gpt"].update(total_seconds=out["total_seconds"], total_cpu_seconds=out["total_cpu_seconds"])
    write_json(meta_path, meta)
    logging.info("train_t2i_teacher done in %.0fs (%.0f CPU-s): val NLL %.4f, caption agreement "
                 "%.3f at cfg %.2f; wrote %s", out["total_seconds"], out["total_cpu_seconds"],
                 out["val_nll"], out["samples"]["caption_agreement"], out["sampling"]["cfg_scale"],
                 path)
    return out


# -- evaluation ----------------------------------------------------------------------------------
def _pick(rows: list[dict[str, Any]], min_agreement: float) -> dict[str, Any]:
    """The lowest-FID row among those with caption agreement >= min_agreement, else the row with
    the highest agreement."""
    ok = [r for r in rows if r["caption_agreement"] >= min_agreement]
    if ok:
        return min(ok, key=lambda r: r["fid_vs_data"])
    return max(rows, key=lambda r: (r["caption_agreement"], -r["fid_vs_data"]))


def evaluate_t2i_teacher(config: Any, workdir: str, *, vq_path: str | None = None,
                         vq_params: Params = None) -> dict[str, Any]:
    """Measures WORKDIR's t2i teacher (gpt.safetensors, text_encoder.npz, captions.npz) and writes
    t2i_samples.png, t2i_metrics.json and meta.json.

    Validation / training NLL per token (each image with its seed-`caption_seed` caption), then
    for every guidance scale of train_t2i_teacher.cfg_sweep, `eval_samples_per_digit` samples per
    digit (cycling through that digit's captions, seed sample_seed, config.sampling otherwise):
    the caption agreement (the fraction `digits_classifier` reads as the digit the caption
    names), the style agreement (the fraction whose ink-mass tercile is the caption's style) and
    the FID against all 1797 digits (the demo's protocol). The shipped scale (meta.json
    "sampling") is the lowest-FID one with caption agreement >= min_agreement.
    """
    tc = config.train_t2i_teacher
    vcfg = vq_config_from(config)
    gcfg = t2i_gpt_config_from(config)
    vq_path = vq_path or _resolve_vq_checkpoint(config, workdir)
    if vq_params is None:
        vq_params = load_vq(vq_path, vcfg)
    params = load_gpt(os.path.join(workdir, "gpt.safetensors"), gcfg)
    encoder = TextEncoder.load(os.path.join(workdir, "text_encoder.npz"))
    caps = CaptionSet.load(os.path.join(workdir, "captions.npz"))
    _check_shapes(gcfg, encoder.config, vcfg, int(config.digits.image_size))
    again = encoder.encode(caps.texts)
    # Bitwise equal on the machine that wrote them; another CPU's XLA may differ in the last bits.
    caption_diff = float(np.abs(np.asarray(again.features) - caps.features).max())
    if not np.array_equal(np.asarray(again.mask), caps.mask) or caption_diff > 1e-5:
        raise ValueError(f"{workdir}/captions.npz does not match its text encoder's features "
                         f"(max difference {caption_diff:.3g})")
    metrics_path = os.path.join(workdir, "t2i_metrics.json")
    info: dict[str, Any] = {}
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            info = json.load(f)

    tr_x, tr_y, va_x, va_y = digits_data(config)
    val_nll = token_nll(params, gcfg, encode_images(vq_params, vcfg, va_x), caps,
                        captions_lib.image_captions(va_x, va_y, tc.caption_seed)[0])
    train_nll = token_nll(params, gcfg, encode_images(vq_params, vcfg, tr_x), caps,
                          captions_lib.image_captions(tr_x, tr_y, tc.caption_seed)[0])

    ids = eval_caption_ids(int(tc.eval_samples_per_digit))
    named = caps.classes[ids]
    want_style = _caption_style(ids)
    base = sampling_lib.settings_from_config(config.sampling)
    svc = digits_classifier(image_size=int(config.digits.image_size))
    fid_of, fid_protocol = digits_fid(int(config.digits.image_size))
    rows, images_at = [], {}
    for cfg_scale in tuple(tc.cfg_sweep):
        settings = dataclasses.replace(base, cfg_scale=float(cfg_scale))
        t0 = time.time()
        images, _ = sample_images(params, gcfg, vq_params, vcfg, caps, ids,
                                  jax.random.PRNGKey(tc.sample_seed), settings)
        seconds = time.time() - t0
        pred = classify_digits(svc, images)
        style = captions_lib.style_ids(images, named)
        row = {"cfg_scale": float(cfg_scale),
               "caption_agreement": float((pred == named).mean()),
               "per_digit_agreement": [round(float((pred[named == d] == d).mean()), 4)
                                       for d in range(10)],
               "style_agreement": float((style == want_style).mean()),
               "fid_vs_data": fid_of(images), "seconds": round(seconds, 1)}
        logging.info("evaluate_t2i_teacher: cfg %.2f -> caption agreement %.3f, style agreement "
                     "%.3f, FID %.2f (%.0fs)", cfg_scale, row["caption_agreement"],
                     row["style_agreement"], row["fid_vs_data"], seconds)
        rows.append(row)
        images_at[float(cfg_scale)] = images
    best = _pick(rows, float(tc.min_agreement))
    settings = dataclasses.replace(base, cfg_scale=best["cfg_scale"])
    images = images_at[best["cfg_scale"]]
    show = np.concatenate([images[named == d][:10] for d in range(10)])
    png = save_grid(os.path.join(workdir, "t2i_samples.png"), show,
                    nrow=min(10, int(tc.eval_samples_per_digit)), scale=2)
    samples = {**{k: v for k, v in best.items() if k != "seconds"},
               "num_samples": int(len(ids)), "seed": int(tc.sample_seed),
               "captions": "eval_samples_per_digit per digit, cycling through its captions",
               "classifier": "RBF-SVC on 8x8 average-pooled digits (digits_classifier)",
               "fid_protocol": fid_protocol, "cfg_sweep": rows,
               "pick": f"lowest FID with caption agreement >= {float(tc.min_agreement)}"}
    sampling = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    n_params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
    n_enc = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(encoder.params))
    out = {**info, "val_nll": val_nll, "train_nll": train_nll, "samples": samples,
           "sampling": sampling, "png": png, "parameters": n_params,
           "caption_features_max_difference": caption_diff}
    write_json(metrics_path, out)

    shipped_vq = resolve_path(config.vq.checkpoint)
    same_vq = bool(shipped_vq) and os.path.exists(shipped_vq) and os.path.samefile(vq_path, shipped_vq)
    timing = {k: info[k] for k in ("train_seconds", "train_cpu_seconds", "total_seconds",
                                   "total_cpu_seconds") if k in info}
    meta = {
        "description": "LlamaGen text-to-image GPT trained on sklearn's digits with short "
                       "captions (ddjax.demo.digits_captions), over the shipped digits VQ "
                       "(32x32 RGB in [-1, 1], 8x8 = 64 tokens per image) and a frozen seeded "
                       "random word-level text encoder (ddjax.demo.text_encoder)",
        "image_size": int(config.digits.image_size),
        "weights_dtype": export_dtype(config),
        "data": config.digits.to_dict(),
        "vq": {"checkpoint": config.vq.checkpoint if same_vq else vq_path,
               "variant": config.vq.variant, "model": _listify(fields(config.vq.model))},
        "gpt": {"file": "gpt.safetensors", "variant": tc.variant, "model": _listify(fields(tc.model)),
                "config": config_to_dict(gcfg), "parameters": n_params, "val_nll": val_nll,
                "train_nll": train_nll, "val_nll_history": info.get("val_nll_history"), **timing},
        "text_encoder": {"file": "text_encoder.npz", "config": encoder.config.to_json(),
                         "vocab": ["<pad>", "<unk>", *encoder.config.vocab],
                         "parameters": n_enc, "weights_dtype": "float32",
                         "frozen": "seeded random initialisation, never trained"},
        "captions": {"file": "captions.npz", "num_captions": len(caps), "max_len": caps.max_len,
                     "caption_dim": caps.caption_dim, "padding": "left",
                     "digit_names": list(captions_lib.DIGIT_NAMES),
                     "styles": list(captions_lib.STYLES), "templates": list(captions_lib.TEMPLATES),
                     "style_rule": "ink-mass tercile within the class over all 1797 digits"},
        "sampling": sampling,
        "samples": samples,
        "train_t2i_teacher": tc.to_dict(),
    }
    write_json(os.path.join(workdir, "meta.json"), json.loads(json.dumps(meta, default=_json_default)))
    logging.info("evaluate_t2i_teacher: val NLL %.4f (train %.4f); shipped cfg %.2f: caption "
                 "agreement %.3f, FID %.2f", val_nll, train_nll, best["cfg_scale"],
                 best["caption_agreement"], best["fid_vs_data"])
    return out


def _listify(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, (tuple, np.ndarray)):
        return list(x)
    return str(x)


def export_assets(workdir: str, dest: str = T2I_ASSET_DIR) -> dict[str, str]:
    """Copies WORKDIR's gpt.safetensors, text_encoder.npz, captions.npz and meta.json to `dest`."""
    os.makedirs(dest, exist_ok=True)
    out = {}
    for name in SHIPPED_FILES:
        shutil.copyfile(os.path.join(workdir, name), os.path.join(dest, name))
        out[name] = os.path.join(dest, name)
    return out


MODES = {"train_t2i_teacher": train_t2i_teacher, "evaluate_t2i_teacher": evaluate_t2i_teacher}
