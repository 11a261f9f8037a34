r"""Pair generation speed at GPT-B dimensions, and the flow map's overhead over plain ancestral
sampling in the same compiled loop (target: <= 15%), measured in one run.

    python benchmarks/pairs.py                    # batch 8, first 64 of 256 tokens, CFG on
    python benchmarks/pairs.py --tokens 256 --batch 8
    python benchmarks/pairs.py --small            # tiny model smoke run

Both paths run `ddjax.teacher.llamagen.sampling.sample` with the same teacher, batch and settings; the
map replaces the multinomial draw by the one-token flow map (default FlowSettings) and reads
the noise. Random weights; K = 16384 codes of dimension 8 (L2-normalised).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks._common import interleaved, print_environment, table  # noqa: E402
from ddjax.mapper.flow import FlowSettings  # noqa: E402
from ddjax.mapper.sequence import map_noise_to_tokens  # noqa: E402
from ddjax.teacher.llamagen.family import LlamaGenTeacher  # noqa: E402
from ddjax.teacher.llamagen.gpt import gpt_config, init_params  # noqa: E402
from ddjax.teacher.llamagen.sampling import SamplingSettings, sample  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64, help="tokens per sequence to time (<= 256)")
    p.add_argument("--top-k", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--small", action="store_true")
    p.add_argument("--chunk", type=int, default=None,
                   help="FlowSettings.chunk (rows mapped together; default: FlowSettings' own)")
    args = p.parse_args(argv)
    dims = dict(n_layer=2, dim=64, n_head=4, vocab_size=256, block_size=16, num_classes=10) if args.small \
        else dict(vocab_size=16384, block_size=256, num_classes=1000)
    cfg = gpt_config("GPT-B", **dims)
    tokens = min(args.tokens, cfg.block_size)
    leaves, tree = jax.tree_util.tree_flatten(init_params(cfg, jax.random.PRNGKey(0)))
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree_util.tree_unflatten(
        tree, [jax.random.normal(k, x.shape) * 0.02 for k, x in zip(keys, leaves)])
    code = jax.random.normal(jax.random.PRNGKey(2), (cfg.vocab_size, 8))
    code = code / jnp.linalg.norm(code, axis=1, keepdims=True)
    teacher = LlamaGenTeacher.from_codebook(cfg, params, code)
    b = args.batch
    labels = jnp.arange(b) % cfg.num_classes
    noise = jax.random.normal(jax.random.PRNGKey(3), (b, tokens, 8))
    s = SamplingSettings(cfg_scale=2.0, top_k=min(args.top_k, cfg.vocab_size))
    # A chunk larger than the batch maps padding rows; results depend on the chunk, not the batch.
    flow = dataclasses.replace(FlowSettings(), chunk=args.chunk or FlowSettings().chunk)
    print_environment({"flow": flow, "tokens": tokens, "batch": b})
    fns = {
        "ancestral": lambda: sample(params, cfg, labels, jax.random.PRNGKey(0), s, num_tokens=tokens),
        "flow map": lambda: map_noise_to_tokens(teacher, noise, labels, s, flow),
    }
    times = interleaved(fns, warmup=1, repeats=args.repeats)
    rows = [{"path": k, "s / call": t.median, "pairs/s": b / t.median * tokens / cfg.block_size,
             "tokens/s": b * tokens / t.median} for k, t in times.items()]
    print(table(rows))
    overhead = times["flow map"].median / times["ancestral"].median - 1
    print(f"# flow map overhead over ancestral sampling: {100 * overhead:.1f}% (target <= 15%)")
    print("# pairs/s counts full 256-token pairs (scaled from the timed tokens)")
    return overhead


if __name__ == "__main__":
    main()
