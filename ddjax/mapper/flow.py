"""The flow-matching map for one token: noise eps in R^d -> a code index (method.md, section 2).

The data distribution at one position is the mixture of Diracs sum_k p_k delta(c_k) (time 0),
the noise is N(0, I_d) (time 1) and x_t = (1 - t) x_0 + t eps. With the posterior

    w_k(x, t) = softmax_k( log p_k - |x - (1 - t) c_k|^2 / (2 t^2) )

the velocity is v(x, t) = sum_k w_k (x - c_k) / t = (x - w @ C) / t. Integrating dx/dt = v from
t = 1 down to t_min and snapping to the nearest code gives a deterministic map eps -> token that
pushes N(0, I) forward to p.

Support compaction (`FlowSettings.support_k`) integrates each row over its codes with a finite
log p only (`codes.compact`: top-k sampling removes half of LlamaGen's codes), which is the same
flow; a row with more finite codes than `support_k` slots is integrated over all codes.

Late pruning (`FlowSettings.prune_t`) finishes a row's integration on a few codes only when a
bound (`ddjax.mapper.prune`, derivation in `prune_bound`'s docstring) proves that the codes it drops keep a
posterior weight below `prune_tol` for the whole rest of the integration; rows the bound does not
certify keep integrating over all codes. Pruning therefore changes a token only through the
(tiny, bounded) velocity error it admits, on every codebook.

All functions are pure and jit-friendly. Rows are independent: nothing reduces across rows, and
`integrate` / `map_token` run every row inside a fixed-size chunk (`FlowSettings.chunk`), so a
row's floats do not depend on how many other rows share the call (an [N, d] x [d, K] matmul
picks different CPU kernels for N = 1 and N = 1000, which changes the last bits). Inside a chunk
the work skipped for pruned rows is skipped only when every row of the chunk is pruned
(`lax.cond`); a row's own result never depends on the other rows.

The defaults (`FlowSettings()`) were chosen by `experiments/flow_solver/measure.py` (table and
command in its README): they give the same token as a converged float64 reference for >= 99.9%
of tokens on random, clustered and the shipped digits codebooks, with full-support and top-k p.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from ddjax.mapper.codes import column, compact, dots, gather, logits_from_dots, mix, sq_norms
from ddjax.mapper.prune import GROUP_AFTER, SMALL_KEEP, PruneBound, certify, keep

Array = jax.Array
Solver = Literal["euler", "heun", "rk4"]
SOLVERS: tuple[str, ...] = ("euler", "heun", "rk4")
Schedule = Literal["linear", "quadratic", "cubic", "log"]
SCHEDULES: tuple[str, ...] = ("linear", "quadratic", "cubic", "log")


@dataclasses.dataclass(frozen=True)
class FlowSettings:
    """How `map_token` integrates the flow (see experiments/flow_solver/README.md).

    solver: "rk4" (classical Runge-Kutta, 4 velocity evaluations per step), "heun" (2) or
      "euler" (1). Per evaluation, RK4 converged fastest by far (measured).
    num_steps: number of steps from t = 1 to t_min (of the base schedule, with early_steps).
    t_min: end time; 0 is allowed (the last step is then an Euler step, which lands on E[x_0]).
    schedule: time grid, see `time_grid`.
    early_steps: if set, the schedule's steps from t = 1 to its first time <= early_t are
      replaced by min(early_steps, their number) steps equally spaced in sqrt(1/t - 1)
      (`time_grid`; the grid is `settings_grid(settings)`). None (default): the schedule as it
      is. 10 with the cubic 32-step schedule (10 + 14 steps, 43 instead of 75 full-width
      evaluations per token) is opt-in: it keeps >= 99.9% agreement with the reference on
      random and the digits codebooks but measured 99.80-99.85% on the clustered one and 99.22-99.37%
      on codes with norms beyond the noise's (experiments/flow_solver/README.md).
    early_t: where the early part of the grid ends (with early_steps).
    support_k: if set, each row integrates over its finite-log_p codes only, compacted into
      `support_k` slots (`codes.compact`): the same flow, about K / support_k times less work
      per evaluation under top-k sampling with top_k <= support_k. A row with more finite codes
      than that is integrated over all K codes instead (for its block only when it occurs), so
      the map is the same for every p. None: always all K codes.
    prune_t: if set, from the first grid time <= prune_t on, each row is tested at every grid
      time by `prune_bound`; once certified, the row finishes its integration on the (at most
      prune_k) codes the bound keeps. None: never prune.
    prune_k: most codes a pruned row keeps (a fixed shape); a row that needs more stays unpruned.
    prune_tol: the bound on the posterior weight, relative to the kept codes, of all the codes a
      pruned row drops, at every time of the rest of its integration.
    chunk: rows integrated together; a fixed chunk makes results independent of the batch
      size. None integrates all rows at once.
    """

    solver: Solver = "rk4"
    num_steps: int = 32
    t_min: float = 1e-3
    schedule: Schedule = "cubic"
    early_steps: int | None = None
    early_t: float = 0.1
    support_k: int | None = None
    prune_t: float | None = 0.1
    prune_k: int = 512
    prune_tol: float = 1e-6
    chunk: int | None = 8  # small: a batch smaller than the chunk maps padding rows


def time_grid(
    num_steps: int, t_min: float, schedule: str = "linear", dtype: type = np.float32, *,
    early_steps: int | None = None, early_t: float = 0.1,
) -> np.ndarray:
    """Decreasing times from 1 to t_min (static numpy, float32 by default): [num_steps + 1], or
    with early_steps [early_steps + 1 + (the schedule's times below early_t)].

    linear:    t_i = 1 - (1 - t_min) u,          u = i / num_steps
    quadratic: t_i = t_min + (1 - t_min)(1 - u)^2   (steps shrink linearly towards t_min)
    cubic:     t_i = t_min + (1 - t_min)(1 - u)^3
    log:       t_i = t_min^u                      (equal ratios t_{i+1}/t_i; needs t_min > 0)

    The posterior sharpens as t -> 0 (its logits scale like 1/t^2), which is where coarse
    steps go wrong, so the non-linear grids spend more of their steps there.

    early_steps: the schedule's steps from 1 to its first time t_s <= early_t are replaced by
    min(early_steps, their number) steps equally spaced in s = sqrt(lambda), lambda = 1/t - 1
    (the flow's natural time, `prune.prune_bound`): t = 1 / (1 + s^2). At t > early_t
    the posterior is still spread over many codes and the flow is smooth, and every step there
    costs full-width evaluations (pruning starts later); the cubic grid spends more than half
    its steps there. Measured in experiments/flow_solver/README.md.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 <= t_min < 1.0:
        raise ValueError(f"t_min must be in [0, 1), got {t_min}")
    u = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    if schedule == "linear":
        t = 1.0 - (1.0 - t_min) * u
    elif schedule in ("quadratic", "cubic"):
        power = 2.0 if schedule == "quadratic" else 3.0
        t = t_min + (1.0 - t_min) * (1.0 - u) ** power
    elif schedule == "log":
        if t_min <= 0.0:
            raise ValueError("the log schedule needs t_min > 0")
        t = np.exp(u * math.log(t_min))
    else:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    t[0], t[-1] = 1.0, t_min  # exact end points whatever the rounding above
    if early_steps is not None:
        t = _with_early_steps(t, early_steps, early_t)
    return t.astype(dtype)


def _with_early_steps(t: np.ndarray, early_steps: int, early_t: float) -> np.ndarray:
    """t (float64, decreasing from 1) with its part above early_t replaced (see `time_grid`)."""
    if early_steps < 1:
        raise ValueError(f"early_steps must be >= 1, got {early_steps}")
    if not float(t[-1]) <= early_t < 1.0:
        raise ValueError(f"early_t must be in [t_min, 1), got {early_t} (t_min {float(t[-1])})")
    late = t[t <= early_t]
    if late[0] <= 0.0:
        raise ValueError(f"early_t {early_t} leaves no grid time in (0, early_t] to end the early steps at")
    n = min(early_steps, len(t) - len(late))  # never more steps than the schedule had there
    s = np.linspace(0.0, math.sqrt(1.0 / late[0] - 1.0), n + 1)[:-1]
    return np.concatenate([1.0 / (1.0 + s * s), late])


def _shifted_logits(x: Array, t: Array, log_p: Array, codebook: Array, c2: Array) -> Array:
    return logits_from_dots(dots(x, codebook), t, log_p, c2)


def posterior_logits(x: Array, t: Array | float, log_p: Array, codebook: Array) -> Array:
    """log p_k - |x - (1 - t) c_k|^2 / (2 t^2), float32.

    Args:
      x: [N, d] points at time t.
      t: scalar or [N] times in (0, 1].
      log_p: [N, K] log-probabilities; -inf marks removed codes (they stay -inf).
      codebook: [K, d].
    Returns:
      [N, K]. The squared distance is |x|^2 - 2(1-t) x.c + (1-t)^2 |c|^2 through a matmul,
      so no [N, K, d] tensor is formed.
    """
    x = jnp.asarray(x, jnp.float32)
    log_p = jnp.asarray(log_p, jnp.float32)
    codebook = jnp.asarray(codebook, jnp.float32)
    t = column(t, x.shape[0])
    a = 1.0 - t
    x2 = jnp.sum(x * x, axis=-1, keepdims=True)
    sq = x2 - 2.0 * a * dots(x, codebook) + a * a * sq_norms(codebook)
    sq = jnp.maximum(sq, 0.0)  # rounding can make a tiny distance negative
    return log_p - sq / (2.0 * t * t)


def _velocity_from_logits(x: Array, t: Array, logits: Array, codebook: Array) -> Array:
    # Softmax by hand: subtracting the row max makes -inf logits exactly zero weight (no NaN
    # while a row keeps one finite entry), and dividing the [N, d] mix instead of the [N, K]
    # weights saves a K-wide pass.
    e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    mean = mix(e, codebook) / jnp.sum(e, axis=-1, keepdims=True)
    return (x - mean) / t


def _velocity(x: Array, t: Array, log_p: Array, codebook: Array, c2: Array) -> Array:
    return _velocity_from_logits(x, t, _shifted_logits(x, t, log_p, codebook, c2), codebook)


def velocity(x: Array, t: Array | float, log_p: Array, codebook: Array) -> Array:
    """Flow-matching velocity dx/dt = (x - w @ codebook) / t, [N, d] float32.

    Args: as `posterior_logits` (t must be > 0). Returns [N, d].
    """
    x = jnp.asarray(x, jnp.float32)
    codebook = jnp.asarray(codebook, jnp.float32)
    t = column(t, x.shape[0])
    return _velocity(x, t, jnp.asarray(log_p, jnp.float32), codebook, sq_norms(codebook))


# --- integration --------------------------------------------------------------------------------


def _step(v, x: Array, t: Array, s: Array, solver: str, k1: Array | None = None) -> Array:
    """One Euler / Heun / RK4 step of dx/dt = v(x, t) from t to s (k1 = v(x, t) if known)."""
    h = s - t
    k1 = v(x, t) if k1 is None else k1
    if solver == "euler":
        return x + h * k1
    if solver == "heun":
        return x + 0.5 * h * (k1 + v(x + h * k1, s))
    m = t + 0.5 * h
    k2 = v(x + 0.5 * h * k1, m)
    k3 = v(x + 0.5 * h * k2, m)
    k4 = v(x + h * k3, s)
    return x + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


def _field(log_p: Array, codebook: Array, n: int, dtype):
    """v(x, t) for scalar t over the given codes."""
    c2 = sq_norms(codebook)
    return lambda x, t: _velocity(x, column(t, n, dtype), log_p, codebook, c2)


def _loop_length(ts: np.ndarray, solver: str) -> tuple[int, bool]:
    """(steps of the main loop, whether a final Euler step to t = 0 follows)."""
    last_is_euler = solver != "euler" and float(ts[-1]) == 0.0
    return len(ts) - 1 - int(last_is_euler), last_is_euler


def _solve(x: Array, log_p: Array, codebook: Array, ts: np.ndarray, solver: str) -> Array:
    """Integrates dx/dt = v(x, t) for one block of rows over the static decreasing grid `ts`.

    Euler (1 evaluation per step), Heun (2) or classical RK4 (4, midpoints at (t + s) / 2 > 0).
    A last step that ends at t = 0 is an Euler step, which lands on E[x_0 | x]: the other
    solvers would evaluate v at t = 0.
    """
    v = _field(log_p, codebook, x.shape[0], x.dtype)
    grid = jnp.asarray(ts, x.dtype)
    n_loop, last_is_euler = _loop_length(ts, solver)
    x = jax.lax.fori_loop(0, n_loop, lambda i, x: _step(v, x, grid[i], grid[i + 1], solver), x)
    if last_is_euler:
        x = _step(v, x, grid[-2], grid[-1], "euler")
    return x


def _solve_pruned(
    x: Array, log_p: Array, codebook: Array, ts: np.ndarray, s: FlowSettings
) -> tuple[Array, Array]:
    """Integrates over `ts` (all ts <= prune_t), testing every row with the bound at each grid
    time until it is certified; certified rows continue on their kept codes.

    Returns (x at the end [N, d], the step at which each row was pruned [N] int32, len(ts) - 1
    if never). The full-width step is skipped only when every row of the block is pruned. A row
    tries the bound's group core only after `prune.GROUP_AFTER` failed tests.
    """
    n, d = x.shape
    k, dtype = s.prune_k, x.dtype
    grid = jnp.asarray(ts, dtype)
    n_loop, last_is_euler = _loop_length(ts, s.solver)
    t_end = float(ts[-1]) if ts[-1] > 0 else float(ts[-2])
    c2 = sq_norms(codebook)
    v_full = _field(log_p, codebook, n, dtype)

    def kept_codes(bound: PruneBound, new: Array) -> tuple[Array, Array]:
        """log p [N, k] and codes [N, d, k] a row keeps: SMALL_KEEP of them (padded with
        removed codes) if it needs no more, else k; decided per row."""
        def take(size: int) -> tuple[Array, Array]:
            lp, cb = gather(log_p, codebook, keep(bound, size)[0])
            pad = k - size
            return (jnp.pad(lp, ((0, 0), (0, pad)), constant_values=-jnp.inf),
                    jnp.pad(cb, ((0, 0), (0, 0), (0, pad))))

        if k <= SMALL_KEEP:
            return take(k)
        small = take(SMALL_KEEP)
        wide = new & (bound.needed > SMALL_KEEP)
        big = jax.lax.cond(jnp.any(wide), lambda _: take(k), lambda _: small, None)
        use = bound.needed <= SMALL_KEEP
        return jnp.where(use[:, None], small[0], big[0]), jnp.where(use[:, None, None], small[1], big[1])

    def full_step(x, t, t_next, solver, state):
        done, lp_s, cb_s, at, fails, i = state
        tc = column(t, n, dtype)
        xc = dots(x, codebook)
        logits = logits_from_dots(xc, tc, log_p, c2)
        group = ~done & (fails >= GROUP_AFTER)  # rows that may try the group core now
        bound = certify(x, tc, t_end, xc, logits, log_p, codebook, c2, k, s.prune_tol, group)
        new = bound.certified & ~done
        x_full = _step(v_full, x, t, t_next, solver, _velocity_from_logits(x, tc, logits, codebook))

        def take(_):
            lp_n, cb_n = kept_codes(bound, new)
            return jnp.where(new[:, None], lp_n, lp_s), jnp.where(new[:, None, None], cb_n, cb_s)

        lp_s, cb_s = jax.lax.cond(jnp.any(new), take, lambda _: (lp_s, cb_s), None)
        fails = jnp.where(done | new, fails, fails + 1)
        return x_full, (done | new, lp_s, cb_s, jnp.where(new, i, at), fails, i)

    def step(i, carry, solver):
        x, done, lp_s, cb_s, at, fails = carry
        t, t_next = grid[i], grid[i + 1]
        state = (done, lp_s, cb_s, at, fails, i)
        x_full, (done, lp_s, cb_s, at, fails, _) = jax.lax.cond(
            jnp.all(done), lambda st: (x, st), lambda st: full_step(x, t, t_next, solver, st), state
        )
        x_kept = _step(_field(lp_s, cb_s, n, dtype), x, t, t_next, solver)
        return jnp.where(done[:, None], x_kept, x_full), done, lp_s, cb_s, at, fails

    carry = (x, jnp.zeros((n,), bool), jnp.zeros((n, k), dtype), jnp.zeros((n, d, k), dtype),
             jnp.full((n,), len(ts) - 1, jnp.int32), jnp.zeros((n,), jnp.int32))
    carry = jax.lax.fori_loop(0, n_loop, lambda i, c: step(i, c, s.solver), carry)
    if last_is_euler:
        carry = step(len(ts) - 2, carry, "euler")
    return carry[0], carry[-2]


def settings_grid(s: FlowSettings, dtype=np.float32) -> np.ndarray:
    """The time grid `s` integrates over (static numpy), after checking its solver and pruning."""
    if s.solver not in SOLVERS:
        raise ValueError(f"unknown solver {s.solver!r}; expected one of {SOLVERS}")
    if s.prune_t is not None and not (s.prune_k >= 1 and 0.0 < s.prune_tol < 1.0):
        raise ValueError(f"need prune_k >= 1 and 0 < prune_tol < 1, got {s.prune_k}, {s.prune_tol}")
    return time_grid(s.num_steps, s.t_min, s.schedule, dtype, early_steps=s.early_steps,
                     early_t=s.early_t)


def _integrate_rows(
    x: Array, log_p: Array, codebook: Array, ts: np.ndarray, s: FlowSettings, snapped: bool = False
) -> tuple[Array, Array]:
    """Integration of one block of rows with the optional support and pruning stages of `s`.

    Returns (x at t_min [N, d], or with `snapped` the index of its nearest allowed code [N]
    int32 (`snap`); the step at which each row was pruned [N], num_steps: never).
    """
    if s.support_k is None or s.support_k >= log_p.shape[-1]:
        return _run_support(x, log_p, codebook, None, ts, s, snapped)
    lp_c, cb_c, ids, fits = compact(log_p, codebook, s.support_k)
    # A row with more finite codes than support_k takes the full-width result. Each branch runs
    # only when some row of the block needs it, and a row's result never depends on the others.
    unused = jnp.zeros(x.shape[:1], jnp.int32)
    skip = lambda _: (unused if snapped else x, unused)
    x_c, at_c = jax.lax.cond(jnp.any(fits),
                             lambda _: _run_support(x, lp_c, cb_c, ids, ts, s, snapped), skip, None)
    x_f, at_f = jax.lax.cond(jnp.all(fits), skip,
                             lambda _: _run_support(x, log_p, codebook, None, ts, s, snapped), None)
    fits_out = fits.reshape(fits.shape + (1,) * (x_c.ndim - 1))
    return jnp.where(fits_out, x_c, x_f), jnp.where(fits, at_c, at_f)


def _run_support(
    x: Array, log_p: Array, codebook: Array, ids: Array | None, ts: np.ndarray, s: FlowSettings,
    snapped: bool,
) -> tuple[Array, Array]:
    """`_integrate_support`, then (if snapped) the nearest allowed code, as an index into the
    shared codebook (ids [N, S]: the code index of each slot of per-row codebooks)."""
    end, at = _integrate_support(x, log_p, codebook, ts, s)
    return (_nearest(end, codebook, log_p, ids) if snapped else end), at


def _nearest(x: Array, codebook: Array, log_p: Array | None, ids: Array | None = None) -> Array:
    """argmin_k |c_k|^2 - 2 x.c_k over the codes with a finite log p, int32 [N] (`snap`)."""
    dist = sq_norms(codebook) - 2.0 * dots(x, codebook)
    if log_p is not None:
        dist = jnp.where(jnp.isneginf(log_p), jnp.inf, dist)
    j = jnp.argmin(dist, axis=-1).astype(jnp.int32)
    return j if ids is None else jnp.take_along_axis(ids, j[:, None], axis=1)[:, 0]


def _integrate_support(
    x: Array, log_p: Array, codebook: Array, ts: np.ndarray, s: FlowSettings
) -> tuple[Array, Array]:
    """`_integrate_rows` over the given codes (shared [K, d] or per-row [N, d, S])."""
    never = jnp.full((x.shape[0],), len(ts) - 1, jnp.int32)
    below = np.nonzero(ts[:-1] <= s.prune_t)[0] if s.prune_t is not None else []
    if len(below) == 0 or s.prune_k >= log_p.shape[-1]:
        return _solve(x, log_p, codebook, ts, s.solver), never
    i = int(below[0])
    if i > 0:
        x = _solve(x, log_p, codebook, ts[: i + 1], s.solver)
    x, at = _solve_pruned(x, log_p, codebook, ts[i:], s)
    return x, at + i


def _by_chunks(fn, chunk: int, *rows: Array):
    """Applies fn to fixed-size blocks of rows (zero-padded), so every row sees the same shapes.
    fn returns an array or a tuple of arrays with leading dimension = block rows."""
    n = rows[0].shape[0]
    n_blocks = -(-n // chunk)
    pad = n_blocks * chunk - n

    def blocks(a: Array) -> Array:
        if pad:
            # padding rows repeat the last row: valid inputs that behave like real rows (a
            # uniform p at x = 0 would never be pruned and keep its block at full width)
            a = jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)], axis=0)
        return a.reshape((n_blocks, chunk) + a.shape[1:])

    out = jax.lax.map(lambda args: fn(*args), tuple(blocks(a) for a in rows))
    return jax.tree_util.tree_map(lambda o: o.reshape((n_blocks * chunk,) + o.shape[2:])[:n], out)


def _rows(noise: Array, log_p: Array, codebook: Array, dtype) -> tuple[Array, Array, Array, tuple]:
    """Flattens noise [..., d] and log_p [..., K] to rows; returns them, the codebook and the
    leading shape."""
    noise = jnp.asarray(noise, dtype)
    log_p = jnp.asarray(log_p, dtype)
    lead = noise.shape[:-1]
    if log_p.shape[:-1] != lead:
        raise ValueError(f"noise {noise.shape} and log_p {log_p.shape} differ in leading dims")
    return (noise.reshape(-1, noise.shape[-1]), log_p.reshape(-1, log_p.shape[-1]),
            jnp.asarray(codebook, dtype), lead)


def _run_rows(fn, chunk: int | None, x: Array, log_p: Array):
    return fn(x, log_p) if chunk is None else _by_chunks(fn, chunk, x, log_p)


def integrate(
    noise: Array,
    log_p: Array,
    codebook: Array,
    settings: FlowSettings = FlowSettings(),
    *,
    dtype=jnp.float32,
    **overrides,
) -> Array:
    """Solves dx/dt = v(x, t) from x(1) = noise down to settings.t_min.

    Args:
      noise: [..., d] starting points (N(0, I) samples).
      log_p: [..., K] log-probabilities (normalised or not; -inf = removed code).
      codebook: [K, d].
      settings: solver, steps, schedule, pruning, chunk (static); keyword overrides replace
        single fields, e.g. integrate(eps, lp, cb, solver="euler", num_steps=100).
      dtype: compute dtype (float64 needs jax.enable_x64).
    Returns:
      [..., d], x(t_min).
    """
    s = dataclasses.replace(settings, **overrides) if overrides else settings
    ts = settings_grid(s, np.dtype(dtype).type)
    x, log_p, codebook, lead = _rows(noise, log_p, codebook, dtype)
    run = lambda x, lp: _integrate_rows(x, lp, codebook, ts, s)[0]
    return _run_rows(run, s.chunk, x, log_p).reshape(lead + x.shape[-1:])


def pruned_at(
    noise: Array, log_p: Array, codebook: Array, settings: FlowSettings = FlowSettings()
) -> Array:
    """The grid step at which each row was pruned, int32 [...] (num_steps: never pruned)."""
    ts = settings_grid(settings)
    x, log_p, codebook, lead = _rows(noise, log_p, codebook, jnp.float32)
    run = lambda x, lp: _integrate_rows(x, lp, codebook, ts, settings)[1]
    return _run_rows(run, settings.chunk, x, log_p).reshape(lead)


def snap(
    x: Array, codebook: Array, log_p: Array | None = None, *, chunk: int | None = None,
    dtype=jnp.float32,
) -> Array:
    """Index of the nearest code in L2, int32 [...] for x [..., d].

    argmin_k |x|^2 - 2 x.c_k + |c_k|^2 by a matmul; |x|^2 is the same for every k, so it is left
    out. If log_p [..., K] is given, codes with log_p = -inf are never chosen (the token stays in
    the sampler's support, e.g. top_k = 1 always returns the kept code). `chunk` bounds memory
    to [chunk, K] distances (e.g. for a whole [B, L, d] latent at once).
    """
    x = jnp.asarray(x, dtype)
    codebook = jnp.asarray(codebook, dtype)
    lead, d = x.shape[:-1], x.shape[-1]
    rows = [x.reshape(-1, d)]
    if log_p is not None:
        rows.append(jnp.asarray(log_p, dtype).reshape(rows[0].shape[0], -1))
    nearest = lambda flat, lp=None: _nearest(flat, codebook, lp)
    ids = nearest(*rows) if chunk is None else _by_chunks(nearest, chunk, *rows)
    return ids.reshape(lead)


def map_token(
    noise: Array,
    log_p: Array,
    codebook: Array,
    settings: FlowSettings = FlowSettings(),
    *,
    dtype=jnp.float32,
) -> Array:
    """The token map: integrate from noise [..., d] with p = softmax(log_p) [..., K], then snap.

    Returns int32 [...]. Deterministic; a row's token depends only on its own noise and log_p
    (integration and snapping both run in blocks of settings.chunk rows). dtype: compute dtype
    (float64 needs jax.enable_x64).
    """
    ts = settings_grid(settings, np.dtype(dtype).type)
    x, log_p, codebook, lead = _rows(noise, log_p, codebook, dtype)

    def run(x: Array, lp: Array) -> Array:
        # snapping inside the integration's branches reuses a row's compacted codes
        return _integrate_rows(x, lp, codebook, ts, settings, snapped=True)[0]

    return _run_rows(run, settings.chunk, x, log_p).reshape(lead)
