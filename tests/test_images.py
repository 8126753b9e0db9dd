"""load_image: every awkward format becomes the right pixels; every bad file fails with its reason."""

from __future__ import annotations

import numpy as np
import pytest
from corpus import make_corpus
from PIL import Image

from siglip2_encoder import ImageLoadError, ImageProcessor, load_image


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def test_good_images_load_as_rgb(corpus):
    good, _ = corpus
    processor = ImageProcessor.from_preset("siglip2-base-patch16-224")
    for path in good:
        pixels = load_image(path)
        assert pixels.ndim == 3 and pixels.shape[2] == 3, path
        assert pixels.dtype in (np.uint8, np.float32), path
        processor(pixels)  # the processor takes every one as it is


def test_exif_orientation_is_applied(corpus):
    good, _ = corpus
    rotated = next(p for p in good if p.endswith("rotated.jpg"))
    assert load_image(rotated).shape[:2] == (50, 20)  # stored 20 x 50, displayed rotated
    assert load_image(rotated, exif_transpose=False).shape[:2] == (20, 50)


def test_transparency_goes_to_white_and_high_bit_depth_is_scaled_not_clipped(tmp_path):
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(tmp_path / "clear.png")
    assert (load_image(tmp_path / "clear.png") == 255).all()
    Image.new("LA", (4, 4), (0, 128)).save(tmp_path / "half.png")
    assert np.allclose(load_image(tmp_path / "half.png"), 127, atol=1)
    values = np.array([[0, 1000], [30000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "sixteen.png")
    pixels = load_image(tmp_path / "sixteen.png")
    assert pixels.dtype == np.float32
    np.testing.assert_allclose(pixels[..., 0], values / 65535, atol=1e-6)  # 30000 is not clipped to 1
    floats = np.array([[-2.0, 0.0], [1.0, 6.0]], dtype=np.float32)
    Image.fromarray(floats).save(tmp_path / "float.tiff")
    np.testing.assert_allclose(load_image(tmp_path / "float.tiff")[..., 0], (floats + 2) / 8, atol=1e-6)


def test_bad_files_raise_with_their_reason(corpus, tmp_path):
    _, bad = corpus
    for path, word in bad.items():
        limit = 100_000 if path.endswith("bomb.png") else 10**9
        with pytest.raises(ImageLoadError, match=word):
            load_image(path, max_pixels=limit)
    with pytest.raises(ImageLoadError, match="No such file"):
        load_image(tmp_path / "missing.jpg")
    nan = np.full((4, 4), np.nan, dtype=np.float32)
    Image.fromarray(nan).save(tmp_path / "nan.tiff")
    with pytest.raises(ImageLoadError, match="NaN"):
        load_image(tmp_path / "nan.tiff")
