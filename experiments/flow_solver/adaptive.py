"""An error-controlled solver for the flow map: diffrax Tsit5 with a PID step controller.

    pip install diffrax     # not a ddjax dependency
    python experiments/flow_solver/adaptive.py            # the adaptive table in README.md

Same random and clustered codebooks and distributions as measure.py (K = 16384, d = 8). The ODE
is integrated in s = log t (dx/ds = x - m, from s = 0 to log t_min = log 1e-3), every row with
its own step-size control (vmap over a chunk of 8 rows, as FlowSettings.chunk), then snapped.
Under vmap a chunk runs until its slowest row is done, so the cost per token is 6 K-wide
evaluations (Tsit5) times the chunk's largest step count (accepted + rejected).
"""

from __future__ import annotations

import argparse
import os
import sys

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import codebook, distribution  # noqa: E402

from ddjax.mapper import flow  # noqa: E402
from ddjax.mapper.check import REFERENCE, reference_tokens  # noqa: E402

CHUNK, T_MIN = 8, 1e-3


def adaptive_tokens(noise, log_p, cb, tol: float) -> tuple[jax.Array, jax.Array]:
    """Tokens [N] and steps per row [N] of Tsit5 with rtol = atol = tol."""
    cbj = jnp.asarray(cb)

    def field(s, x, lp):
        t = jnp.exp(s)
        return t * flow.velocity(x[None], t, lp[None], cbj)[0]

    def one(x0, lp):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field), diffrax.Tsit5(), t0=0.0, t1=float(np.log(T_MIN)), dt0=-0.05,
            y0=x0, args=lp, stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
            max_steps=4096)
        return sol.ys[-1], sol.stats["num_steps"]

    d, k = noise.shape[-1], log_p.shape[-1]
    x, steps = jax.lax.map(lambda a: jax.vmap(one)(*a),
                           (noise.reshape(-1, CHUNK, d), log_p.reshape(-1, CHUNK, k)))
    return flow.snap(x.reshape(-1, d), cbj, log_p), steps.reshape(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    print(f"tokens={args.tokens} load average={os.getloadavg()}")
    noise = np.random.default_rng(2).standard_normal((args.tokens, 8)).astype(np.float32)
    print("| case | rtol = atol | agree % (differ) | steps/row (mean) | K-wide evals/token |")
    print("|---|---|---|---|---|")
    for cb_name, dist in (("random", "full"), ("clustered", "flat")):
        cb = codebook(cb_name)
        log_p = distribution(dist, args.tokens, cb.shape[0])
        ref = reference_tokens(noise, log_p, cb, REFERENCE)
        for tol in (1e-4, 1e-5, 1e-6):
            ids, steps = jax.jit(lambda e, lp, c=cb, tol=tol: adaptive_tokens(e, lp, c, tol))(noise, log_p)
            ids, steps = np.asarray(ids), np.asarray(steps)
            worst = steps.reshape(-1, CHUNK).max(axis=1)
            print(f"| {cb_name} / {dist} | {tol:g} | {100 * np.mean(ids == ref):.2f} "
                  f"({int(np.sum(ids != ref))}) | {steps.mean():.1f} | {6 * worst.mean():.0f} |",
                  flush=True)
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
