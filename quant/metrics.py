"""Quality metrics against full precision: PSNR, SSIM, and the embedded model's prompt adherence.

PSNR and SSIM compare two uint8 RGB images of the same size. SSIM follows Wang et al. (2004):
an 11x11 Gaussian window with sigma 1.5, K1 = 0.01 and K2 = 0.03, computed per channel and averaged.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.shapes import grammar

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """Return an image as a uint8 [height, width, 3] array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image array, got {image.dtype}")
    return image


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} and {b.shape}")


def psnr(reference, image) -> float:
    """Peak signal-to-noise ratio in dB between two 8-bit images; inf when they are identical."""
    a, b = to_array(reference).astype(np.float64), to_array(image).astype(np.float64)
    _check_pair(a, b)
    mse = np.mean((a - b) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _gaussian_window(channels: int) -> torch.Tensor:
    coords = torch.arange(SSIM_WINDOW, dtype=torch.float64) - SSIM_WINDOW // 2
    kernel = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    kernel = kernel / kernel.sum()
    window = kernel[:, None] * kernel[None, :]
    return window.expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW).contiguous()


def ssim(reference, image) -> float:
    """Structural similarity (mean SSIM over the image and its channels) between two 8-bit images."""
    a, b = to_array(reference), to_array(image)
    _check_pair(a, b)
    x = torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].double()
    y = torch.from_numpy(np.array(b)).permute(2, 0, 1)[None].double()
    channels = x.shape[1]
    window = _gaussian_window(channels)
    padding = SSIM_WINDOW // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, [padding] * 4, mode="reflect"), window, groups=channels)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = blur(x), blur(y)
    sigma_x = blur(x * x) - mu_x**2
    sigma_y = blur(y * y) - mu_y**2
    sigma_xy = blur(x * y) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)
    denominator = (mu_x**2 + mu_y**2 + c1) * (sigma_x + sigma_y + c2)
    return float((numerator / denominator).mean())


def adherence(images, prompts: list[str]) -> float:
    """Share of images whose colour, shape and background match their prompt (embedded model only)."""
    return grammar.adherence([to_array(image) for image in images], prompts)


def is_adherence_prompt(prompt: str) -> bool:
    """Return whether the embedded model's checker can score this prompt."""
    return grammar.parse_caption(prompt) is not None
