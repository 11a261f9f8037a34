"""Convergence and cost of the one-token flow map (ddjax.mapper.flow) at LlamaGen's sizes.

    python experiments/flow_solver/measure.py            # the table in README.md
    python experiments/flow_solver/measure.py --tokens 512 --check-tokens 64   # smoke run

Two settings, K = 16384 codes of dimension d = 8 (random, L2-normalised), one random p per token:
  A  logits ~ N(0, 3^2), full support;
  B  the same logits with top-k 8000 applied (LlamaGen's sampler setting), the rest -inf.
Reference for every token: RK4, 64 steps on the quadratic grid down to t_min = 1e-4 (as
accurate as 1000-step Heun for a quarter of the cost). It is itself checked on a subset against
1000-step Heun on a linear grid to t_min = 1e-3, and on A also against 2000-step Heun to 1e-4.
Each candidate runs on all tokens: "agree" is the % of tokens identical to the reference,
"evals" the velocity evaluations per token (in brackets those over all K codes; after late
pruning the rest cover prune_k codes), "us/tok" the wall time per token of one compiled run
(integration + snap, compile excluded; indicative only on a shared machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from ddjax.mapper.flow import FlowSettings, map_token, time_grid  # noqa: E402

K, D, TOP_K = 16384, 8, 8000
# Every configuration below is spelled out from this base, whatever FlowSettings' defaults are.
BASE = FlowSettings(t_min=1e-3, support_k=None, prune_t=None, chunk=64)
# The reference for all tokens; on a subset it is checked against the two fine Heun solutions.
REFERENCE = dataclasses.replace(BASE, solver="rk4", num_steps=64, t_min=1e-4, schedule="quadratic")
CHECKS = (
    dataclasses.replace(BASE, solver="heun", num_steps=1000, schedule="linear"),
    dataclasses.replace(BASE, solver="heun", num_steps=2000, t_min=1e-4, schedule="linear"),
)


def make_problem(tokens: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    codebook = rng.standard_normal((K, D), dtype=np.float32)
    codebook /= np.linalg.norm(codebook, axis=1, keepdims=True)
    logits = 3.0 * rng.standard_normal((tokens, K), dtype=np.float32)
    noise = rng.standard_normal((tokens, D), dtype=np.float32)
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    # top-k 8000: keep the 8000 largest logits of each row, renormalise
    cut = np.partition(logits, K - TOP_K, axis=1)[:, K - TOP_K][:, None]
    top = np.where(logits >= cut, logits, -np.inf).astype(np.float32)
    top -= top.max(axis=1, keepdims=True)
    top -= np.log(np.exp(top).sum(axis=1, keepdims=True))
    return {"codebook": codebook, "noise": noise, "A": log_p, "B": top}


def evals_per_token(s: FlowSettings) -> tuple[int, int]:
    """(velocity evaluations, of which over all K codes) per token; late pruning makes the rest
    prune_k wide."""
    per_step = {"euler": 1, "heun": 2, "rk4": 4}[s.solver]
    total = s.num_steps * per_step - (per_step - 1 if s.t_min == 0 else 0)
    if s.prune_t is None:
        return total, total
    ts = time_grid(s.num_steps, s.t_min, s.schedule)
    return total, int(np.argmax(ts[:-1] <= s.prune_t)) * per_step


def run(s: FlowSettings, noise, log_p, codebook) -> tuple[np.ndarray, float]:
    """Tokens and seconds per token of one compiled run (compile time excluded)."""
    fn = jax.jit(lambda e, lp, cb: map_token(e, lp, cb, s)).lower(noise, log_p, codebook)
    fn = fn.compile()
    start = time.perf_counter()
    ids = np.asarray(jax.block_until_ready(fn(noise, log_p, codebook)))
    return ids, (time.perf_counter() - start) / noise.shape[0]


def describe(s: FlowSettings) -> str:
    text = f"{s.solver:5s} {s.num_steps:4d} {s.schedule:9s} t_min={s.t_min:g}"
    if s.support_k is not None:
        text += f" support_k={s.support_k}"
    if s.prune_t is not None:
        text += f" prune_t={s.prune_t:g},k={s.prune_k}"
    return text


def candidates(setting: str) -> list[FlowSettings]:
    out = []

    def add(solver: str, steps: int, schedule: str = "quadratic", **kw) -> None:
        s = dataclasses.replace(BASE, solver=solver, num_steps=steps, schedule=schedule, **kw)
        out.append(s)

    if setting == "A":  # the solver sweep
        add("euler", 100, "linear")
        add("heun", 25, "linear")
        add("heun", 32)
        add("rk4", 16, "linear")
        for steps in (12, 16, 20, 24):
            add("rk4", steps)
        # top-k by p without top-k sampling drops real mass (~1% beyond the top 4096 here)
        add("rk4", 20, support_k=4096)
        prunes = ((0.1, 64), (0.2, 256), (0.3, 256))
    else:
        for steps in (20, 24):
            add("rk4", steps)
        # exact here (8000 finite entries per row), but per-row codebooks cost more than they save
        add("rk4", 20, support_k=TOP_K)
        prunes = ((0.1, 64), (0.2, 256))
    # late pruning to the codes with the largest posterior weight
    for prune_t, prune_k in prunes:
        add("rk4", 20, prune_t=prune_t, prune_k=prune_k)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per setting")
    parser.add_argument(
        "--check-tokens", type=int, default=256, help="subset for the reference's own check"
    )
    args = parser.parse_args()
    t_start = time.perf_counter()
    prob = make_problem(args.tokens)
    cb, noise = prob["codebook"], prob["noise"]
    print(f"K={K} d={D} tokens={args.tokens} devices={jax.devices()} cpus={os.cpu_count()}")
    rows = []
    for setting in ("A", "B"):
        log_p = prob[setting]
        ref, ref_time = run(REFERENCE, noise, log_p, cb)
        print(f"[{setting}] reference {describe(REFERENCE)}: {ref_time * 1e6:.0f} us/tok", flush=True)
        # the reference's own check: both fine Heun solutions on A, the 1000-step one on B
        n = args.check_tokens
        for check in CHECKS if setting == "A" else CHECKS[:1]:
            ids, _ = run(check, noise[:n], log_p[:n], cb)
            print(f"    vs {describe(check)} on {n} tokens: {100.0 * np.mean(ids == ref[:n]):.2f}%")
        for s in candidates(setting):
            ids, sec = run(s, noise, log_p, cb)
            rows.append((setting, s, 100.0 * np.mean(ids == ref), sec))
            print(f"  {setting}  {describe(s):58s} {rows[-1][2]:7.2f}%  {sec * 1e6:7.0f} us/tok",
                  flush=True)
    # Late pruning on flatter p, where the posterior stays broad for longer: pruned vs unpruned.
    print("\nlate pruning on flatter p (logits ~ N(0, sigma^2)), RK4 20 quadratic:")
    n = min(args.tokens, 2048)
    for sigma in (0.0, 1.0):
        log_p = sigma * np.random.default_rng(1).standard_normal((n, K), dtype=np.float32)
        base = dataclasses.replace(BASE, solver="rk4", num_steps=20)
        full, _ = run(base, noise[:n], log_p, cb)
        for prune_t, prune_k in ((0.1, 64), (0.2, 256)):
            ids, _ = run(dataclasses.replace(base, prune_t=prune_t, prune_k=prune_k), noise[:n],
                         log_p, cb)
            agree = 100.0 * np.mean(ids == full)
            print(f"  sigma={sigma:g} prune_t={prune_t:g} prune_k={prune_k}: {agree:.2f}% "
                  f"of {n} tokens as without pruning")
    print()
    print("| setting | solver | steps | schedule | pruning | evals (K-wide) | agree % | us/tok |")
    print("|---|---|---|---|---|---|---|---|")
    for setting, s, agree, sec in rows:
        total, wide = evals_per_token(s)
        pruning = []
        if s.support_k is not None:
            pruning.append(f"support_k={s.support_k}")
        if s.prune_t is not None:
            pruning.append(f"prune_t={s.prune_t:g}, prune_k={s.prune_k}")
        print(
            f"| {setting} | {s.solver} | {s.num_steps} | {s.schedule} | "
            f"{'; '.join(pruning) or '-'} | {total} ({wide}) | {agree:.2f} | {sec * 1e6:.0f} |"
        )
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
