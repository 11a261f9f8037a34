"""ddjax's VAR transformer against FoundationVision/VAR's PyTorch `VAR.forward`.

Fixtures: tests/fixtures/var/var_*.npz (`make_var_fixtures.py`; seeded weights, eval mode,
cond_drop_rate 0, float32). Logits within 1e-4 (null-class rows included); the scale-by-scale
KV-cache path within 1e-5 of ddjax's own masked forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from var_fixtures import arrays, max_diff, meta, seeded_var, var_cfg

from ddjax.teacher.var import model as M
from ddjax.teacher.var.loading import var_from_state_dict, var_state_dict
from ddjax.utils.torch_io import CheckpointError

ATOL = 1e-4
CACHE_ATOL = 1e-5


def _case(name: str):
    m = meta()[name]
    cfg = var_cfg(m["var"])
    return cfg, seeded_var(m["shapes"], m["seed"], cfg), arrays(name)


def _forward(cfg):
    return jax.jit(lambda p, labels, x, drop=None: M.VAR(cfg).apply({"params": p}, labels, x, drop=drop))


@pytest.mark.parametrize("name", ["var_small", "var_full", "var_nol2", "var_first4"])
def test_teacher_forcing_logits(name):
    cfg, params, a = _case(name)
    assert a["labels"][-1] == cfg.num_classes  # the null row of a num_classes + 1 table
    logits = _forward(cfg)(params, a["labels"], a["x"])
    assert logits.shape == (len(a["labels"]), cfg.seq_len, cfg.vocab_size)
    diff = max_diff(logits, a["logits"])
    print(name, diff)
    assert diff < ATOL


def test_drop_flag_selects_null_class():
    cfg, params, a = _case("var_small")
    labels = a["labels"].copy()
    labels[-1] = 4
    drop = jnp.arange(len(labels)) == len(labels) - 1
    assert max_diff(_forward(cfg)(params, labels, a["x"], drop), a["logits"]) < ATOL


def _cached_logits(cfg, params, labels, x):
    """The sampler's path: scale by scale through the KV cache, teacher-forced on x."""
    model = M.VAR(cfg)

    def run(p, labels, x):
        apply = lambda *args, method: model.apply({"params": p}, *args, method=method)
        cond = apply(labels, method=M.VAR.embed_cond)
        caches = M.init_cache(cfg, labels.shape[0])
        h_in = apply(cond, method=M.VAR.embed_first)
        out = []
        for si, (start, end) in enumerate(cfg.begin_ends):
            if si:
                h_in = apply(x[:, start - cfg.first_l:end - cfg.first_l], si, method=M.VAR.embed_scale)
            h, caches = apply(h_in, cond, caches, start, method=M.VAR.blocks_step)
            out.append(apply(h, cond, method=M.VAR.logits))
        return jnp.concatenate(out, axis=1)

    return jax.jit(run)(params, labels, x)


@pytest.mark.parametrize("name", ["var_small", "var_first4"])
def test_kv_cache_path_equals_masked_forward(name):
    cfg, params, a = _case(name)
    forced = _forward(cfg)(params, a["labels"], a["x"])
    cached = _cached_logits(cfg, params, jnp.asarray(a["labels"]), jnp.asarray(a["x"]))
    assert max_diff(cached, forced) < CACHE_ATOL
    assert max_diff(cached, a["logits"]) < ATOL


def test_bf16_compute_close_to_float32():
    cfg, params, a = _case("var_small")
    bf16 = M.VARConfig(**{**cfg.__dict__, "dtype": "bfloat16"})
    logits = _forward(bf16)(params, a["labels"], a["x"])
    assert logits.dtype == jnp.float32
    assert max_diff(logits, a["logits"]) < 0.1  # logits std 1.0; measured 2.9e-2


def test_train_mode_drops_labels_and_paths():
    cfg, params, a = _case("var_small")
    train_cfg = M.VARConfig(**{**cfg.__dict__, "cond_drop_rate": 0.5, "drop_path_rate": 0.5})
    fwd = lambda key, train: M.VAR(train_cfg).apply({"params": params}, a["labels"], a["x"],
                                                    train=train, rngs={"dropout": key})
    eval_out = fwd(jax.random.PRNGKey(0), False)
    assert max_diff(eval_out, a["logits"]) < ATOL  # eval ignores both rates
    outs = [np.asarray(fwd(jax.random.PRNGKey(i), True)) for i in range(3)]
    assert max_diff(outs[0], outs[0]) == 0 and max_diff(outs[0], eval_out) > 1e-2
    assert max_diff(outs[1], outs[2]) > 1e-2


@pytest.mark.parametrize("depth, millions", [(16, 310.28), (20, 600.92), (24, 1033.40), (30, 2010.02)])
def test_released_parameter_counts(depth, millions):
    cfg = M.var_config(depth)
    assert (cfg.embed_dim, cfg.num_heads, cfg.mlp_hidden) == (64 * depth, depth, 256 * depth)
    assert abs(M.param_count(cfg) / 1e6 - millions) < 0.005


def test_state_dict_round_trip_and_buffers():
    cfg, params, _ = _case("var_small")
    state = var_state_dict(params, cfg)
    assert state["lvl_1L"].dtype == np.int64 and state["lvl_1L"].shape == (1, 30)
    bias = state["attn_bias_for_masking"]
    assert bias.shape == (1, 1, 30, 30) and bias[0, 0, 0, 1] == -np.inf and bias[0, 0, 5, 4] == 0
    assert np.all(state["blocks.1.attn.zero_k_bias"] == 0)
    back = var_from_state_dict(state, cfg)  # the buffers are ignored on the way back
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params), strict=True):
        np.testing.assert_array_equal(x, y)


def test_bad_checkpoint_names_every_problem():
    cfg, params, _ = _case("var_small")
    state = var_state_dict(params, cfg)
    del state["blocks.0.attn.q_bias"], state["head_nm.ada_lin.1.bias"]
    state["blocks.0.attn.extra"] = np.zeros(3, np.float32)
    state["pos_1LC"] = np.zeros((1, 31, cfg.embed_dim), np.float32)
    with pytest.raises(CheckpointError) as e:
        var_from_state_dict(state, cfg, source="bad.pth")
    msg = str(e.value)
    for part in ("bad.pth", "missing keys (2)", "blocks.0.attn.q_bias", "head_nm.ada_lin.1.bias",
                 "unexpected keys (1): blocks.0.attn.extra", "pos_1LC: checkpoint (1, 31, 128)"):
        assert part in msg, (part, msg)


@pytest.mark.parametrize("kw, match", [
    (dict(embed_dim=129), "divisible by num_heads"),
    (dict(shared_aln=True), "shared_aln"),
    (dict(patch_nums=(4,)), "at least 2"),
    (dict(cond_drop_rate=1.5), r"\[0, 1\)"),
    (dict(width=3), "unknown VAR config"),
])
def test_bad_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        M.var_config(2, **kw)


def test_bad_input_shape():
    cfg, params, a = _case("var_small")
    with pytest.raises(ValueError, match="x must be"):
        _forward(cfg)(params, a["labels"], a["x"][:, :-1])


def test_attention_mask_and_scale_arguments():
    from ddjax.kernels.attention import attention, attention_reference

    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 6, 2, 8)) for i in range(3))
    mask = jnp.asarray(M.var_config(2, patch_nums=(1, 1, 2)).block_mask())  # [6, 6] block-causal
    out = attention(q, k, v, causal=False, mask=mask, scale=1.0)  # None -> xla when masked
    scores = jnp.einsum("bthd,bshd->bhts", q, k)
    want = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), -1), v)
    assert max_diff(out, want) < 1e-5
    # the defaults are unchanged, and the mask combines with causality
    assert max_diff(attention_reference(q, k, v), attention_reference(q, k, v, scale=8 ** -0.5)) == 0
    both = attention_reference(q, k, v, causal=True, mask=mask)
    assert max_diff(both, attention_reference(q, k, v, causal=True)) == 0  # causal within block-causal
    with pytest.raises(ValueError, match="takes no explicit mask"):
        attention(q, k, v, causal=False, mask=mask, implementation="pallas")


def test_pallas_attention_takes_a_scale():
    from ddjax.kernels.attention import attention

    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, 16, 2, 16)) for i in range(3))
    want = attention(q, k, v, causal=False, scale=1.0, implementation="xla")
    got = attention(q, k, v, causal=False, scale=1.0, implementation="pallas", interpret=True)
    assert max_diff(got, want) < 1e-4
