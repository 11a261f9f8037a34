"""A pre-write check of the flow map: agreement with a converged float64 reference integration.

Pair generation writes (noise, token) pairs whose tokens come from `flow.map_token` with the
configured `FlowSettings`; a solver that is too coarse for the codebook at hand (e.g. a
codebook with tight groups of near-identical codes) maps some noise to the wrong token, which
no later stage detects. `check_flow` maps a few hundred rows of the teacher's actual
log-probabilities with the configured settings and with `REFERENCE` (fine RK4 grid, no
pruning, float64), and `require_flow` stops the run if they agree on too few tokens.

    check = check_flow(log_p, codebook, flow_settings, key=jax.random.PRNGKey(0))
    require_flow(check)          # raises FlowCheckError below check.threshold
    metadata["flow_check"] = check.to_json()
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddjax.mapper.flow import FlowSettings, map_token

# The converged reference: agrees with RK4 on twice as many steps on every case of
# experiments/flow_solver/measure.py (random, clustered and the digits codebook).
REFERENCE = FlowSettings(solver="rk4", num_steps=128, t_min=1e-4, schedule="cubic", early_steps=None,
                         support_k=None, prune_t=None, chunk=64)
DEFAULT_THRESHOLD = 0.999


class FlowCheckError(ValueError):
    """The flow map disagrees with the reference on more tokens than the threshold allows."""


@dataclasses.dataclass(frozen=True)
class FlowCheck:
    """Result of `check_flow`: the fraction of `num_tokens` rows mapped to the same token."""

    agreement: float
    num_tokens: int
    settings: FlowSettings
    reference: FlowSettings
    threshold: float
    passed: bool
    seconds: float = 0.0

    @property
    def mismatches(self) -> int:
        return int(round((1.0 - self.agreement) * self.num_tokens))

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (json.dumps it or embed it in metadata)."""
        return {"agreement": self.agreement, "num_tokens": self.num_tokens,
                "mismatches": self.mismatches, "threshold": self.threshold,
                "passed": self.passed, "seconds": self.seconds,
                "settings": dataclasses.asdict(self.settings),
                "reference": dataclasses.asdict(self.reference)}


def reference_tokens(
    noise: np.ndarray, log_p: np.ndarray, codebook: np.ndarray, reference: FlowSettings = REFERENCE
) -> np.ndarray:
    """Tokens [N] of the reference integration in float64 (x64 enabled only inside this call)."""
    with jax.enable_x64(True):
        fn = jax.jit(lambda e, lp, cb: map_token(e, lp, cb, reference, dtype=jnp.float64))
        ids = fn(np.asarray(noise, np.float64), np.asarray(log_p, np.float64),
                 np.asarray(codebook, np.float64))
        return np.asarray(ids)


def check_flow(
    log_p: Any,
    codebook: Any,
    settings: FlowSettings,
    *,
    key: jax.Array | None = None,
    noise: Any = None,
    reference: FlowSettings | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> FlowCheck:
    """Maps N rows with `settings` (float32, as pair generation does) and with the reference.

    Args:
      log_p: [N, K] float32, the teacher's processed log-probabilities (-inf for removed codes),
        e.g. one row per position of a few sequences.
      codebook: [K, d].
      settings: the FlowSettings pair generation uses.
      key: PRNG key for the noise (standard normal [N, d]); or give `noise` [N, d] directly.
        Neither: PRNGKey(0).
      reference: the converged integration to compare with (default `REFERENCE`; run in
        float64, unpruned, over the full support).
      threshold: the smallest agreement that passes.
    Returns:
      FlowCheck. About 15 s for 256 rows at K = 16384 on one CPU core (mostly the reference).
    """
    start = time.perf_counter()
    log_p = np.asarray(log_p, np.float32)
    codebook = np.asarray(codebook, np.float32)
    if log_p.ndim != 2 or codebook.ndim != 2 or log_p.shape[1] != codebook.shape[0]:
        raise ValueError(f"need log_p [N, K] and codebook [K, d], got {log_p.shape}, {codebook.shape}")
    if noise is None:
        key = jax.random.PRNGKey(0) if key is None else key
        noise = jax.random.normal(key, (log_p.shape[0], codebook.shape[1]), jnp.float32)
    elif key is not None:
        raise ValueError("give key or noise, not both")
    noise = np.asarray(noise, np.float32)
    if noise.shape != (log_p.shape[0], codebook.shape[1]):
        raise ValueError(f"noise must be [{log_p.shape[0]}, {codebook.shape[1]}], got {noise.shape}")
    reference = REFERENCE if reference is None else reference
    got = np.asarray(jax.jit(lambda e, lp, cb: map_token(e, lp, cb, settings))(noise, log_p, codebook))
    want = reference_tokens(noise, log_p, codebook, reference)
    agreement = float(np.mean(got == want))
    return FlowCheck(agreement=agreement, num_tokens=int(log_p.shape[0]), settings=settings,
                     reference=reference, threshold=float(threshold),
                     passed=agreement >= threshold, seconds=time.perf_counter() - start)


def require_flow(check: FlowCheck) -> FlowCheck:
    """Returns `check` if it passed; otherwise raises FlowCheckError saying what to change."""
    if check.passed:
        return check
    s = check.settings
    raise FlowCheckError(
        f"flow map check failed: {100 * check.agreement:.2f}% of {check.num_tokens} tokens "
        f"({check.mismatches} differ) match the converged reference, below the threshold "
        f"{100 * check.threshold:.2f}%. The solver is too coarse for this codebook/distribution: "
        f"raise config.flow.num_steps (now {s.num_steps}), use config.flow.solver='rk4' (now "
        f"{s.solver!r}), set config.flow.prune_t=None (now {s.prune_t}), raise or unset "
        f"config.flow.early_steps (now {s.early_steps}) or use a finer config.flow.schedule (now "
        f"{s.schedule!r}); or, if this agreement is acceptable, lower "
        f"config.data.flow_check_threshold (now {check.threshold})."
    )
