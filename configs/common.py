"""Shared config pieces (plain data): `parse_arg`, the digits demo teacher's blocks, the flow
map's defaults. Config files load this file by path (`load_common()` in each), so no config
edits sys.path or imports the library."""

from __future__ import annotations

import ast
from typing import Any

import ml_collections as mlc

_none = mlc.config_dict.placeholder

# The shipped digits teacher (ddjax/assets/digits; its meta.json records the same values,
# tests/test_configs.py checks they agree). `ddjax:` paths resolve inside the package.
DIGITS_ASSETS = "ddjax:assets/digits"
DIGITS_GPT = {"vocab_size": 128, "block_size": 64, "num_classes": 10, "cls_token_num": 1,
              "n_layer": 4, "dim": 128, "n_head": 4, "multiple_of": 32,
              "class_dropout_prob": 0.1,  # the null class for CFG
              # No dropout: with the shift augmentation the short run does not overfit.
              "token_dropout_p": 0.0, "resid_dropout_p": 0.0, "ffn_dropout_p": 0.0}
DIGITS_VQ = {"codebook_size": 128, "codebook_embed_dim": 8, "codebook_l2_norm": True, "ch": 32,
             "encoder_ch_mult": (1, 1, 2), "decoder_ch_mult": (1, 1, 2), "z_channels": 32,
             "num_res_blocks": 1}  # ch_mult of length 3: 4x downsampling, 32 px -> 8x8 tokens
DIGITS_IMAGE_SIZE = 32
# The teacher's sampling settings, chosen by FID (experiments/digits_teacher).
DIGITS_SAMPLING = {"cfg_scale": 1.5, "cfg_interval": -1, "temperature": 1.0, "top_k": 32,
                   "top_p": 1.0, "greedy": False}

# The embedded VAR teacher (ddjax/assets/var_digits; configs/var.py, preset digits): VAR-d4 at
# width 128 over a VAR VQVAE with 4x downsampling, 32 px -> an 8x8 f quantised over 6 scales.
# The embedded text-to-image digits teacher (ddjax/assets/digits_t2i/meta.json): the c2i
# digits GPT's shape with 8 caption tokens of 32 features instead of one class token.
DIGITS_T2I_ASSETS = "ddjax:assets/digits_t2i"
DIGITS_T2I_GPT = {**{k: v for k, v in DIGITS_GPT.items() if k not in ("num_classes", "cls_token_num")},
                  "model_type": "t2i", "cls_token_num": 8, "caption_dim": 32}
DIGITS_T2I_SAMPLING = dict(DIGITS_SAMPLING)  # cfg 1.5 is also the t2i teacher's FID-best

VAR_DIGITS_ASSETS = "ddjax:assets/var_digits"
VAR_DIGITS_PATCH_NUMS = (1, 2, 3, 4, 6, 8)  # 130 tokens
VAR_DIGITS_DEPTH = 4
VAR_DIGITS_MODEL = {"embed_dim": 128, "num_heads": 4, "num_classes": 10, "vocab_size": 256,
                    "cvae": 16, "patch_nums": VAR_DIGITS_PATCH_NUMS, "cond_drop_rate": 0.1,
                    "drop_path_rate": 0.0}
VAR_DIGITS_VAE = {"vocab_size": 256, "z_channels": 16, "ch": 32, "ch_mult": (1, 1, 2),
                  "num_res_blocks": 1, "using_sa": True, "using_mid_sa": True, "quant_resi": 0.5,
                  "share_quant_resi": 4, "patch_nums": VAR_DIGITS_PATCH_NUMS}
# The shipped sampling settings (experiments/var_digits_teacher: the guidance sweep).
VAR_DIGITS_SAMPLING = {"cfg": 1.0, "top_k": 0, "top_p": 0.0, "greedy": False}

# ddjax.mapper.flow.FlowSettings' measured defaults (experiments/flow_solver; checked equal by
# tests/test_configs.py).
FLOW_DEFAULTS = {"solver": "rk4", "num_steps": 32, "t_min": 1e-3, "schedule": "cubic",
                 "early_steps": _none(int), "early_t": 0.1, "support_k": _none(int), "prune_t": 0.1,
                 "prune_k": 512, "prune_tol": 1e-6, "chunk": 8}


def parse_arg(arg: str | None, lazy: bool = False, **spec: Any) -> dict[str, Any]:
    """Parses 'preset' or 'key=value,key=value' (or 'preset,key=value') against `spec` defaults.

    The first bare word sets the key named by the first entry of `spec` (the preset).
    Values are parsed as Python literals when possible (`runlocal=True`, `steps=100`).
    Unknown keys raise unless `lazy`.
    """
    out = dict(spec)
    if not arg:
        return out
    first_key = next(iter(spec)) if spec else None
    for i, item in enumerate(p for p in arg.split(",") if p):
        if "=" in item:
            k, v = item.split("=", 1)
        elif i == 0 and first_key is not None:
            k, v = first_key, item
        else:
            raise ValueError(f"config argument {item!r} must be key=value")
        if k not in spec and not lazy:
            raise ValueError(f"unknown config argument {k!r}; known: {sorted(spec)}")
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def model_block(fields: dict[str, Any]) -> mlc.ConfigDict:
    return mlc.ConfigDict(dict(fields))


def teacher_block(variant: str, checkpoint: str, model: dict[str, Any], family: str = "llamagen"
                  ) -> mlc.ConfigDict:
    """config.teacher: family, variant, weights and GPTConfig overrides (None keeps the variant's)."""
    return mlc.ConfigDict({
        "family": family, "variant": variant,
        "checkpoint": checkpoint,  # .pt / .safetensors / ddjax dir / ddjax:...; "" only with random_init
        "weights_key": _none(str),  # ema / model / ...; None = detect
        "random_init": False,  # allow a random teacher (tiny preset, benchmarks)
        "dtype": "float32",  # compute dtype
        "param_dtype": "float32",
        "model": model_block(model)})


def vq_block(variant: str, checkpoint: str, model: dict[str, Any], image_size: int) -> mlc.ConfigDict:
    """config.vq: the tokenizer's weights and VQConfig overrides."""
    return mlc.ConfigDict({"variant": variant, "checkpoint": checkpoint, "weights_key": _none(str),
                           "random_init": False, "dtype": "float32", "model": model_block(model),
                           "image_size": image_size})


def pipeline_blocks() -> mlc.ConfigDict:
    """The DD pipeline's blocks (flow, data, dd, student, eval, train) at their defaults:
    one definition for every teacher family's config (a preset then overrides them)."""
    c = mlc.ConfigDict()
    # The flow-matching map (one token): see experiments/flow_solver/README.md for the defaults.
    # fresh placeholders: a FieldReference shared between configs would carry one config's
    # value (say early_steps=10 of a LlamaGen preset) into every other
    c.flow = mlc.ConfigDict({k: _none(v.get_type()) if isinstance(v, mlc.FieldReference) else v
                             for k, v in FLOW_DEFAULTS.items()})

    # The noise -> token pair dataset (mode=generate).
    c.data = mlc.ConfigDict()
    c.data.dir = ""  # "" = WORKDIR/pairs
    c.data.num_pairs = 100_000
    c.data.shard_size = 1024
    c.data.batch_size = 32  # pairs mapped per compiled call (multiple of the batch shards)
    c.data.label_policy = "balanced"  # or "uniform"
    c.data.seed = 0
    c.data.verify_existing = True  # checksum finished shards when resuming
    c.data.flow_check_tokens = 256  # before writing: teacher tokens mapped by flow and a reference
    c.data.flow_check_threshold = 0.999  # ... and the agreement below which the run stops

    # DD (student) sampling: t_list steps; positions < split_t snap to codes, the rest stay
    # continuous. Teacher-involved sampling: the teacher samples from teacher_start to t_list[1]
    # (-1 = off), then a student step with teacher_split_t (-1 = the official value for
    # teacher_start: 180 for 60 and 40, 220 for 0).
    c.dd = mlc.ConfigDict({"t_list": (0, 80), "split_t": 80, "teacher_start": 60,
                           "teacher_split_t": -1, "num_images": 16, "batch_size": 8})
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
    c.eval.reference = ""  # FID reference: stats .npz (mu, sigma), tfds:NAME/SPLIT or "digits"
    c.eval.tfds_data_dir = ""  # data_dir of a tfds: reference ("" = TFDS's default); no download
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
    c.train.cont_loss = "mse"  # "mse" to the target codes, or "lpips" on VQ-decoded images
    c.train.lpips_weights = ""  # cont_loss="lpips": torchvision VGG16 weights (.pth/.safetensors/.npz)
    c.train.lpips_lin_weights = ""  # LPIPS linear layers; "" = the installed lpips package's
    c.train.compute_dtype = "float32"  # or "bfloat16"
    c.train.sharding = "data"  # "data" (replicated params) or "fsdp"
    c.train.log_every = 50
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.train.shuffle_window = 16  # shards shuffled together

    # --- DD2 (method="dd2": conditional score distillation, ddjax/dd2/train.py) --------------
    c.method = "dd1"  # "dd2": mode=all also runs DD2's stages and the report adds its rows
    c.dd2 = dd2_block()
    return c


def dd2_block() -> mlc.ConfigDict:
    """DD2's stages (ddjax.dd2.train.DD2Settings; dd2.md §5 for the paper's values)."""
    opt = lambda lr, warmup: {"lr": lr, "warmup_steps": warmup, "b1": 0.9, "b2": 0.95,  # noqa: E731
                              "weight_decay": 0.0, "grad_clip": 1.0}
    return mlc.ConfigDict({
        "batch_size": 32,  # global, every stage
        "num_samples": 4096,  # teacher sequences (ancestral, config.sampling) for adapt and tune
        "sample_batch_size": 256,
        "noise_draws": 4,  # R noise draws per sequence in the diffusion losses
        "t_min": 0.02,  # diffusion times of tune / FCS: U[t_min, 1]
        "csd_t_min": 0.02, "csd_t_max": 0.98,  # CSD times
        "csd_draws": 1,  # noise draws per generated sequence in the CSD loss
        "csd_cfg": 0.0,  # the teacher score's CFG scale in CSD (0 = config.sampling's)
        "alpha": 1.0,  # SiD's alpha
        "guide_steps": 5,  # K guidance updates per generator update
        "ema_decay": 0.9999, "ema_warmup": True,  # min(ema_decay, (i + 1) / (i + 10))
        "head_width": 0, "head_depth": 3,  # the MLP head (width 0 = the teacher's width)
        # the generator: "score" (the paper's: the tuned network fed the shifted noise) or
        # "student" (DD1's 1-step student, its code choice passed straight through, gradients
        # through softmax(logits / gen_tau); needs DD1's student; not in the paper)
        "generator": "score", "gen_tau": 1.0,
        # the guidance network: "score" (the paper's) or "ar" (generator "student" only: an AR
        # model of the generated codes, its fake score in the teacher score's closed form)
        "guidance": "score",
        "embed_tau": 0.2,  # the continuous embedding's tau / the smallest distance between codes
        "compute_dtype": "float32", "sharding": "data",
        "adapt_steps": 200, "adapt_opt": opt(1e-4, 20),  # adapt: AR fine-tuning (0 = skip)
        "tune_steps": 1000, "tune_head_steps": 0, "tune_opt": opt(1e-3, 50),  # GTS tuning
        # The generator's warm start on DD1's pairs before CSD (not in the paper; 0 = off).
        "warm_steps": 0, "warm_opt": opt(1e-3, 20),
        # its loss: "mse" to the code, or "code_ce" (nearest-code cross-entropy, tau = warm_tau x
        # the median distance from a code to its nearest other code)
        "warm_loss": "mse", "warm_tau": 0.5,
        "guide_warm_steps": 0,  # guidance-only FCS updates on the starting generator before CSD
        "csd_steps": 300, "guide_opt": opt(2e-4, 50), "gen_opt": opt(1e-4, 10),  # CSD
        "align_steps": 0, "align_csd_steps": 0,  # performance alignment (0 = off)
        "teacher_from": 0,  # the report's "DD2 + teacher (k-L)" row: k > 0 turns it on
        "log_every": 50, "checkpoint_every": 200, "keep_checkpoints": 2,
    })
