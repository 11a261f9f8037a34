r"""ddjax on VAR (next-scale prediction) class-conditional teachers.

Presets (the part after ':'):
  digits            (default) the embedded VAR teacher: a small VAR + multi-scale VQVAE trained on
                    scikit-learn's digits, shipped in ddjax/assets/var_digits (no download);
                    modes train_vae / train_var / evaluate_vae / evaluate_var retrain or re-measure
                    it (`assets=DIR` points at a retrained copy)
  tiny              a tiny randomly initialised VAR and VQVAE (CPU, seconds; tests and smoke runs)
  d16, d20, d24, d30  the released var_d{16,20,24,30}.pth over vae_ch160v4096z32.pth (256 px,
                    10 scales, 680 tokens)
Extra key=value pairs override the arguments below, e.g. `:d16,mode=info`.

Modes: those of configs/llamagen.py (`all`, the default: pairs -> student -> report; info,
sample_teacher, generate, train, train_dd2, sample, evaluate), and for `digits` the training
modes above. DD timesteps (t_list, split_t, teacher_start) count tokens at scale boundaries.
`method=dd2` (e.g. `:digits,method=dd2`) adds DD2's stages (ddjax/dd2; on VAR without the
continuous-input adaptation) to mode=all and DD2's rows to the report.

Launch:
  python -m ddjax.main --config=configs/var.py --workdir=/tmp/var_dd          # the embedded demo
  python -m ddjax.main --config=configs/var.py:digits,method=dd2 --workdir=/tmp/var_dd2  # + DD2
  python -m ddjax.main --config=configs/var.py:digits,mode=sample_teacher --workdir=/tmp/var_samples
  python -m ddjax.main --config=configs/var.py:d16,mode=sample_teacher --workdir=/tmp/var_d16 \
      --config.teacher.checkpoint=/ckpts/var_d16.pth --config.vae.checkpoint=/ckpts/vae_ch160v4096z32.pth
  python -m ddjax.main --config=configs/var.py:digits,mode=train_vae --workdir=/tmp/var_digits
  python -m ddjax.main --config=configs/var.py:digits,mode=train_var --workdir=/tmp/var_digits \
      --config.export_dir=ddjax/assets/var_digits
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

RELEASED = {16: "var_d16.pth", 20: "var_d20.pth", 24: "var_d24.pth", 30: "var_d30.pth"}
TRAIN_MODES = ("train_vae", "evaluate_vae", "train_var", "evaluate_var")


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    a = common.parse_arg(arg, preset="digits", mode="all", assets=common.VAR_DIGITS_ASSETS,
                         method="dd1")
    preset = a["preset"]
    if preset not in ("digits", "tiny", *(f"d{d}" for d in RELEASED)):
        raise ValueError(f"unknown preset {preset!r}; presets: digits, tiny, "
                         + ", ".join(f"d{d}" for d in RELEASED))
    if a["mode"] in TRAIN_MODES and preset not in ("digits", "tiny"):
        raise ValueError(f"mode {a['mode']} trains the embedded digits teacher: use preset digits")
    c = mlc.ConfigDict()
    c.preset, c.mode, c.seed = preset, a["mode"], 0
    c.mesh = mlc.ConfigDict({"data": -1, "fsdp": 1})

    # The transformer: depth d is VAR-d (width 64 d, d heads) unless model overrides it.
    c.teacher = mlc.ConfigDict({
        "family": "var", "variant": "", "depth": 16,
        "checkpoint": "",  # var_d16.pth / .safetensors / ddjax dir / ddjax:...
        "weights_key": _none(str), "random_init": False,
        "dtype": "float32", "param_dtype": "float32",  # compute dtype (bfloat16 on accelerators)
        "model": mlc.ConfigDict({"embed_dim": _none(int), "num_heads": _none(int),
                                 "num_classes": 1000, "vocab_size": 4096, "cvae": 32,
                                 "patch_nums": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                                 "cond_drop_rate": 0.1, "drop_path_rate": _none(float),
                                 "attention_impl": _none(str)})})
    # The multi-scale VQVAE (vae_ch160v4096z32 by default).
    c.vae = mlc.ConfigDict({
        "checkpoint": "", "weights_key": _none(str), "random_init": False, "dtype": "float32",
        "model": mlc.ConfigDict({"vocab_size": 4096, "z_channels": 32, "ch": 160,
                                 "ch_mult": (1, 1, 2, 2, 4), "num_res_blocks": 2,
                                 "using_sa": True, "using_mid_sa": True, "quant_resi": 0.5,
                                 "share_quant_resi": 4,
                                 "patch_nums": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)})})

    # Teacher sampling: VAR's FID settings (cfg is VAR's guidance ratio, ramped over the scales).
    c.sampling = mlc.ConfigDict({"cfg": 1.5, "top_k": 900, "top_p": 0.96, "greedy": False,
                                 "batch_size": 8, "num_images": 16,
                                 "labels": _none(str)})  # "207,360"; None = random classes
    c.update(common.pipeline_blocks())  # flow, data, dd, student, eval, train, dd2
    c.method = a["method"]  # "dd1", or "dd2": DD2's stages too, and its rows in the report
    # VAR reads continuous tokens as it is: no continuous-input adaptation; the head is tuned
    # alone first, then the whole network (dd2.md §4); the paper's CSD teacher settings are
    # config.sampling's (VAR: cfg 2.0, top-k 900, top-p 0.95).
    c.dd2.update(adapt_steps=0, tune_head_steps=200)
    c.export_dtype = "float16"  # the embedded teacher's weights as written (loaders cast back)
    c.export_dir = ""  # train_var / evaluate_var copy weights + meta.json here when set

    if preset in {f"d{d}" for d in RELEASED}:
        depth = int(preset[1:])
        c.teacher.update(depth=depth, variant=preset)
        # DD timesteps count tokens at scale boundaries (0, 1, 5, 14, 30, 55, 91, 155, 255, 424):
        # the official t_list {0, 5 scales} for d16 and {0, 4 scales} for d20/d24, with
        # loss_split_t the same scale; teacher-involved 3 steps: the teacher samples scales 4..
        t1 = 55 if depth == 16 else 30
        c.dd.update(t_list=(0, t1), split_t=t1, teacher_start=14 if depth != 16 else 30,
                    teacher_split_t=t1 if depth != 16 else 55)
        c.train.t_list = (0, t1)
        c.sampling.top_p = 0.95  # DD's teacher settings (VAR's FID setting is 0.96)
        c.flow.support_k = c.sampling.top_k  # the flow over each row's top-k codes (exact)
    elif preset == "tiny":
        tiny_pn = (1, 2, 4)
        c.teacher.update(depth=2, variant="tiny", random_init=True)
        c.teacher.model.update(embed_dim=32, num_heads=2, num_classes=10, vocab_size=32, cvae=8,
                               patch_nums=tiny_pn)
        c.vae.update(random_init=True)
        c.vae.model.update(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1,
                           patch_nums=tiny_pn)
        c.sampling.update(cfg=1.5, top_k=0, top_p=0.0, batch_size=4, num_images=8)
        c.data.update(num_pairs=64, shard_size=32, batch_size=16, flow_check_tokens=32,
                      flow_check_threshold=0.98)
        c.eval.update(num_samples=32, batch_size=16, extractor="digits", reference="digits", grid_size=16)
        c.dd.update(t_list=(0, 5), split_t=5, teacher_start=1, teacher_split_t=5, num_images=8,
                    batch_size=8)
        c.train.update(t_list=(0, 5), batch_size=8, num_steps=20, warmup_steps=2, lr=1e-3,
                       log_every=10, checkpoint_every=10, ema_decay=0.99)
        c.dd2.update(num_samples=32, sample_batch_size=16, batch_size=8, noise_draws=2, head_depth=1,
                     tune_steps=4, tune_head_steps=2, csd_steps=4, guide_steps=2, log_every=2,
                     checkpoint_every=2)
    if preset in ("digits", "tiny"):
        _digits(c, a["assets"], tiny=preset == "tiny")
    return c


def _digits(c: mlc.ConfigDict, assets: str, tiny: bool) -> None:
    """The embedded teacher's architecture and its training recipe (configs/common.py holds the
    architecture; ddjax/assets/var_digits/meta.json records the same values)."""
    if not tiny:
        c.teacher.update(depth=common.VAR_DIGITS_DEPTH, variant="digits",
                         checkpoint=f"{assets}/var.safetensors")
        c.teacher.model.update(common.VAR_DIGITS_MODEL)
        c.vae.update(checkpoint=f"{assets}/vae.safetensors")
        c.vae.model.update(common.VAR_DIGITS_VAE)
        c.sampling.update(common.VAR_DIGITS_SAMPLING)
        c.sampling.update(batch_size=50, num_images=100, labels="0,1,2,3,4,5,6,7,8,9")
        # DD on the embedded teacher: boundaries 0, 1, 5, 14, 30, 66 of 130 tokens.
        # Sized for about 15 minutes on 2 cores (pairs ~30/s, student ~50 examples/s measured);
        # lr and split_t from experiments/var_digits_demo (recipe.py: lr 2e-3 -> 4e-3 -> 6e-3,
        # every token snapped at split_t 130 rather than 30).
        c.data.update(num_pairs=4096, shard_size=512, batch_size=256)
        c.train.update(t_list=(0, 30), t_weights=(1.0, 1.0), batch_size=32, num_steps=800, lr=6e-3,
                       warmup_steps=50, min_lr_ratio=0.05, weight_decay=0.01, ema_decay=0.995,
                       log_every=100, checkpoint_every=300, keep_checkpoints=2)
        c.dd.update(t_list=(0, 30), split_t=130, teacher_start=5, teacher_split_t=30, num_images=100,
                    batch_size=100)
        c.eval.update(num_samples=1000, batch_size=250, extractor="digits", reference="digits",
                      extractor_weights="", grid_size=100)
        # DD2 (method=dd2; experiments/dd2_var_digits has the measurements)
        # As the LlamaGen digits recipe: the generator starts as DD1's 1-step student and the
        # guidance network models its codes (generator=student, guidance=ar; not in the
        # paper), so there is no tune or warm stage; `generator=score,guidance=score,
        # tune_steps=400,tune_head_steps=100,warm_steps=600` is the paper's wiring with a warm start.
        c.dd2.update(num_samples=2048, batch_size=32, noise_draws=2, head_depth=2, tune_steps=0,
                     tune_head_steps=0, warm_steps=0, generator="student", guidance="ar",
                     guide_warm_steps=100, csd_steps=100, guide_steps=5, log_every=25,
                     checkpoint_every=100)
        c.dd2.guide_opt.update(lr=1e-3, warmup_steps=10)
        c.dd2.gen_opt.update(lr=2e-5, warmup_steps=10)
    # Data: sklearn digits, bilinear 8 -> 32 px, grey copied to RGB, [-1, 1]; stratified split.
    c.digits = mlc.ConfigDict({"image_size": 16 if tiny else common.DIGITS_IMAGE_SIZE,
                               "val_fraction": 0.1, "split_seed": 0, "max_images": 64 if tiny else 0})
    c.train_vae = mlc.ConfigDict({
        "seed": 0, "num_steps": 600, "batch_size": 16, "lr": 2e-3, "warmup_steps": 100,
        "min_lr_ratio": 0.05, "b1": 0.9, "b2": 0.95, "weight_decay": 0.0, "grad_clip": 1.0,
        "beta": 0.25,  # VAR's commitment weight
        "max_shift": 2,  # random translations (pixels)
        "restart_every": 100, "restart_until": 0.8,  # re-seed unused codes (0 = off)
        "log_every": 50})
    c.train_var = mlc.ConfigDict({
        "seed": 0, "num_steps": 2000, "batch_size": 32, "lr": 2e-3, "warmup_steps": 100,
        "min_lr_ratio": 0.05, "b1": 0.9, "b2": 0.95, "weight_decay": 0.05, "grad_clip": 1.0,
        "ema_decay": 0.0,  # 0 = off
        "label_smoothing": 0.0,  # VAR trains ImageNet with 0.1
        "max_shift": 1,  # pre-encoded translations of every image, |dy|, |dx| <= max_shift px
        "vae_checkpoint": "",  # "" = WORKDIR/vae.safetensors if present, else config.vae.checkpoint
        "eval_every": 250, "log_every": 50,
        "eval_samples_per_class": 100, "sample_seed": 0,
        "cfg_sweep": (0.0, 1.0, 1.5, 2.0, 3.0)})  # FID and accuracy at each guidance ratio
    if tiny:
        c.train_vae.update(num_steps=3, batch_size=4, warmup_steps=1, restart_every=2, log_every=1)
        c.train_var.update(num_steps=3, batch_size=4, warmup_steps=1, max_shift=0, eval_every=3,
                           log_every=1, eval_samples_per_class=1, cfg_sweep=(1.5,))
