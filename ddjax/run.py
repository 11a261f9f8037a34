"""The library side of `python -m ddjax.main`: builds models from a config and runs a mode."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ddjax import sharding
from ddjax.teacher import gpt as gpt_lib
from ddjax.teacher import loading
from ddjax.teacher import sampling as sampling_lib


def _fields(block: Any) -> dict[str, Any]:
    """Config block -> dict without None values (None keeps the variant's default)."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in block.items() if v is not None}


def teacher_config(config: Any) -> gpt_lib.GPTConfig:
    t = config.teacher
    return gpt_lib.gpt_config(t.variant, dtype=t.dtype, param_dtype=t.param_dtype,
                              **_fields(t.model))


def vq_config(config: Any):
    from ddjax.teacher import vq as vq_lib  # noqa: PLC0415

    return vq_lib.vq_config(config.vq.variant, dtype=config.vq.dtype, **_fields(config.vq.model))


def _load_or_init(block: Any, what: str, load_fn, init_fn, cfg, seed: int):
    if block.checkpoint:
        logging.info("loading %s weights from %s", what, block.checkpoint)
        return load_fn(block.checkpoint, cfg, block.weights_key)
    if not block.random_init:
        raise ValueError(
            f"config.{what}.checkpoint is empty: point it at a checkpoint "
            f"(--config.{what}.checkpoint=PATH) or set --config.{what}.random_init=True"
        )
    logging.warning("%s: random weights (config.%s.random_init=True)", what, what)
    return init_fn(cfg, jax.random.PRNGKey(seed))


def load_teacher(config: Any) -> tuple[gpt_lib.GPTConfig, Any]:
    """(GPTConfig, params) from config.teacher; random weights only with random_init."""
    cfg = teacher_config(config)
    params = _load_or_init(config.teacher, "teacher", loading.load_gpt, gpt_lib.init_params, cfg,
                           config.seed)
    if cfg.model_type == "c2i" and cfg.num_cond_rows == cfg.num_classes:
        logging.warning("teacher has no null class row: CFG is unavailable")
    return cfg, params


def load_vq(config: Any):
    from ddjax.teacher import vq as vq_lib  # noqa: PLC0415

    cfg = vq_config(config)
    params = _load_or_init(config.vq, "vq", loading.load_vq,
                           lambda c, r: vq_lib.init_params(c, r), cfg, config.seed + 1)
    return cfg, params


def make_mesh(config: Any):
    return sharding.make_mesh(dict(config.mesh))


def class_labels(config: Any, num: int, num_classes: int, seed: int) -> np.ndarray:
    """config.sampling.labels ("1,2,3", cycled) or seeded uniform classes, [num] int32."""
    if config.sampling.labels:
        given = [int(x) for x in str(config.sampling.labels).split(",") if x.strip()]
        bad = [x for x in given if not 0 <= x < num_classes]
        if bad:
            raise ValueError(f"config.sampling.labels has classes outside [0, {num_classes}): {bad}")
        return np.resize(np.asarray(given, np.int32), num)
    return np.random.default_rng(seed).integers(0, num_classes, num).astype(np.int32)


# -- modes ----------------------------------------------------------------------------------
def mode_info(config: Any, workdir: str) -> dict:
    cfg, params = load_teacher(config)
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    info = {"teacher": config.teacher.variant, "parameters": int(n), "block_size": cfg.block_size,
            "vocab_size": cfg.vocab_size, "devices": [str(d) for d in jax.devices()]}
    logging.info("%s", info)
    return info


def mode_sample_teacher(config: Any, workdir: str) -> dict:
    """Samples config.sampling.num_images teacher images; writes tokens and a PNG grid."""
    from ddjax.teacher import vq as vq_lib  # noqa: PLC0415
    from ddjax.utils.images import save_grid  # noqa: PLC0415

    cfg, params = load_teacher(config)
    vcfg, vparams = load_vq(config)
    mesh = make_mesh(config)
    settings = sampling_lib.settings_from_config(config.sampling)
    s = config.sampling
    bs = s.batch_size
    if bs % sharding.batch_size_per_step(mesh):
        raise ValueError(f"config.sampling.batch_size={bs} must be a multiple of the "
                         f"{sharding.batch_size_per_step(mesh)} batch shards")
    labels = class_labels(config, s.num_images, cfg.num_classes, config.seed)
    key = jax.random.PRNGKey(config.seed)
    params = jax.device_put(params, sharding.replicated(mesh))
    all_tokens, t0 = [], time.time()
    for start in range(0, s.num_images, bs):
        lab = labels[start:start + bs]
        pad = bs - len(lab)
        lab_p = np.concatenate([lab, np.zeros(pad, np.int32)]) if pad else lab
        toks = sampling_lib.sample(params, cfg, jnp.asarray(lab_p), jax.random.fold_in(key, start),
                                   settings, mesh=mesh)
        all_tokens.append(np.asarray(toks)[: len(lab)])
        done = start + len(lab)
        el = time.time() - t0
        logging.info("teacher samples %d/%d (%.2f images/s)", done, s.num_images, done / el)
    tokens = np.concatenate(all_tokens)
    images = np.asarray(vq_lib.decode_ids(vparams, vcfg, jnp.asarray(tokens)))
    os.makedirs(workdir, exist_ok=True)
    np.savez(os.path.join(workdir, "teacher_samples.npz"), tokens=tokens, labels=labels)
    grid = save_grid(os.path.join(workdir, "teacher_samples.png"), images,
                     scale=max(1, 64 // images.shape[1]))
    logging.info("wrote %s", grid)
    return {"tokens": tokens, "labels": labels, "grid": grid}


def vq_codebook(vq_params: Any, vcfg: Any) -> np.ndarray:
    """The VQ codebook [K, d] as the teacher's tokens index it (L2-normalised when configured)."""
    from ddjax.teacher import vq as vq_lib  # noqa: PLC0415

    return np.asarray(vq_lib.VQModel(vcfg).apply({"params": vq_params}, method=vq_lib.VQModel.codebook))


def flow_settings(config: Any):
    from ddjax.mapper.flow import FlowSettings  # noqa: PLC0415

    return FlowSettings(**dict(config.flow))


def pairs_dir(config: Any, workdir: str) -> str:
    return config.data.dir or os.path.join(workdir, "pairs")


def mode_generate(config: Any, workdir: str) -> dict:
    """Writes (noise, tokens, label) pair shards with the flow-matching map; resumable."""
    from ddjax.mapper.pairs import PairSpec, generate_pairs  # noqa: PLC0415
    from ddjax.mapper.sequence import map_noise_to_tokens  # noqa: PLC0415

    cfg, params = load_teacher(config)
    vcfg, vparams = load_vq(config)
    codebook = vq_codebook(vparams, vcfg)
    settings = sampling_lib.settings_from_config(config.sampling)
    flow = flow_settings(config)
    # Each process maps its own shards on its local devices.
    mesh = sharding.make_mesh(dict(config.mesh), devices=jax.local_devices())
    if config.data.batch_size % sharding.batch_size_per_step(mesh):
        raise ValueError(f"config.data.batch_size={config.data.batch_size} must be a multiple of "
                         f"the {sharding.batch_size_per_step(mesh)} local batch shards")
    params = jax.device_put(params, sharding.replicated(mesh))
    spec = PairSpec(
        seed=config.data.seed, num_pairs=config.data.num_pairs, shard_size=config.data.shard_size,
        seq_len=cfg.block_size, noise_dim=codebook.shape[1], num_classes=cfg.num_classes,
        label_policy=config.data.label_policy,
        generator={"teacher": config.teacher.variant, "checkpoint": config.teacher.checkpoint,
                   "vocab_size": cfg.vocab_size, "sampling": dataclasses.asdict(settings),
                   "flow": dataclasses.asdict(flow)},
    )

    def map_fn(noise, labels):
        return map_noise_to_tokens(params, cfg, jnp.asarray(noise), jnp.asarray(labels), codebook,
                                   settings, flow, mesh=mesh)

    directory = pairs_dir(config, workdir)
    written = generate_pairs(directory, spec, map_fn, config.data.batch_size,
                             verify_existing=config.data.verify_existing)
    logging.info("pairs in %s: wrote %d shards now, %d in total", directory, len(written),
                 spec.num_shards)
    return {"dir": directory, "written": written}


MODES = {
    "generate": mode_generate,
    "info": mode_info,
    "sample_teacher": mode_sample_teacher,
}


def _pipeline_modes() -> dict:
    from ddjax import pipeline  # noqa: PLC0415
    from ddjax.teacher import train as teacher_train  # noqa: PLC0415

    return {"train": pipeline.mode_train, "sample": pipeline.mode_sample,
            "evaluate": pipeline.mode_evaluate, "all": pipeline.mode_all,
            # training the digits teacher (configs/digits.py)
            "train_vq": teacher_train.train_vq, "train_teacher": teacher_train.train_teacher,
            "evaluate_vq": teacher_train.evaluate_vq, "evaluate_teacher": teacher_train.evaluate_teacher}


def run(config: Any, workdir: str) -> Any:
    """Runs config.mode; each mode writes its outputs under workdir."""
    modes = {**MODES, **_pipeline_modes()}
    if config.mode not in modes:
        raise ValueError(f"config.mode={config.mode!r} is not available; modes: {sorted(modes)}")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(json.loads(config.to_json_best_effort()), f, indent=2)
    return modes[config.mode](config, workdir)
