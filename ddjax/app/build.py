"""Config -> the run's objects, each built once: teacher, mesh, pair dataset, student, features.

Paths in a config may start with `ddjax:` (inside the installed package, e.g. the shipped
digits teacher `ddjax:assets/digits/gpt.safetensors`); they are resolved here
(`ddjax.utils.paths`), when the job starts, so that configs stay plain data.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging

from ddjax import sharding
from ddjax.evaluate import lpips as lpips_lib
from ddjax.evaluate import reference as reference_lib
from ddjax.evaluate.digits import digits_images
from ddjax.evaluate.features import FeatureExtractor, get_extractor
from ddjax.mapper.pairs import PairDataset
from ddjax.student.loading import load_student
from ddjax.student.train import ImageLoss, TrainSettings
from ddjax.teacher.base import Teacher
from ddjax.teacher.llamagen import gpt as gpt_lib
from ddjax.teacher.llamagen import vq as vq_lib
from ddjax.teacher.llamagen.captions import CaptionSet
from ddjax.teacher.llamagen.family import LlamaGenTeacher
from ddjax.teacher.llamagen.loading import load_gpt, load_vq
from ddjax.teacher.var import model as var_lib
from ddjax.teacher.var import vqvae as vqvae_lib
from ddjax.teacher.var.family import VARTeacher
from ddjax.teacher.var.loading import load_var, load_vqvae
from ddjax.utils.paths import resolve_path


def _fields(block: Any) -> dict[str, Any]:
    """Config block -> dict without None values (None keeps the variant's default)."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in block.items() if v is not None}


# -- teachers -----------------------------------------------------------------------------------
def gpt_config(config: Any) -> gpt_lib.GPTConfig:
    t = config.teacher
    return gpt_lib.gpt_config(t.variant, dtype=t.dtype, param_dtype=t.param_dtype, **_fields(t.model))


def vq_config(config: Any) -> vq_lib.VQConfig:
    return vq_lib.vq_config(config.vq.variant, dtype=config.vq.dtype, **_fields(config.vq.model))


def _load_or_init(block: Any, what: str, load_fn, init_fn, cfg, seed: int):
    path = resolve_path(block.checkpoint)
    if path:
        logging.info("loading %s weights from %s", what, path)
        return load_fn(path, cfg, block.weights_key)
    if not block.random_init:
        raise ValueError(
            f"config.{what}.checkpoint is empty: point it at a checkpoint "
            f"(--config.{what}.checkpoint=PATH) or set --config.{what}.random_init=True")
    logging.warning("%s: random weights (config.%s.random_init=True)", what, what)
    return init_fn(cfg, jax.random.PRNGKey(seed))


def caption_set(config: Any) -> CaptionSet | None:
    """config.captions.path: a CaptionSet `.npz` or a directory of LlamaGen T5 `.npy` files
    (None when the config has no captions block or an empty path)."""
    block = config.get("captions")
    path = resolve_path(block.path) if block is not None else ""
    if block is not None and block.get("random", 0) and not path:
        dim = config.teacher.model.caption_dim
        return random_captions(int(block.random), block.max_len, dim, config.seed)
    if not path:
        return None
    logging.info("loading captions from %s", path)
    if os.path.isdir(path):
        return CaptionSet.from_feature_dir(path, max_len=block.max_len)
    return CaptionSet.load(path)


def random_captions(num: int, max_len: int, dim: int, seed: int) -> CaptionSet:
    """Seeded random captions of 1..max_len tokens, left-padded (tiny runs and tests)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, num)
    mask = np.arange(max_len)[None, :] >= (max_len - lengths)[:, None]
    feats = rng.normal(size=(num, max_len, dim)).astype(np.float32) * mask[..., None]
    return CaptionSet(feats, mask, texts=[f"random caption {i}" for i in range(num)])


def build_llamagen(config: Any) -> LlamaGenTeacher:
    cfg, vcfg = gpt_config(config), vq_config(config)
    params = _load_or_init(config.teacher, "teacher", load_gpt, gpt_lib.init_params, cfg, config.seed)
    vparams = _load_or_init(config.vq, "vq", load_vq, vq_lib.init_params, vcfg, config.seed + 1)
    captions = caption_set(config)
    if cfg.model_type == "t2i" and captions is None:
        raise ValueError("a t2i teacher conditions on captions: set config.captions.path to a "
                         "caption set (.npz) or a directory of LlamaGen T5 feature files")
    teacher = LlamaGenTeacher(cfg, params, vcfg, vparams, variant=config.teacher.variant,
                              checkpoint=resolve_path(config.teacher.checkpoint), captions=captions)
    if not teacher.has_null_class:
        logging.warning("teacher has no null class row: CFG is unavailable")
    return teacher


def var_config(config: Any) -> var_lib.VARConfig:
    t = config.teacher
    return var_lib.var_config(t.depth, dtype=t.dtype, param_dtype=t.param_dtype, **_fields(t.model))


def vae_config(config: Any) -> vqvae_lib.VQVAEConfig:
    return vqvae_lib.vqvae_config(dtype=config.vae.dtype, **_fields(config.vae.model))


def build_var(config: Any) -> VARTeacher:
    cfg, vcfg = var_config(config), vae_config(config)
    params = _load_or_init(config.teacher, "teacher", load_var, var_lib.init_params, cfg, config.seed)
    vparams = _load_or_init(config.vae, "vae", load_vqvae, vqvae_lib.init_params, vcfg, config.seed + 1)
    return VARTeacher(cfg, params, vcfg, vparams, variant=config.teacher.variant,
                      checkpoint=resolve_path(config.teacher.checkpoint))


# config.teacher.family -> the builder of its Teacher
FAMILIES = {"llamagen": build_llamagen, "var": build_var}


def build_teacher(config: Any) -> Teacher:
    """The teacher of `config.teacher.family` (weights, tokenizer and codebook), built once."""
    family = config.teacher.family
    if family not in FAMILIES:
        raise ValueError(f"config.teacher.family={family!r}; available: {sorted(FAMILIES)}")
    return FAMILIES[family](config)


# -- the rest -----------------------------------------------------------------------------------
def make_mesh(config: Any, local: bool = False) -> Any:
    """The mesh of config.mesh over all devices, or (local) a data-parallel mesh over this
    process's devices for pair generation (each process maps its own shards; config.mesh may
    span processes, e.g. fsdp within a host and data across hosts)."""
    if local:
        return sharding.make_mesh({"data": -1}, devices=jax.local_devices())
    return sharding.make_mesh(dict(config.mesh))


def pairs_dir(config: Any, workdir: str) -> str:
    return config.data.dir or os.path.join(workdir, "pairs")


def open_pairs(config: Any, workdir: str) -> PairDataset:
    directory = pairs_dir(config, workdir)
    if not os.path.exists(os.path.join(directory, "dataset.json")):
        raise FileNotFoundError(f"no pair dataset in {directory}: run --config.mode=generate first "
                                "(or point --config.data.dir at one)")
    return PairDataset(directory)


def student(config: Any, workdir: str, teacher: Teacher) -> tuple[Any, Any]:
    """(DDConfig, params): config.student.checkpoint, else the latest EMA of WORKDIR's run."""
    path = resolve_path(config.student.checkpoint) or workdir
    cfg, params, meta = load_student(path, teacher)
    if "step" in meta:
        logging.info("student: training step %d of %s (EMA)", meta["step"], path)
    return cfg, params


def condition_classes(teacher: Teacher) -> np.ndarray | None:
    """The class each condition names, for the report's class agreement: a caption set's
    classes (t2i), the labels themselves (c2i), or None."""
    captions = getattr(teacher, "captions", None)
    if teacher.caption_conditioned:
        return None if captions is None or captions.classes is None else captions.classes
    return np.arange(teacher.num_classes, dtype=np.int32) if teacher.num_classes else None


def class_labels(spec: str | None, num: int, num_classes: int, seed: int) -> np.ndarray:
    """config.sampling.labels ("1,2,3", cycled) or seeded uniform classes, [num] int32."""
    if spec:
        given = [int(x) for x in str(spec).split(",") if x.strip()]
        bad = [x for x in given if not 0 <= x < num_classes]
        if bad:
            raise ValueError(f"config.sampling.labels has classes outside [0, {num_classes}): {bad}")
        return np.resize(np.asarray(given, np.int32), num)
    return np.random.default_rng(seed).integers(0, num_classes, num).astype(np.int32)


def extractor(config: Any) -> FeatureExtractor:
    weights = resolve_path(config.eval.extractor_weights)
    return get_extractor(config.eval.extractor, weights or None)


def reference(config: Any, image_size: int, features: FeatureExtractor, workdir: str) -> Any:
    """The FID reference: the digits images [M, H, W, 3] in [-1, 1], the statistics of
    tfds:NAME/SPLIT (cached in WORKDIR/reference), or a statistics path."""
    ref = config.eval.reference
    if ref == "digits":
        return digits_images(size=image_size)[0]
    tfds_name = reference_lib.parse_tfds(ref)
    if tfds_name is not None:
        name = "_".join((*tfds_name, features.name, str(image_size)))
        cache = os.path.join(workdir, "reference", "".join(c if c.isalnum() else "_" for c in name) + ".npz")
        return reference_lib.tfds_reference(ref, features, image_size, cache,
                                            data_dir=resolve_path(config.eval.tfds_data_dir) or None)
    path = resolve_path(ref)
    if not os.path.exists(path):
        raise FileNotFoundError(f"config.eval.reference not found: {path}")
    return path


def image_loss(train: TrainSettings, teacher: Teacher) -> tuple[ImageLoss, Any] | None:
    """cont_loss="lpips": (loss, weights) for LPIPS between the frozen decoder's images of the
    continuous tokens and of the target codes (the official `--loss_norm lpips`); else None."""
    if train.cont_loss != "lpips":
        return None
    weights = {"lpips": lpips_lib.load_lpips(resolve_path(train.lpips_weights),
                                             resolve_path(train.lpips_lin_weights) or None),
               "decoder": teacher.tokenizer_params}
    decode = teacher.latent_decoder()

    def loss(w: Any, latents: jax.Array, targets: jax.Array) -> jax.Array:
        w = jax.lax.stop_gradient(w)
        return lpips_lib.lpips_distance(w["lpips"], decode(w["decoder"], latents),
                                        decode(w["decoder"], targets))

    return loss, weights
