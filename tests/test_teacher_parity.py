"""ddjax's teacher GPT against logits computed by LlamaGen's PyTorch `Transformer`.

The fixtures under tests/fixtures/gpt_* were produced by `make_gpt_fixtures.py` (see the GPT
section of tests/fixtures/README.md); these tests need neither torch nor LlamaGen. The small
cases carry their weights as `.safetensors`; the GPT-B-shaped ones rebuild theirs from a seed
(`gpt_weights.py`) and keep a subset of the expected logits: every position on a fixed set of
vocabulary columns, full rows at a few positions, and the log-sum-exp of every row.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddjax.teacher.llamagen import GPT, gpt_config, init_cache, init_params, load_gpt
from ddjax.teacher.llamagen.loading import abstract_params
from ddjax.utils.state_dict import flax_to_torch, torch_to_flax

FIXTURES = Path(__file__).parent / "fixtures"
# ddjax vs PyTorch, float32 max abs. Measured (2-core x86 CPU, with and without XLA's
# optimisations): small cases 4.1e-6, GPT-B-shaped 5.7e-6 (t2i_b, 12 layers).
ATOL = 8e-6
CACHE_ATOL = 5e-6  # KV-cache decoding vs ddjax's own teacher forcing (measured 1.9e-6)


@pytest.fixture(autouse=True)
def _exact_float32():
    """Full float32 matmuls on every backend (no TF32 on GPUs)."""
    with jax.default_matmul_precision("float32"):
        yield


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpt_weights = _load_module("gpt_weights", FIXTURES / "gpt_weights.py")


def _case(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    meta = json.loads((FIXTURES / f"gpt_{name}.json").read_text())
    with np.load(FIXTURES / f"gpt_{name}.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return meta, arrays


def _config(meta: dict):
    # Every architectural field is given, so the variant only fills in defaults.
    return gpt_config("GPT-B", **meta["config"])


def _seeded_params(meta: dict, cfg):
    state = gpt_weights.seeded_state_dict(meta["shapes"], meta["seed"], meta["std"])
    bad = gpt_weights.check_fingerprints(state, meta["fingerprints"])
    assert not bad, f"the seeded weight generator changed (regenerate the fixtures): {bad[:5]}"
    return torch_to_flax(state, abstract_params(init_params, cfg), source=meta["case"])


def _forward(cfg):
    def fwd(params, tokens, cond, drop=None):
        return GPT(cfg).apply({"params": params}, tokens, cond, drop=drop)

    return jax.jit(fwd)


def _max_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


# -- small cases: full logits, committed weights ---------------------------------------------
@pytest.fixture(scope="module")
def c2i_small():
    meta, arrays = _case("c2i_small")
    cfg = _config(meta)
    params = load_gpt(str(FIXTURES / meta["weights"]), cfg)
    return cfg, params, arrays, _forward(cfg)


@pytest.fixture(scope="module")
def t2i_small():
    meta, arrays = _case("t2i_small")
    cfg = _config(meta)
    params = load_gpt(str(FIXTURES / meta["weights"]), cfg)
    return cfg, params, arrays, _forward(cfg)


def test_c2i_small_gqa_parity(c2i_small):
    cfg, params, a, fwd = c2i_small
    assert cfg.kv_heads < cfg.n_head and a["labels"][-1] == cfg.num_classes  # GQA, null row
    logits = fwd(params, a["tokens"], a["labels"])
    assert _max_diff(logits, a["logits"]) < ATOL


def test_c2i_small_drop_flag_selects_null_class(c2i_small):
    cfg, params, a, fwd = c2i_small
    labels = a["labels"].copy()
    labels[-1] = 4  # replaced by the null class through `drop`
    drop = np.arange(len(labels)) == len(labels) - 1
    logits = fwd(params, a["tokens"], labels, jnp.asarray(drop))
    assert _max_diff(logits, a["logits"]) < ATOL


def test_c2i_small_prefix(c2i_small):
    cfg, params, a, fwd = c2i_small
    n = 7  # a shorter sequence: causality makes its logits the first n of the full ones
    logits = fwd(params, a["tokens"][:, :n], a["labels"])
    assert _max_diff(logits, a["logits"][:, :n]) < ATOL


def test_c2i_small_kv_cache_matches_teacher_forcing(c2i_small):
    cfg, params, a, fwd = c2i_small
    tokens, labels = jnp.asarray(a["tokens"]), jnp.asarray(a["labels"])
    model = GPT(cfg)
    forced = np.asarray(fwd(params, tokens, labels))
    batch, length = tokens.shape

    prefill = jax.jit(lambda p, c, caches: model.apply({"params": p}, c, caches,
                                                       method=GPT.prefill))
    decode = jax.jit(lambda p, t, caches, i: model.apply({"params": p}, t, caches, i,
                                                         method=GPT.decode))
    first, caches = prefill(params, labels, init_cache(cfg, batch))
    steps = [first]
    step_caches = caches
    for i in range(length - 1):  # token i sits at absolute position cls_token_num + i
        out, step_caches = decode(params, tokens[:, i : i + 1], step_caches,
                                  jnp.int32(cfg.cls_token_num + i))
        steps.append(out[:, 0])
    stepped = np.stack([np.asarray(s) for s in steps], axis=1)
    assert _max_diff(stepped, forced) < CACHE_ATOL
    assert _max_diff(stepped, a["logits"]) < ATOL

    # All remaining tokens in one chunk against the prefilled cache.
    chunk, _ = decode(params, tokens[:, :-1], caches, jnp.int32(cfg.cls_token_num))
    assert _max_diff(np.concatenate([np.asarray(first)[:, None], chunk], 1), forced) < CACHE_ATOL


def test_t2i_small_parity(t2i_small):
    cfg, params, a, fwd = t2i_small
    assert a["caption"].shape[1] == 120 and cfg.cls_token_num == 8
    logits = fwd(params, a["tokens"], a["caption"])
    assert _max_diff(logits, a["logits"]) < ATOL
    # Only the first cls_token_num caption tokens matter.
    logits = fwd(params, a["tokens"], a["caption"][:, : cfg.cls_token_num])
    assert _max_diff(logits, a["logits"]) < ATOL


def test_t2i_small_drop_flag_selects_uncond_caption(t2i_small):
    cfg, params, a, fwd = t2i_small
    # The fixture's last row is the unconditional caption; `drop` must substitute it.
    caption = a["caption"].copy()
    caption[-1] = caption[0]
    drop = np.arange(len(caption)) == len(caption) - 1
    np.testing.assert_array_equal(
        np.asarray(params["cls_embedding"]["uncond_embedding"]), a["caption"][-1]
    )
    logits = fwd(params, a["tokens"], caption, jnp.asarray(drop))
    assert _max_diff(logits, a["logits"]) < ATOL


# -- GPT-B-shaped cases: seeded weights, a subset of the logits ------------------------------
def _check_subset(logits: np.ndarray, a: dict[str, np.ndarray], expected_std: float) -> dict:
    x = logits.astype(np.float64)
    lse = np.log(np.exp(x).sum(-1))  # over the full vocabulary: checks every column at once
    diffs = {
        "cols": _max_diff(logits[:, :, a["cols"]], a["logits_cols"]),
        "rows": _max_diff(logits[:, a["rows"]], a["logits_rows"]),
        "lse": _max_diff(lse, a["lse"]),
    }
    assert max(diffs.values()) < ATOL, diffs
    # The comparison means something only if the logits are not trivially small.
    assert 0.1 < float(logits.std()) < 3.0 and abs(float(logits.std()) - expected_std) < 1e-3
    return diffs


def test_c2i_gpt_b_parity():
    meta, a = _case("c2i_b")
    cfg = _config(meta)
    assert (cfg.dim, cfg.n_layer, cfg.n_head, cfg.vocab_size) == (768, 12, 12, 16384)
    params = _seeded_params(meta, cfg)
    assert a["labels"][-1] == cfg.num_classes  # the null row of a 1001-row table
    logits = np.asarray(_forward(cfg)(params, a["tokens"], a["labels"]))
    assert logits.shape == (2, 256, 16384)
    _check_subset(logits, a, meta["logits_std"])


def test_t2i_gpt_b_shaped_parity():
    meta, a = _case("t2i_b")
    cfg = _config(meta)
    assert (cfg.dim, cfg.cls_token_num, cfg.caption_dim) == (768, 120, 2048)
    params = _seeded_params(meta, cfg)
    caption = gpt_weights.caption_features(meta["seed"], a["tokens"].shape[0], cfg.caption_dim)
    assert not gpt_weights.check_fingerprints({"c": caption}, {"c": meta["caption_fingerprint"]})
    # The reference's last row ran on the unconditional caption: ddjax gets it through `drop`.
    drop = np.arange(len(caption)) == len(caption) - 1
    logits = np.asarray(_forward(cfg)(params, a["tokens"], caption, jnp.asarray(drop)))
    _check_subset(logits, a, meta["logits_std"])


# -- loading: .pt (nested under "model" / "ema") and .safetensors give the same params -------
@pytest.mark.torch
def test_load_gpt_pt_and_safetensors_agree(tmp_path):
    torch = pytest.importorskip("torch")
    meta, _ = _case("c2i_small")
    cfg = _config(meta)
    st_path = FIXTURES / meta["weights"]
    from_st = load_gpt(str(st_path), cfg)
    state = flax_to_torch(from_st)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    other = {k: t + 1.0 for k, t in tensors.items()}

    files = {
        "model": ({"model": tensors}, None),
        "ema": ({"ema": tensors, "steps": 7}, None),
        # EMA weights are preferred over the raw ones unless asked for by name.
        "both": ({"model": other, "ema": tensors}, None),
        "both_by_name": ({"model": tensors, "ema": other}, "model"),
    }
    for name, (payload, key) in files.items():
        path = tmp_path / f"{name}.pt"
        torch.save(payload, path)
        params = load_gpt(str(path), cfg, weights_key=key)
        assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(from_st)
        for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(from_st),
                        strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
