"""Generation with the embedded model, in full precision and with GGUF, scored by the exact checker."""

import copy

import numpy as np
import pytest

from models.shapes import grammar
from plugins.gguf import GGUFOptions
from plugins.gguf import plugin as gguf_plugin
from quant import metrics
from quant.runtime import generate_many, with_denoiser

# 45 of the 90 adherence pairs (every other one), so each scene family is covered in half the time.
PAIRS = grammar.adherence_prompts()[::2]
PROMPTS = [prompt for prompt, _ in PAIRS]
SEEDS = [seed for _, seed in PAIRS]

# Measured on these 45 pairs in float32: adherence 1.00 in full precision, with Q8_0 and with Q4_0,
# mean PSNR against full precision 48.8 dB for Q8_0 and 26.3 dB for Q4_0. The floors leave a margin
# for float differences across machines (two misses of 45 for adherence).
FULL_ADHERENCE_FLOOR = 0.95
Q8_0_ADHERENCE_FLOOR = 0.95
Q4_0_ADHERENCE_FLOOR = 0.90
Q8_0_PSNR_FLOOR = 42.0
Q4_0_PSNR_FLOOR = 22.0


@pytest.fixture(scope="module")
def full_images(embedded):
    return generate_many(embedded, PROMPTS, SEEDS)


def _quantized_images(embedded, qtype):
    unet, _ = gguf_plugin.quantize(copy.deepcopy(embedded.denoiser), GGUFOptions(qtype=qtype))
    return generate_many(with_denoiser(embedded, unet), PROMPTS, SEEDS)


def _mean_psnr(reference, images):
    return float(np.mean([min(metrics.psnr(a, b), 99.0) for a, b in zip(reference, images)]))


def test_full_precision_adherence(full_images):
    assert metrics.adherence(full_images, PROMPTS) >= FULL_ADHERENCE_FLOOR


def test_red_circle_on_blue(embedded):
    image = generate_many(embedded, ["a red circle on a blue background"], [0])[0]
    assert grammar.read_scene(np.asarray(image)) == grammar.Scene("red", "circle", "blue")


def test_gguf_q8_0_quality(embedded, full_images):
    images = _quantized_images(embedded, "Q8_0")
    assert metrics.adherence(images, PROMPTS) >= Q8_0_ADHERENCE_FLOOR
    assert _mean_psnr(full_images, images) >= Q8_0_PSNR_FLOOR


def test_gguf_q4_0_quality(embedded, full_images):
    images = _quantized_images(embedded, "Q4_0")
    assert metrics.adherence(images, PROMPTS) >= Q4_0_ADHERENCE_FLOOR
    assert _mean_psnr(full_images, images) >= Q4_0_PSNR_FLOOR
