"""Convergence and cost of the one-token flow map (ddjax.mapper.flow) on LlamaGen- and VAR-like codebooks.

    python experiments/flow_solver/measure.py                          # the tables in README.md
    python experiments/flow_solver/measure.py --tokens 256 --check-tokens 32 --quick   # smoke run

Codebooks (d = 8, L2-normalised):
  random     K = 16384 Gaussian codes (as LlamaGen's VQ-16 codebook size);
  clustered  K = 16384 = 64 centres x 256 near-duplicate codes (centre + 0.02 N(0, I)), the
             tight groups trained codebooks can have;
  digits     the shipped digits VQ (ddjax/assets/digits, K = 128), loaded as the pipeline does.
VAR's codebooks are not normalised (d = 32 for VAR's vae_ch160v4096z32):
  var-sS     K = 4096 Gaussian codes N(0, S^2 I) in d = 32, unnormalised (var-s0.1: norms ~0.57,
             near-duplicates at noise scale; var-s1: norms ~5.7, beyond the noise);
  var-digits the shipped VAR digits VQVAE's codebook (ddjax/assets/var_digits, K = 256, d = 16,
             norms 0.09-0.99), loaded as the pipeline does.
Distributions (one p per token):
  full   logits ~ N(0, 3^2), full support;
  flat   logits ~ N(0, 1), full support (the posterior stays spread longer);
  top-k  the full logits with top-k applied (8000 for K = 16384 as LlamaGen's sampler, 32 as
         the digits teacher's), the rest -inf;
  var    VAR's processed distribution: top-k 900 then top-p 0.95 of the full logits (VAR-DD's
         teacher settings).
Reference for every token: `ddjax.mapper.check.REFERENCE` (RK4, 128 cubic steps to t_min = 1e-4,
no pruning, float64). It is itself checked on a subset against RK4 with 256 cubic steps (float64).
Each candidate (float32, chunk = FlowSettings' default) runs on all tokens: "agree" is the % of
tokens identical to the reference, "K-wide evals" the velocity evaluations over all codes per
token (with pruning: per chunk of rows, those until the chunk's last row was certified; on the
first 1024 tokens),
"bounds" the pruning-bound evaluations per token, "us/tok" the wall time per token of one
compiled run (integration + snap, compile excluded; indicative only on a shared machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from ddjax.app.build import build_teacher  # noqa: E402
from ddjax.configs_path import load_config  # noqa: E402
from ddjax.mapper.check import REFERENCE, reference_tokens  # noqa: E402
from ddjax.mapper.flow import FlowSettings, map_token, pruned_at, settings_grid  # noqa: E402
from ddjax.teacher.var.sampling import filter_top_k_top_p  # noqa: E402

K, D = 16384, 8
CODEBOOKS = ("random", "clustered", "digits")
VAR_CODEBOOKS = ("var-s0.1", "var-s0.3", "var-s1", "var-digits")  # --codebooks var selects these
DISTRIBUTIONS = ("full", "flat", "top-k")
VAR_K, VAR_D = 4096, 32
COST_TOKENS = 1024
REFERENCE_CHECK = dataclasses.replace(REFERENCE, num_steps=256)
DEFAULT = FlowSettings()
# Every candidate is spelled out from this base, whatever FlowSettings' defaults are.
BASE = FlowSettings(solver="rk4", t_min=1e-3, early_steps=None, support_k=None, prune_t=None,
                    prune_k=512, prune_tol=1e-6, chunk=DEFAULT.chunk)


def codebook(name: str, seed: int = 0) -> np.ndarray:
    """[K, d] float32 codes (L2-normalised but for VAR's)."""
    rng = np.random.default_rng(seed)
    if name == "var-digits":
        config = load_config("var", "digits")
        return np.asarray(build_teacher(config).codebook, np.float32)
    if name.startswith("var-s"):
        return (float(name[5:]) * rng.standard_normal((VAR_K, VAR_D))).astype(np.float32)
    if name == "digits":
        config = load_config("llamagen", "digits")
        return np.asarray(build_teacher(config).codebook, np.float32)
    if name == "random":
        c = rng.standard_normal((K, D))
    elif name == "clustered":
        centres = rng.standard_normal((64, D))
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        c = np.repeat(centres, K // 64, axis=0) + 0.02 * rng.standard_normal((K, D))
    else:
        raise ValueError(name)
    return (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return (z - np.log(np.exp(z).sum(axis=1, keepdims=True))).astype(np.float32)


def distribution(name: str, tokens: int, k: int, seed: int = 1) -> np.ndarray:
    """[tokens, k] log-probabilities."""
    rng = np.random.default_rng(seed)
    logits = (1.0 if name == "flat" else 3.0) * rng.standard_normal((tokens, k))
    if name == "var":  # VAR's own sampler filter (ddjax.teacher.var.sampling)
        logits = np.asarray(filter_top_k_top_p(jnp.asarray(logits, jnp.float32), 900, 0.95))
    if name == "top-k":
        top = 8000 if k > 1000 else 32
        cut = np.partition(logits, k - top, axis=1)[:, k - top][:, None]
        logits = np.where(logits >= cut, logits, -np.inf)
    return log_softmax(logits)


def cached_references(
    directory: str, name: str, noise: np.ndarray, log_p: np.ndarray, cb: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reference tokens for all rows, and those of REFERENCE_CHECK for the first n rows."""
    digest = hashlib.sha256(repr((REFERENCE, REFERENCE_CHECK, cb.tobytes())).encode()).hexdigest()[:12]
    key = f"{name}-{len(noise)}-{n}-{digest}.npz"
    path = os.path.join(directory, key) if directory else ""
    if path and os.path.exists(path):
        with np.load(path) as f:
            return f["ref"], f["check"]
    ref = reference_tokens(noise, log_p, cb, REFERENCE)
    check = reference_tokens(noise[:n], log_p[:n], cb, REFERENCE_CHECK)
    if path:
        os.makedirs(directory, exist_ok=True)
        np.savez(path, ref=ref, check=check)
    return ref, check


def candidates(quick: bool, early: bool = False) -> list[FlowSettings]:
    def rk4(steps: int, schedule: str = "cubic", **kw) -> FlowSettings:
        return dataclasses.replace(BASE, num_steps=steps, schedule=schedule, **kw)

    if early:  # the pruned default against its grid with fewer early steps (opt-in: no preset sets it)
        return [rk4(32, prune_t=0.1)] + [rk4(32, early_steps=n, prune_t=0.1) for n in (8, 10, 12)]
    if quick:
        return [rk4(20, "quadratic"), rk4(32, prune_t=0.1), DEFAULT]
    out = [rk4(20, "quadratic"), rk4(32, "quadratic"), rk4(24), rk4(28), rk4(32), rk4(40),
           rk4(32, "log"), dataclasses.replace(BASE, solver="heun", num_steps=64)]
    out += [rk4(20, "quadratic", prune_t=0.1, prune_k=64), rk4(32, prune_t=0.1, prune_k=64),
            rk4(28, prune_t=0.1), rk4(32, prune_t=0.1), rk4(32, prune_t=0.2), rk4(40, prune_t=0.1)]
    out += [rk4(32, early_steps=n) for n in (8, 10, 12)]
    out += [rk4(32, early_steps=n, prune_t=0.1) for n in (8, 10, 12)]
    if DEFAULT not in out:
        out.append(DEFAULT)
    return out


def run(s: FlowSettings, noise, log_p, cb) -> tuple[np.ndarray, float]:
    """Tokens and seconds per token of one compiled run (compile time excluded)."""
    fn = jax.jit(lambda e, lp, c: map_token(e, lp, c, s)).lower(noise, log_p, cb).compile()
    start = time.perf_counter()
    ids = np.asarray(jax.block_until_ready(fn(noise, log_p, cb)))
    return ids, (time.perf_counter() - start) / noise.shape[0]


def cost(s: FlowSettings, noise, log_p, cb) -> tuple[float, float]:
    """(K-wide velocity evaluations, pruning-bound evaluations) per token.

    A chunk of rows runs the full-width step until its last row is certified; each of those
    steps from the first time <= prune_t on also evaluates the bound (about 2 K-wide passes).
    Measured on the first COST_TOKENS tokens (pruned_at integrates again)."""
    per_step = {"euler": 1, "heun": 2, "rk4": 4}[s.solver]
    ts = settings_grid(s)
    steps = len(ts) - 1
    if s.prune_t is None or s.prune_k >= cb.shape[0]:  # pruning off (or nothing to drop)
        return float(steps * per_step), 0.0
    at = np.asarray(jax.jit(lambda e, lp, c: pruned_at(e, lp, c, s))(noise, log_p, cb))
    chunk = s.chunk or len(at)
    pad = -len(at) % chunk
    full = np.concatenate([at, np.full(pad, at.min())]).reshape(-1, chunk).max(axis=1)
    first = int(np.argmax(ts[:-1] <= s.prune_t))
    attempts = np.minimum(full, steps - 1) - first + 1
    return float(np.mean(full) * per_step), float(np.mean(attempts))


def describe(s: FlowSettings) -> str:
    text = f"{s.solver} {s.num_steps} {s.schedule}"
    if s.early_steps is not None:
        text += f" early {s.early_steps} (t > {s.early_t:g}; {len(settings_grid(s)) - 1} steps)"
    if s.prune_t is not None:
        text += f", prune_t={s.prune_t:g} prune_k={s.prune_k} tol={s.prune_tol:g}"
    return text + (" **(default)**" if s == DEFAULT else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per case")
    parser.add_argument("--check-tokens", type=int, default=256,
                        help="subset for the reference's own check")
    parser.add_argument("--codebooks", default=",".join(CODEBOOKS),
                        help=f"comma-separated; 'var' = {','.join(VAR_CODEBOOKS)} (use with "
                             "--distributions var,full)")
    parser.add_argument("--distributions", default=",".join(DISTRIBUTIONS))
    parser.add_argument("--quick", action="store_true", help="three candidates only")
    parser.add_argument("--early", action="store_true",
                        help="only the pruned RK4-32 cubic grid with and without early steps")
    parser.add_argument("--reference-cache", default="",
                        help="directory to keep the reference tokens in between runs")
    args = parser.parse_args()
    t_start, c_start = time.perf_counter(), time.process_time()
    print(f"tokens={args.tokens} devices={jax.devices()} cpus={os.cpu_count()} "
          f"load average={os.getloadavg()}")
    print(f"default: {DEFAULT}")
    rows = []
    names = [n for c in args.codebooks.split(",") for n in (VAR_CODEBOOKS if c == "var" else (c,))]
    for cb_name in names:
        cb = codebook(cb_name)
        noise = np.random.default_rng(2).standard_normal((args.tokens, cb.shape[1])).astype(np.float32)
        for dist in args.distributions.split(","):
            log_p = distribution(dist, args.tokens, cb.shape[0])
            case = f"{cb_name} K={cb.shape[0]} / {dist}"
            t0 = time.perf_counter()
            n = args.check_tokens
            ref, check = cached_references(args.reference_cache, f"{cb_name}-{dist}", noise, log_p,
                                           cb, n)
            print(f"[{case}] reference {time.perf_counter() - t0:.0f} s; vs 256 steps on {n} "
                  f"tokens: {100 * np.mean(check == ref[:n]):.2f}%", flush=True)
            for s in candidates(args.quick, args.early):
                ids, sec = run(s, noise, log_p, cb)
                m = min(COST_TOKENS, len(noise))
                wide, bounds = cost(s, noise[:m], log_p[:m], cb)
                agree = 100.0 * np.mean(ids == ref)
                rows.append((case, s, agree, int(np.sum(ids != ref)), wide, bounds, sec))
                print(f"  {describe(s):60s} {agree:7.2f}% ({rows[-1][3]} differ) "
                      f"K-wide {wide:5.1f} bounds {bounds:4.1f} {sec * 1e6:6.0f} us/tok", flush=True)
    print()
    print("| case | candidate | agree % (differ) | K-wide evals | bounds | us/tok |")
    print("|---|---|---|---|---|---|")
    for case, s, agree, bad, wide, bounds, sec in rows:
        print(f"| {case} | {describe(s)} | {agree:.2f} ({bad}) | {wide:.1f} | {bounds:.1f} | "
              f"{sec * 1e6:.0f} |")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s wall, {time.process_time() - c_start:.0f} s "
          f"CPU; load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
