r"""ddjax on LlamaGen class-conditional teachers.

Presets (the part after ':'):
  digits       (default) the embedded demo: a small LlamaGen-architecture VQ + GPT trained on
               scikit-learn's digits, shipped in ddjax/assets/digits; `mode=all` distils it on
               the CPU in minutes (`assets=DIR` points at a retrained copy, see configs/digits.py;
               `size=small` is the short CI run of the same pipeline)
  tiny         a tiny randomly initialised teacher and VQ (CPU, seconds; tests and smoke runs)
  B, L         LlamaGen GPT-B / GPT-L, 256 px, VQ-16 (official checkpoints c2i_B_256.pt, ...)
  XL, XXL      GPT-XL / GPT-XXL, 384 px (576 tokens)
  XXXL         GPT-XXXL (LlamaGen's "3B" c2i), 384 px
Extra key=value pairs override the arguments below, e.g. `:B,mode=sample_teacher`;
`method=dd2` (e.g. `:digits,method=dd2`) adds DD2's stages (ddjax/dd2) to mode=all and DD2's
rows to the report, beside DD1's on the same noise and labels.

Launch:
  python -m ddjax.main --config=configs/llamagen.py --workdir=/tmp/ddjax
  python -m ddjax.main --config=configs/llamagen.py:B --config.mode=sample_teacher \
      --config.teacher.checkpoint=/ckpts/c2i_B_256.pt --config.vq.checkpoint=/ckpts/vq_ds16_c2i.pt \
      --workdir=/tmp/ddjax_b
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
_none = mlc.config_dict.placeholder

# preset -> (GPT variant, image size, DD split_t, official checkpoint file name)
PRESETS = {
    "B": ("GPT-B", 256, 80, "c2i_B_256.pt"),
    "L": ("GPT-L", 256, 130, "c2i_L_256.pt"),
    "XL": ("GPT-XL", 384, 130, "c2i_XL_384.pt"),
    "XXL": ("GPT-XXL", 384, 130, "c2i_XXL_384.pt"),
    "XXXL": ("GPT-XXXL", 384, 130, "c2i_3B_384.pt"),
}


def _digits_preset(c: mlc.ConfigDict, assets: str, small: bool = False) -> None:
    """The embedded demo: the shipped digits teacher and a recipe that runs in minutes on 2 cores
    (`size=small`: a much shorter run of the same pipeline, for CI)."""
    c.teacher.update(variant="GPT-B", checkpoint=f"{assets}/gpt.safetensors")
    c.teacher.model.update(common.DIGITS_GPT)
    c.vq.update(variant="VQ-16", checkpoint=f"{assets}/vq.safetensors", image_size=common.DIGITS_IMAGE_SIZE)
    c.vq.model.update(common.DIGITS_VQ)
    c.sampling.update(common.DIGITS_SAMPLING)
    c.sampling.update(batch_size=50, num_images=100, labels="0,1,2,3,4,5,6,7,8,9")
    c.data.update(num_pairs=8192, shard_size=1024, batch_size=256)
    c.train.update(t_list=(0, 20), t_weights=(1.0, 1.0), batch_size=64, num_steps=1200, lr=2e-3,
                   warmup_steps=100, min_lr_ratio=0.05, weight_decay=0.01, ema_decay=0.999,
                   log_every=100, checkpoint_every=500, keep_checkpoints=2)
    # 64 tokens: split_t 64 keeps every position snapped (split_t < 64 measured worse).
    c.dd.update(t_list=(0, 20), split_t=64, teacher_start=10, teacher_split_t=64, num_images=100,
                batch_size=100)
    c.eval.update(num_samples=1000, batch_size=250, extractor="digits", reference="digits",
                  extractor_weights="", grid_size=100)  # "": the classifier is trained (seed 0)
    if small:
        c.data.update(num_pairs=1024, shard_size=512, batch_size=128)
        c.train.update(num_steps=400, lr=2e-3, warmup_steps=20, batch_size=32, log_every=100,
                       checkpoint_every=200)
        c.dd.update(num_images=20, batch_size=20)
        c.eval.update(num_samples=200, batch_size=100, grid_size=25)
    _digits_dd2(c, small)


def _digits_dd2(c: mlc.ConfigDict, small: bool) -> None:
    """DD2 on the digits teacher (method=dd2; experiments/dd2_digits has the measurements)."""
    # The generator starts as DD1's 1-step student and the guidance network models its codes
    # (generator=student, guidance=ar; neither in the paper, nor does either need the tuned
    # network): `generator=score,guidance=score,tune_steps=400,warm_steps=600` is the
    # paper's wiring with a warm start (FID 38.6 against 17.0 here).
    c.dd2.update(num_samples=2048, batch_size=32, noise_draws=2, head_depth=2, adapt_steps=100,
                 generator="student", guidance="ar", tune_steps=0, warm_steps=0,
                 guide_warm_steps=100, csd_steps=100, guide_steps=5, log_every=25,
                 checkpoint_every=100)
    c.dd2.guide_opt.update(lr=1e-3, warmup_steps=10)
    c.dd2.gen_opt.update(lr=2e-5, warmup_steps=10)
    if small:
        c.dd2.update(num_samples=256, adapt_steps=20, guide_warm_steps=4, csd_steps=10, guide_steps=2,
                     log_every=10, checkpoint_every=20)


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    a = common.parse_arg(arg, preset="digits", mode="all", ckpt_dir="checkpoints",
                         assets=common.DIGITS_ASSETS, size="full", method="dd1")
    c = mlc.ConfigDict()
    c.preset = a["preset"]
    c.mode = a["mode"]
    c.seed = 0

    # Mesh: the batch is split over `data`; `fsdp` shards parameters (training). -1 = the rest.
    c.mesh = mlc.ConfigDict({"data": -1, "fsdp": 1})

    c.teacher = common.teacher_block("GPT-B", "", {
        "vocab_size": 16384, "block_size": 256, "num_classes": 1000, "cls_token_num": 1,
        "n_layer": _none(int), "dim": _none(int), "n_head": _none(int), "n_kv_head": _none(int),
        "attention_impl": _none(str)})
    c.vq = common.vq_block("VQ-16", "", {
        "codebook_size": 16384, "codebook_embed_dim": 8, "ch": _none(int),
        "encoder_ch_mult": _none(tuple), "decoder_ch_mult": _none(tuple), "z_channels": _none(int)},
        image_size=256)

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

    c.update(common.pipeline_blocks())
    c.method = a["method"]  # "dd1", or "dd2": DD2's stages too, and its rows in the report

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
        c.data.update(num_pairs=256, shard_size=64, batch_size=16, flow_check_tokens=64,
                      flow_check_threshold=0.98)
        c.eval.update(num_samples=64, batch_size=32, extractor="digits", reference="digits", grid_size=16)
        c.dd.update(t_list=(0, 8), split_t=8, teacher_start=4, teacher_split_t=8, num_images=8,
                    batch_size=8)
        c.train.update(t_list=(0, 8), batch_size=16, num_steps=50, warmup_steps=5, lr=1e-3,
                       log_every=10, checkpoint_every=25, ema_decay=0.99)
        c.dd2.update(num_samples=32, sample_batch_size=16, batch_size=8, noise_draws=2, head_depth=1,
                     adapt_steps=4, tune_steps=4, csd_steps=4, guide_steps=2,
                     log_every=2, checkpoint_every=2)
    elif preset in PRESETS:
        variant, image_size, split_t, ckpt = PRESETS[preset]
        c.teacher.variant = variant
        c.teacher.checkpoint = os.path.join(a["ckpt_dir"], ckpt)
        c.vq.checkpoint = os.path.join(a["ckpt_dir"], "vq_ds16_c2i.pt")
        c.vq.image_size = image_size
        c.teacher.model.block_size = (image_size // 16) ** 2
        c.dd.split_t = split_t
        # The flow integrates over each row's top-k codes only (exact; FlowSettings.support_k).
        c.flow.support_k = c.sampling.top_k
    else:
        raise ValueError(f"unknown preset {preset!r}; choose 'digits', 'tiny' or one of {sorted(PRESETS)}")
    return c
