"""Benchmark GGUF files: our loader, diffusers' GGUF loader and full precision, on the same files and inputs.

    python -m bench.gguf_bench                 # both models, writes bench/RESULTS.md
    python -m bench.gguf_bench --only embedded

For each type (Q8_0, Q4_K, Q4_0) the benchmark writes two files of one model:

- "linear": every linear layer quantized, convolutions kept in F32. diffusers 0.42 runs packed
  ``nn.Linear`` weights only, so this is the file both loaders read, side by side.
- "all": our default, convolutions quantized too. Only our loader reads it.

Each row loads one file in a fresh process, so its peak memory is its own. Our loader runs with
ggml's C dequantizers (the default on the CPU) and, on the embedded model, also with the PyTorch
dequantizers that GPUs use. The columns are weight bytes resident in the UNet, seconds per step,
the step time against full precision, and the peak process RSS during the steps. On the embedded
model they add the prompt adherence over the fixed 90-prompt set and PSNR and SSIM against full
precision on the same seeds. Every row computes in float32, the compute dtype the device probe
picks on CPUs without AVX512-BF16 or AMX.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from bench import cpu_name
from quant.files import release_freed_memory
from quant.runtime import PeakMemory

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
QTYPES = ("Q8_0", "Q4_K", "Q4_0")
# (file layout, loader, CPU dequantizer) of each quantized row.
LOADERS = {
    "embedded": [
        ("linear", "ours", "ggml"),
        ("linear", "diffusers", None),
        ("all", "ours", "ggml"),
        ("all", "ours", "torch"),
    ],
    "sd15": [("linear", "ours", "ggml"), ("linear", "diffusers", None), ("all", "ours", "ggml")],
}
SD15_STEPS = 3


# ---------------------------------------------------------------- models and files


def _embedded_unet() -> torch.nn.Module:
    from quant.runtime import load_pipeline

    return load_pipeline(None, dtype=torch.float32, device="cpu").pipeline.unet


def _sd15_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    # The SD1.5 UNet: diffusers' defaults are its architecture, with 768-wide text conditioning.
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval()
    for parameter in unet.parameters():  # random weights at the scale of trained ones
        torch.nn.init.normal_(parameter, std=0.02)
    return unet


def _base(model: str) -> torch.nn.Module:
    return _embedded_unet() if model == "embedded" else _sd15_unet()


def write_files(model: str, folder: Path) -> dict:
    """Quantize ``model`` to every type and layout, save the files and the model's config; return timings."""
    from plugins.gguf import GGUFOptions, plugin

    unet = _base(model)
    unet.save_config(folder / f"{model}-config")
    convolutions = tuple(name for name, module in unet.named_modules() if isinstance(module, torch.nn.Conv2d))
    seconds = {}
    for qtype in QTYPES:
        for layout, keep in (("linear", convolutions), ("all", ())):
            options = GGUFOptions(qtype=qtype, keep=keep)
            started = time.perf_counter()
            quantized, report = plugin.quantize(_base(model), options)
            seconds[f"{qtype}-{layout}"] = time.perf_counter() - started
            plugin.save(quantized, report, options, folder / f"{model}-{qtype}-{layout}.gguf")
            del quantized
    return seconds


def _load(model: str, qtype: str, layout: str, loader: str, folder: Path) -> tuple[torch.nn.Module, float]:
    """Load one file with one loader; return the UNet and its bits per quantized weight."""
    path = folder / f"{model}-{qtype}-{layout}.gguf"
    if loader == "ours":
        from plugins.gguf import plugin

        unet, report = plugin.load(path, _base(model))
        return unet, report.bits_per_weight

    from diffusers import GGUFQuantizationConfig, UNet2DConditionModel
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    from quant.formats import gguf_names

    checkpoint = load_gguf_checkpoint(str(path))
    if model == "sd15":  # diffusers' LDM converter reads only names under this prefix
        checkpoint = {gguf_names.LDM_PREFIX + name: value for name, value in checkpoint.items()}
    unet = UNet2DConditionModel.from_single_file(
        checkpoint,
        config=str(folder / f"{model}-config"),
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        local_files_only=True,
    )
    packed = [value for value in checkpoint.values() if hasattr(value, "quant_type")]
    packed_bytes = sum(value.numel() for value in packed)
    values = 0
    for value in packed:
        block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(value.quant_type)]
        values += value.numel() // type_size * block_size
    return unet.eval(), 8 * packed_bytes / values if values else 0.0


# ---------------------------------------------------------------- one row, in its own process


def run_row(model: str, variant: str, folder: Path) -> dict:
    from quant.layers import weight_bytes

    if variant == "full":
        unet, bits = _base(model), 32.0
    else:
        qtype, layout, loader, dequantizer = variant.split("/")
        try:
            unet, bits = _load(model, qtype, layout, loader, folder)
            release_freed_memory()
        except (ValueError, RuntimeError, KeyError) as error:
            if loader != "diffusers":
                raise
            return {"variant": variant, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:400]}"}
    row = {"variant": variant, "unet_bytes": weight_bytes(unet), "bits_per_weight": bits}
    if model == "embedded":
        row |= _run_embedded(unet, folder / f"embedded-{variant.replace('/', '-')}.npy")
    else:
        row |= _run_sd15(unet)
    return row


def _run_embedded(unet: torch.nn.Module, images_path: Path) -> dict:
    from models.shapes import grammar
    from quant.runtime import GenerationRequest, PipelineCache, generate, generate_many

    loaded = PipelineCache().get(None, torch.float32)
    loaded.pipeline.unet = unet
    pairs = grammar.adherence_prompts()
    prompts, seeds = [prompt for prompt, _ in pairs], [seed for _, seed in pairs]
    images = generate_many(loaded, prompts, seeds)
    times = []
    with PeakMemory("cpu") as memory:
        for seed in range(5):
            times.append(generate(loaded, GenerationRequest(prompt=prompts[seed], seed=seed)).seconds)
    arrays = np.stack([np.asarray(image) for image in images])
    np.save(images_path, arrays)
    return {
        "seconds_per_step": statistics.median(times) / 20,
        "peak_rss": memory.peak,
        "adherence": grammar.adherence(list(arrays), prompts),
    }


def _run_sd15(unet: torch.nn.Module) -> dict:
    latents = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(1))  # guidance batch, 512 px
    text = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(2))
    times = []
    with torch.inference_mode(), PeakMemory("cpu") as memory:
        for step in range(SD15_STEPS):
            started = time.perf_counter()
            output = unet(latents, 999 - step, text).sample
            times.append(time.perf_counter() - started)
    return {
        "seconds_per_step": statistics.median(times),
        "peak_rss": memory.peak,
        "checksum": float(output.abs().mean()),
    }


def _child(args: list[str], out: Path, env: dict | None = None) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "bench.gguf_bench", "--child", *args, str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if result.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


# ---------------------------------------------------------------- tables


def _variants(model: str) -> list[str]:
    rows = ["full"]
    for qtype in QTYPES:
        rows += [f"{qtype}/{layout}/{loader}/{dequantizer}" for layout, loader, dequantizer in LOADERS[model]]
    return rows


def _label(variant: str) -> tuple[str, str]:
    """Return the file and loader columns of a row."""
    if variant == "full":
        return "full precision", ""
    qtype, layout, loader, dequantizer = variant.split("/")
    convolutions = "convolutions F32" if layout == "linear" else "convolutions quantized"
    return f"{qtype}, {convolutions}", "diffusers" if loader == "diffusers" else f"ours, {dequantizer} dequantizer"


def _quality(rows: list[dict], folder: Path) -> None:
    from quant.metrics import psnr, ssim

    reference = np.load(folder / "embedded-full.npy")
    for row in rows:
        if "error" in row:
            continue
        images = np.load(folder / f"embedded-{row['variant'].replace('/', '-')}.npy")
        row["psnr"] = statistics.mean(min(psnr(a, b), 99.0) for a, b in zip(reference, images))
        row["ssim"] = statistics.mean(ssim(a, b) for a, b in zip(reference, images))


def _table(model: str, rows: list[dict]) -> str:
    full = rows[0]
    by_variant = {row["variant"]: row for row in rows}
    head = "| file | loader | UNet bytes | bits per weight | s per step | vs full | vs diffusers | peak RSS |"
    if model == "embedded":
        head += " adherence | PSNR (dB) | SSIM |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        file, loader = _label(row["variant"])
        if "error" in row:
            lines.append(f"| {file} | {loader} | cannot load the file: {row['error']} |")
            continue
        peer = None
        if row["variant"] != "full":
            peer = by_variant.get(row["variant"].split("/")[0] + "/linear/diffusers/None")
        versus_peer = ""
        if peer is not None and peer is not row and "error" not in peer:
            versus_peer = f"{row['seconds_per_step'] / peer['seconds_per_step']:.2f}x"
        line = (
            f"| {file} | {loader} | {row['unet_bytes'] / 1e6:.1f} MB | {row['bits_per_weight']:.2f} | "
            f"{row['seconds_per_step']:.3f} | {row['seconds_per_step'] / full['seconds_per_step']:.2f}x | "
            f"{versus_peer} | {row['peak_rss'] / 2**20:.0f} MiB |"
        )
        if model == "embedded":
            quality = "reference | 1.0000" if row["variant"] == "full" else f"{row['psnr']:.2f} | {row['ssim']:.4f}"
            line += f" {row['adherence']:.3f} | {quality} |"
        lines.append(line)
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


TITLES = {
    "embedded": "Embedded shapes model, 20 steps, guidance 4, 90 prompts (seconds per step: median of 5 images / 20)",
    "sd15": f"SD1.5 UNet (random weights), 512 x 512, batch 2, median of {SD15_STEPS} steps",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["embedded", "sd15"], help="run one model only")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / ".work", help="folder for files and raw results")
    args = parser.parse_args()

    if args.child:
        *child_args, out = args.child
        if child_args[0] == "files":
            result = write_files(child_args[1], args.work)
        else:
            result = run_row(child_args[1], child_args[2], args.work)
        Path(out).write_text(json.dumps(result))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    models = [args.only] if args.only else ["embedded", "sd15"]
    sections = _previous_sections() if args.only else {}
    for model in models:
        quantize_seconds = _child(["files", model], args.work / f"{model}-files.json")
        rows = []
        for variant in _variants(model):
            dequantizer = variant.split("/")[-1] if variant != "full" else None
            env = {"LOWBIT_GGUF_CPU_DEQUANTIZER": dequantizer} if dequantizer in ("ggml", "torch") else {}
            out = args.work / f"{model}-{variant.replace('/', '-')}.json"
            rows.append(_child(["row", model, variant], out, env))
            print(model, variant, rows[-1].get("seconds_per_step", rows[-1].get("error")), flush=True)
        if model == "embedded":
            _quality(rows, args.work)
        times = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in quantize_seconds.items())
        sections[TITLES[model]] = f"### {TITLES[model]}\n\n{_table(model, rows)}\n\nQuantize times: {times}.\n"
        print(sections[TITLES[model]], flush=True)

    cpu = cpu_name()
    header = (
        f"Measured with `python -m bench.gguf_bench` on {cpu}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, float32 compute, {time.strftime('%Y-%m-%d')}.\n"
    )
    # The hand-written "## Notes" section of the previous results is kept below the new tables.
    notes = ""
    if RESULTS.is_file() and "\n## Notes" in RESULTS.read_text():
        notes = "\n## Notes" + RESULTS.read_text().split("\n## Notes", 1)[1]
    RESULTS.write_text("# GGUF benchmark\n\n" + header + "\n" + "\n".join(sections.values()) + notes)


if __name__ == "__main__":
    main()
