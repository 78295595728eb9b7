import math

import numpy as np
import pytest
from PIL import Image

from quant import metrics


def _image(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_psnr_identical_is_infinite():
    image = _image(0)
    assert metrics.psnr(image, image.copy()) == math.inf


def test_psnr_known_value():
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    b = a.copy()
    b[...] = 16  # mse 256: 10 * log10(255^2 / 256) = 24.05 dB
    assert metrics.psnr(a, b) == pytest.approx(24.0478, abs=1e-3)


def test_psnr_accepts_pil_images():
    image = _image(1)
    assert metrics.psnr(Image.fromarray(image), image) == math.inf


def test_ssim_identical_is_one():
    image = _image(2)
    assert metrics.ssim(image, image) == pytest.approx(1.0, abs=1e-12)


def test_ssim_falls_with_noise():
    rng = np.random.default_rng(3)
    image = np.full((32, 32, 3), 128, dtype=np.uint8)
    image[8:24, 8:24] = 230
    scores = []
    for amplitude in (5, 20, 60):
        noisy = np.clip(image + rng.normal(0, amplitude, image.shape), 0, 255).astype(np.uint8)
        scores.append(metrics.ssim(image, noisy))
    assert 1.0 > scores[0] > scores[1] > scores[2]


def test_ssim_of_inverted_image_is_negative():
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[:, 16:] = 255
    assert metrics.ssim(image, 255 - image) < 0


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="images differ in shape"):
        metrics.psnr(_image(0, 32), _image(0, 16))
