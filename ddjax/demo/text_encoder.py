r"""The small text encoder shipped with the text-to-image digits teacher (ddjax/assets/digits_t2i).

It plays the part of LlamaGen's frozen T5 encoder at digits scale:

* **Tokenizer:** word level over a fixed vocabulary (`TextEncoderConfig.vocab`; id 0 `<pad>`,
  id 1 `<unk>`, then the words): a caption is lower-cased and split on white space, unknown
  words map to `<unk>`, and a caption of more than `max_len` words is a ValueError (no silent
  truncation). Captions are LEFT-padded like LlamaGen's T5 pipeline: padding first, the words
  last, so the last condition position always holds the caption's last word.
* **Network:** token embedding + learned positional embedding (of the left-padded slot), then
  `n_layer` pre-LayerNorm bidirectional transformer-encoder layers whose attention ignores the
  padding (a padded query sees only itself), a final LayerNorm; padded positions output zeros.
  Output: features [B, max_len, dim] float32 and mask [B, max_len] bool, as a
  `ddjax.teacher.llamagen.captions.Captions`.
* **Frozen, random:** the weights are a seeded random initialisation (`TextEncoderConfig.seed`)
  and are never trained; the t2i GPT's caption MLP (`cap_proj`) learns to read the features,
  as LlamaGen's GPT learns to read the frozen T5's. Distinct captions give distinct features,
  which is all a conditional model needs. The weights ship as float32 `.npz` (with the config
  and vocabulary inside, also repeated in meta.json), so `encode` reproduces the shipped
  `captions.npz` features: encoding runs in fixed chunks of `ENCODE_BATCH` captions (one
  compiled program whatever the number of captions).

    from ddjax.demo.text_encoder import encode, shipped_text_encoder
    caps = encode(["a bold seven", "the digit zero"])   # Captions([2, 8, 32], [2, 8])
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddjax.teacher.llamagen.captions import Captions, CaptionSet

PAD, UNK = "<pad>", "<unk>"
ENCODE_BATCH = 128  # captions per compiled call (the last chunk is padded)
T2I_ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "assets", "digits_t2i")


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """vocab: the words (ids 2..; 0 is <pad>, 1 is <unk>); dim is the GPT's caption_dim."""

    vocab: tuple[str, ...]
    max_len: int = 8
    dim: int = 32
    n_layer: int = 1
    n_head: int = 4
    mlp_ratio: int = 2
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "vocab", tuple(self.vocab))
        words = [w.lower() for w in self.vocab]
        if len(set(words)) != len(words) or any(not w or " " in w for w in words):
            raise ValueError(f"vocab must be distinct single words, got {self.vocab}")
        if PAD in words or UNK in words:
            raise ValueError(f"vocab must not contain {PAD} / {UNK} (ids 0 and 1 are reserved)")
        if self.dim % self.n_head:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_head ({self.n_head})")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 2

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["vocab"] = list(self.vocab)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TextEncoderConfig:
        return cls(**{**d, "vocab": tuple(d["vocab"])})


class EncoderLayer(nn.Module):
    dim: int
    n_head: int
    mlp_ratio: int

    @nn.compact
    def __call__(self, x: jax.Array, attn_mask: jax.Array) -> jax.Array:
        h = nn.LayerNorm(name="attn_norm")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.n_head, name="attn")(
            h, h, mask=attn_mask)
        h = nn.LayerNorm(name="ffn_norm")(x)
        h = nn.Dense(self.dim * self.mlp_ratio, name="fc1")(h)
        return x + nn.Dense(self.dim, name="fc2")(nn.gelu(h))


class TextEncoderNet(nn.Module):
    """ids [B, N] int, mask [B, N] bool -> features [B, N, dim] (zeros where padded)."""

    config: TextEncoderConfig

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        x = nn.Embed(c.vocab_size, c.dim, embedding_init=nn.initializers.normal(1.0),
                     name="tok_embeddings")(ids)
        pos = self.param("pos_embeddings", nn.initializers.normal(0.2), (c.max_len, c.dim))
        x = x + pos[None, : ids.shape[1]]
        eye = jnp.eye(ids.shape[1], dtype=bool)
        # Keys: the real tokens; a padded query sees only itself (no all-masked row).
        attn_mask = (mask[:, None, None, :] | eye[None, None]) & (mask[:, None, :, None] | eye)
        for i in range(c.n_layer):
            x = EncoderLayer(c.dim, c.n_head, c.mlp_ratio, name=f"layers_{i}")(x, attn_mask)
        x = nn.LayerNorm(name="norm")(x)
        return x * mask[..., None].astype(x.dtype)


@functools.lru_cache(maxsize=8)
def _apply_fn(config: TextEncoderConfig):
    return jax.jit(lambda p, ids, mask: TextEncoderNet(config).apply({"params": p}, ids, mask))


class TextEncoder:
    """The tokenizer and the frozen network: `encode(texts) -> Captions`."""

    def __init__(self, config: TextEncoderConfig, params: Any):
        self.config, self.params = config, params
        self._index = {w.lower(): i + 2 for i, w in enumerate(config.vocab)}

    # -- construction and files -------------------------------------------------------------
    @classmethod
    def init(cls, config: TextEncoderConfig) -> TextEncoder:
        """The seeded random (frozen) weights of `config`."""
        ids = jnp.zeros((1, config.max_len), jnp.int32)
        mask = jnp.ones((1, config.max_len), bool)
        params = TextEncoderNet(config).init(jax.random.PRNGKey(config.seed), ids, mask)["params"]
        return cls(config, jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params))

    def save(self, path: str) -> str:
        """float32 `.npz`: one array per parameter ('/'-joined names) and the config as JSON."""
        flat = traverse_util.flatten_dict(jax.device_get(self.params), sep="/")
        arrays = {f"params/{k}": np.asarray(v, np.float32) for k, v in flat.items()}
        arrays["config"] = np.asarray(json.dumps(self.config.to_json()))
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str) -> TextEncoder:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"text encoder weights {path} do not exist")
        with np.load(path) as z:
            if "config" not in z.files:
                raise ValueError(f"{path}: not a text encoder file (no 'config' entry)")
            config = TextEncoderConfig.from_json(json.loads(str(z["config"])))
            flat = {k[len("params/"):]: np.asarray(z[k]) for k in z.files if k.startswith("params/")}
        params = traverse_util.unflatten_dict(flat, sep="/")
        ref = jax.tree_util.tree_map(np.shape, cls._abstract(config))
        got = jax.tree_util.tree_map(np.shape, params)
        if ref != got:
            raise ValueError(f"{path}: parameter shapes do not match its config")
        return cls(config, params)

    @staticmethod
    def _abstract(config: TextEncoderConfig) -> Any:
        ids = jnp.zeros((1, config.max_len), jnp.int32)
        mask = jnp.ones((1, config.max_len), bool)
        return jax.eval_shape(lambda: TextEncoderNet(config).init(jax.random.PRNGKey(0), ids,
                                                                   mask)["params"])

    # -- tokenizer ---------------------------------------------------------------------------
    def words(self, text: str) -> list[str]:
        return text.lower().split()

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (ids [B, max_len] int32, mask [B, max_len] bool), left-padded.

        Unknown words map to <unk> (id 1); more than max_len words is a ValueError."""
        if isinstance(texts, str):
            raise ValueError("tokenize takes a list of captions, got a single string")
        n = self.config.max_len
        ids = np.zeros((len(texts), n), np.int32)
        mask = np.zeros((len(texts), n), bool)
        for b, text in enumerate(texts):
            words = self.words(text)
            if len(words) > n:
                raise ValueError(f"caption {text!r} has {len(words)} words, more than the text "
                                 f"encoder's max_len={n}")
            if words:
                ids[b, n - len(words):] = [self._index.get(w, 1) for w in words]
                mask[b, n - len(words):] = True
        return ids, mask

    # -- encoding ----------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> Captions:
        """texts -> Captions(features [B, max_len, dim] float32, mask [B, max_len] bool) (numpy)."""
        ids, mask = self.tokenize(texts)
        fn = _apply_fn(self.config)
        out = []
        for s in range(0, len(ids), ENCODE_BATCH):
            i, m = ids[s:s + ENCODE_BATCH], mask[s:s + ENCODE_BATCH]
            k = len(i)
            if k < ENCODE_BATCH:
                i = np.concatenate([i, np.zeros((ENCODE_BATCH - k, i.shape[1]), np.int32)])
                m = np.concatenate([m, np.zeros((ENCODE_BATCH - k, m.shape[1]), bool)])
            out.append(np.asarray(fn(self.params, jnp.asarray(i), jnp.asarray(m)), np.float32)[:k])
        feats = (np.concatenate(out) if out
                 else np.zeros((0, self.config.max_len, self.config.dim), np.float32))
        return Captions(feats, mask)

    def caption_set(self, texts: Sequence[str], classes: Sequence[int] | None = None) -> CaptionSet:
        caps = self.encode(texts)
        return CaptionSet(np.asarray(caps.features), np.asarray(caps.mask), list(texts), classes)


def t2i_asset_paths(asset_dir: str = T2I_ASSET_DIR) -> dict[str, str]:
    """The shipped t2i digits teacher: {"gpt", "text_encoder", "captions", "meta"} paths."""
    return {"gpt": os.path.join(asset_dir, "gpt.safetensors"),
            "text_encoder": os.path.join(asset_dir, "text_encoder.npz"),
            "captions": os.path.join(asset_dir, "captions.npz"),
            "meta": os.path.join(asset_dir, "meta.json")}


@functools.lru_cache(maxsize=1)
def shipped_text_encoder() -> TextEncoder:
    """The encoder in ddjax/assets/digits_t2i/text_encoder.npz."""
    return TextEncoder.load(t2i_asset_paths()["text_encoder"])


def encode(texts: Sequence[str], encoder: TextEncoder | None = None) -> Captions:
    """texts -> Captions with `encoder` (default: the shipped one)."""
    return (encoder or shipped_text_encoder()).encode(texts)
