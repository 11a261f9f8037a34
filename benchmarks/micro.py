"""Micro-benchmarks behind the notes in benchmarks/README.md ("Optimising sampling.py").

    python benchmarks/micro.py topk            # kth_largest vs lax.top_k threshold, [8|32, 16384]
    python benchmarks/micro.py kv-layout       # KV-cache update + decode attention: [B,S,H,D] vs [B,H,S,D]
    python benchmarks/micro.py bf16-matmul     # [rows, 768] x [768, 16384] in f32 / bf16 / bf16->f32
    python benchmarks/micro.py flow-support    # the flow's support compaction and velocity layouts
    python benchmarks/micro.py concurrency     # do two independent XLA:CPU fusions share the cores?
    python benchmarks/micro.py decode-matmul   # the decoding matmul shape, XLA and (if installed) torch
    python benchmarks/micro.py all --small     # every one at toy sizes (a smoke run)

topk: the top-k threshold the sampler needs per token, `sampling.kth_largest(x, k)` against
`lax.top_k(x, k)[0][..., -1:]` (the two are checked equal first), at k = 8000 and 10.

kv-layout: one layer's decoding step repeated --steps times in a `fori_loop`: write one new
key/value row into a cache of --cache rows, then attend from one query per row over the cache
(softmax in float32, causal mask by position). "seq-major" is ddjax's layout today
([B, S, Hkv, D], `ddjax.kernels.attention_reference`); "head-major" is LlamaGen's
([B, Hkv, S, D], written with `dynamic_update_slice(..., (0, 0, index, 0))`, contracted as
"bthd,bhsd->bhts" / "bhts,bhsd->bthd"). Both give the same outputs (checked).

bf16-matmul: the logits head's shape; f32 x f32, bf16 x bf16 -> bf16, and bf16 inputs with
`preferred_element_type=float32` (f32 accumulation and output).

flow-support: rows of log p = top-k (half) of 16384; `codes.compact` (running count + a
scatter by a permutation, then a gather; also with jnp.cumsum as the running count, and with
the earlier scatter that drops the removed codes) against gathering `lax.top_k`'s indices, then
--steps velocity evaluations over all codes, over the compacted per-row codes in ddjax's
[N, d, S] layout and in [N, S, d] (velocities checked equal to 1e-5 first).

concurrency: one elementwise-and-reduce fusion over [8, 2^20] against two independent ones in
one program: a ratio near 2 means XLA:CPU runs them one after the other on one core.

decode-matmul: GPT-B's feed-forward shape at batch 8 with CFG, [16, 768] x [768, 2048] and back,
for 12 layers' distinct weights (75 MB in f32, more than the L3 cache) in a loop, in XLA (as
x @ kernel, and weight-major: kernel^T x^T on [out, in] buffers, as `sample` runs on the CPU)
and in PyTorch (torch.set_num_threads(2)): GFLOP/s and the weight bytes read per second.

Every comparison interleaves its candidates' calls (benchmarks/_common.py), median of --repeats.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._common import interleaved, print_environment, table  # noqa: E402
from ddjax.kernels.attention import attention_reference  # noqa: E402
from ddjax.teacher.llamagen.sampling import kth_largest  # noqa: E402


def bench_topk(args) -> list[dict]:
    rows = []
    vocab = 512 if args.small else 16384
    for batch in (8, 32):
        x = jax.random.normal(jax.random.PRNGKey(batch), (batch, vocab), jnp.float32)
        for k in (max(1, vocab * 8000 // 16384), 10):
            fns = {"kth_largest": jax.jit(lambda a, k=k: kth_largest(a, k)),
                   "lax.top_k": jax.jit(lambda a, k=k: jax.lax.top_k(a, k)[0][..., -1:])}
            np.testing.assert_array_equal(np.asarray(fns["kth_largest"](x)),
                                          np.asarray(fns["lax.top_k"](x)))
            t = interleaved({n: (lambda f=f, x=x: f(x)) for n, f in fns.items()}, warmup=1,
                            repeats=args.repeats)
            rows.append({"batch": batch, "vocab": vocab, "k": k,
                         "kth_largest ms": 1e3 * t["kth_largest"].median,
                         "lax.top_k ms": 1e3 * t["lax.top_k"].median,
                         "speed-up": t["lax.top_k"].median / t["kth_largest"].median})
    return rows


def _decode_loop(layout: str, steps: int, start: int):
    """(q [B,1,H,D], new k/v [steps,B,1,H,D], caches) -> (last output, caches)."""

    def seq_major(q, new_k, new_v, k_cache, v_cache):
        def body(i, carry):
            _, kc, vc = carry
            idx = start + i
            kc = jax.lax.dynamic_update_slice(kc, new_k[i], (0, idx, 0, 0))
            vc = jax.lax.dynamic_update_slice(vc, new_v[i], (0, idx, 0, 0))
            return attention_reference(q, kc, vc, q_offset=idx), kc, vc

        return jax.lax.fori_loop(0, steps, body, (q, k_cache, v_cache))

    def head_major(q, new_k, new_v, k_cache, v_cache):
        d = q.shape[-1]

        def body(i, carry):
            _, kc, vc = carry
            idx = start + i
            kc = jax.lax.dynamic_update_slice(kc, new_k[i].transpose(0, 2, 1, 3), (0, 0, idx, 0))
            vc = jax.lax.dynamic_update_slice(vc, new_v[i].transpose(0, 2, 1, 3), (0, 0, idx, 0))
            s = jnp.einsum("bthd,bhsd->bhts", q, kc, preferred_element_type=jnp.float32)
            s = s / jnp.sqrt(jnp.float32(d))
            s = jnp.where(jnp.arange(kc.shape[2]) <= idx, s, jnp.finfo(jnp.float32).min)
            p = jax.nn.softmax(s, axis=-1).astype(vc.dtype)
            out = jnp.einsum("bhts,bhsd->bthd", p, vc, preferred_element_type=jnp.float32)
            return out.astype(q.dtype), kc, vc

        return jax.lax.fori_loop(0, steps, body, (q, k_cache, v_cache))

    return jax.jit(seq_major if layout == "seq-major" else head_major)


def bench_kv_layout(args) -> list[dict]:
    b, s, h, d = (4, 33, 2, 16) if args.small else (args.rows, args.cache, 12, 64)
    steps = min(args.steps, s - 1)
    start = s - steps - 1  # the last `steps` rows: the longest contexts
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    q = jax.random.normal(ks[0], (b, 1, h, d))
    new_k = jax.random.normal(ks[1], (steps, b, 1, h, d))
    new_v = jax.random.normal(ks[2], (steps, b, 1, h, d))
    kc = jax.random.normal(ks[3], (b, s, h, d))
    vc = jax.random.normal(ks[4], (b, s, h, d))
    inputs = {"seq-major": (q, new_k, new_v, kc, vc),
              "head-major": (q, new_k, new_v, kc.transpose(0, 2, 1, 3), vc.transpose(0, 2, 1, 3))}
    fns = {name: _decode_loop(name, steps, start) for name in inputs}
    outs = {name: fns[name](*inputs[name]) for name in inputs}
    np.testing.assert_allclose(np.asarray(outs["seq-major"][0]), np.asarray(outs["head-major"][0]),
                               rtol=1e-5, atol=1e-5)
    t = interleaved({n: (lambda n=n: fns[n](*inputs[n])) for n in fns}, warmup=1,
                    repeats=args.repeats)
    return [{"rows": b, "cache rows": s, "heads": h, "head dim": d, "steps": steps,
             "seq-major s": t["seq-major"].median, "head-major s": t["head-major"].median,
             "speed-up": t["seq-major"].median / t["head-major"].median}]


def bench_bf16_matmul(args) -> list[dict]:
    dim, vocab = (64, 512) if args.small else (768, 16384)
    w = jax.random.normal(jax.random.PRNGKey(1), (dim, vocab), jnp.float32) * 0.02
    fns = {"f32": jax.jit(lambda x, w: jnp.dot(x, w)),
           "bf16->bf16": jax.jit(lambda x, w: jnp.dot(x, w)),
           "bf16->f32": jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))}
    rows = []
    for r in (16, 64):
        x = jax.random.normal(jax.random.PRNGKey(r), (r, dim), jnp.float32)
        args_of = {"f32": (x, w), "bf16->bf16": (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)),
                   "bf16->f32": (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))}
        t = interleaved({n: (lambda n=n, a=args_of: fns[n](*a[n])) for n in fns}, warmup=2,
                        repeats=args.repeats)
        rows.append({"rows": r, "dim": dim, "vocab": vocab,
                     **{f"{n} ms": 1e3 * t[n].median for n in fns},
                     "bf16->bf16 / f32": t["bf16->bf16"].median / t["f32"].median,
                     "f32 / bf16->f32": t["f32"].median / t["bf16->f32"].median})
    return rows


def _velocity_loop(steps: int):
    """steps velocity evaluations of the flow map at t = 0.5 (x moves, so nothing is hoisted)."""
    from ddjax.mapper.codes import sq_norms
    from ddjax.mapper.flow import _velocity

    def run(x, log_p, codebook):
        t = jnp.full((x.shape[0], 1), 0.5, x.dtype)
        c2 = sq_norms(codebook)
        return jax.lax.fori_loop(0, steps, lambda i, x: x + 1e-3 * _velocity(x, t, log_p, codebook, c2), x)

    return jax.jit(run)


def bench_flow_support(args) -> list[dict]:
    from ddjax.mapper import codes
    from ddjax.mapper.codes import compact, gather

    n, k, d = 8, (512 if args.small else 16384), 8
    s = k // 2
    logits = jax.random.normal(jax.random.PRNGKey(0), (n, k))
    log_p = jnp.where(logits >= kth_largest(logits, s), logits, -jnp.inf)
    code = jax.random.normal(jax.random.PRNGKey(1), (k, d))
    code = code / jnp.linalg.norm(code, axis=1, keepdims=True)
    x = jax.random.normal(jax.random.PRNGKey(2), (n, d))
    def compact_dropping(lp):  # the earlier compaction (same outputs)
        finite = lp > -jnp.inf
        running = codes.running_count(finite)
        count = running[:, -1]
        rows = jnp.arange(n)[:, None]
        ids = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), lp.shape)
        slot = jnp.where(finite, running - 1, s)
        idx = jnp.zeros((n, s), jnp.int32).at[rows, slot].set(ids, mode="drop")
        out, cb = gather(lp, code, idx)
        return jnp.where(jnp.arange(s)[None, :] < count[:, None], out, -jnp.inf), cb

    sel = {"compact": jax.jit(lambda lp: compact(lp, code, s)[:2]),
           "compact, scatter dropping removed codes": jax.jit(compact_dropping),
           "lax.top_k + gather": jax.jit(lambda lp: gather(lp, code, jax.lax.top_k(lp, s)[1]))}
    # the same compaction with XLA's cumsum as its running count (traced with it swapped in)
    with mock.patch.object(codes, "running_count", lambda m: jnp.cumsum(m, axis=-1, dtype=jnp.int32)):
        sel["compact, jnp.cumsum count"] = jax.jit(lambda lp: compact(lp, code, s)[:2]).lower(log_p).compile()
    for m, f in sel.items():
        if m.startswith("compact"):
            for a, b in zip(f(log_p), sel["compact"](log_p)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    t = interleaved({m: (lambda f=f: f(log_p)) for m, f in sel.items()}, warmup=1, repeats=args.repeats)
    rows = [{"what": f"select {s} of {k} codes, {n} rows", "candidate": m, "ms": 1e3 * t[m].median}
            for m in sel]
    run = _velocity_loop(args.steps)
    lp_c, cb_c = sel["compact"](log_p)
    cb_sd = jnp.swapaxes(cb_c, 1, 2)

    def loop_sd(x, lp, cb):  # the same evaluation with per-row codes [N, S, d]
        t = jnp.full((n, 1), 0.5)
        c2 = jnp.sum(cb * cb, axis=-1)

        def v(x):
            lg = lp + (jnp.einsum("nd,nsd->ns", x, cb) - 0.25 * c2) / 0.5
            e = jnp.exp(lg - jnp.max(lg, axis=-1, keepdims=True))
            return (x - jnp.einsum("ns,nsd->nd", e, cb) / jnp.sum(e, -1, keepdims=True)) / t
        return jax.lax.fori_loop(0, args.steps, lambda i, x: x + 1e-3 * v(x), x)

    loop_sd = jax.jit(loop_sd)
    evals = {"all codes [K, d]": lambda: run(x, log_p, code),
             "compacted [N, d, S]": lambda: run(x, lp_c, cb_c),
             "compacted [N, S, d]": lambda: loop_sd(x, lp_c, cb_sd)}
    ref = np.asarray(evals["all codes [K, d]"]())
    for m, f in evals.items():
        np.testing.assert_allclose(np.asarray(f()), ref, atol=1e-5, err_msg=m)
    t = interleaved(evals, warmup=1, repeats=args.repeats)
    rows += [{"what": f"one velocity evaluation, {n} rows", "candidate": m,
              "ms": 1e3 * t[m].median / args.steps} for m in evals]
    return rows


def bench_concurrency(args) -> list[dict]:
    size = 1 << (12 if args.small else 20)
    a, b = (jax.random.normal(jax.random.PRNGKey(i), (8, size)) for i in (0, 1))
    chain = lambda x: jnp.sum(jnp.exp(jnp.sin(x) * 0.5), axis=-1)
    fns = {"one": jax.jit(chain), "two": jax.jit(lambda a, b: (chain(a), chain(b)))}
    t = interleaved({"one": lambda: fns["one"](a), "two": lambda: fns["two"](a, b)}, warmup=1,
                    repeats=args.repeats)
    return [{"elements per chain": 8 * size, "one ms": 1e3 * t["one"].median,
             "two ms": 1e3 * t["two"].median, "two / one": t["two"].median / t["one"].median,
             "cores": os.cpu_count()}]


def bench_decode_matmul(args) -> list[dict]:
    rows, dim, hidden, layers, loops = 16, 768, 2048, 12, 10
    if args.small:
        dim, hidden, layers, loops = 64, 128, 2, 2
    ws = [np.asarray(jax.random.normal(jax.random.PRNGKey(i), (dim, hidden)), np.float32) * 0.02
          for i in range(layers)]
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(99), (rows, dim)), np.float32)

    @jax.jit
    def xla(x, ws):
        def body(i, x):
            for w in ws:
                x = x + 1e-3 * (jnp.tanh(x @ w) @ w.T)
            return x
        return jax.lax.fori_loop(0, loops, body, x)

    from ddjax.teacher.llamagen.layers import accumulating_dot

    wm_dot = functools.partial(accumulating_dot(jnp.float32, weight_major=True),
                               dimension_numbers=(((1,), (0,)), ((), ())))

    @jax.jit
    def xla_weight_major(x, ws, ws_t):  # each kernel's [out, in] buffer, applied through its view
        def body(i, x):
            for w, w_t in zip(ws, ws_t):
                x = x + 1e-3 * wm_dot(jnp.tanh(wm_dot(x, w_t.T)), w.T)
            return x
        return jax.lax.fori_loop(0, loops, body, x)

    fns = {"XLA": functools.partial(xla, jnp.asarray(x), [jnp.asarray(w) for w in ws]),
           "XLA, weight-major": functools.partial(xla_weight_major, jnp.asarray(x),
                                                  [jnp.asarray(w) for w in ws],
                                                  [jnp.asarray(w.T.copy()) for w in ws])}
    np.testing.assert_allclose(np.asarray(fns["XLA, weight-major"]()), np.asarray(fns["XLA"]()),
                               rtol=1e-4, atol=1e-5)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(2)
        tw, tx = [torch.from_numpy(np.array(w)) for w in ws], torch.from_numpy(np.array(x))  # writable copies

        def eager():
            with torch.no_grad():
                y = tx
                for _ in range(loops):
                    for w in tw:
                        y = y + 1e-3 * (torch.tanh(y @ w) @ w.T)
                return y.numpy()
        fns["torch"] = eager
    t = interleaved(fns, warmup=1, repeats=args.repeats)
    n = loops * layers * 2
    return [{"library": m, "ms per matmul": 1e3 * t[m].median / n,
             "GFLOP/s": 2 * rows * dim * hidden * n / t[m].median / 1e9,
             "weight GB/s": 4 * dim * hidden * n / t[m].median / 1e9} for m in fns]


BENCHES = {"topk": bench_topk, "kv-layout": bench_kv_layout, "bf16-matmul": bench_bf16_matmul,
           "flow-support": bench_flow_support, "concurrency": bench_concurrency,
           "decode-matmul": bench_decode_matmul}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("which", choices=[*BENCHES, "all"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--small", action="store_true", help="toy sizes: a smoke run")
    p.add_argument("--rows", type=int, default=64, help="kv-layout: batch rows (CFG included)")
    p.add_argument("--cache", type=int, default=257, help="kv-layout: cache rows")
    p.add_argument("--steps", type=int, default=16,
                   help="kv-layout: decoding steps per call; flow-support: evaluations per call")
    args = p.parse_args(argv)
    print_environment({"benchmark": args.which, "small": args.small})
    for name in BENCHES if args.which == "all" else [args.which]:
        print(f"\n{name} (interleaved calls, median of {args.repeats}):\n")
        print(table(BENCHES[name](args)), flush=True)


if __name__ == "__main__":
    main()
