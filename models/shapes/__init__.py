"""The embedded text-to-image model: coloured shapes on coloured backgrounds."""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "weights"
MODEL_ID = "lowbit/tiny-shapes"
