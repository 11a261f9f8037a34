"""LlamaGen VQ tokenizer in Flax: parity with the PyTorch model (fixtures from
`tests/fixtures/make_vq_fixtures.py`), codebook consistency, dtypes and checkpoint loading."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddjax.teacher.llamagen import load_vq, vq
from ddjax.teacher.llamagen.loading import abstract_params
from ddjax.utils.state_dict import flax_to_torch, torch_to_flax
from ddjax.utils.torch_io import CheckpointError, read_state_dict, write_state_dict

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
# float32 parity with PyTorch, max abs (decoded images reach |2.8|). Measured (2-core x86 CPU,
# with and without XLA's optimisations): small case 4.7e-6, VQ-16 7.7e-6 (decode_latents).
ATOL = 1e-5
# bf16 compute on the small case (measured: latent error 0.055, 126/128 ids, flips at gaps <= 0.023)
BF16_LATENT_ERR = 0.1  # max |unit(z_bf16) - unit(z_f32)|
BF16_MIN_ID_AGREEMENT = 0.95  # 122 of 128: four more flips than measured
BF16_NEAR_TIE = 0.05  # every flipped id's f32 squared-distance gap to the bf16 choice


def _fixture_module(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(FIXTURES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _exact_float32():
    """Full float32 convolutions and matmuls on every backend (no TF32 on GPUs)."""
    with jax.default_matmul_precision("float32"):
        yield


@pytest.fixture(scope="module")
def meta() -> dict:
    with open(os.path.join(FIXTURES, "vq_meta.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def small(meta):
    """(config, params loaded from the committed safetensors, expected outputs)."""
    case = meta["cases"]["small"]
    config = vq.VQConfig(**case["config"])
    params = load_vq(os.path.join(FIXTURES, case["weights_file"]), config)
    return config, params, dict(np.load(os.path.join(FIXTURES, "vq_small.npz")))


def _assert_parity(config, params, ref: dict) -> None:
    ids = np.asarray(vq.encode(params, config, ref["images"]))
    assert ids.dtype == np.int32 and ids.shape == ref["ids"].shape
    np.testing.assert_array_equal(ids, ref["ids"])
    decoded = np.asarray(vq.decode_latents(params, config, ref["latents"]))
    assert decoded.shape == ref["decoded"].shape
    err = np.abs(decoded - ref["decoded"]).max()
    assert err < ATOL, f"decode_latents differs from torch decode by {err:.2e}"


# -- parity with PyTorch ------------------------------------------------------------------------
def test_small_parity(small):
    config, params, ref = small
    _assert_parity(config, params, ref)
    model = vq.VQModel(config)
    z = model.apply({"params": params}, ref["images"], method=vq.VQModel.encode_latents)
    np.testing.assert_allclose(np.asarray(z), ref["latents_pre"], rtol=0, atol=ATOL)
    decoded = np.asarray(vq.decode_ids(params, config, ref["ids"]))
    np.testing.assert_allclose(decoded, ref["decoded_ids"], rtol=0, atol=ATOL)


def test_vq16_parity(meta):
    """Full VQ-16 shapes with seeded weights (not committed), small inputs."""
    case = meta["cases"]["16"]
    config = vq.vq_config("VQ-16")
    assert vq.VQConfig(**case["config"]) == config
    weights = _fixture_module("vq_weights")
    state = weights.seeded_state_dict(case["state_shapes"], case["weights_seed"])
    np.testing.assert_allclose(weights.fingerprint(state), case["weights_fingerprint"],
                               rtol=1e-9, err_msg="vq_weights.py no longer draws the fixture's "
                               "weights: regenerate with make_vq_fixtures.py")
    params = torch_to_flax(state, abstract_params(vq.init_params, config), source="seeded VQ-16")
    del state
    _assert_parity(config, params, dict(np.load(os.path.join(FIXTURES, "vq_16.npz"))))


# -- codebook consistency -----------------------------------------------------------------------
def test_codebook_and_quantizer(small):
    config, params, ref = small
    model = vq.VQModel(config)
    codes = np.asarray(model.apply({"params": params}, method=vq.VQModel.codebook))
    assert codes.shape == (config.codebook_size, config.codebook_embed_dim)
    np.testing.assert_allclose(np.linalg.norm(codes, axis=-1), 1.0, atol=1e-6)
    # Every code vector (at any scale, as the quantiser l2-normalises) maps back to itself.
    ids = np.arange(config.codebook_size, dtype=np.int32).reshape(4, 4, 4)
    z_q, got = model.apply({"params": params}, 3.0 * codes[ids], method=vq.VQModel.quantize)
    np.testing.assert_array_equal(np.asarray(got), ids.reshape(4, -1))
    np.testing.assert_allclose(np.asarray(z_q), codes[ids], atol=1e-6)
    # encode == quantize(encode_latents); decode_ids == decode_latents(codebook[ids]).
    z = model.apply({"params": params}, ref["images"], method=vq.VQModel.encode_latents)
    _, ids_q = model.apply({"params": params}, z, method=vq.VQModel.quantize)
    np.testing.assert_array_equal(np.asarray(ids_q), ref["ids"])
    side = int(np.sqrt(ref["ids"].shape[1]))
    grid = ref["ids"].reshape(-1, side, side)
    by_ids = vq.decode_ids(params, config, ref["ids"])
    by_latents = vq.decode_latents(params, config, jnp.asarray(codes[grid]))
    np.testing.assert_allclose(np.asarray(by_ids), np.asarray(by_latents), atol=1e-5)
    # [B, h, w] ids are accepted as well (shapes only: no extra compilation).
    assert jax.eval_shape(vq.decode_ids, params, config, grid).shape == by_ids.shape


def test_reconstruction_is_decoded_quantized_latents(small):
    config, params, ref = small
    model = vq.VQModel(config)
    recon = model.apply({"params": params}, ref["images"])
    assert recon.shape == ref["images"].shape and recon.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(recon), ref["decoded_ids"], atol=ATOL)


def test_decode_ids_rejects_non_square(small):
    config, params, _ = small
    with pytest.raises(ValueError, match="square"):
        vq.decode_ids(params, config, jnp.zeros((1, 12), jnp.int32))


# -- dtypes -------------------------------------------------------------------------------------
def test_bf16_close_to_f32(small):
    config, params, ref = small
    bf16 = dataclasses.replace(config, dtype="bfloat16")
    assert bf16.dtype == jnp.bfloat16
    out = vq.decode_latents(params, bf16, ref["latents"])
    assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
    err = float(jnp.abs(out - ref["decoded"]).max())
    assert err < 0.05 * float(np.abs(ref["decoded"]).max()), err
    ids = np.asarray(vq.encode(params, bf16, ref["images"]))
    # bf16 moves the (l2-normalised) latents by up to 0.055 (median 0.014): tokens whose
    # nearest and second-nearest codes are about that close in squared distance can flip.
    # Measured: 126 of 128 ids equal; the 2 that differ have f32 gaps 0.012 and 0.023 between
    # their f32 and bf16 codes (squared distances of unit vectors lie in [0, 4]; the median
    # top-2 gap over all tokens is 0.13, and 10% of tokens have a gap below 0.023).
    model, model16 = vq.VQModel(config), vq.VQModel(bf16)
    unit = lambda z: z / np.linalg.norm(z, axis=-1, keepdims=True)  # noqa: E731
    z32 = unit(np.asarray(model.apply({"params": params}, ref["images"],
                                      method=vq.VQModel.encode_latents), np.float64).reshape(-1, 8))
    z16 = unit(np.asarray(model16.apply({"params": params}, ref["images"],
                                        method=vq.VQModel.encode_latents), np.float64).reshape(-1, 8))
    assert np.linalg.norm(z16 - z32, axis=-1).max() < BF16_LATENT_ERR
    assert (ids == ref["ids"]).mean() >= BF16_MIN_ID_AGREEMENT
    codes = np.asarray(model.apply({"params": params}, method=vq.VQModel.codebook), np.float64)
    dist = 2 - 2 * z32 @ codes.T
    rows = np.arange(len(dist))
    gap = dist[rows, ids.ravel()] - dist[rows, ref["ids"].ravel()]
    assert gap[ids.ravel() != ref["ids"].ravel()].max(initial=0.0) < BF16_NEAR_TIE


# -- configs and init ---------------------------------------------------------------------------
def test_configs():
    assert vq.vq_config("VQ-16").downsample_factor == 16
    assert vq.vq_config("VQ-8").downsample_factor == 8
    assert vq.vq_config("VQ-8").encoder_ch_mult == (1, 2, 2, 4)
    assert vq.vq_config("VQ-16", dtype="bfloat16").dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="unknown VQ variant"):
        vq.vq_config("VQ-32")
    with pytest.raises(ValueError, match="unknown VQ config fields"):
        vq.vq_config("VQ-16", chanels=3)
    with pytest.raises(ValueError, match="divisible by 32"):
        vq.VQConfig(ch=48)
    with pytest.raises(ValueError, match="same length"):
        vq.VQConfig(encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2, 4))


def test_init_params_vq16_template_and_small_init(small):
    config, params, _ = small
    template = abstract_params(vq.init_params, vq.vq_config("VQ-16"))
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(template))
    assert 71_000_000 < n < 73_000_000
    fresh = vq.init_params(config, jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(params)
    table = np.asarray(fresh["quantize"]["embedding"]["embedding"])
    np.testing.assert_allclose(np.linalg.norm(table, axis=-1), 1.0, atol=1e-5)


# -- checkpoint loading -------------------------------------------------------------------------
@pytest.mark.parametrize("edit", ["rename", "reshape"])
def test_bad_key_raises_checkpoint_error(small, tmp_path, edit):
    config, params, _ = small
    state = flax_to_torch(params)
    if edit == "rename":
        state["encoder.conv_blocks.0.res.0.norm1.wieght"] = state.pop(
            "encoder.conv_blocks.0.res.0.norm1.weight")
        names = ["encoder.conv_blocks.0.res.0.norm1.wieght",
                 "encoder.conv_blocks.0.res.0.norm1.weight"]
    else:
        state["quantize.embedding.weight"] = state["quantize.embedding.weight"][:, :4]
        names = ["quantize.embedding.weight"]
    path = str(tmp_path / "bad.safetensors")
    write_state_dict(path, state)
    with pytest.raises(CheckpointError) as err:
        load_vq(path, config)
    for name in names:
        assert name in str(err.value)


def _assert_same(a, b) -> None:
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_ema_and_model_prefixes_load_the_same(small, tmp_path):
    config, params, _ = small
    state = flax_to_torch(params)
    other = {k: v + 1 for k, v in state.items()}
    paths = {}
    for name, contents in {"ema": {"ema": state}, "model": {"model": state},
                           "both": {"ema": state, "model": other}}.items():
        paths[name] = str(tmp_path / f"{name}.safetensors")
        write_state_dict(paths[name], {f"{prefix}.{k}": v for prefix, sd in contents.items()
                                       for k, v in sd.items()})
    _assert_same(load_vq(paths["ema"], config), params)
    _assert_same(load_vq(paths["model"], config), params)
    _assert_same(load_vq(paths["both"], config), params)  # EMA weights are preferred
    _assert_same(load_vq(paths["both"], config, weights_key="model"),
                 torch_to_flax(other, params))
    assert set(read_state_dict(paths["both"])) == set(state)


@pytest.mark.torch
def test_pt_checkpoint_ema_and_model(small, tmp_path):
    pytest.importorskip("torch")
    config, params, _ = small
    state = flax_to_torch(params)
    for nest in [("ema",), ("model",), ("model", "ema")]:
        path = str(tmp_path / f"{'_'.join(nest)}.pt")
        write_state_dict(path, state, nest_under=nest)
        _assert_same(load_vq(path, config), params)
