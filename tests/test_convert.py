"""Checkpoint reading, key/shape checking, and the conversion CLI."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from ddjax.convert import CheckpointError, flax_to_torch, read_state_dict, write_state_dict
from ddjax.convert.__main__ import main as convert_main
from ddjax.teacher.llamagen import load_gpt
from ddjax.utils.checkpoint import load_params

GPT_ARGS = ["--set", "n_layer=2", "--set", "dim=64", "--set", "n_head=4", "--set", "n_kv_head=2",
            "--set", "vocab_size=64", "--set", "block_size=16", "--set", "num_classes=10",
            "--set", "multiple_of=32"]


def _same(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture()
def state(tiny_gpt):
    cfg, params = tiny_gpt
    return cfg, params, flax_to_torch(params)


def test_ema_model_module_and_top_level_load_the_same(tmp_path, state):
    cfg, params, sd = state
    for where in ("ema", "model", "module", "state_dict", None):
        path = str(tmp_path / f"{where}.safetensors")
        write_state_dict(path, {(f"{where}." if where else "") + k: v for k, v in sd.items()})
        _same(load_gpt(path, cfg), params)
    # DDP / torch.compile prefixes are stripped.
    path = str(tmp_path / "ddp.safetensors")
    write_state_dict(path, {"module." + k: v for k, v in sd.items()})
    _same(load_gpt(path, cfg), params)


def test_renamed_and_misshaped_keys_are_named(tmp_path, state):
    cfg, _, sd = state
    bad = dict(sd)
    bad["layers.1.attention.wqkv.weights"] = bad.pop("layers.1.attention.wqkv.weight")
    bad["norm.weight"] = np.ones(63, np.float32)
    path = str(tmp_path / "bad.safetensors")
    write_state_dict(path, bad)
    with pytest.raises(CheckpointError) as e:
        load_gpt(path, cfg)
    msg = str(e.value)
    assert "bad.safetensors" in msg
    assert "missing keys (1): layers.1.attention.wqkv.weight" in msg
    assert "unexpected keys (1): layers.1.attention.wqkv.weights" in msg
    assert "norm.weight: checkpoint (63,) != model (64,)" in msg


def test_buffers_are_ignored_and_missing_files_reported(tmp_path, state):
    cfg, params, sd = state
    extra = dict(sd, freqs_cis=np.zeros((17, 8, 2), np.float32))
    extra["layers.0.attention.kv_cache.k_cache"] = np.zeros((1, 4, 17, 16), np.float32)
    path = str(tmp_path / "buffers.safetensors")
    write_state_dict(path, extra)
    _same(load_gpt(path, cfg), params)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_gpt(str(tmp_path / "nope.pt"), cfg)
    with pytest.raises(CheckpointError, match="no weights under 'ema'"):
        read_state_dict(path, weights_key="ema")


def test_cli_round_trip_bit_for_bit(tmp_path, state, capsys):
    cfg, params, sd = state
    for dtype in ("float32", "bfloat16"):
        src = str(tmp_path / f"in_{dtype}.safetensors")
        sd_d = {k: v.astype(dtype) if dtype == "float32" else
                v.astype(jax.numpy.bfloat16) for k, v in sd.items()}
        write_state_dict(src, {"ema." + k: v for k, v in sd_d.items()})
        out_dir = str(tmp_path / f"jax_{dtype}")
        args = ["to-jax", "--kind", "gpt", "--model", "GPT-B", "--input", src,
                "--output", out_dir, "--set", f"param_dtype='{dtype}'", *GPT_ARGS]
        assert convert_main(args) == 0
        assert convert_main(args) == 1  # refuses to overwrite
        assert "exists" in capsys.readouterr().err
        restored, meta = load_params(out_dir)
        assert meta["kind"] == "gpt" and meta["model_config"]["param_dtype"] == dtype
        back = str(tmp_path / f"back_{dtype}.safetensors")
        assert convert_main(["to-torch", "--kind", "gpt", "--input", out_dir, "--output", back]) == 0
        got = read_state_dict(back)
        assert sorted(got) == sorted(sd_d)
        for k in sd_d:
            assert got[k].dtype == sd_d[k].dtype, k
            np.testing.assert_array_equal(got[k], sd_d[k])


def test_cli_reports_mismatch(tmp_path, state, capsys):
    _, _, sd = state
    src = str(tmp_path / "m.safetensors")
    write_state_dict(src, sd)
    args = ["to-jax", "--kind", "gpt", "--input", src, "--output", str(tmp_path / "o"),
            *GPT_ARGS[:-4]]  # wrong num_classes / multiple_of
    assert convert_main(args) == 1
    err = capsys.readouterr().err
    assert "mis-shaped keys" in err and "cls_embedding.embedding_table.weight" in err
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.torch
def test_pt_files_under_model_and_ema(tmp_path, state):
    torch = pytest.importorskip("torch")
    cfg, params, sd = state
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
    for layout in ({"model": tensors}, {"ema": tensors, "optimizer": {}, "steps": 3}, tensors):
        path = str(tmp_path / "c.pt")
        torch.save(layout, path)
        _same(load_gpt(path, cfg), params)
    path = str(tmp_path / "w.pt")
    write_state_dict(path, sd, nest_under=("model", "ema"))
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model", "ema"}
    _same(load_gpt(path, cfg, weights_key="model"), params)


@pytest.mark.parametrize("suffix", [".safetensors", pytest.param(".pt", marks=pytest.mark.torch)])
def test_truncated_or_corrupt_files_raise_a_checkpoint_error_naming_them(tmp_path, state, suffix):
    if suffix == ".pt":
        pytest.importorskip("torch")
    cfg, _, sd = state
    path = str(tmp_path / f"whole{suffix}")
    write_state_dict(path, sd)
    data = open(path, "rb").read()
    for name, content in (("truncated", data[: len(data) // 2]), ("garbage", b"\x00not a checkpoint" * 9)):
        bad = str(tmp_path / f"{name}{suffix}")
        with open(bad, "wb") as f:
            f.write(content)
        with pytest.raises(CheckpointError, match=f"{name}{suffix}"):
            load_gpt(bad, cfg)
