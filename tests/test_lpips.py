"""LPIPS-VGG (`ddjax/evaluate/lpips.py`) against the `lpips` package's fixture (no torch needed).

The fixture (`tests/fixtures/lpips/`, made by `make_lpips_fixture.py`) holds the package's
distances for random VGG16 weights, which are regenerated here from their numpy seed, and its
real linear heads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from ddjax.evaluate import lpips as lp
from ddjax.utils.torch_io import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_DIR = os.path.join(ROOT, "tests", "fixtures", "lpips")
LIN_FILE = os.path.join(FIXTURE_DIR, "lin_vgg_v0.1.safetensors")
CASES = ("s32", "s64", "s16", "r20x36")
# Measured against the package (float32, CPU): max abs diff 3.0e-8 (s32, 32x32), 3.7e-9 (s64,
# 64x64), 1.5e-8 (s16, 16x16), 1.9e-9 (r20x36, 20x36); max relative 2.0e-6; distances span
# 1.5e-3 .. 0.15. Per-layer terms: same order.
ATOL, RTOL = 1e-7, 1e-5

distance = jax.jit(lp.lpips_distance)


@jax.jit
def distance_and_layers(params, x, y):
    """(distances [B], the five per-layer terms [B, 5]) via the lin layers' captured outputs."""
    dist, state = lp.LPIPS().apply({"params": params}, x, y, capture_intermediates=True)
    inter = state["intermediates"]
    return dist, jnp.stack([inter[f"lin{i}"]["__call__"][0].mean(axis=(1, 2, 3)) for i in range(5)], 1)


@pytest.fixture(scope="module")
def expected():
    with np.load(os.path.join(FIXTURE_DIR, "expected.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def vgg_state(expected):
    return lp.random_vgg_state_dict(int(expected["seed"]))


@pytest.fixture(scope="module")
def vgg_file(vgg_state, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("lpips") / "vgg16.safetensors")
    save_file(vgg_state, path)
    return path


@pytest.fixture(scope="module")
def params(vgg_file):
    return lp.load_lpips(vgg_file, LIN_FILE)


def _images(seed: int, shape=(2, 16, 16, 3)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=shape).astype(np.float32)
    return x, np.clip(x + 0.3 * rng.standard_normal(shape), -1, 1).astype(np.float32)


# ----------------------------------------------------------------------------- parity
def test_seeded_vgg_weights_match_fixture(expected, vgg_state):
    sums = [sum(float(np.sum(vgg_state[k], dtype=np.float64)) for k in sorted(vgg_state)),
            sum(float(np.sum(np.square(vgg_state[k], dtype=np.float64))) for k in sorted(vgg_state))]
    np.testing.assert_allclose(sums, expected["vgg_fingerprint"], rtol=1e-9,
                               err_msg="random_vgg_state_dict no longer draws the fixture's weights")
    with open(os.path.join(FIXTURE_DIR, "meta.json")) as f:
        assert json.load(f)["seed"] == int(expected["seed"])


@pytest.mark.parametrize("case", CASES)
def test_matches_lpips_package(params, expected, case):
    x, y = expected[f"{case}_x"], expected[f"{case}_y"]
    with jax.default_matmul_precision("float32"):
        got, per_layer = distance_and_layers(params, x, y)
    chex.assert_shape([got, per_layer], [(x.shape[0],), (x.shape[0], 5)])
    np.testing.assert_allclose(np.asarray(got), expected[f"{case}_dist"], atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(np.asarray(per_layer), expected[f"{case}_per_layer"],
                               atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------- properties
def test_identical_images_and_symmetry(params):
    x, y = _images(1)
    np.testing.assert_array_equal(np.asarray(distance(params, x, x)), 0.0)
    d_xy, d_yx = np.asarray(distance(params, x, y)), np.asarray(distance(params, y, x))
    assert (d_xy > 0).all()
    np.testing.assert_allclose(d_xy, d_yx, rtol=1e-6, atol=0)


def test_loss_fn_jit_and_gradient(params):
    x, y = _images(2)
    loss = lp.lpips_loss_fn(params)
    jitted = jax.jit(loss)(x, y)
    chex.assert_shape(jitted, (2,))
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(distance(params, x, y)), rtol=1e-6)
    grad = jax.jit(jax.grad(lambda a, b: loss(a, b).sum()))
    g = grad(jnp.asarray(x), jnp.asarray(y))
    chex.assert_shape(g, x.shape)
    chex.assert_tree_all_finite(g)
    assert float(jnp.abs(g).max()) > 0
    g_same = grad(jnp.asarray(x), jnp.asarray(x))  # at the minimum: finite, zero
    chex.assert_tree_all_finite(g_same)
    np.testing.assert_array_equal(np.asarray(g_same), 0.0)
    # central difference along a random direction (ReLU kinks: 1.8% off at this step)
    v = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    eps = 1e-3
    f = lambda a: float(distance(params, a, y).sum())
    fd = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
    assert fd == pytest.approx(float(jnp.vdot(g, v)), rel=5e-2)


def test_normalize_channels_gradient_at_zero():
    f = jnp.zeros((2, 3, 4), jnp.float32).at[0, 0].set(jnp.array([3.0, 0.0, 4.0, 0.0]))
    np.testing.assert_allclose(np.asarray(lp.normalize_channels(f))[0, 0], [0.6, 0, 0.8, 0], rtol=1e-6)
    g = jax.grad(lambda a: jnp.sum(lp.normalize_channels(a) * jnp.arange(4.0)))(f)
    chex.assert_tree_all_finite(g)


def test_minimum_size(params):
    x = np.zeros((1, 15, 32, 3), np.float32)
    with pytest.raises(ValueError, match="at least 16x16"):
        lp.lpips_distance(params, x, x)
    with pytest.raises(ValueError, match="equal shape"):
        lp.lpips_distance(params, np.zeros((1, 16, 16, 3)), np.zeros((1, 16, 17, 3)))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        lp.lpips_distance(params, np.zeros((1, 16, 16, 1)), np.zeros((1, 16, 16, 1)))


# ----------------------------------------------------------------------------- weight files
def test_bad_vgg_file_names_every_key(vgg_state, tmp_path):
    bad = dict(vgg_state)
    del bad["features.0.bias"]
    bad["features.28.weight"] = bad["features.28.weight"][:, :, :1]
    bad["features.3.weight"] = np.zeros((1,), np.float32)
    bad["classifier.0.weight"] = np.zeros((2, 2), np.float32)  # torchvision's head: ignored
    path = str(tmp_path / "bad_vgg.npz")
    np.savez(path, **bad)
    with pytest.raises(CheckpointError) as err:
        lp.load_lpips(path, LIN_FILE)
    msg = str(err.value)
    assert path in msg
    assert "1 missing: features.0.bias" in msg
    assert "1 unexpected: features.3.weight" in msg
    assert "features.28.weight: expected (512, 512, 3, 3), got (512, 512, 1, 3)" in msg
    assert "classifier" not in msg


def test_bad_lin_file_and_missing_paths(vgg_file, tmp_path):
    lin = lp.read_weights(LIN_FILE)
    lin["lin2.model.1.weight"] = lin["lin2.model.1.weight"][:, :128]
    del lin["lin4.model.1.weight"]
    path = str(tmp_path / "bad_lin.safetensors")
    save_file(lin, path)
    with pytest.raises(CheckpointError, match=r"(?s)bad_lin.*1 missing: lin4.*lin2.model.1.weight: "
                                              r"expected \(1, 256, 1, 1\), got \(1, 128, 1, 1\)"):
        lp.load_lpips(vgg_file, path)
    missing = str(tmp_path / "nowhere" / "vgg16.pth")
    with pytest.raises(FileNotFoundError, match="nowhere/vgg16.pth"):
        lp.load_lpips(missing, LIN_FILE)
    with pytest.raises(FileNotFoundError, match="nowhere/vgg16.pth"):
        lp.load_lpips(vgg_file, missing)
    (tmp_path / "w.txt").write_text("")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        lp.read_weights(tmp_path / "w.txt")


def test_combined_file_roundtrip(params, tmp_path):
    path = str(tmp_path / "lpips_vgg.npz")
    np.savez(path, **lp.params_to_state_dict(params))
    again = lp.load_lpips(path)  # lin heads taken from the same file
    chex.assert_trees_all_equal(again, params)
    with pytest.raises(CheckpointError, match="5 unexpected: lin0.model.1.weight, lin1"):
        lp.load_lpips(path, LIN_FILE)  # explicit heads + heads in the VGG file: ambiguous


def test_installed_lin_path(tmp_path, monkeypatch, vgg_file):
    monkeypatch.setattr(lp.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install lpips"):
        lp.load_lpips(vgg_file)
    monkeypatch.undo()
    weights = tmp_path / "lpips" / "weights" / "v0.1"
    weights.mkdir(parents=True)
    (tmp_path / "lpips" / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (weights / "vgg.pth").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert lp.installed_lin_path() == str(weights / "vgg.pth")


def test_no_torch_at_import():
    code = "import sys, ddjax.evaluate.lpips; assert 'torch' not in sys.modules, 'torch imported'"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)


@pytest.mark.torch
def test_pth_files(params, tmp_path):
    torch = pytest.importorskip("torch")
    sd = lp.params_to_state_dict(params)
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
    vgg = {k: v for k, v in tensors.items() if k.startswith("features.")}
    vgg["classifier.6.bias"] = torch.zeros(1000)  # as a full torchvision vgg16 state dict
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save({k: v for k, v in tensors.items() if k.startswith("lin")}, tmp_path / "vgg.pth")
    chex.assert_trees_all_equal(lp.load_lpips(tmp_path / "vgg16.pth", tmp_path / "vgg.pth"), params)
