r"""ddjax on LlamaGen text-to-image teachers (DD1 for text-conditional AR models).

The pipeline is the class-conditional one (configs/llamagen.py) with captions in place of class
labels: pair files, the trainer and the report carry caption ids, which index a caption set
(`config.captions.path`: a CaptionSet `.npz`, or a directory of LlamaGen T5 feature `.npy`
files as its language/extract_t5_feature.py writes them, one per caption, [1, n, 2048]).

Presets (the part after ':'):
  digits       (default) the embedded demo: a small LlamaGen t2i GPT over the digits VQ,
               conditioned on short captions ("a thin seven") embedded by a small shipped text
               encoder (ddjax/assets/digits_t2i); `mode=all` distils it on the CPU
  tiny         a tiny random t2i teacher over random captions (tests and smoke runs)
  XL           LlamaGen's t2i GPT-XL (775M), 256 px stage-1 checkpoint t2i_XL_stage1_256.pt
               with vq_ds16_t2i.pt, 120 T5 (flan-t5-xl) tokens of 2048 dims
  XL-512       the same model at 512 px (t2i_XL_stage2_512.pt, 1024 tokens)
Extra key=value pairs override the arguments below, e.g. `:XL,mode=sample_teacher`.

Launch:
  python -m ddjax.main --config=configs/llamagen_t2i.py --workdir=/tmp/ddjax_t2i
  python -m ddjax.main --config=configs/llamagen_t2i.py:XL --config.mode=sample_teacher \
      --config.teacher.checkpoint=/ckpts/t2i_XL_stage1_256.pt \
      --config.vq.checkpoint=/ckpts/vq_ds16_t2i.pt --config.captions.path=/data/t5_features \
      --workdir=/tmp/t2i_xl
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections as mlc


def _load(name: str):
    """A sibling config file, loaded by path (no sys.path edits)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    spec = importlib.util.spec_from_file_location(f"ddjax_configs_{name[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = _load("common.py")
llamagen = _load("llamagen.py")
_none = mlc.config_dict.placeholder

DIGITS_T2I_ASSETS = common.DIGITS_T2I_ASSETS

# preset -> (image size, checkpoint file name)
PRESETS = {"XL": (256, "t2i_XL_stage1_256.pt"), "XL-512": (512, "t2i_XL_stage2_512.pt")}


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    a = common.parse_arg(arg, preset="digits", mode="all", ckpt_dir="checkpoints",
                         assets=DIGITS_T2I_ASSETS, size="full")
    preset = a["preset"]
    base = {"digits": "digits", "tiny": "tiny"}.get(preset, "B")
    c = llamagen.get_config(f"{base},mode={a['mode']},size={a['size']},ckpt_dir={a['ckpt_dir']}")
    c.preset = preset
    c.teacher.model.update(model_type="t2i", cls_token_num=120, caption_dim=2048)

    # The caption set the pipeline's caption ids index (see the module docstring).
    c.captions = mlc.ConfigDict()
    c.captions.path = ""  # .npz CaptionSet or a directory of LlamaGen T5 .npy files
    c.captions.max_len = 120  # tokens per caption (left-padded), = teacher cls_token_num
    c.captions.random = 0  # > 0: that many seeded random captions (tiny preset only)
    # Teacher sampling: caption ids to sample (config.sampling.labels, "0,5,9"; None = random).

    if preset == "digits":
        assets = a["assets"]
        c.teacher.update(checkpoint=f"{assets}/gpt.safetensors")
        c.teacher.model.update(common.DIGITS_T2I_GPT)
        c.captions.update(path=f"{assets}/captions.npz", max_len=common.DIGITS_T2I_GPT["cls_token_num"])
        c.sampling.update(common.DIGITS_T2I_SAMPLING)
        c.sampling.labels = _none(str)
    elif preset == "tiny":
        c.teacher.model.update(model_type="t2i", cls_token_num=4, caption_dim=16)
        c.captions.update(random=12, max_len=4)
    elif preset in PRESETS:
        image_size, ckpt = PRESETS[preset]
        c.teacher.update(variant="GPT-XL", checkpoint=os.path.join(a["ckpt_dir"], ckpt))
        c.teacher.model.update(block_size=(image_size // 16) ** 2)
        c.vq.update(checkpoint=os.path.join(a["ckpt_dir"], "vq_ds16_t2i.pt"), image_size=image_size)
        # LlamaGen's sample_t2i defaults: cfg 7.5, top-k 1000, top-p 1.0.
        c.sampling.update(cfg_scale=7.5, top_k=1000, top_p=1.0, temperature=1.0)
        c.flow.support_k = c.sampling.top_k  # the flow over each row's top-k codes (exact)
    else:
        raise ValueError(f"unknown preset {preset!r}; choose digits, tiny, {', '.join(PRESETS)}")
    c.method = "dd1"  # DD2 is class-conditional only for now
    return c
