r"""DD student 1-step sampling speed at GPT-B dimensions, its model-FLOPs utilisation, and the
speed-up over the teacher's 256-step sampling, all measured in one run.

    python benchmarks/student.py                      # batch 1, 16, 64, f32; teacher at batch 16
    python benchmarks/student.py --small              # a quick smoke run (tiny model)
    python benchmarks/student.py --dtypes float32,bfloat16 --teacher-batch 8

Random weights (the speed does not depend on them). One step = one forward of the student on
[class token, 256 positions] plus the pass-through, argmax and split_t selection.
FLOPs per image: 2 x (matmul parameters) x 257 tokens + the attention matmuls (QK^T and AV:
4 x 257^2 x dim per layer, computed in full as XLA does) + the logits head; MFU divides the
achieved FLOP/s by the measured peak of an XLA f32/bf16 matmul on this machine.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._common import compile_jitted, matmul_peak, print_environment, table, time_fn  # noqa: E402
from ddjax.student.model import dd_config, init_params  # noqa: E402
from ddjax.student.sampling import StudentApply, dd_step  # noqa: E402
from ddjax.teacher.llamagen.gpt import gpt_config  # noqa: E402
from ddjax.teacher.llamagen.gpt import init_params as teacher_init  # noqa: E402
from ddjax.teacher.llamagen.sampling import SamplingSettings, sample  # noqa: E402


def random_like(params, seed=0, std=0.02):
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [(jax.random.normal(k, x.shape, jnp.float32) * std).astype(x.dtype)
               for k, x in zip(keys, leaves)])


def student_flops(cfg, d: int) -> float:
    """FLOPs of one student forward per image."""
    g = cfg.gpt
    n = g.block_size + 1
    hidden = int(2 * 4 * g.dim / 3)
    hidden = hidden if hidden % g.multiple_of == 0 else hidden + g.multiple_of - hidden % g.multiple_of
    per_layer = g.dim * (g.dim + 2 * g.kv_heads * g.head_dim) + g.dim * g.dim + 3 * g.dim * hidden
    matmul_params = g.n_layer * per_layer + g.dim * g.vocab_size + g.dim * d + d * g.dim
    attention = g.n_layer * 4 * n * n * g.dim
    return 2.0 * matmul_params * n + attention


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--teacher-batch", type=int, default=16, help="0 skips the teacher")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--small", action="store_true", help="tiny model, for a smoke run")
    args = p.parse_args(argv)
    dims = dict(n_layer=2, dim=64, n_head=4, vocab_size=64, block_size=16, num_classes=10) if args.small \
        else dict(vocab_size=16384, block_size=256, num_classes=1000)
    d = 8
    print_environment()
    peaks = {dt: matmul_peak(getattr(jnp, dt), n=512 if args.small else 2048)
             for dt in args.dtypes.split(",")}
    for dt, v in peaks.items():
        print(f"# measured matmul peak {dt}: {v:.1f} GFLOP/s")
    rows = []
    base = gpt_config("GPT-B", **dims)
    code = jax.random.normal(jax.random.PRNGKey(1), (base.vocab_size, d))
    code = code / jnp.linalg.norm(code, axis=1, keepdims=True)
    student_s = {}
    for dt in args.dtypes.split(","):
        cfg = dd_config(gpt_config("GPT-B", dtype=dt, **dims), d)
        params = random_like(init_params(cfg, jax.random.PRNGKey(0)))
        net = StudentApply(cfg)
        flops = student_flops(cfg, d)
        for b in (int(x) for x in args.batches.split(",")):
            noise = jax.random.normal(jax.random.PRNGKey(2), (b, base.block_size, d))
            labels = jnp.arange(b) % base.num_classes
            t = jnp.zeros((b,), jnp.int32)
            comp = compile_jitted(dd_step, net, params, noise, noise, labels, t, code, 80)
            run = lambda: comp.executable(params, noise, noise, labels, t, code)  # noqa: B023
            tm = time_fn(run, warmup=1, repeats=args.repeats)
            student_s[(dt, b)] = tm.median
            achieved = flops * b / tm.median / 1e9
            rows.append({"model": "DD 1-step", "dtype": dt, "batch": b, "images/s": b / tm.median,
                         "ms/image": 1e3 * tm.median / b, "compile s": comp.total_s,
                         "GFLOP/s": achieved, "MFU": achieved / peaks[dt]})
    if args.teacher_batch:
        b = args.teacher_batch
        tcfg = gpt_config("GPT-B", **dims)
        tparams = random_like(teacher_init(tcfg, jax.random.PRNGKey(3)))
        labels = jnp.arange(b) % tcfg.num_classes
        s = SamplingSettings(cfg_scale=2.0, top_k=min(8000, tcfg.vocab_size))
        sample(tparams, tcfg, labels, jax.random.PRNGKey(0), s).block_until_ready()  # compile
        tm = time_fn(lambda: sample(tparams, tcfg, labels, jax.random.PRNGKey(0), s), warmup=0,
                     repeats=max(1, args.repeats - 1))
        rows.append({"model": f"teacher {tcfg.block_size} steps, CFG", "dtype": "float32", "batch": b,
                     "images/s": b / tm.median, "ms/image": 1e3 * tm.median / b})
        ref = student_s.get(("float32", b))
        if ref is None:  # time the student at the teacher's batch too
            cfg = dd_config(tcfg, d)
            params = random_like(init_params(cfg, jax.random.PRNGKey(0)))
            noise = jax.random.normal(jax.random.PRNGKey(2), (b, tcfg.block_size, d))
            t = jnp.zeros((b,), jnp.int32)
            ref = time_fn(lambda: dd_step(StudentApply(cfg), params, noise, noise, labels, t, code, 80),
                          warmup=1, repeats=args.repeats).median
        print(f"# speed-up of DD 1-step over the teacher at batch {b}: {tm.median / ref:.1f}x")
    print(table(rows, ["model", "dtype", "batch", "images/s", "ms/image", "compile s", "GFLOP/s", "MFU"]))
    return rows


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
