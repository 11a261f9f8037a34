"""Teacher sampling throughput: ddjax's compiled KV-cache loop, and LlamaGen's `generate()` beside it.

    python benchmarks/teacher_sampling.py                      # GPT-B table: batch 1/8/32, f32/bf16
    python benchmarks/teacher_sampling.py --small              # tiny model, a smoke run in seconds
    python benchmarks/teacher_sampling.py --compare-llamagen /path/to/LlamaGen --tokens 64

GPT-B dimensions (12 layers, dim 768, 12 heads, vocabulary 16384, 256 image tokens, 1000
classes) with random weights (normal(0.02) everywhere, the output head included: LlamaGen's
zero head would make every distribution uniform), classifier-free guidance on (scale 2.0),
top-k 8000 (the paper's setting), top-p 1.0, temperature 1.0.

The table gives, per compute dtype and batch: tokens/s and images/s in steady state (AOT-compiled,
so no compilation in the timed calls), the lowering and compile times, the model FLOPs per image
and the model-FLOPs utilisation against the measured matmul peak of the same dtype.

Model FLOPs of one forward row at context length L (keys attended, the new one included):
2 x (non-embedding matmul parameters) + 2 x dim x vocab (the head) + n_layer x 4 x L x dim
(attention QK and AV); an image needs the prefill and num_tokens - 1 decoding steps, times two
rows with CFG. Work the implementation does beyond that (attention over cache rows past L, top-k,
sampling) is not counted.

--compare-llamagen PATH imports LlamaGen from PATH (nothing of it is copied here), loads the same
weights into its Transformer (n_kv_head = n_head, as its KV cache assumes) and times its
`generate()` (torch.no_grad, eval mode, float32, torch.set_num_threads(--torch-threads)) against
ddjax (float32) with the same settings, the calls interleaved. It first checks that with top_k=1
both produce identical tokens for a few rows (the same weights and sampling semantics).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
import warnings
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._common import (  # noqa: E402
    compile_jitted,
    interleaved,
    matmul_peak,
    print_environment,
    table,
    time_fn,
    time_once,
)
from ddjax.teacher.llamagen.gpt import GPTConfig, gpt_config, init_params  # noqa: E402
from ddjax.teacher.llamagen.layers import ffn_hidden_dim  # noqa: E402
from ddjax.teacher.llamagen.sampling import (  # noqa: E402
    SamplingSettings,
    greedy_rule,
    multinomial_rule,
    weight_major_params,
)
from ddjax.teacher.llamagen.sampling import _compiled as sampling_compiled  # noqa: E402

PAPER_TOP_K = 8000  # of a 16384-token vocabulary
SMALL = dict(n_layer=2, dim=64, n_head=4, vocab_size=512, block_size=16, num_classes=10, multiple_of=32)


# -- model, weights, settings ----------------------------------------------------------------
def make_config(small: bool, dtype: str = "float32") -> GPTConfig:
    return gpt_config("GPT-B", dtype=dtype, **(SMALL if small else {}))


def random_params(config: GPTConfig, seed: int = 0, std: float = 0.02) -> Any:
    """normal(std) for every weight matrix and embedding (the output head too), ones for norms."""
    params = init_params(config, jax.random.PRNGKey(seed))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), len(flat)))

    def init(path, x):
        k = next(keys)
        if jax.tree_util.keystr(path).endswith("['weight']"):  # RMSNorm scales
            return x
        return (jax.random.normal(k, x.shape, jnp.float32) * std).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(init, params)


def settings_for(config: GPTConfig, top_k: int | None = None) -> SamplingSettings:
    """CFG 2.0, top-p 1, temperature 1; top-k 8000 scaled to the vocabulary unless given."""
    if top_k is None:
        top_k = max(1, round(PAPER_TOP_K * config.vocab_size / 16384))
    return SamplingSettings(cfg_scale=2.0, top_k=top_k, top_p=1.0, temperature=1.0)


def labels(batch: int, config: GPTConfig) -> jax.Array:
    return jnp.arange(batch, dtype=jnp.int32) * 7 % config.num_classes


# -- FLOPs ---------------------------------------------------------------------------------------
def matmul_params(config: GPTConfig) -> int:
    """Non-embedding matmul parameters of the transformer blocks (the head excluded)."""
    d, kv = config.dim, config.kv_heads * config.head_dim
    hidden = ffn_hidden_dim(d, config.multiple_of, config.ffn_dim_multiplier)
    per_layer = d * (d + 2 * kv) + d * d + 3 * d * hidden
    return config.n_layer * per_layer


def flops_per_image(config: GPTConfig, num_tokens: int, cfg: bool) -> float:
    """Model FLOPs to sample one sequence of num_tokens (see the module docstring)."""
    blocks = 2 * matmul_params(config)
    head = 2 * config.dim * config.vocab_size
    attn = lambda length: config.n_layer * 4 * length * config.dim
    c = config.cls_token_num
    total = sum(blocks + attn(j + 1) for j in range(c)) + head  # prefill: logits of token 0
    total += sum(blocks + head + attn(c + i + 1) for i in range(num_tokens - 1))
    return float(total * (2 if cfg else 1))


# -- ddjax -----------------------------------------------------------------------------------------
def ddjax_sampler(config: GPTConfig, settings: SamplingSettings, num_tokens: int,
                  weight_major: bool = False):
    """A jitted (params, labels, key) -> tokens: `sample`'s compiled loop. With weight_major
    the params must come from `weight_major_params` (as `sample` passes them)."""
    rule = greedy_rule if settings.greedy else multinomial_rule
    run = sampling_compiled(config, settings, rule, 0, num_tokens, None, weight_major)
    return jax.jit(lambda p, c, k: run(p, c, k, jnp.zeros((c.shape[0], 1), jnp.int32), None))


def compiled_ddjax(config, settings, n, params, cond, key, weight_major: bool):
    """(compile timing, a no-argument call) of ddjax's loop; weight_major as `sample` runs it
    (the kernels copied to [out, in] once, outside the timed calls)."""
    p = weight_major_params(params) if weight_major else params
    comp = compile_jitted(ddjax_sampler(config, settings, n, weight_major), p, cond, key)
    return comp, functools.partial(comp.executable, p, cond, key)


def bench_ddjax(args, peaks: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    params = None
    for dtype in args.dtypes:
        config = make_config(args.small, dtype)
        params = params if params is not None else random_params(config)
        settings = settings_for(config, args.top_k)
        n = args.tokens or config.block_size
        fpi = flops_per_image(config, n, settings.use_cfg)
        for batch, wm in ((b, w) for b in args.batches for w in args.weight_major):
            cond, key = labels(batch, config), jax.random.PRNGKey(batch)
            comp, run = compiled_ddjax(config, settings, n, params, cond, key, wm == "on")
            if args.warmup is None:  # adaptive: warm up only where a call is cheap
                t = time_fn(run, repeats=args.repeats, warmup_below_s=5.0)
            else:
                t = time_fn(run, warmup=args.warmup, repeats=args.repeats)
            images = batch / t.median
            row = {
                "dtype": dtype, "weight-major": wm, "batch": batch, "tokens": n, "s/call": t.median,
                "tokens/s": images * n, "images/s": images,
                "lower s": comp.lower_s, "compile s": comp.compile_s,
                "GFLOP/image": fpi / 1e9, "GFLOP/s": fpi * images / 1e9,
                "MFU %": 100 * fpi * images / 1e9 / peaks[dtype],
            }
            rows.append(row)
            print(f"  {dtype} weight-major {wm} batch {batch}: {t}, {row['tokens/s']:.1f} tokens/s, "
                  f"compile {comp.total_s:.1f} s", flush=True)
    return rows


def dtype_parity(args, params) -> dict[str, Any]:
    """bf16 compute against f32 on the same weights: teacher-forcing logits and greedy tokens.

    Greedy (top_k=1) CFG sampling of --check-rows x --check-tokens tokens in each dtype: the
    fraction of tokens equal to f32's, and the first position where a row departs. Then the
    f32 teacher's tokens fed to both dtypes (teacher forcing, condition branch): the largest
    logit difference, absolute and relative to the f32 logits' spread.
    """
    from ddjax.teacher.llamagen.gpt import GPT

    cfgs = {d: make_config(args.small, d) for d in ("float32", "bfloat16")}
    n = min(args.check_tokens, cfgs["float32"].block_size)
    b = args.check_rows
    cond = labels(b, cfgs["float32"])
    greedy = {d: np.asarray(ddjax_sampler(c, settings_for(c, 1), n)(params, cond, jax.random.PRNGKey(0)))
              for d, c in cfgs.items()}
    same = greedy["bfloat16"] == greedy["float32"]
    first = [int(np.argmin(r)) if not r.all() else n for r in same]
    tokens = jnp.asarray(greedy["float32"])
    logits = {d: np.asarray(jax.jit(GPT(c).apply)({"params": params}, tokens, cond), np.float32)
              for d, c in cfgs.items()}
    diff = np.abs(logits["bfloat16"] - logits["float32"])
    return {"rows x tokens": f"{b} x {n}", "greedy tokens equal %": 100 * float(same.mean()),
            "first departure (mean)": float(np.mean(first)),
            "logits max |diff|": float(diff.max()),
            "max |diff| / std(f32 logits)": float(diff.max() / logits["float32"].std()),
            "mean |diff| / std": float(diff.mean() / logits["float32"].std())}


# -- LlamaGen --------------------------------------------------------------------------------------
def load_llamagen(path: str, config: GPTConfig, params: Any, threads: int, device: str = "cpu"):
    """(model, generate) from a LlamaGen checkout at `path`, holding ddjax's weights."""
    import torch

    from ddjax.convert import flax_to_torch

    if config.kv_heads != config.n_head:
        raise ValueError("LlamaGen's KV cache assumes n_kv_head == n_head")
    sys.path.insert(0, os.path.abspath(path))
    from autoregressive.models.generate import generate
    from autoregressive.models.gpt import ModelArgs, Transformer

    torch.set_num_threads(threads)
    # generate() enters the deprecated torch.backends.cuda.sdp_kernel() context on every step.
    warnings.filterwarnings("ignore", message=".*sdp_kernel.*", category=FutureWarning)
    names = {f.name for f in dataclasses.fields(ModelArgs)}
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k in names}
    model = Transformer(ModelArgs(**fields))
    state = {k: torch.from_numpy(np.array(v)) for k, v in flax_to_torch(params).items()}
    model.load_state_dict(state, strict=True)
    model.eval()
    return model.to(device), generate


def llamagen_sampler(model, generate, config: GPTConfig, settings: SamplingSettings, batch: int,
                     num_tokens: int):
    import torch

    device = next(model.parameters()).device
    cond = torch.from_numpy(np.array(labels(batch, config))).long().to(device)

    def run():
        with torch.no_grad():
            out = generate(model, cond, num_tokens, cfg_scale=settings.cfg_scale,
                           cfg_interval=settings.cfg_interval, temperature=settings.temperature,
                           top_k=settings.top_k, top_p=settings.top_p)
        if device.type == "cuda":  # the timings wait for the GPU, as block_until_ready does
            torch.cuda.synchronize()
        return out.cpu()

    return run


def check_same_tokens(args, config, params, model, generate) -> None:
    """With top_k=1 (argmax) both must produce identical tokens."""
    n = min(args.check_tokens, config.block_size)
    settings = settings_for(config, 1)
    batch = args.check_rows
    theirs = llamagen_sampler(model, generate, config, settings, batch, n)().numpy()
    for wm in args.weight_major:
        ours = np.asarray(compiled_ddjax(config, settings, n, params, labels(batch, config),
                                         jax.random.PRNGKey(0), wm == "on")[1]())
        same = (ours == theirs).all(axis=1)
        print(f"greedy check (top_k=1, CFG {settings.cfg_scale}, {batch} rows x {n} tokens, "
              f"weight-major {wm}): identical rows {int(same.sum())}/{batch}", flush=True)
        if not same.all():
            first = int(np.argmax(ours[~same][0] != theirs[~same][0]))
            raise SystemExit(f"ddjax and LlamaGen disagree (first difference at token {first}): "
                             "the weights or sampling semantics differ")


def compile_llamagen(model):
    """LlamaGen's `sample_c2i.py --compile`: the whole Transformer under torch.compile."""
    import torch

    return torch.compile(model, mode="reduce-overhead", fullgraph=True)


def compare_llamagen(args) -> list[dict[str, Any]]:
    config = make_config(args.small, "float32")
    params = random_params(config)
    model, generate = load_llamagen(args.compare_llamagen, config, params, args.torch_threads,
                                    args.torch_device)
    check_same_tokens(args, config, params, model, generate)
    models = {}
    if "eager" in args.llamagen_modes:
        models["LlamaGen"] = model
    if "compiled" in args.llamagen_modes:
        models["LlamaGen compiled"] = compile_llamagen(model)
    settings = settings_for(config, args.top_k)
    n = args.tokens or config.block_size
    rows = []
    for batch in args.batches:
        cond, key = labels(batch, config), jax.random.PRNGKey(batch)
        comps, fns = {}, {}
        for wm in args.weight_major:  # "ddjax" is the first mode, (x @ kernel) the other
            name = "ddjax" if wm == args.weight_major[0] else f"ddjax (weight-major {wm})"
            comps[name], fns[name] = compiled_ddjax(config, settings, n, params, cond, key, wm == "on")
        comp = comps["ddjax"]
        fns.update({name: llamagen_sampler(m, generate, config, settings, batch, n)
                    for name, m in models.items()})
        # Warm-up (excluded from the timings): one call of each. For the compiled model this is
        # where torch.compile traces and compiles (prefill and decoding step, at this batch);
        # its time minus an eager call's is reported as its compile time.
        warm = {name: time_once(fn)[0] for name, fn in fns.items()}
        t = interleaved(fns, warmup=0, repeats=args.repeats)
        ours = batch * n / t["ddjax"].median
        row: dict[str, Any] = {"batch": batch, "tokens": n, "ddjax tokens/s": ours}
        for name in fns:
            if name.startswith("ddjax ("):
                row[f"{name} tokens/s"] = batch * n / t[name].median
                row[f"ddjax / {name}"] = ours / (batch * n / t[name].median)
        for name in models:
            theirs = batch * n / t[name].median
            row[f"{name} tokens/s"] = theirs
            row[f"ddjax / {name}"] = ours / theirs
        row["ddjax compile s"] = comp.total_s
        if "LlamaGen compiled" in models:
            row["torch.compile s"] = warm["LlamaGen compiled"] - t["LlamaGen compiled"].median
        rows.append(row)
        print(f"  batch {batch}: " + ", ".join(f"{k} {v}" for k, v in t.items())
              + f"; load average {os.getloadavg()[0]:.2f}", flush=True)
    return rows


# -- main ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]
    p.add_argument("--batches", type=ints, default=None,
                   help="comma-separated batch sizes (default 1,8,32; 8,32 with --compare-llamagen)")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (median)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls after compiling (default: 1 if a call takes < 5 s, else 0)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per sequence (default block_size)")
    p.add_argument("--top-k", type=int, default=None, help="default 8000 (scaled to the vocabulary)")
    p.add_argument("--small", action="store_true", help="tiny model: a smoke run in seconds")
    p.add_argument("--compare-llamagen", metavar="PATH", default=None,
                   help="a LlamaGen checkout: time its generate() beside ddjax (float32)")
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--torch-device", default="cpu", help="LlamaGen's device: cpu or cuda")
    p.add_argument("--llamagen-modes", type=lambda s: s.split(","), default=["eager", "compiled"],
                   help="with --compare-llamagen: eager, compiled (torch.compile as sample_c2i.py "
                        "--compile does), or both (default)")
    p.add_argument("--check-rows", type=int, default=2, help="rows for the top_k=1 identity check")
    p.add_argument("--check-tokens", type=int, default=32, help="tokens for the top_k=1 check")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--weight-major", type=lambda s: s.split(","), default=None,
                   help="ddjax's kernels applied as kernel^T x^T (on: sample()'s CPU default) or "
                        "x @ kernel (off); the first listed is 'ddjax' in the comparison "
                        "(default: on,off on the CPU, off,on elsewhere: sample()'s default first)")
    args = p.parse_args(argv)
    if args.weight_major is None:
        args.weight_major = ["on", "off"] if jax.default_backend() == "cpu" else ["off", "on"]
    if not args.weight_major or set(args.weight_major) - {"on", "off"}:
        p.error(f"--weight-major takes on, off or on,off; got {','.join(args.weight_major)}")
    if args.batches is None:
        args.batches = [2] if args.small else ([8, 32] if args.compare_llamagen else [1, 8, 32])
    if args.small:
        args.matmul_size = min(args.matmul_size, 512)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    config = make_config(args.small)
    settings = settings_for(config, args.top_k)
    print_environment({
        "model": "GPT-B dims (small)" if args.small else "GPT-B",
        "config": f"layers {config.n_layer}, dim {config.dim}, heads {config.n_head}, "
                  f"vocab {config.vocab_size}, block {config.block_size}",
        "settings": settings,
        "tokens": args.tokens or config.block_size,
    })
    if args.compare_llamagen:
        print(f"# matmul peak float32 ({args.matmul_size}^3): "
              f"{matmul_peak(jnp.float32, args.matmul_size):.1f} GFLOP/s", flush=True)
        rows = compare_llamagen(args)
        print("\nddjax vs LlamaGen generate() (float32, interleaved calls, median of "
              f"{args.repeats}):\n")
        print(table(rows))
    else:
        peaks = {d: matmul_peak(jnp.dtype(d), args.matmul_size) for d in args.dtypes}
        for d, g in peaks.items():
            print(f"# matmul peak {d} ({args.matmul_size}^3): {g:.1f} GFLOP/s")
        rows = bench_ddjax(args, peaks)
        print(f"\nddjax teacher sampling (median of {args.repeats}; MFU against the matmul peak "
              "of the same dtype):\n")
        print(table(rows))
        if {"float32", "bfloat16"} <= set(args.dtypes):
            print("\nbfloat16 compute (float32 parameters and accumulation) against float32:\n")
            print(table([dtype_parity(args, random_params(make_config(args.small)))]))
    print(f"\n# total wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
