"""PNG metadata in the A1111 convention: a ``parameters`` text chunk that other tools read back.

The chunk reads like this, with our plugin and its options appended as extra key-value pairs:

    a red circle on a blue background
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, CFG scale: 4.0, Seed: 0, Size: 32x32, Model: embedded,
    Quantization: gguf, Quantization options: {"qtype": "Q4_0", "version": 1}
"""

import io
import json
from pathlib import Path

from PIL import Image, PngImagePlugin

from quant.files import atomic_path


def parameters_text(prompt: str, negative_prompt: str, settings: dict[str, object]) -> str:
    """Format generation settings as A1111's ``parameters`` text."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    pairs = []
    for key, value in settings.items():
        text = json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)
        if "," in text and not isinstance(value, dict):
            text = json.dumps(text)
        pairs.append(f"{key}: {text}")
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def png_bytes(image: Image.Image, parameters: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Image.Image, path: Path, parameters: str) -> None:
    """Save an image with its ``parameters`` chunk, atomically (temporary file, then rename)."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(png_bytes(image, parameters))


def read_parameters(path: Path) -> str | None:
    with Image.open(path) as image:
        return image.info.get("parameters")
