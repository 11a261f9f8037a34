"""FID reference statistics of a TFDS dataset (tfds.testing.mock_data, no TensorFlow needed):
the values against features computed here from the same images, the cache and its contents."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ddjax.evaluate import reference as ref_lib
from ddjax.evaluate.features import FeatureExtractor
from ddjax.evaluate.fid import feature_statistics, load_statistics

tfds = pytest.importorskip("tensorflow_datasets")


def adm_center_crop_arr(pil_image, image_size):
    """guided-diffusion's image_datasets.center_crop_arr, verbatim (the reference)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def small_extractor() -> FeatureExtractor:
    """Per-channel means and standard deviations: 6 features, enough for a covariance."""

    @jax.jit
    def apply(x):
        return {"features": jnp.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=-1)}

    return FeatureExtractor(name="moments", protocol="channel moments (test)", feature_dim=6,
                            apply=apply, batch_size=8)


def test_center_crop_arr_is_adms_on_a_non_square_image():
    image = np.random.default_rng(0).integers(0, 256, (70, 101, 3)).astype(np.uint8)
    for size in (8, 16, 33):
        got = ref_lib.center_crop_arr(image, size)
        assert got.shape == (size, size, 3) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, adm_center_crop_arr(Image.fromarray(image), size))


def test_parse_tfds():
    assert ref_lib.parse_tfds("tfds:imagenet2012/validation") == ("imagenet2012", "validation")
    assert ref_lib.parse_tfds("tfds:celeb_a_hq/256/train") == ("celeb_a_hq/256", "train")
    assert ref_lib.parse_tfds("stats.npz") is None
    with pytest.raises(ValueError, match="tfds:NAME/SPLIT"):
        ref_lib.parse_tfds("tfds:cifar10")


def test_tfds_statistics_equal_the_images_features_and_are_cached(tmp_path):
    ex, size, cache = small_extractor(), 16, str(tmp_path / "ref" / "cifar10_train.npz")
    with tfds.testing.mock_data(num_examples=20):
        stats = ref_lib.tfds_reference("tfds:cifar10/train", ex, size, cache, batch_size=8)
        source = tfds.data_source("cifar10", split="train", download=False)
        images = np.stack([adm_center_crop_arr(Image.fromarray(np.asarray(source[i]["image"])), size)
                           for i in range(len(source))])
    mu, sigma = feature_statistics(ex(images))
    np.testing.assert_allclose(stats.mu, mu, rtol=0, atol=1e-6)
    np.testing.assert_allclose(stats.sigma, sigma, rtol=0, atol=1e-6)
    with np.load(cache) as f:
        assert (str(f["dataset"]), str(f["split"]), int(f["count"])) == ("cifar10", "train", 20)
        assert str(f["protocol"]) == ex.protocol
        assert str(f["preprocessing"]) == ref_lib.preprocessing(size)
    np.testing.assert_array_equal(load_statistics(cache).mu, stats.mu)

    class NoImages(list):  # the same length; reading an image would mean the cache was ignored
        def __getitem__(self, i):
            raise AssertionError("the cached statistics were not used")

    again = ref_lib.tfds_reference("tfds:cifar10/train", ex, size, cache, source=NoImages([0] * 20))
    np.testing.assert_array_equal(again.sigma, stats.sigma)
    with pytest.raises(AssertionError, match="not used"):  # another size: recomputed
        ref_lib.tfds_reference("tfds:cifar10/train", ex, 8, cache, source=NoImages([0] * 20))
