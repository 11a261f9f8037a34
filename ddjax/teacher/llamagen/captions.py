"""Caption conditioning for LlamaGen's text-to-image GPT.

`Captions` is what a t2i network takes as its condition: caption features [B, N, caption_dim]
(N = cls_token_num, 120 for LlamaGen's T5 features) with a padding mask [B, N]. Captions are
left-padded as LlamaGen's t2i scripts write them: padding first, the caption's tokens last, so
the last condition token (whose output predicts the first image token) is a real one. Padded
positions are invisible to every query but themselves (LlamaGen's `emb_masks`), so what they
hold never changes a logit.

`CaptionSet` is a table of captions addressed by integer id. The DD pipeline (pair files,
trainer, report) carries caption ids where a class-conditional teacher carries labels; the
teacher and the student look the ids up (`lookup`) on the host, so the table may be a memory
map of millions of captions.

Features come from LlamaGen's own `language/extract_t5_feature.py` (one `.npy` of
[1, n, 2048] float32 per caption, the valid tokens only): `load_t5_feature` and
`CaptionSet.from_feature_files` read them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Captions:
    """A batch of captions: features [B, N, caption_dim] and mask [B, N] (True: a real token)."""

    features: jax.Array
    mask: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        """The features' shape, so that `cond.shape[0]` is the batch as for labels."""
        return tuple(self.features.shape)

    def __getitem__(self, idx: Any) -> Captions:
        return Captions(self.features[idx], self.mask[idx])

    def __len__(self) -> int:
        return int(self.features.shape[0])


def is_captions(cond: Any) -> bool:
    return isinstance(cond, Captions)


def batch_size(cond: Any) -> int:
    """B of labels [B] or of a Captions batch."""
    return int(cond.shape[0])


def check_captions(cond: Captions, n_tokens: int, caption_dim: int) -> None:
    """ValueError naming the field unless cond is [B, n_tokens, caption_dim] with mask [B, n_tokens]."""
    f, m = cond.features, cond.mask
    if f.ndim != 3 or tuple(f.shape[1:]) != (n_tokens, caption_dim):
        raise ValueError(f"caption features must be [B, {n_tokens}, {caption_dim}] "
                         f"(cls_token_num, caption_dim), got {tuple(f.shape)}")
    if tuple(m.shape) != tuple(f.shape[:2]):
        raise ValueError(f"caption mask must be [B, {n_tokens}] = {tuple(f.shape[:2])}, "
                         f"got {tuple(m.shape)}")


def key_mask(cond: Any, seq_len: int) -> jax.Array | None:
    """Which of the seq_len key positions a query may see besides causality: [B, seq_len] bool
    (the caption mask, then the image tokens), or None for labels (all visible)."""
    if not is_captions(cond):
        return None
    m = jnp.asarray(cond.mask).astype(bool)
    rest = jnp.ones((m.shape[0], seq_len - m.shape[1]), bool)
    return jnp.concatenate([m, rest], axis=1)


def left_pad(features: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The valid tokens of one caption [n, C] -> (features [max_len, C], mask [max_len]) with the
    tokens last; a caption longer than max_len keeps its first max_len tokens (as LlamaGen's
    t2i dataset does)."""
    features = np.asarray(features, np.float32)
    if features.ndim == 3 and features.shape[0] == 1:
        features = features[0]
    if features.ndim != 2:
        raise ValueError(f"caption features must be [n, C] (or [1, n, C]), got {features.shape}")
    n = min(int(features.shape[0]), max_len)
    out = np.zeros((max_len, features.shape[1]), np.float32)
    mask = np.zeros((max_len,), bool)
    if n:
        out[-n:] = features[:n]
        mask[-n:] = True
    return out, mask


def load_t5_feature(path: str, max_len: int = 120, caption_dim: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One `.npy` written by LlamaGen's `extract_t5_feature.py` ([1, n, C] float32, valid tokens
    only) -> left-padded (features [max_len, C], mask [max_len])."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption feature file {path} does not exist")
    try:
        arr = np.load(path)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable .npy caption feature file ({e})") from e
    if caption_dim is not None and arr.shape[-1] != caption_dim:
        raise ValueError(f"{path}: caption features have dimension {arr.shape[-1]}, the model "
                         f"expects caption_dim={caption_dim}")
    try:
        return left_pad(arr, max_len)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


class CaptionSet:
    """Captions addressed by id: features [C, N, caption_dim], mask [C, N], optional texts and
    classes (the class a caption names, -1 if none; the demo's caption-agreement score)."""

    def __init__(self, features: np.ndarray, mask: np.ndarray, texts: Sequence[str] | None = None,
                 classes: Sequence[int] | None = None):
        if features.ndim != 3:
            raise ValueError(f"CaptionSet features must be [C, N, caption_dim], got {features.shape}")
        if tuple(mask.shape) != tuple(features.shape[:2]):
            raise ValueError(f"CaptionSet mask must be {tuple(features.shape[:2])}, got {mask.shape}")
        self.features, self.mask = features, np.asarray(mask, bool)
        self.texts = list(texts) if texts is not None else None
        if self.texts is not None and len(self.texts) != len(self):
            raise ValueError(f"{len(self.texts)} texts for {len(self)} captions")
        self.classes = np.asarray(classes, np.int32) if classes is not None else None
        if self.classes is not None and self.classes.shape != (len(self),):
            raise ValueError(f"classes must be [{len(self)}], got {self.classes.shape}")

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def max_len(self) -> int:
        return int(self.features.shape[1])

    @property
    def caption_dim(self) -> int:
        return int(self.features.shape[2])

    def fingerprint(self) -> str:
        """A short sha256 of the features and masks: pair files record it, so a rerun over
        another caption set is refused instead of mixing caption ids of two tables."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.mask).tobytes())
        for i in range(0, len(self), 4096):  # chunked: a memory map is not read at once
            h.update(np.ascontiguousarray(self.features[i:i + 4096], np.float32).tobytes())
        return h.hexdigest()[:16]

    def lookup(self, ids: Any) -> Captions:
        """ids [B] int -> Captions (float32 features, bool mask) gathered on the host."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"caption ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise ValueError(f"caption ids must be in [0, {len(self)}), got [{ids.min()}, {ids.max()}]")
        return Captions(np.asarray(self.features[ids], np.float32), self.mask[ids])

    # -- files -------------------------------------------------------------------------------
    @classmethod
    def from_feature_files(cls, paths: Sequence[str], max_len: int = 120,
                           caption_dim: int | None = None, texts: Sequence[str] | None = None
                           ) -> CaptionSet:
        """LlamaGen `.npy` feature files (one per caption) -> a CaptionSet, id i = paths[i]."""
        if not paths:
            raise ValueError("no caption feature files given")
        feats, masks = zip(*(load_t5_feature(p, max_len, caption_dim) for p in paths))
        return cls(np.stack(feats), np.stack(masks), texts)

    @classmethod
    def from_feature_dir(cls, directory: str, max_len: int = 120, caption_dim: int | None = None
                         ) -> CaptionSet:
        """Every `.npy` under directory (sorted by relative path; the texts are those paths)."""
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"caption feature directory {directory} does not exist")
        rel = sorted(os.path.relpath(os.path.join(r, f), directory)
                     for r, _, fs in os.walk(directory) for f in fs if f.endswith(".npy"))
        if not rel:
            raise ValueError(f"{directory} holds no .npy caption feature files")
        return cls.from_feature_files([os.path.join(directory, p) for p in rel], max_len,
                                      caption_dim, texts=rel)

    def save(self, path: str) -> None:
        """One `.npz` (features as float16 when they round-trip closely enough, else float32)."""
        arrays: dict[str, Any] = {"features": self.features, "mask": self.mask}
        if self.texts is not None:
            arrays["texts"] = np.asarray(json.dumps(self.texts))
        if self.classes is not None:
            arrays["classes"] = self.classes
        tmp = path + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> CaptionSet:
        """A `.npz` from `save` (or a directory of LlamaGen `.npy` feature files)."""
        if os.path.isdir(path):
            return cls.from_feature_dir(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"caption set {path} does not exist")
        with np.load(path) as z:
            missing = {"features", "mask"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: a caption set needs arrays {sorted(missing)}")
            texts = json.loads(str(z["texts"])) if "texts" in z.files else None
            classes = z["classes"] if "classes" in z.files else None
            return cls(np.asarray(z["features"], np.float32), z["mask"], texts, classes)
