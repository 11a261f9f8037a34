"""Tests of ddjax.evaluate: FID arithmetic, precision/recall, Inception parity, digits classifier."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ddjax.evaluate import (
    FeatureStatistics,
    FrechetDistanceError,
    evaluate_samples,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    load_statistics,
    prdc,
    precision_recall,
    save_statistics,
)
from ddjax.evaluate import digits as digits_lib
from ddjax.evaluate import fid as fid_lib
from ddjax.evaluate import inception as inc
from ddjax.evaluate.features import digits_extractor, inception_extractor, to_unit_range
from ddjax.evaluate.prdc import knn_radii

FIXTURE_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "inception")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- Fréchet distance
def _diag_closed_form(mu1, var1, mu2, var2):
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2)))


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.2, 3.0, 6), rng.uniform(0.2, 3.0, 6)
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(_diag_closed_form(mu1, v1, mu2, v2), rel=1e-10)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_commuting_nondiagonal_closed_form():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = rng.uniform(0.1, 4.0, 5), rng.uniform(0.1, 4.0, 5)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T  # commute, not diagonal
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = float(np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b)))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_of_samples_approaches_closed_form():
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    a, b = np.array([1.0, 2.0, 0.5, 1.5]), np.array([0.5, 1.0, 2.0, 1.0])
    mu1, mu2 = np.zeros(4), np.array([1.0, -0.5, 0.0, 0.25])
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = float(np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b)))
    errors = []
    for n in (500, 50_000):
        x1 = rng.multivariate_normal(mu1, s1, size=n)
        x2 = rng.multivariate_normal(mu2, s2, size=n)
        errors.append(abs(fid_from_features(x1, x2) - expected))
    assert errors[1] < 0.03 * expected
    assert errors[1] < errors[0]


def test_feature_statistics_match_numpy():
    x = np.random.default_rng(3).normal(size=(50, 3)).astype(np.float32)
    mu, sigma = feature_statistics(x)
    assert mu.dtype == np.float64 and sigma.shape == (3, 3)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False))
    with pytest.raises(ValueError):
        feature_statistics(x[:1])


def test_frechet_raises_instead_of_sentinel(monkeypatch):
    mu, s = np.zeros(3), np.eye(3)
    with pytest.raises(FrechetDistanceError):
        frechet_distance(mu, s * np.nan, mu, s)
    with pytest.raises(ValueError, match="feature dimensions"):
        frechet_distance(mu, s, np.zeros(2), np.eye(2))
    monkeypatch.setattr(fid_lib, "_sqrtm", lambda a: np.full_like(a, np.nan))
    with pytest.raises(FrechetDistanceError, match="not finite"):
        frechet_distance(mu, s, mu, s)
    monkeypatch.setattr(fid_lib, "_sqrtm", lambda a: a + 0.5j * np.eye(len(a)))
    with pytest.raises(FrechetDistanceError, match="imaginary"):
        frechet_distance(mu, s, mu, s)


def test_statistics_npz_roundtrip(tmp_path):
    x = np.random.default_rng(4).normal(size=(20, 5))
    mu, sigma = feature_statistics(x)
    path = tmp_path / "stats.npz"
    save_statistics(path, mu, sigma, protocol="test protocol")
    with np.load(path) as f:  # what pytorch-fid reads
        np.testing.assert_array_equal(f["mu"], mu)
        np.testing.assert_array_equal(f["sigma"], sigma)
    stats = load_statistics(path)
    assert stats.protocol == "test protocol"
    np.testing.assert_array_equal(stats.sigma, sigma)
    np.savez(tmp_path / "plain.npz", mu=mu, sigma=sigma)  # a pytorch-fid file
    assert load_statistics(tmp_path / "plain.npz").protocol is None


# ----------------------------------------------------------------------------- precision / recall
def test_prdc_identical_sets():
    x = np.random.default_rng(5).normal(size=(200, 8))
    out = prdc(x, x.copy(), k=3)
    assert out["precision"] == 1.0 and out["recall"] == 1.0 and out["coverage"] == 1.0


def test_prdc_disjoint_sets():
    rng = np.random.default_rng(6)
    real, fake = rng.normal(size=(100, 8)), rng.normal(size=(120, 8)) + 100.0
    out = prdc(real, fake, k=3)
    assert out == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_hand_checked():
    # k = 1. Real radii (nearest other real): 1, 1, 1, 1. Fake radii: 9.5, 9.5.
    # Fake 0.5 lies in the balls of reals 0 and 1; fake 10 in none -> precision 1/2,
    # density 2 / (1 * 2) = 1, coverage (reals 0, 1 have a fake within 1) 2/4.
    # Every real is within 9.5 of fake 0.5 -> recall 1.
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0]])
    out = prdc(real, fake, k=1)
    assert out == pytest.approx({"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 0.5})
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)


def test_prdc_blocks_match_brute_force():
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(150, 6)), rng.normal(size=(130, 6)) * 1.3 + 0.3
    d_rr = ((real[:, None] - real[None]) ** 2).sum(-1)
    np.testing.assert_allclose(knn_radii(real, k=3, block_size=16), np.sort(d_rr, axis=1)[:, 3],
                               rtol=1e-9, atol=1e-12)
    assert prdc(real, fake, k=3, block_size=7) == prdc(real, fake, k=3, block_size=4096)
    d_fr = ((fake[:, None] - real[None]) ** 2).sum(-1)
    precision = (d_fr <= np.sort(d_rr, axis=1)[:, 3][None]).any(axis=1).mean()
    assert prdc(real, fake, k=3)["precision"] == pytest.approx(precision)


# ----------------------------------------------------------------------------- Inception
@pytest.fixture(scope="module")
def fixture_npz():
    with np.load(os.path.join(FIXTURE_DIR, "expected.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def random_sd(fixture_npz):
    return inc.random_state_dict(int(fixture_npz["seed"]))


@pytest.fixture(scope="module")
def flax_outputs(fixture_npz, random_sd):
    extractor = inception_extractor(inc.state_dict_to_variables(random_sd), batch_size=2)
    return extractor.extract(fixture_npz["images"])


def _rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def test_random_state_dict_is_reproducible(fixture_npz, random_sd):
    sd = random_sd
    checksum = sum(np.abs(sd[k].astype(np.float64)).sum() for k in sorted(sd))
    assert checksum == pytest.approx(float(fixture_npz["state_dict_checksum"]), rel=1e-9)
    assert len(sd) == 472 and sum(v.size for v in sd.values()) == 23_885_392


def test_inception_matches_pytorch_fid_fixture(fixture_npz, flax_outputs):
    assert flax_outputs["features"].shape == (2, inc.INCEPTION_FEATURE_DIM)
    assert _rel_err(flax_outputs["features"], fixture_npz["pool3"]) < 1e-4
    assert _rel_err(flax_outputs["logits"], fixture_npz["logits_unbiased"]) < 1e-4


def test_resize_matches_torch_interpolate_fixture(fixture_npz):
    x = fixture_npz["resize_input"]
    for key in ("resize_17x23", "resize_61x77"):
        want = fixture_npz[key]
        got = inc.resize_bilinear(x, want.shape[1:3])
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_state_dict_check_lists_bad_keys(random_sd):
    sd = dict(random_sd)
    del sd["Mixed_6b.branch7x7_2.conv.weight"]
    sd["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    sd["fc.bias"] = np.zeros(1000, np.float32)
    sd["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.zeros((), np.int64)  # ignored
    with pytest.raises(inc.WeightMismatchError) as err:
        inc.state_dict_to_variables(sd)
    msg = str(err.value)
    assert "1 missing: Mixed_6b.branch7x7_2.conv.weight" in msg
    assert "1 unexpected: AuxLogits.fc.weight" in msg
    assert "fc.bias: expected (1008,), got (1000,)" in msg


def test_state_dict_roundtrip_and_file_formats(random_sd, tmp_path):
    back = inc.variables_to_state_dict(inc.state_dict_to_variables(random_sd))
    assert back.keys() == random_sd.keys()
    for k in ("Conv2d_1a_3x3.conv.weight", "fc.weight", "Mixed_7c.branch_pool.bn.running_var"):
        np.testing.assert_array_equal(back[k], random_sd[k])
    small = {k: random_sd[k] for k in ("fc.bias", "Conv2d_1a_3x3.conv.weight")}
    np.savez(tmp_path / "w.npz", **small)
    from safetensors.numpy import save_file

    save_file(small, str(tmp_path / "w.safetensors"))
    for name in ("w.npz", "w.safetensors"):
        loaded = inc.load_state_dict_file(tmp_path / name)
        for k, v in small.items():
            np.testing.assert_array_equal(loaded[k], v)
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        inc.load_state_dict_file(tmp_path / "missing.pth")


def test_inception_score():
    assert inc.inception_score(np.zeros((20, 7)), splits=2) == pytest.approx((1.0, 0.0))
    logits = np.full((48, 4), -50.0)
    logits[np.arange(48), np.arange(48) % 4] = 50.0  # confident, all classes equally often
    mean, std = inc.inception_score(logits, splits=4)
    assert mean == pytest.approx(4.0, rel=1e-6) and std < 1e-6


def test_no_torch_at_import():
    code = "import sys, ddjax.evaluate; assert 'torch' not in sys.modules, 'torch imported'"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, env=env)


def test_pth_loading_and_resize_against_torch(tmp_path):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    sd = {"fc.bias": torch.arange(3, dtype=torch.float32), "a.weight": torch.ones(2, 2)}
    torch.save(sd, tmp_path / "w.pth")
    loaded = inc.load_state_dict_file(tmp_path / "w.pth")
    np.testing.assert_array_equal(loaded["fc.bias"], np.arange(3, dtype=np.float32))
    x = np.random.default_rng(8).uniform(-1, 1, size=(1, 33, 20, 3)).astype(np.float32)
    for size in ((299, 299), (7, 41), (33, 20)):
        want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size,
                             mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(np.asarray(inc.resize_bilinear(x, size)), want, atol=2e-5)


# ----------------------------------------------------------------------------- features
def test_to_unit_range():
    u8 = np.array([[[[0, 255, 127]]]], dtype=np.uint8)
    np.testing.assert_allclose(to_unit_range(u8)[0, 0, 0], [-1.0, 1.0, 127 / 127.5 - 1])
    assert to_unit_range(np.zeros((2, 4, 4, 1), np.float32)).shape == (2, 4, 4, 3)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        to_unit_range(np.full((1, 4, 4, 3), 255.0))


# ----------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits_setup():
    tr_x, tr_y, te_x, te_y = digits_lib.digits_split(seed=0)
    params = digits_lib.train_digits_classifier(seed=0, epochs=8, train_data=(tr_x, tr_y))
    return params, (tr_x, tr_y, te_x, te_y)


def test_digits_images():
    x, y = digits_lib.digits_images(size=16)
    assert x.shape == (1797, 16, 16, 3) and x.dtype == np.float32 and y.shape == (1797,)
    assert x.min() >= -1.0 and x.max() <= 1.0 and set(np.unique(y)) == set(range(10))


def test_digits_classifier_accuracy_and_features(digits_setup, tmp_path):
    params, (tr_x, tr_y, te_x, te_y) = digits_setup
    acc = digits_lib.classifier_accuracy(params, te_x, te_y)
    assert acc >= 0.97, f"held-out accuracy {acc:.4f}"
    feats = digits_lib.digits_features(params, te_x[:10])
    assert feats.shape == (10, digits_lib.DIGITS_FEATURE_DIM)
    digits_lib.save_params(tmp_path / "digits.npz", params)
    loaded = digits_lib.load_params(tmp_path / "digits.npz")
    np.testing.assert_array_equal(digits_lib.digits_features(loaded, te_x[:10]), feats)


def test_evaluate_samples_on_digits(digits_setup, tmp_path):
    params, (tr_x, _, te_x, _) = digits_setup
    ex = digits_extractor(params, batch_size=256)  # 360 test images: one full, one padded batch
    assert ex.protocol.startswith("digits-classifier penultimate layer")
    np.testing.assert_allclose(ex(te_x[:10]), digits_lib.digits_features(params, te_x[:10]),
                               rtol=1e-5, atol=1e-5)
    good = evaluate_samples(te_x, tr_x, ex)
    ref_feats = ex(tr_x)
    noise = np.random.default_rng(9).uniform(-1, 1, size=te_x.shape).astype(np.float32)
    bad = evaluate_samples(noise, ref_feats, ex)  # reference given as features
    assert good["fid"] < 0.2 * bad["fid"]
    assert good["precision"] > 0.8 and good["recall"] > 0.8 and bad["precision"] < 0.1
    assert good["protocol"] == ex.protocol and "inception_score" not in good
    mu, sigma = feature_statistics(ref_feats)
    save_statistics(tmp_path / "ref.npz", mu, sigma, protocol=ex.protocol)
    from_stats = evaluate_samples(te_x, str(tmp_path / "ref.npz"), ex)
    assert from_stats["fid"] == pytest.approx(good["fid"], rel=1e-6)
    assert from_stats["precision"] is None
    with pytest.raises(ValueError, match="protocol"):
        evaluate_samples(te_x, FeatureStatistics(mu, sigma, "another protocol"), ex)
