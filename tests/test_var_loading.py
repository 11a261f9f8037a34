"""Loading and exporting VAR / VQVAE weights, and `python -m ddjax.convert --kind var|var_vae`.

Torch-free: the exports are compared with the state-dict layouts (keys, shapes, dtypes, buffers
included) that make_var_fixtures.py recorded from VAR's own modules. The `torch`-marked tests
load ddjax's `.pth` exports into VAR's classes with strict=True when DDJAX_VAR_REF points at a
VAR checkout.
"""

from __future__ import annotations

import os
import sys
import types

import jax
import numpy as np
import pytest
from var_fixtures import arrays, meta, seeded_vae, seeded_var, vae_cfg, var_cfg

from ddjax.convert import __main__ as cli
from ddjax.convert import api
from ddjax.teacher.var import loading as L
from ddjax.teacher.var.model import VAR
from ddjax.teacher.var.vqvae import var_torch_key, vqvae_config
from ddjax.utils.state_dict import _torch_shapes
from ddjax.utils.torch_io import CheckpointError, read_state_dict


def _layout(state: dict) -> dict:
    return {k: [list(v.shape), np.dtype(v.dtype).name] for k, v in state.items()}


@pytest.fixture(scope="module")
def var_small():
    m = meta()["var_small"]
    cfg = var_cfg(m["var"])
    return m, cfg, seeded_var(m["shapes"], m["seed"], cfg)


@pytest.fixture(scope="module")
def vae_small():
    m = meta()["vae_small"]
    cfg = vae_cfg(m["vae"])
    return m, cfg, seeded_vae(m["shapes"], m["seed"], cfg, m["codebook_std"])


def _same_tree(a, b) -> None:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_exports_have_the_official_layout(var_small, vae_small):
    m, cfg, params = var_small
    assert _layout(L.var_state_dict(params, cfg)) == m["state_dict_layout"]
    m, cfg, params = vae_small
    assert _layout(L.vqvae_state_dict(params, cfg)) == m["state_dict_layout"]


def test_released_vae_layout_from_shapes():
    want = meta()["vae_160"]["state_dict_layout"]
    cfg = vqvae_config(ch_mult=(1, 1, 2, 2, 4), patch_nums=(1, 2, 3, 4))
    got = _torch_shapes(L.abstract_params("var_vae", cfg), var_torch_key)
    got["quantize.ema_vocab_hit_SV"] = (4, 4096)
    assert {k: list(v) for k, v in got.items()} == {k: v[0] for k, v in want.items()}


def test_safetensors_round_trip(tmp_path, var_small, vae_small):
    m, cfg, params = var_small
    path = L.export_var(params, cfg, str(tmp_path / "var.safetensors"))
    assert "attn_bias_for_masking" in read_state_dict(path)
    _same_tree(L.load_var(path, cfg), params)
    m, cfg, params = vae_small
    path = L.export_vqvae(params, cfg, str(tmp_path / "vae.safetensors"))
    _same_tree(L.load_vqvae(path, cfg), params)


def test_state_dict_without_buffers_also_loads(var_small):
    m, cfg, params = var_small
    state = L.var_state_dict(params)  # parameters only, as a strict=False save might hold
    assert "lvl_1L" not in state
    _same_tree(L.var_from_state_dict(state, cfg), params)


def test_vae_mismatch_lists_every_problem(vae_small):
    m, cfg, params = vae_small
    state = L.vqvae_state_dict(params, cfg)
    del state["quantize.quant_resi.qresi_ls.2.weight"], state["encoder.mid.block_1.conv1.bias"]
    state["quantize.quant_resi.qresi_ls.4.weight"] = state["quantize.quant_resi.qresi_ls.1.weight"]
    with pytest.raises(CheckpointError) as e:
        L.vqvae_from_state_dict(state, vae_cfg({**m["vae"], "vocab_size": 300}), source="vae.pth")
    msg = str(e.value)
    for part in ("vae.pth", "missing keys (2)", "encoder.mid.block_1.conv1.bias",
                 "quantize.quant_resi.qresi_ls.2.weight", "unexpected keys (1)",
                 "quantize.quant_resi.qresi_ls.4.weight",
                 "quantize.embedding.weight: checkpoint (256, 16) != model (300, 16)"):
        assert part in msg, (part, msg)
    assert "ema_vocab_hit_SV" not in msg  # a buffer: never reported


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="var checkpoint not found"):
        L.load_var("/nonexistent/var_d16.pth", var_cfg(meta()["var_small"]["var"]))


def test_convert_cli_round_trip(tmp_path, var_small, vae_small):
    m, cfg, params = var_small
    src = L.export_var(params, cfg, str(tmp_path / "var.safetensors"))
    sets = [f"--set={k}={v!r}" for k, v in m["var"].items() if k != "depth"]
    sets += ["--set=drop_path_rate=0.0", "--set=cond_drop_rate=0.0"]
    assert cli.main(["to-jax", "--kind", "var", "--model", f"d{m['var']['depth']}", "--input", src,
                     "--output", str(tmp_path / "var_dir"), *sets]) == 0
    loaded, config = api.load_jax(str(tmp_path / "var_dir"), "var")
    assert config == cfg
    _same_tree(loaded, params)
    out = str(tmp_path / "back.safetensors")
    assert cli.main(["to-torch", "--kind", "var", "--input", str(tmp_path / "var_dir"), "--output", out]) == 0
    assert _layout(read_state_dict(out)) == m["state_dict_layout"]
    # a ddjax directory is also what load_var takes
    _same_tree(L.load_var(str(tmp_path / "var_dir"), cfg), params)

    m, cfg, params = vae_small
    src = L.export_vqvae(params, cfg, str(tmp_path / "vae.safetensors"))
    sets = [f"--set={k}={tuple(v) if isinstance(v, list) else v!r}" for k, v in m["vae"].items()]
    assert cli.main(["to-jax", "--kind", "var_vae", "--input", src, "--output", str(tmp_path / "vae_dir"),
                     *sets]) == 0
    loaded, config = api.load_jax(str(tmp_path / "vae_dir"), "var_vae")
    assert config == cfg
    _same_tree(loaded, params)


def test_convert_build_config():
    assert api.build_config("var", "d20").embed_dim == 1280
    assert api.build_config("var", "var-d24").depth == 24
    assert api.build_config("var_vae").ch == 160
    with pytest.raises(ValueError, match="d16, d20"):
        api.build_config("var", "large")
    with pytest.raises(ValueError, match="needs its config"):
        api.to_state_dict({}, "var")


def test_bad_checkpoint_through_cli(tmp_path, var_small, capsys):
    m, cfg, params = var_small
    src = L.export_var(params, cfg, str(tmp_path / "var.safetensors"))
    # the released d16 shape does not match the small weights: one error, every key
    assert cli.main(["to-jax", "--kind", "var", "--model", "d16", "--input", src,
                     "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "missing keys (" in err and "mis-shaped keys (" in err and "blocks.15.attn.q_bias" in err


# -- against VAR's own modules (torch + a VAR checkout) ---------------------------------------
def _reference():
    pytest.importorskip("torch")
    path = os.environ.get("DDJAX_VAR_REF")
    if not path:
        pytest.skip("set DDJAX_VAR_REF to a FoundationVision/VAR checkout")
    if "huggingface_hub" not in sys.modules:
        try:
            import huggingface_hub  # noqa: F401
        except ImportError:
            stub = types.ModuleType("huggingface_hub")
            stub.PyTorchModelHubMixin = object
            sys.modules["huggingface_hub"] = stub
    sys.path.insert(0, os.path.abspath(path))
    import models.var as var
    import models.vqvae as vqvae

    return var, vqvae


@pytest.mark.torch
def test_pth_export_loads_strictly_into_var(tmp_path, var_small):
    import torch

    var_mod, vqvae_mod = _reference()
    m, cfg, params = var_small
    v = m["var"]
    vae = vqvae_mod.VQVAE(vocab_size=v["vocab_size"], z_channels=v["cvae"], ch=32,
                          v_patch_nums=tuple(v["patch_nums"]))
    model = var_mod.VAR(vae, num_classes=v["num_classes"], depth=v["depth"], embed_dim=v["embed_dim"],
                        num_heads=v["num_heads"], cond_drop_rate=0.0, attn_l2_norm=True,
                        patch_nums=tuple(v["patch_nums"]), flash_if_available=False,
                        fused_if_available=False).eval()
    path = L.export_var(params, cfg, str(tmp_path / "var.pth"))
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    a = arrays("var_small")
    with torch.no_grad():
        logits = model(torch.from_numpy(a["labels"]).long(), torch.from_numpy(a["x"])).numpy()
    ours = VAR(cfg).apply({"params": params}, a["labels"], a["x"])
    assert np.abs(logits - a["logits"]).max() < 1e-5 and np.abs(np.asarray(ours) - logits).max() < 1e-4
    # and VAR's own .pth (buffers included) loads back into ddjax
    torch.save(model.state_dict(), tmp_path / "own.pth")
    _same_tree(L.load_var(str(tmp_path / "own.pth"), cfg), params)


@pytest.mark.torch
def test_vae_pth_export_loads_strictly_into_vqvae(tmp_path, vae_small):
    import torch

    _, vqvae_mod = _reference()
    import models.basic_vae as basic_vae

    m, cfg, params = vae_small
    v = m["vae"]
    vae = vqvae_mod.VQVAE(vocab_size=v["vocab_size"], z_channels=v["z_channels"], ch=v["ch"],
                          v_patch_nums=tuple(v["patch_nums"]))
    kw = dict(ch=v["ch"], ch_mult=tuple(v["ch_mult"]), num_res_blocks=v["num_res_blocks"], dropout=0.0,
              in_channels=3, z_channels=v["z_channels"], using_sa=True, using_mid_sa=True)
    vae.encoder, vae.decoder = basic_vae.Encoder(double_z=False, **kw), basic_vae.Decoder(**kw)
    path = L.export_vqvae(params, cfg, str(tmp_path / "vae.pth"))
    vae.load_state_dict(torch.load(path, weights_only=True), strict=True)
    a = arrays("vae_small")
    with torch.no_grad():
        ids = vae.img_to_idxBl(torch.from_numpy(a["images"].transpose(0, 3, 1, 2).copy()))
    np.testing.assert_array_equal(torch.cat(ids, 1).numpy(), a["ids"])
