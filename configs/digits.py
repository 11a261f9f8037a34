r"""The small real teacher of the embedded demo: LlamaGen VQ + class-conditional LlamaGen GPT
trained on scikit-learn's handwritten digits (32x32 RGB, 8x8 = 64 tokens per image).

Modes (the part after ':'):
  train_vq, train_teacher        training (`ddjax.demo.digits_teacher`; weights + PNG + metrics in WORKDIR)
  evaluate_vq, evaluate_teacher  re-measure WORKDIR's weights (e.g. new sampling settings), rewrite
                                 the metrics and meta.json without retraining
  train_t2i_teacher              the text-to-image teacher over the shipped VQ (`ddjax.demo.digits_t2i`)
  evaluate_t2i_teacher           re-measure WORKDIR's t2i teacher (NLL, caption agreement, FID per cfg)
  sample_teacher, info           the shipped weights through `ddjax.main`
Extra key=value pairs:
  tiny=True   16 px images, tiny models, 64 images and 3 steps (smoke runs and tests).

Launch (measured on a shared 2-core CPU: 6.5 min + 16 min wall, 3.5 + 11 CPU-min;
see experiments/digits_teacher/README.md):
  python -m ddjax.main --config=configs/digits.py:train_vq --workdir=/tmp/digits
  python -m ddjax.main --config=configs/digits.py:train_teacher --workdir=/tmp/digits \
      --config.export_dir=ddjax/assets/digits
  python -m ddjax.main --config=configs/digits.py:sample_teacher --workdir=/tmp/digits_samples
  python -m ddjax.main --config=configs/digits.py:train_t2i_teacher --workdir=/tmp/digits_t2i \
      --config.export_dir=ddjax/assets/digits_t2i

By default config.vq.checkpoint / config.teacher.checkpoint are the shipped weights
(ddjax/assets/digits/); train_teacher tokenizes with WORKDIR/vq.safetensors when train_vq wrote
one there (or with train_teacher.vq_checkpoint when set), else with config.vq.checkpoint.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections as mlc


def load_common():
    """configs/common.py, loaded by path (no sys.path edits)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py")
    spec = importlib.util.spec_from_file_location("ddjax_configs_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = load_common()

DIGITS_T2I_GPT = common.DIGITS_T2I_GPT


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    a = common.parse_arg(arg, mode="train_vq", tiny=False)
    c = mlc.ConfigDict()
    c.mode = a["mode"]
    c.preset = "digits-tiny" if a["tiny"] else "digits"
    c.seed = 0
    c.mesh = mlc.ConfigDict({"data": -1, "fsdp": 1})
    # Weights are written as LlamaGen-named .safetensors in this dtype (the loaders cast back to
    # float32); the figures in meta.json are measured on the weights as written.
    c.export_dtype = "float16"

    # Data: sklearn digits, bilinear 8 -> 32 px, grey copied to RGB, [-1, 1]; stratified split.
    c.digits = mlc.ConfigDict({"image_size": 32, "val_fraction": 0.1, "split_seed": 0,
                             "max_images": 0})  # 0 = all

    # The shipped teacher's architecture (configs/common.py): GPTConfig overrides on GPT-B and
    # VQConfig overrides on VQ-16.
    c.teacher = common.teacher_block("GPT-B", f"{common.DIGITS_ASSETS}/gpt.safetensors",
                                     common.DIGITS_GPT)
    c.vq = common.vq_block("VQ-16", f"{common.DIGITS_ASSETS}/vq.safetensors", common.DIGITS_VQ,
                           common.DIGITS_IMAGE_SIZE)
    # train_teacher / evaluate_teacher copy the weights and meta.json here when set (e.g.
    # ddjax/assets/digits to replace the shipped teacher).
    c.export_dir = ""

    c.train_vq = mlc.ConfigDict({
        "seed": 0, "num_steps": 600, "batch_size": 16, "lr": 2e-3, "warmup_steps": 100,
        "min_lr_ratio": 0.05, "b1": 0.9, "b2": 0.95, "weight_decay": 0.0, "grad_clip": 1.0,
        "l2_weight": 1.0, "l1_weight": 0.0,  # reconstruction loss
        "beta": 0.25,  # commitment
        "max_shift": 2,  # random translations (pixels)
        "restart_every": 100,  # re-seed codes unused over this many steps (0 = off) ...
        "restart_until": 0.8,  # ... during this fraction of training
        "log_every": 50, "png_images": 32,
    })

    c.train_teacher = mlc.ConfigDict({
        "seed": 0, "num_steps": 2000, "batch_size": 32, "lr": 2e-3, "warmup_steps": 100,
        "min_lr_ratio": 0.05, "b1": 0.9, "b2": 0.95, "weight_decay": 0.05, "grad_clip": 1.0,
        "ema_decay": 0.0,  # 0 = off
        "max_shift": 1,  # pre-encoded translations of every image, |dy|, |dx| <= max_shift px
        "vq_checkpoint": "",  # "" = WORKDIR/vq.safetensors if present, else config.vq.checkpoint
        "eval_every": 250, "log_every": 50,
        "eval_samples_per_class": 100, "sample_seed": 0,  # evaluate: 1000 samples at c.sampling
        # evaluate also measures FID and class accuracy at these guidance scales (same labels and
        # seed); the shipped c.sampling.cfg_scale is the FID-best of them (experiments/digits_teacher)
        "cfg_sweep": (1.0, 1.25, 1.5, 2.0, 3.0),
    })

    # The text-to-image teacher (ddjax.demo.digits_t2i; shipped in ddjax/assets/digits_t2i): a
    # LlamaGen t2i GPT the size of the c2i one over the shipped VQ, conditioned on the captions
    # of ddjax.demo.digits_captions through the frozen text encoder of ddjax.demo.text_encoder
    # (max_len = cls_token_num words, dim = caption_dim). Sampling: c.sampling with the cfg_scale
    # picked from cfg_sweep (the lowest FID with caption agreement >= min_agreement).
    c.train_t2i_teacher = mlc.ConfigDict({
        "variant": "GPT-B", "model": dict(DIGITS_T2I_GPT),
        "text_encoder": {"max_len": 8, "dim": 32, "n_layer": 1, "n_head": 4, "mlp_ratio": 2,
                         "seed": 0},
        "seed": 0, "num_steps": 2500, "batch_size": 32, "lr": 2e-3, "warmup_steps": 100,
        "min_lr_ratio": 0.05, "b1": 0.9, "b2": 0.95, "weight_decay": 0.05, "grad_clip": 1.0,
        "ema_decay": 0.0,  # 0 = off
        "max_shift": 1,  # pre-encoded translations of every image, |dy|, |dx| <= max_shift px
        "caption_seed": 0,  # templates: shifted copy k draws with caption_seed + k
        "vq_checkpoint": "",  # "" = WORKDIR/vq.safetensors if present, else config.vq.checkpoint
        "eval_every": 250, "log_every": 50,
        "eval_samples_per_digit": 100, "sample_seed": 0,  # 1000 samples per guidance scale
        "cfg_sweep": (1.0, 1.5, 2.0, 3.0), "min_agreement": 0.9,
    })

    # Teacher sampling (the settings shipped in meta.json; see experiments/digits_teacher).
    c.sampling = mlc.ConfigDict({**common.DIGITS_SAMPLING, "batch_size": 10, "num_images": 100,
                                 "labels": "0,1,2,3,4,5,6,7,8,9"})

    if a["tiny"]:  # 16 px -> 4x4 tokens, 64 images, 3 steps; no shipped weights fit these shapes
        c.vq.checkpoint = c.teacher.checkpoint = ""
        c.digits.update(image_size=16, max_images=64)
        c.vq.image_size = 16
        c.teacher.model.update(vocab_size=32, block_size=16, n_layer=1, dim=32, n_head=2)
        c.vq.model.update(codebook_size=32, encoder_ch_mult=(1, 1, 1), decoder_ch_mult=(1, 1, 1))
        c.train_vq.update(num_steps=3, batch_size=4, warmup_steps=1, restart_every=2, log_every=1,
                          png_images=4)
        c.train_teacher.update(num_steps=3, batch_size=4, warmup_steps=1, max_shift=0, eval_every=3,
                               log_every=1, eval_samples_per_class=1, cfg_sweep=(1.0,))
        c.train_t2i_teacher.model.update(vocab_size=32, block_size=16, n_layer=1, dim=32,
                                         n_head=2, caption_dim=16)
        c.train_t2i_teacher.text_encoder.update(dim=16, n_head=2)
        c.train_t2i_teacher.update(num_steps=3, batch_size=4, warmup_steps=1, max_shift=0,
                                   eval_every=3, log_every=1, eval_samples_per_digit=1,
                                   cfg_sweep=(1.0, 2.0))
        c.sampling.update(num_images=10)
    return c
