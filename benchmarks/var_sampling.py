"""VAR teacher sampling: ddjax's compiled next-scale loop beside VAR's `autoregressive_infer_cfg`.

    python benchmarks/var_sampling.py --small                          # tiny dims, ddjax only
    python benchmarks/var_sampling.py --compare-var PATH               # d16 at batch 8 (PATH: a
                                                                       # FoundationVision/VAR checkout)
    python benchmarks/var_sampling.py --compare-var PATH --split       # loop and decoder apart,
                                                                       # with model FLOPs and MFU

VAR-d16 dimensions (16 blocks, width 1024, 16 heads, 1000 classes, vocabulary 4096 x 32, the 10
scales 1..16: 680 tokens) over the released VQVAE's architecture (vae_ch160v4096z32, 256 px),
random weights (Flax initialisers; the same weights are loaded into VAR's classes with
`strict=True`), VAR's FID sampling settings: CFG 1.5 (ramped over the scales), top-k 900,
top-p 0.95. One image is the 10-scale loop with CFG (2 rows) and, unless --no-decode, the VQVAE
decoder from f_hat to pixels, as `autoregressive_infer_cfg` returns images.

Compare mode first checks semantics: with top_k=1 both return the same images (argmax at every
scale; max |difference| printed, must be < 1e-3). Then the two are called alternately
(`interleaved`, one warm-up each), VAR under torch.no_grad in eval mode, float32,
torch.set_num_threads(--torch-threads); ddjax AOT-compiled, float32. Prints the load average
before and after: measure with the machine otherwise idle.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._common import interleaved, matmul_peak, print_environment, table, time_fn  # noqa: E402
from ddjax.teacher import var  # noqa: E402
from ddjax.teacher.var import sampling as var_sampling  # noqa: E402


def configs(args) -> tuple[var.VARConfig, var.VQVAEConfig]:
    if args.small:
        pn = (1, 2, 3, 4)
        vae = var.vqvae_config(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                               patch_nums=pn)
        return var.var_config(2, embed_dim=128, num_heads=2, num_classes=10, vocab_size=512, cvae=16,
                              patch_nums=pn, drop_path_rate=0.0), vae
    return var.var_config(args.depth, drop_path_rate=0.0), var.vqvae_config()


def loop_flops(cfg: var.VARConfig, batch: int, use_cfg: bool = True) -> float:
    """Model FLOPs of one sampling call's transformer: per token of scale si, 2 x 12 C^2 per
    block (qkv, proj, fc1, fc2), 4 x C x (keys up to the end of scale si) per block (QK and AV),
    2 x C x V for the head; rows = 2 B with CFG. The AdaLN projections (once per row and scale)
    are not counted."""
    c, v = cfg.embed_dim, cfg.vocab_size
    total = 0.0
    for start, end in cfg.begin_ends:
        n = end - start
        total += n * (cfg.depth * (24 * c * c + 4 * c * end) + 2 * c * v)
    return total * batch * (2 if use_cfg else 1)


def split(args, cfg, vcfg, params, vparams, labels, settings, model) -> list[dict]:
    """The loop (ids) and the decoder (f_hat -> pixels) timed apart, interleaved, with MFU."""
    import torch

    peak = matmul_peak(jnp.float32) * 1e9  # FLOP/s
    ids = var_sampling.sample(params, cfg, vparams, vcfg, jnp.asarray(labels), jax.random.PRNGKey(0),
                              settings)
    vae = var.VQVAE(vcfg)
    fhat = vae.apply({"params": vparams}, ids, method=var.VQVAE.idxBl_to_fhat)
    fhat_t = torch.from_numpy(np.asarray(fhat).transpose(0, 3, 1, 2).copy())
    decode = jax.jit(lambda p, f: vae.apply({"params": p}, f, method=var.VQVAE.fhat_to_img))
    torch_vae = model.vae_proxy[0]

    def torch_decode():
        with torch.no_grad():
            return torch_vae.fhat_to_img(fhat_t)

    def torch_loop():  # the whole call minus nothing: VAR's loop always ends in the decoder
        return torch_fn(model, labels, settings, True)()

    t = interleaved({"ddjax loop": ddjax_fn(cfg, vcfg, params, vparams, labels, settings, False),
                     "ddjax decode": lambda: decode(vparams, fhat),
                     "VAR call": torch_loop, "VAR decode": torch_decode},
                    warmup=1, repeats=args.repeats)
    flops = loop_flops(cfg, len(labels), settings.cfg != 0)
    var_loop = t["VAR call"].median - t["VAR decode"].median
    rows = [{"part": "transformer loop", "ddjax s": f"{t['ddjax loop'].median:.2f}",
             "VAR s": f"{var_loop:.2f} (call - decode)",
             "ddjax MFU": f"{100 * flops / t['ddjax loop'].median / peak:.0f}%",
             "VAR MFU": f"{100 * flops / var_loop / peak:.0f}%"},
            {"part": "decoder", "ddjax s": f"{t['ddjax decode'].median:.2f}",
             "VAR s": f"{t['VAR decode'].median:.2f}", "ddjax MFU": "", "VAR MFU": ""}]
    print(f"matmul peak (f32, 2048^3, this run): {peak / 1e9:.1f} GFLOP/s; loop model FLOPs per "
          f"call: {flops / 1e12:.2f} TFLOP; the loop's bound at that peak: {flops / peak:.1f} s")
    return rows


def import_var(path: str) -> types.SimpleNamespace:
    """VAR's `models` package from a checkout (imported from PATH, not copied)."""
    if "huggingface_hub" not in sys.modules:
        try:
            import huggingface_hub  # noqa: F401
        except ImportError:  # VAR imports it for a mixin only
            stub = types.ModuleType("huggingface_hub")
            stub.PyTorchModelHubMixin = object
            sys.modules["huggingface_hub"] = stub
    sys.path.insert(0, os.path.abspath(path))
    import models.basic_vae as basic_vae
    import models.var as var_mod
    import models.vqvae as vqvae

    return types.SimpleNamespace(basic_vae=basic_vae, var=var_mod, vqvae=vqvae)


def torch_models(ref, cfg: var.VARConfig, vcfg: var.VQVAEConfig, params: Any, vparams: Any):
    """VAR's VQVAE and VAR with ddjax's weights (strict loads)."""
    import torch

    vae = ref.vqvae.VQVAE(vocab_size=vcfg.vocab_size, z_channels=vcfg.z_channels, ch=vcfg.ch,
                          test_mode=True, v_patch_nums=vcfg.patch_nums)
    if vcfg.ch_mult != (1, 1, 2, 2, 4) or vcfg.num_res_blocks != 2:
        kw = dict(ch=vcfg.ch, ch_mult=vcfg.ch_mult, num_res_blocks=vcfg.num_res_blocks, dropout=0.0,
                  in_channels=3, z_channels=vcfg.z_channels, using_sa=True, using_mid_sa=True)
        vae.encoder = ref.basic_vae.Encoder(double_z=False, **kw)
        vae.decoder = ref.basic_vae.Decoder(**kw)
    to_t = lambda sd: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    vae.load_state_dict(to_t(var.vqvae_state_dict(vparams, vcfg)), strict=True)
    model = ref.var.VAR(vae_local=vae.eval(), num_classes=cfg.num_classes, depth=cfg.depth,
                        embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, drop_rate=0.0,
                        attn_drop_rate=0.0, drop_path_rate=0.0, norm_eps=cfg.norm_eps,
                        shared_aln=False, cond_drop_rate=cfg.cond_drop_rate,
                        attn_l2_norm=cfg.attn_l2_norm, patch_nums=cfg.patch_nums,
                        flash_if_available=False, fused_if_available=False)
    model.load_state_dict(to_t(var.var_state_dict(params, cfg)), strict=True)
    return model.eval()


def ddjax_fn(cfg, vcfg, params, vparams, labels, settings, decode: bool):
    """A compiled () -> images [B, H, W, 3] in [0, 1] (or ids with decode=False)."""
    lab = jnp.asarray(labels, jnp.int32)
    key = jax.random.PRNGKey(0)

    def run():
        ids = var_sampling.sample(params, cfg, vparams, vcfg, lab, key, settings)
        if not decode:
            return ids
        return (var_sampling.ids_to_image(vparams, vcfg, ids) + 1) / 2

    return run


def torch_fn(model, labels, settings, decode: bool):
    import torch

    lab = torch.from_numpy(np.asarray(labels, np.int64))
    if not decode:  # the loop without the final decoder: VAR calls vae_proxy[0].fhat_to_img
        model.vae_proxy[0].fhat_to_img = lambda f_hat: f_hat  # noqa: B023

    def run():
        with torch.no_grad():
            return model.autoregressive_infer_cfg(B=len(labels), label_B=lab, g_seed=0, cfg=settings.cfg,
                                                  top_k=settings.top_k, top_p=settings.top_p)

    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top-k", type=int, default=900)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--small", action="store_true")
    p.add_argument("--no-decode", dest="decode", action="store_false")
    p.add_argument("--compare-var", default="", help="a FoundationVision/VAR checkout")
    p.add_argument("--split", action="store_true", help="time the loop and the decoder apart")
    p.add_argument("--torch-threads", type=int, default=2)
    args = p.parse_args()

    cfg, vcfg = configs(args)
    params = jax.jit(lambda k: var.model.init_params(cfg, k))(jax.random.PRNGKey(0))
    vparams = jax.jit(lambda k: var.vqvae.init_params(vcfg, k))(jax.random.PRNGKey(1))
    params, vparams = jax.device_get((params, vparams))
    labels = np.random.default_rng(0).integers(0, cfg.num_classes, args.batch)
    top_k = min(args.top_k, cfg.vocab_size // 4) if args.small else args.top_k
    settings = var.VARSamplingSettings(cfg=args.cfg, top_k=top_k, top_p=args.top_p)
    print_environment({"load_avg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
                       "depth": cfg.depth, "width": cfg.embed_dim, "tokens": cfg.seq_len,
                       "batch": args.batch, "decode": args.decode, "settings": settings})
    ours = ddjax_fn(cfg, vcfg, params, vparams, labels, settings, args.decode)
    rows = []
    if not args.compare_var:
        t = time_fn(ours, warmup=1, repeats=args.repeats)
        rows.append({"impl": "ddjax", "s/call": f"{t.median:.3f}",
                     "images/s": f"{args.batch / t.median:.3f}"})
        print(table(rows))
        print(f"load average at the end: {os.getloadavg()}")
        return 0

    import torch

    torch.set_num_threads(args.torch_threads)
    ref = import_var(args.compare_var)
    model = torch_models(ref, cfg, vcfg, params, vparams)
    if args.split:
        print(table(split(args, cfg, vcfg, params, vparams, labels, settings, model)))
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        return 0
    if args.decode:  # semantics first: argmax at every scale gives the same images
        greedy = var.VARSamplingSettings(cfg=args.cfg, top_k=1, top_p=0.0)
        a = np.asarray(ddjax_fn(cfg, vcfg, params, vparams, labels[:2], greedy, True)())
        b = torch_fn(model, labels[:2], greedy, True)().numpy().transpose(0, 2, 3, 1)
        diff = float(np.abs(a - b).max())
        print(f"top_k=1 check: max |ddjax - VAR| over the images = {diff:.2e}")
        if not diff < 1e-3:
            raise SystemExit("the two implementations disagree at top_k=1: no timing")
    t = interleaved({"ddjax": ours, "VAR": torch_fn(model, labels, settings, args.decode)},
                    warmup=1, repeats=args.repeats)
    for name, tm in t.items():
        rows.append({"impl": name, "s/call": f"{tm.median:.3f}", "min s": f"{tm.min:.3f}",
                     "images/s": f"{args.batch / tm.median:.3f}"})
    print(table(rows))
    print(f"ddjax / VAR speed-up (medians): {t['VAR'].median / t['ddjax'].median:.2f}x")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
