r"""Pair generation speed at GPT-B dimensions, and the flow map's overhead over plain ancestral
sampling in the same compiled loop (target: <= 15%), measured in one run.

    python benchmarks/pairs.py                    # batch 8, first 64 of 256 tokens, CFG on
    python benchmarks/pairs.py --tokens 256 --batch 8
    python benchmarks/pairs.py --small            # tiny model smoke run

All paths run `ddjax.teacher.llamagen.sampling.sample` with the same teacher, batch and settings;
the map replaces the multinomial draw by the one-token flow map and reads the noise. Three flow
settings are timed: configs/llamagen.py's flow block (the released checkpoints' settings, which
integrate over each row's top-k codes only: support_k = top_k; `--flow` overrides fields of it),
the same over all K codes (support_k=None, the same map) and the opt-in early_steps=10 grid
(FlowSettings.early_steps); their tokens are compared with the config's. Random weights;
K = 16384 codes of dimension 8 (L2-normalised, as LlamaGen's VQ).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._common import interleaved, print_environment, table, time_once  # noqa: E402
from ddjax.configs_path import load_config  # noqa: E402
from ddjax.mapper.flow import FlowSettings  # noqa: E402
from ddjax.mapper.sequence import map_noise_to_tokens  # noqa: E402
from ddjax.teacher.llamagen.family import LlamaGenTeacher  # noqa: E402
from ddjax.teacher.llamagen.gpt import gpt_config, init_params  # noqa: E402
from ddjax.teacher.llamagen.sampling import SamplingSettings, sample  # noqa: E402


def parse_overrides(text: str) -> dict:
    """'a=1,b=None' -> {'a': 1, 'b': None} for FlowSettings fields (values as Python literals)."""
    import ast

    fields = {f.name for f in dataclasses.fields(FlowSettings)}
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in fields:
            raise SystemExit(f"--flow: {name!r} is not a FlowSettings field ({sorted(fields)})")
        try:
            out[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[name] = value  # a bare string, e.g. schedule=cubic
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64, help="tokens per sequence to time (<= 256)")
    p.add_argument("--top-k", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--small", action="store_true")
    p.add_argument("--chunk", type=int, default=None,
                   help="FlowSettings.chunk (rows mapped together; default: FlowSettings' own)")
    p.add_argument("--flow", default="",
                   help="FlowSettings overrides, e.g. 'early_steps=10,prune_t=None' (default: none)")
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
    chunk = {"chunk": args.chunk} if args.chunk else {}
    base = dataclasses.replace(FlowSettings(**dict(load_config("llamagen", "B").flow)), **chunk,
                               **parse_overrides(args.flow))
    flows = {"flow map (configs/llamagen.py)": base}
    if base.support_k is not None:
        flows["flow map (support_k=None)"] = dataclasses.replace(base, support_k=None)
    flows["flow map (early_steps=10)"] = dataclasses.replace(base, early_steps=10)
    print_environment({**{f"flow: {k}": f for k, f in flows.items()}, "tokens": tokens, "batch": b})
    fns = {"ancestral": lambda: sample(params, cfg, labels, jax.random.PRNGKey(0), s, num_tokens=tokens)}
    for name, f in flows.items():
        fns[name] = lambda f=f: map_noise_to_tokens(teacher, noise, labels, s, f)
    first = {k: time_once(f)[0] for k, f in fns.items()}  # compile + one call
    times = interleaved(fns, warmup=0, repeats=args.repeats)
    plain = np.asarray(fns["flow map (configs/llamagen.py)"]())
    base = times["ancestral"].median
    rows = []
    for k, t in times.items():
        equal = "" if k == "ancestral" else f"{100 * np.mean(np.asarray(fns[k]()) == plain):.2f}"
        rows.append({"path": k, "s / call": t.median, "min s": t.min,
                     "pairs/s": b / t.median * tokens / cfg.block_size,
                     "tokens/s": b * tokens / t.median, "overhead %": 100 * (t.median / base - 1),
                     "tokens = config's %": equal, "compile s": first[k] - t.median})
    print(table(rows))
    overhead = times["flow map (configs/llamagen.py)"].median / base - 1
    print(f"# flow map overhead over ancestral sampling (configs/llamagen.py's flow): "
          f"{100 * overhead:.1f}% (target <= 15%)")
    print(f"# load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("# pairs/s counts full 256-token pairs (scaled from the timed tokens); compile s = the "
          "first call (compile included) minus the median call, for --tokens tokens")
    return overhead


if __name__ == "__main__":
    main()
