"""What the DD pipeline needs from an image autoregressive teacher: one interface, one object.

A `Teacher` is built once by the entry layer (weights, tokenizer, codebook) and handed to the
flow map, the pair writer, the student trainer, the samplers and the report. A family
(LlamaGen: `ddjax.teacher.llamagen.family`; VAR: next-scale prediction) implements it.

Token order and trajectory boundaries: a teacher emits its L tokens in `steps`, one group of
positions per step (LlamaGen: one position per step, L steps; VAR: one whole scale per step).
DD's timestep t counts tokens already given, and a step can only start at a group boundary:
`boundaries` lists them (LlamaGen: 0, 1, ..., L - 1; VAR: 0, 1, 5, 14, ... the cumulative scale
sizes), so t_list / teacher_start / prefix lengths are validated against it.

The per-token rule: the compiled sampling loop computes, at each step, the processed
distribution (CFG, temperature, top-k, top-p) of the positions of that step as log-probs
`logp [B, n, V]` (n = positions in the step; LlamaGen passes [B, V] for n = 1) and asks
`rule(key, logp, step_index, inputs)` for the token ids. The default rule draws from the
distribution; the flow map (`ddjax.mapper.sequence.FlowRule`) maps each position's noise to a
token instead, deterministically.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

TokenRule = Callable[[jax.Array, jax.Array, jax.Array, Any], jax.Array]


class Teacher(abc.ABC):
    """An AR image teacher: network, tokenizer and their settings, built once per run.

    Attributes (set by the family's constructor):
      family: "llamagen", "var", ...
      variant: the model variant ("GPT-B", "d16", ...).
      checkpoint: where the weights came from ("" for random weights).
      config, params: the network's config and weights.
      tokenizer_config, tokenizer_params: the image tokenizer's.
      codebook: [K, d] float32, the code vectors the token ids index (as the network sees them).
    """

    family: str
    variant: str
    checkpoint: str
    config: Any
    params: Any
    tokenizer_config: Any
    tokenizer_params: Any
    codebook: np.ndarray

    # -- shapes and conditioning -----------------------------------------------------------
    @property
    @abc.abstractmethod
    def seq_len(self) -> int:
        """L, tokens per image."""

    @property
    @abc.abstractmethod
    def num_classes(self) -> int:
        """Class labels are in [0, num_classes) (0 for a text-conditional teacher)."""

    @property
    @abc.abstractmethod
    def boundaries(self) -> tuple[int, ...]:
        """Token counts at which a step can start, increasing from 0 (see the module doc)."""

    @property
    @abc.abstractmethod
    def image_size(self) -> int:
        """Height = width of a decoded image in pixels."""

    @property
    def vocab_size(self) -> int:
        return int(self.codebook.shape[0])

    @property
    def code_dim(self) -> int:
        """d, the dimension of a code vector and of the per-token noise."""
        return int(self.codebook.shape[1])

    # -- the network -------------------------------------------------------------------------
    @abc.abstractmethod
    def sample(self, cond: jax.Array, key: jax.Array, settings: Any, *,
               rule: TokenRule | None = None, rule_inputs: Any = None,
               prefix_ids: jax.Array | None = None, prefix_len: int = 0,
               num_tokens: int | None = None, cfg_from_prefix: bool = False,
               mesh: Any = None) -> jax.Array:
        """Token ids [B, L] int32 from one compiled loop.

        cond: class labels [B] (or caption features). settings: the family's sampling settings.
        rule / rule_inputs: the per-token draw (default: the distribution) and a pytree of
        [B, L, ...] arrays it reads at its positions (the flow map's noise).
        prefix_ids [B, L] / prefix_len: keep the first prefix_len tokens (a boundary) and
        continue from there. cfg_from_prefix: a guidance interval counts from the end of the
        prefix (the official teacher-involved sampler) instead of from position 0.
        mesh: split the batch over the mesh's batch axes.
        """

    @abc.abstractmethod
    def log_probs(self, tokens: jax.Array, cond: jax.Array, settings: Any) -> jax.Array:
        """The processed distribution (CFG, temperature, top-k, top-p as in `sample`) of every
        position given the tokens before it (teacher forcing): log-probs [B, L, V] float32 with
        -inf for removed tokens."""

    @property
    def caption_conditioned(self) -> bool:
        """True for a text-conditional teacher: the pipeline's integer conditions are caption
        ids that `resolve_cond` turns into caption features."""
        return False

    def resolve_cond(self, cond: Any) -> Any:
        """The pipeline's integer conditions [B] (class labels, or a text-conditional teacher's
        caption ids) -> what the networks take (a t2i teacher looks captions up on the host)."""
        return cond

    def with_params(self, params: Any) -> Teacher:
        """The same teacher with other network weights (e.g. placed on a mesh)."""
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.params = params
        return out

    # -- the tokenizer -----------------------------------------------------------------------
    @abc.abstractmethod
    def decode_latents(self, latents: jax.Array) -> np.ndarray:
        """Continuous tokens [B, L, d] (codes or not) -> images [B, H, W, 3] in [-1, 1]."""

    @abc.abstractmethod
    def latent_decoder(self) -> Callable[[Any, jax.Array], jax.Array]:
        """A pure, differentiable `decode(tokenizer_params, latents [B, L, d]) -> images
        [B, H, W, 3]` (jnp, not clipped): the frozen decoder of image losses, its weights an
        argument (not constants of the caller's jit)."""

    def decode_ids(self, ids: jax.Array) -> np.ndarray:
        """Token ids [B, L] -> images [B, H, W, 3] in [-1, 1]."""
        return self.decode_latents(np.asarray(self.codebook)[np.asarray(ids)])

    # -- checks ------------------------------------------------------------------------------
    def check_timesteps(self, ts: Sequence[int], what: str) -> None:
        """Raises a ValueError naming `what` unless every t is a step boundary below L."""
        allowed = set(self.boundaries)
        bad = [t for t in ts if int(t) != t or int(t) not in allowed]
        if bad:
            shown = sorted(allowed)
            shown = shown if len(shown) <= 12 else [*shown[:6], "...", *shown[-3:]]
            raise ValueError(f"{what}={tuple(ts)}: {bad} are not step boundaries of this "
                             f"{self.family} teacher (allowed: {shown})")

    def check_labels(self, labels: np.ndarray, what: str) -> None:
        labels = np.asarray(labels)
        if self.num_classes and (labels.min(initial=0) < 0 or labels.max(initial=0) >= self.num_classes):
            raise ValueError(f"{what} has class labels outside [0, {self.num_classes})")


# -- draws ---------------------------------------------------------------------------------------
def argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` (the first maximum; NaN above everything), as two plain reductions.

    XLA:CPU lowers argmax to a variadic (value, index) reduction that does not vectorise; a max
    then a min over the matching indices is 3-4x faster on [32, 16384] and runs once per
    generated token. int32 [...].
    """
    n = x.shape[-1]
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    first_max = jnp.min(jnp.where(x == jnp.max(x, axis=-1, keepdims=True), iota, n), axis=-1)
    first_nan = jnp.min(jnp.where(jnp.isnan(x), iota, n), axis=-1)
    return jnp.where(first_nan < n, first_nan, first_max)


def categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """`jax.random.categorical(key, logits, axis=-1)`, draw for draw (the same Gumbel noise and
    the same argmax), with the faster `argmax`. int32 [...]."""
    return argmax(jax.random.gumbel(key, logits.shape, logits.dtype) + logits)


# -- per-row randomness ------------------------------------------------------------------------
def row_keys(key: jax.Array, rows: np.ndarray | jax.Array) -> jax.Array:
    """One raw PRNG key [B, 2] uint32 per global row index [B]: fold_in(key, row).

    A row's draws then depend on (key, its global index) alone, never on the batch it is in.
    """
    keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.asarray(rows, jnp.uint32))
    return jax.random.key_data(keys) if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) else keys


def row_key_inputs(keys: jax.Array, length: int) -> jax.Array:
    """[B, 2] row keys -> rule inputs [B, length, 2] (every position sees its row's key)."""
    return jnp.broadcast_to(keys[:, None, :], (keys.shape[0], length, keys.shape[-1]))


def row_keyed_multinomial(key: jax.Array, logp: jax.Array, position: jax.Array,
                          inputs: jax.Array) -> jax.Array:
    """A TokenRule drawing row b's token at `position` with fold_in(row key b, position) (and,
    for a step of n tokens, token j with fold_in(that, j)).

    logp [B, V] (or [B, n, V]); inputs: the row keys at this step, [B, 2] (or [B, n, 2]).
    """
    del key

    def draw(k: jax.Array, lp: jax.Array) -> jax.Array:
        return categorical(jax.random.fold_in(k, position), lp)

    if logp.ndim == 2:
        return jax.vmap(draw)(inputs, logp).astype(jnp.int32)
    # A whole step of n tokens (next-scale families): token j of the step also folds in j, so
    # the tokens of one step draw with independent noise.
    n = logp.shape[1]

    def draw_step(k: jax.Array, lp: jax.Array) -> jax.Array:  # k [n, 2], lp [n, V]
        keys = jax.vmap(lambda kk, j: jax.random.fold_in(jax.random.fold_in(kk, position), j))(
            k, jnp.arange(n, dtype=jnp.uint32))
        return jax.vmap(categorical)(keys, lp)

    return jax.vmap(draw_step)(inputs, logp).astype(jnp.int32)
