"""Benchmark GGUF block types against full precision on the embedded model and a full-size SD1.5 UNet.

    python -m bench.gguf_bench                 # both, writes bench/RESULTS.md
    python -m bench.gguf_bench --only embedded

Every variant runs in a fresh process, so peak memory belongs to that variant alone. The columns are
weight bytes resident (all pipeline components, or the UNet alone for SD1.5), bits per quantized
weight, seconds per denoising step and peak process RSS. On the embedded model they add the prompt
adherence over the fixed 90-prompt set, and PSNR and SSIM against full precision on the same seeds.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from quant.runtime import PeakMemory

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("full", "Q8_0", "Q5_1", "Q4_0")
# The embedded model also runs in bfloat16, to measure what that compute dtype costs in quality.
EMBEDDED_VARIANTS = ("full", "full-bf16", *VARIANTS[1:])
RESULTS = ROOT / "bench" / "RESULTS.md"


def _quantize(part: torch.nn.Module, variant: str):
    from plugins.gguf import GGUFOptions, plugin

    if variant.startswith("full"):
        return part, 8.0 * next(part.parameters()).element_size()
    part, report = plugin.quantize(part, GGUFOptions(qtype=variant))
    return part, report.bits_per_weight


def run_embedded(variant: str, out: Path) -> dict:
    from models.shapes import grammar
    from quant.layers import weight_bytes
    from quant.runtime import GenerationRequest, PipelineCache, generate, generate_many, pipeline_weight_bytes

    loaded = PipelineCache().get(None, torch.bfloat16 if variant == "full-bf16" else torch.float32)
    loaded.pipeline.unet, bits = _quantize(loaded.pipeline.unet, variant)

    pairs = grammar.adherence_prompts()
    prompts, seeds = [p for p, _ in pairs], [s for _, s in pairs]
    with PeakMemory("cpu") as memory:
        images = generate_many(loaded, prompts, seeds)
        times = []
        for seed in range(5):
            result = generate(loaded, GenerationRequest(prompt=prompts[seed], seed=seed))
            times.append(result.seconds)
    arrays = np.stack([np.asarray(image) for image in images])
    np.save(out.with_suffix(".npy"), arrays)
    return {
        "variant": variant,
        "weight_bytes": pipeline_weight_bytes(loaded.pipeline),
        "unet_bytes": weight_bytes(loaded.pipeline.unet),
        "bits_per_weight": bits,
        "seconds_per_image": statistics.median(times),
        "seconds_per_step": statistics.median(times) / 20,
        "peak_rss": memory.peak,
        "adherence": grammar.adherence(list(arrays), prompts),
    }


def run_sd15(variant: str, out: Path, steps: int = 3) -> dict:
    from diffusers import UNet2DConditionModel

    from quant.layers import weight_bytes

    torch.manual_seed(0)
    # The SD1.5 UNet: diffusers' defaults are its architecture, with 768-wide text conditioning.
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval()
    for parameter in unet.parameters():  # random weights at the scale of trained ones
        torch.nn.init.normal_(parameter, std=0.02)
    started = time.perf_counter()
    unet, bits = _quantize(unet, variant)
    quantize_seconds = time.perf_counter() - started
    latents = torch.randn(2, 4, 64, 64)  # batch 2: classifier-free guidance at 512 x 512 pixels
    text = torch.randn(2, 77, 768)
    times = []
    with torch.inference_mode(), PeakMemory("cpu") as memory:
        for step in range(steps):
            started = time.perf_counter()
            unet(latents, 999 - step, text)
            times.append(time.perf_counter() - started)
    return {
        "variant": variant,
        "weight_bytes": weight_bytes(unet),
        "bits_per_weight": bits,
        "seconds_per_step": statistics.median(times),
        "peak_rss": memory.peak,
        "quantize_seconds": quantize_seconds,
    }


def _child(model: str, variant: str, out: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "bench.gguf_bench", "--child", model, variant, str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if result.returncode:
        raise RuntimeError(f"{model} {variant} failed:\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def _quality(folder: Path) -> dict[str, tuple[float, float]]:
    from quant.metrics import psnr, ssim

    reference = np.load(folder / "embedded-full.npy")
    scores = {}
    for variant in EMBEDDED_VARIANTS:
        images = np.load(folder / f"embedded-{variant}.npy")
        scores[variant] = (
            statistics.mean(min(psnr(a, b), 99.0) for a, b in zip(reference, images)),
            statistics.mean(ssim(a, b) for a, b in zip(reference, images)),
        )
    return scores


def _table(rows: list[dict], embedded: bool, quality: dict | None) -> str:
    baseline = rows[0]
    if embedded:
        lines = [
            "| variant | weight bytes (pipeline) | UNet bytes | bits per weight | s per image | s per step | "
            "peak RSS | adherence | PSNR (dB) | SSIM |",
            "|" + "---|" * 10,
        ]
    else:
        lines = [
            "| variant | UNet bytes | bits per weight | s per step | step time vs full | peak RSS | quantize time |",
            "|" + "---|" * 7,
        ]
    for row in rows:
        if embedded:
            p, s = quality[row["variant"]]
            lines.append(
                f"| {row['variant']} | {row['weight_bytes'] / 1e6:.2f} MB | {row['unet_bytes'] / 1e6:.2f} MB | "
                f"{row['bits_per_weight']:.2f} | {row['seconds_per_image']:.3f} | "
                f"{row['seconds_per_step'] * 1000:.1f} ms | "
                f"{row['peak_rss'] / 2**20:.0f} MiB | {row['adherence']:.3f} | "
                f"{'reference' if row['variant'] == 'full' else f'{p:.2f}'} | {s:.4f} |"
            )
        else:
            lines.append(
                f"| {row['variant']} | {row['weight_bytes'] / 1e9:.3f} GB | {row['bits_per_weight']:.2f} | "
                f"{row['seconds_per_step']:.2f} | {row['seconds_per_step'] / baseline['seconds_per_step']:.2f}x | "
                f"{row['peak_rss'] / 2**30:.2f} GiB | {row['quantize_seconds']:.0f} s |"
            )
    return "\n".join(lines)


def _previous_sections() -> dict[str, str]:
    """Return the tables of the last results page by title, so that ``--only`` replaces just its own."""
    if not RESULTS.is_file():
        return {}
    body = RESULTS.read_text().split("\n## Notes", 1)[0]
    sections = {}
    for chunk in body.split("\n### ")[1:]:
        title = chunk.split("\n", 1)[0]
        sections[title] = f"### {chunk.rstrip()}\n"
    return sections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["embedded", "sd15"], help="run one model only")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "VARIANT", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / ".work", help="folder for raw results")
    args = parser.parse_args()

    if args.child:
        model, variant, out = args.child
        runner = run_embedded if model == "embedded" else run_sd15
        Path(out).write_text(json.dumps(runner(variant, Path(out))))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    models = [args.only] if args.only else ["embedded", "sd15"]
    sections = _previous_sections() if args.only else {}
    for model in models:
        variants = EMBEDDED_VARIANTS if model == "embedded" else VARIANTS
        rows = [_child(model, variant, args.work / f"{model}-{variant}.json") for variant in variants]
        quality = _quality(args.work) if model == "embedded" else None
        title = (
            "Embedded shapes model, 20 steps, guidance 4, 90 prompts"
            if model == "embedded"
            else "SD1.5-architecture UNet (random weights), 512 x 512, batch 2, median of 3 steps"
        )
        sections[title] = f"### {title}\n\n{_table(rows, model == 'embedded', quality)}\n"
        print(sections[title], flush=True)

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    header = (
        f"Measured with `python -m bench.gguf_bench` on {cpu}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, float32 compute unless the variant says bf16, {time.strftime('%Y-%m-%d')}.\n"
    )
    # The hand-written "## Notes" section of the previous results is kept below the new tables.
    notes = ""
    if RESULTS.is_file() and "\n## Notes" in RESULTS.read_text():
        notes = "\n## Notes" + RESULTS.read_text().split("\n## Notes", 1)[1]
    RESULTS.write_text("# GGUF benchmark\n\n" + header + "\n" + "\n".join(sections.values()) + notes)


if __name__ == "__main__":
    main()
