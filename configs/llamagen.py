r"""ddjax on LlamaGen class-conditional teachers.

Presets (the part after ':'):
  digits       (default) the embedded demo: a small LlamaGen-architecture VQ + GPT trained on
               scikit-learn's digits, shipped in ddjax/assets/digits; `mode=all` distils it on
               the CPU in minutes (`assets=DIR` points at a retrained copy, see configs/digits.py)
  tiny         a tiny randomly initialised teacher and VQ (CPU, seconds; tests and smoke runs)
  B, L         LlamaGen GPT-B / GPT-L, 256 px, VQ-16 (official checkpoints c2i_B_256.pt, ...)
  XL, XXL      GPT-XL / GPT-XXL, 384 px (576 tokens)
  XXXL         GPT-XXXL (LlamaGen's "3B" c2i), 384 px
Extra key=value pairs override the arguments below, e.g. `:B,mode=sample_teacher`.

Launch:
  python -m ddjax.main --config=configs/llamagen.py --workdir=/tmp/ddjax
  python -m ddjax.main --config=configs/llamagen.py:B --config.mode=sample_teacher \
      --config.teacher.checkpoint=/ckpts/c2i_B_256.pt --config.vq.checkpoint=/ckpts/vq_ds16_c2i.pt \
      --workdir=/tmp/ddjax_b
"""

from __future__ import annotations

import json
import os
import sys

import ml_collections as mlc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import parse_arg  # noqa: E402

# preset -> (GPT variant, image size, DD split_t, official checkpoint file name)
PRESETS = {
    "B": ("GPT-B", 256, 80, "c2i_B_256.pt"),
    "L": ("GPT-L", 256, 130, "c2i_L_256.pt"),
    "XL": ("GPT-XL", 384, 130, "c2i_XL_384.pt"),
    "XXL": ("GPT-XXL", 384, 130, "c2i_XXL_384.pt"),
    "XXXL": ("GPT-XXXL", 384, 130, "c2i_3B_384.pt"),
}
_none = mlc.config_dict.placeholder


def _flow_defaults() -> dict:
    """ddjax.mapper.flow.FlowSettings' measured defaults (RK4, 32 cubic steps, bound-checked late pruning)."""
    import dataclasses  # noqa: PLC0415

    from ddjax.mapper.flow import FlowSettings  # noqa: PLC0415

    out = dataclasses.asdict(FlowSettings())
    for k, typ in (("support_k", int), ("prune_t", float)):
        if out[k] is None:
            out[k] = _none(typ)
    return out


def _digits_assets() -> str:
    import ddjax  # noqa: PLC0415

    return os.path.join(os.path.dirname(os.path.abspath(ddjax.__file__)), "assets", "digits")


def _digits_preset(c: mlc.ConfigDict, assets: str, small: bool = False) -> None:
    """The embedded demo: the shipped digits teacher and a recipe that runs in minutes on 2 cores
    (`size=small`: a much shorter run of the same pipeline, for CI)."""
    meta_path = os.path.join(assets, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"digits teacher not found: {meta_path} (train one with configs/digits.py)")
    with open(meta_path) as f:
        meta = json.load(f)
    c.teacher.variant = meta["gpt"]["variant"]
    c.teacher.checkpoint = os.path.join(assets, meta["gpt"].get("file", "gpt.safetensors"))
    c.teacher.model.update({k: v for k, v in meta["gpt"]["model"].items()})
    c.vq.variant = meta["vq"]["variant"]
    c.vq.checkpoint = os.path.join(assets, meta["vq"].get("file", "vq.safetensors"))
    c.vq.model.update({k: tuple(v) if isinstance(v, list) else v for k, v in meta["vq"]["model"].items()})
    c.vq.image_size = meta["image_size"]
    c.sampling.update(meta["sampling"])
    c.sampling.update(batch_size=50, num_images=100, labels="0,1,2,3,4,5,6,7,8,9")
    c.data.update(num_pairs=8192, shard_size=1024, batch_size=256)
    c.train.update(t_list=(0, 20), t_weights=(1.0, 1.0), batch_size=64, num_steps=1200, lr=2e-3,
                   warmup_steps=100, min_lr_ratio=0.05, weight_decay=0.01, ema_decay=0.999,
                   log_every=100, checkpoint_every=500, keep_checkpoints=2)
    c.dd.update(t_list=(0, 20), split_t=64, teacher_start=10, num_images=100, batch_size=100)
    classifier = os.path.join(assets, "classifier.npz")
    c.eval.update(num_samples=1000, batch_size=250, extractor="digits", reference="digits",
                  extractor_weights=classifier if os.path.exists(classifier) else "", grid_size=100)
    if small:
        c.data.update(num_pairs=1024, shard_size=512, batch_size=128)
        c.train.update(num_steps=400, lr=2e-3, warmup_steps=20, batch_size=32, log_every=100,
                       checkpoint_every=200)
        c.dd.update(num_images=20, batch_size=20)
        c.eval.update(num_samples=200, batch_size=100, grid_size=25)
MODES = ("info", "sample_teacher", "generate", "train", "sample", "evaluate", "all", "train_vq",
         "train_teacher", "evaluate_vq", "evaluate_teacher")


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    a = parse_arg(arg, preset="digits", mode="all", ckpt_dir="checkpoints", assets=_digits_assets(),
                  size="full")
    c = mlc.ConfigDict()
    c.preset = a["preset"]
    c.mode = a["mode"]
    c.seed = 0

    # Mesh: the batch is split over `data`; `fsdp` shards parameters (training). -1 = the rest.
    c.mesh = mlc.ConfigDict({"data": -1, "fsdp": 1})

    c.teacher = mlc.ConfigDict()
    c.teacher.variant = "GPT-B"
    c.teacher.checkpoint = ""  # .pt / .safetensors / ddjax dir; "" only with random_init
    c.teacher.weights_key = _none(str)  # ema / model / ...; None = detect
    c.teacher.random_init = False  # allow a random teacher (tiny preset, benchmarks)
    c.teacher.dtype = "float32"  # compute dtype
    c.teacher.param_dtype = "float32"
    # GPTConfig fields; None keeps the variant's value.
    c.teacher.model = mlc.ConfigDict({
        "vocab_size": 16384, "block_size": 256, "num_classes": 1000, "cls_token_num": 1,
        "n_layer": _none(int), "dim": _none(int), "n_head": _none(int), "n_kv_head": _none(int),
        "attention_impl": _none(str),
    })

    c.vq = mlc.ConfigDict()
    c.vq.variant = "VQ-16"
    c.vq.checkpoint = ""
    c.vq.weights_key = _none(str)
    c.vq.random_init = False
    c.vq.dtype = "float32"
    # VQConfig fields; None keeps the variant's value.
    c.vq.model = mlc.ConfigDict({
        "codebook_size": 16384, "codebook_embed_dim": 8, "ch": _none(int),
        "encoder_ch_mult": _none(tuple), "decoder_ch_mult": _none(tuple), "z_channels": _none(int),
    })
    c.vq.image_size = 256

    # Teacher sampling (LlamaGen's paper settings).
    c.sampling = mlc.ConfigDict()
    c.sampling.cfg_scale = 2.0
    c.sampling.cfg_interval = -1  # guidance for all tokens; k > 0: only the first k tokens
    c.sampling.temperature = 1.0
    c.sampling.top_k = 8000  # 0 = off
    c.sampling.top_p = 1.0
    c.sampling.greedy = False
    c.sampling.batch_size = 8
    c.sampling.num_images = 16
    c.sampling.labels = _none(str)  # e.g. "207,360,387"; None = random classes

    # The flow-matching map (one token): see experiments/flow_solver/README.md for the defaults.
    c.flow = mlc.ConfigDict(_flow_defaults())

    # The noise -> token pair dataset (mode=generate).
    c.data = mlc.ConfigDict()
    c.data.dir = ""  # "" = WORKDIR/pairs
    c.data.num_pairs = 100_000
    c.data.shard_size = 1024
    c.data.batch_size = 32  # pairs mapped per compiled call (multiple of the batch shards)
    c.data.label_policy = "balanced"  # or "uniform"
    c.data.seed = 0
    c.data.verify_existing = True  # checksum finished shards when resuming

    # DD (student) sampling: t_list steps; positions < split_t snap to codes, the rest stay
    # continuous; teacher-involved sampling starts the teacher at teacher_start (0 = off).
    c.dd = mlc.ConfigDict({"t_list": (0, 80), "split_t": 80, "teacher_start": 60,
                           "num_images": 16, "batch_size": 8})
    c.student = mlc.ConfigDict()
    c.student.checkpoint = ""  # "" = the latest training checkpoint in WORKDIR/student
    c.student.init_from_teacher = True

    # --- evaluation (mode=evaluate; mode=all runs generate, train, evaluate) --------------
    c.eval = mlc.ConfigDict()
    c.eval.num_samples = 1000  # images per method, on the same noise and labels
    c.eval.batch_size = 100
    c.eval.seed = 1234
    c.eval.extractor = "inception"  # or "digits" (the demo's classifier features)
    c.eval.extractor_weights = ""  # pytorch-fid Inception .pth/.npz; digits classifier .npz
    c.eval.reference = ""  # FID reference: stats .npz (mu, sigma) or "digits" (the demo data)
    c.eval.grid_size = 64  # images per PNG grid

    # --- training (mode=train) -------------------------------------------------------------
    c.train = mlc.ConfigDict()
    c.train.t_list = (0, 80)  # timesteps t the student is trained at
    c.train.t_weights = (1.0, 1.0)  # sampling weights of t_list
    c.train.batch_size = 32  # global
    c.train.num_steps = 10_000
    c.train.lr = 1e-4
    c.train.warmup_steps = 500
    c.train.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio
    c.train.weight_decay = 0.05
    c.train.b1, c.train.b2 = 0.9, 0.95
    c.train.grad_clip = 1.0
    c.train.ema_decay = 0.9999
    c.train.ema_warmup = True  # decay min(ema_decay, (1 + n) / (10 + n)) at update n
    c.train.ce_weight = 1.0  # cross-entropy on the logits head
    c.train.cont_weight = 1.0  # continuous head loss
    c.train.cont_loss = "mse"  # "mse" to the target codes; "lpips" is not implemented yet
    c.train.lpips_weights = ""  # LPIPS weights file (cont_loss="lpips" raises without it)
    c.train.compute_dtype = "float32"  # or "bfloat16"
    c.train.sharding = "data"  # "data" (replicated params) or "fsdp"
    c.train.log_every = 50
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.train.shuffle_window = 16  # shards shuffled together

    preset = a["preset"]
    if preset == "digits":
        _digits_preset(c, a["assets"], small=a["size"] == "small")
    elif preset == "tiny":
        c.teacher.random_init = True
        c.vq.random_init = True
        c.teacher.model.update(vocab_size=64, block_size=16, num_classes=10, n_layer=2, dim=64,
                               n_head=4)
        c.vq.model.update(codebook_size=64, codebook_embed_dim=8, ch=32, encoder_ch_mult=(1, 2),
                          decoder_ch_mult=(1, 2), z_channels=32)
        c.vq.image_size = 8  # 4x4 tokens with a downsample factor of 2
        c.sampling.update(top_k=0, batch_size=4, num_images=8)
        c.data.update(num_pairs=256, shard_size=64, batch_size=16)
        c.eval.update(num_samples=64, batch_size=32, extractor="digits", reference="digits", grid_size=16)
        c.dd.update(t_list=(0, 8), split_t=8, teacher_start=4, num_images=8, batch_size=8)
        c.train.update(t_list=(0, 8), batch_size=16, num_steps=50, warmup_steps=5, lr=1e-3,
                       log_every=10, checkpoint_every=25, ema_decay=0.99)
    elif preset in PRESETS:
        variant, image_size, split_t, ckpt = PRESETS[preset]
        c.teacher.variant = variant
        c.teacher.checkpoint = os.path.join(a["ckpt_dir"], ckpt)
        c.vq.checkpoint = os.path.join(a["ckpt_dir"], "vq_ds16_c2i.pt")
        c.vq.image_size = image_size
        c.teacher.model.block_size = (image_size // 16) ** 2
        c.dd.split_t = split_t
    else:
        raise ValueError(f"unknown preset {preset!r}; choose 'digits', 'tiny' or one of {sorted(PRESETS)}")
    if c.mode not in MODES:
        raise ValueError(f"unknown mode {c.mode!r}; choose one of {MODES}")
    return c
