"""ddjax's VAR VQVAE and multi-scale quantiser against FoundationVision/VAR's PyTorch code.

Fixtures: tests/fixtures/var (`make_var_fixtures.py`, see tests/fixtures/README.md); these tests
need neither torch nor VAR. Ids must match exactly (every fixture's nearest-code gap, measured
in float64 along VAR's own trajectory, is >= 1.6e-3); continuous values within 1e-5 (quantiser)
and 1e-4 (conv nets).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import traverse_util
from var_fixtures import arrays, max_diff, meta, seeded_vae, vae_cfg

from ddjax.teacher.var import vqvae as V
from ddjax.teacher.var.resize import area, area_matrix, bicubic, bicubic_matrix

PN = V.DEFAULT_PATCH_NUMS
QUANT_ATOL = 1e-5
CONV_ATOL = 1e-4


# -- interpolation and phi ------------------------------------------------------------------------
def test_resize_matrices_equal_torch():
    a = arrays("resize")
    for pn in PN:
        np.testing.assert_array_equal(area_matrix(16, pn), a[f"area_matrix_16_{pn}"])
        np.testing.assert_array_equal(bicubic_matrix(pn, 16), a[f"bicubic_matrix_{pn}_16"])
    # the windows of 16 -> 3 overlap (rows 0 and 1 share input 5); 1 -> 16 is constant
    assert area_matrix(16, 3)[0, 5] > 0 and area_matrix(16, 3)[1, 5] > 0
    np.testing.assert_array_equal(bicubic_matrix(1, 16), np.ones((16, 1), np.float32))
    assert bicubic_matrix(3, 16).min() < -0.1 and bicubic_matrix(3, 16).max() > 1.0  # overshoot


def test_resize_maps_match_torch_interpolate():
    a = arrays("resize")
    worst = 0.0
    for pn in PN:
        worst = max(worst, max_diff(area(a["x16"], pn), a[f"area_{pn}"]))
        worst = max(worst, max_diff(bicubic(a[f"x_{pn}"], 16), a[f"bicubic_{pn}"]))
    print("resize maps", worst)
    assert worst < 2e-6, worst


def test_phi_tables_equal_var():
    tables = meta()["resize"]["phi_tables"]
    assert V.phi_table(10, 4) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
    for name, want in tables.items():
        s, k = (int(part[1:]) for part in name.split("_"))
        assert list(V.phi_table(s, k)) == want, name
    # in float32 the tie at si = 7 would round the other way
    ticks = V.phi_ticks(4).astype(np.float32)
    assert int(np.argmin(np.abs(ticks - np.float32(7 / 9)))) == 2


# -- the quantiser at the full pyramid -------------------------------------------------------------
@pytest.fixture(scope="module")
def quant():
    m = meta()["quant"]
    cfg = vae_cfg(m["vae"])
    return cfg, seeded_vae(m["shapes"], m["seed"], cfg, m["codebook_std"]), arrays("quant")


def _quant_outputs(m: V.VQVAE, f, ids):
    """Every quantiser path in one program (one compile)."""
    own = m.f_to_idxBl_or_fhat(f)
    return dict(ids=jax.numpy.concatenate(own, 1), f_hat=m.f_to_idxBl_or_fhat(f, to_fhat=True),
                var_input=m.idxBl_to_var_input(ids), var_input_list=m.idxBl_to_var_input(own),
                f_hat_embed=m.idxBl_to_fhat(ids))


def test_quantiser_ids_fhat_and_var_input(quant):
    cfg, params, a = quant
    assert cfg.patch_nums == PN and cfg.vocab_size == 4096 and cfg.seq_len == 680
    run = jax.jit(lambda p, f, i: V.VQVAE(cfg).apply({"params": p}, f, i, method=_quant_outputs))
    out = run(params, a["f"], a["ids"])
    np.testing.assert_array_equal(out["ids"], a["ids"])
    diffs = {f"f_hat_{si}": max_diff(out["f_hat"][si], a["f_hat"][j])
             for j, si in enumerate(a["f_hat_scales"])}
    assert out["var_input"].shape == (2, 679, 32)
    diffs["var_input"] = max_diff(out["var_input"], a["var_input"])
    diffs["f_hat_embed"] = max_diff(out["f_hat_embed"], a["f_hat_embed"])
    assert max(diffs.values()) < QUANT_ATOL, diffs
    # the list form and the concatenated form agree
    np.testing.assert_array_equal(out["var_input_list"], out["var_input"])
    print(diffs)


def test_next_autoregressive_input_rebuilds_fhat(quant):
    cfg, params, a = quant
    parts = V.split_scales(a["ids"], cfg.patch_nums)
    model = V.VQVAE(cfg)
    f_hat = np.zeros((2, 16, 16, 32), np.float32)
    pieces = []
    for si, part in enumerate(parts):
        code = model.apply({"params": params}, part, method=V.VQVAE.embed)
        f_hat, nxt = V.get_next_autoregressive_input(params, cfg, si, f_hat, code)
        if si < cfg.num_scales - 1:
            assert nxt.shape == (2, cfg.patch_nums[si + 1], cfg.patch_nums[si + 1], 32)
            pieces.append(np.asarray(nxt).reshape(2, -1, 32))
        else:
            np.testing.assert_array_equal(nxt, f_hat)
    assert max_diff(f_hat, a["f_hat_embed"]) < QUANT_ATOL
    assert max_diff(np.concatenate(pieces, 1), a["var_input"]) < QUANT_ATOL


# -- encoder / decoder ----------------------------------------------------------------------------
def _vae_case(name: str) -> tuple:
    m = meta()[name]
    cfg = vae_cfg(m["vae"])
    params = seeded_vae(m["shapes"], m["seed"], cfg, m["codebook_std"], m.get("fingerprints"))
    return cfg, params, arrays(name)


def _vae_outputs(m: V.VQVAE, images, ids):
    """Every VQVAE path of one case in one program (one compile)."""
    f_hat = m.idxBl_to_fhat(ids)
    return dict(f=m.encode_f(images), ids=jax.numpy.concatenate(m.img_to_idxBl(images), 1),
                var_input=m.idxBl_to_var_input(ids), f_hat=f_hat,
                decoded_raw=m.decoder(m.post_quant_conv(f_hat)), decoded=m.idxBl_to_img(ids))


def _check_vae(cfg, params, a) -> dict:
    run = jax.jit(lambda p, x, i: V.VQVAE(cfg).apply({"params": p}, x, i, method=_vae_outputs))
    out = run(params, a["images"], a["ids"])
    np.testing.assert_array_equal(out["ids"], a["ids"])
    want = dict(a, f_hat=a["f_hat"][-1])
    diffs = {k: max_diff(out[k], want[k]) for k in ("f", "var_input", "f_hat", "decoded_raw", "decoded")}
    assert max(diffs.values()) < CONV_ATOL, diffs
    assert float(np.std(a["decoded_raw"])) > 0.1  # the comparison is not on a trivial output
    print(diffs)
    return diffs


def test_vae_small_encode_decode():
    cfg, params, a = _vae_case("vae_small")
    assert cfg.ch_mult == (1, 2, 2) and cfg.phi_index == V.phi_table(7, 4)
    _check_vae(cfg, params, a)


def test_vae_ch160_encode_decode():
    cfg, params, a = _vae_case("vae_160")
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.vocab_size) == (160, (1, 1, 2, 2, 4), 2, 4096)
    _check_vae(cfg, params, a)


# -- config and shapes ----------------------------------------------------------------------------
def test_released_vae_parameter_count():
    cfg = V.vqvae_config()
    shapes = jax.eval_shape(lambda: V.init_params(cfg, jax.random.PRNGKey(0)))
    keys = {V.var_torch_key(p) for p in traverse_util.flatten_dict(shapes)}
    assert sum(x.size for x in jax.tree_util.tree_leaves(shapes)) == 108_948_355
    assert {"encoder.mid.block_1.conv1.weight", "decoder.mid.attn_1.qkv.weight",
            "decoder.up.4.attn.2.proj_out.bias", "encoder.down.3.downsample.conv.weight",
            "quantize.quant_resi.qresi_ls.3.weight"} <= keys


@pytest.mark.parametrize("kw, match", [
    (dict(ch=48), "divisible by 32"),
    (dict(patch_nums=(4,)), "at least 2"),
    (dict(patch_nums=(1, 4, 2)), "small to large"),
    (dict(dtype="float64"), "unknown dtype"),
    (dict(chanels=4), "unknown VQVAE config"),
])
def test_bad_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        V.vqvae_config(**kw)


def test_bad_inputs(quant):
    cfg, params, a = quant
    with pytest.raises(ValueError, match="patch_nums"):
        V.idxBl_to_var_input(params, cfg, a["ids"][:, :600])
    with pytest.raises(ValueError, match="end at 16"):
        V.f_to_idxBl_or_fhat(params, cfg, a["f"][:, :8, :8])
