"""A few steps of the embedded model's training recipe, end to end into a loadable pipeline."""

import subprocess
import sys
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from transformers import CLIPTokenizer

from models.shapes import MODEL_DIR, grammar
from models.shapes.train import MAX_TOKENS, build_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def test_tokenizer_rebuilds_shipped_one():
    shipped = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")
    built = build_tokenizer()
    for scene in grammar.all_scenes():
        caption = scene.caption()
        assert built(caption).input_ids == shipped(caption).input_ids, caption


def test_tokenizer_word_lengths():
    tokenizer = build_tokenizer()
    for word in ["a", "on", "background", "red", "blue", "yellow", "white", "black", *grammar.SHAPES]:
        assert len(tokenizer(word).input_ids) == 3, word
    assert len(tokenizer("green").input_ids) == 6
    longest = max(len(tokenizer(scene.caption()).input_ids) for scene in grammar.all_scenes())
    assert longest <= MAX_TOKENS


def test_tokenizer_encodes_unknown_words_by_bytes():
    tokenizer = build_tokenizer()
    ids = tokenizer("purple").input_ids
    assert len(ids) == 2 + len("purple")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "purple"


def test_recipe_runs_and_saves_loadable_pipeline(tmp_path):
    out = tmp_path / "weights"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "models.shapes.train",
            "--out",
            str(out),
            "--vae-steps",
            "2",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--eval-every",
            "2",
            "--eval-prompts",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    pipeline = DiffusionPipeline.from_pretrained(out)
    image = pipeline(
        "a red circle on a blue background", num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (grammar.IMAGE_SIZE, grammar.IMAGE_SIZE)
    assert (out / "training.json").is_file()
