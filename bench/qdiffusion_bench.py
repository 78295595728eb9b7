"""Benchmark Q-Diffusion on the embedded model against full precision and round to nearest.

    python -m bench.qdiffusion_bench                   # every row, writes bench/QDIFFUSION.md
    python -m bench.qdiffusion_bench --rows full qd-w4a8 --prompts 30 --out /tmp/table.md

Every row generates the 90 adherence prompts (seed = prompt index, 20 steps, guidance 4, the
model's scheduler) and scores them with the embedded model's checker. PSNR and SSIM compare each
image with the full-precision image of the same seed, averaged over the images. Weight bytes are
the bytes resident in the UNet (integer codes, quantizer parameters, and the biases and norms that
stay in float32). Seconds per image is the wall time of the whole prompt set, generated 32 images per
pipeline call, divided by the image count. Calibration time includes sampling the calibration data.
Rows are calibrated one after another in this process, and each row's raw figures are written to
``bench/.work`` so that a later ``--rows`` run can rebuild the table from them.
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench import cpu_name
from models.shapes import grammar
from plugins import studio
from plugins.registry import discover
from quant import metrics
from quant.layers import weight_bytes
from quant.runtime import PipelineCache, generate_many

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "QDIFFUSION.md"
STEPS, GUIDANCE = 20, 4.0
# label -> (plugin options, or None for full precision)
ROWS = {
    "full": ("full precision", None),
    "rtn-w8a8": ("round to nearest W8A8", {"bits": "W8A8", "method": "nearest"}),
    "rtn-w4a8": ("round to nearest W4A8", {"bits": "W4A8", "method": "nearest"}),
    "one-step-w4a8": ("Q-Diffusion W4A8, one-step calibration", {"bits": "W4A8", "calibration_steps": 1}),
    "qd-w8a8": ("Q-Diffusion W8A8", {"bits": "W8A8"}),
    "qd-w4a8": ("Q-Diffusion W4A8", {"bits": "W4A8"}),
    "qd-w4a8-grouped": ("Q-Diffusion W4A8, 4 timestep groups", {"bits": "W4A8", "grouped_ranges": True}),
    "qd-w4a16": ("Q-Diffusion W4A16 (weights only)", {"bits": "W4A16"}),
}


def run_row(name: str, prompt_count: int, work: Path) -> dict:
    label, options = ROWS[name]
    registry = discover()
    cache = PipelineCache()
    plugin = registry.get("full" if options is None else "qdiffusion")
    plugin_options = plugin.options_class.from_dict(options or {})
    loaded, report = studio.prepare(cache, None, plugin, plugin_options, dtype=torch.float32)

    pairs = grammar.adherence_prompts()[:prompt_count]
    prompts, seeds = [prompt for prompt, _ in pairs], [seed for _, seed in pairs]
    started = time.perf_counter()
    images = generate_many(loaded, prompts, seeds, steps=STEPS, guidance=GUIDANCE)
    seconds = time.perf_counter() - started
    arrays = np.stack([np.asarray(image) for image in images])
    np.save(work / f"qdiffusion-{name}.npy", arrays)
    row = {
        "name": name,
        "label": label,
        "options": plugin_options.to_dict(),
        "adherence": grammar.adherence(list(arrays), prompts),
        "weight_bytes": weight_bytes(loaded.denoiser),
        "seconds_per_image": seconds / len(prompts),
        "calibration_seconds": None if options is None else report.seconds,
        "prompts": len(prompts),
    }
    (work / f"qdiffusion-{name}.json").write_text(json.dumps(row))
    return row


def add_quality(rows: list[dict], work: Path) -> None:
    reference = np.load(work / "qdiffusion-full.npy")
    for row in rows:
        images = np.load(work / f"qdiffusion-{row['name']}.npy")
        count = min(len(images), len(reference))
        row["psnr"] = float(np.mean([metrics.psnr(reference[i], images[i]) for i in range(count)]))
        row["ssim"] = float(np.mean([metrics.ssim(reference[i], images[i]) for i in range(count)]))


def table(rows: list[dict]) -> str:
    lines = [
        "| row | adherence | PSNR (dB) | SSIM | weight bytes | s / image | calibration |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        quality = "reference | 1.0000" if row["name"] == "full" else f"{row['psnr']:.2f} | {row['ssim']:.4f}"
        calibration = "" if row["calibration_seconds"] is None else f"{row['calibration_seconds']:.0f} s"
        lines.append(
            f"| {row['label']} | {row['adherence']:.3f} | {quality} | {row['weight_bytes'] / 1e6:.2f} MB | "
            f"{row['seconds_per_image']:.3f} | {calibration} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rows", nargs="+", choices=list(ROWS), help="rows to run (default: all); others are read from --work"
    )
    parser.add_argument("--prompts", type=int, default=90, help="adherence prompts per row (default 90, the full set)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / ".work", help="folder for images and raw results")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results page to write")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name in args.rows or list(ROWS):
        row = run_row(name, args.prompts, args.work)
        print(f"{name}: adherence {row['adherence']:.3f}, {row['seconds_per_image']:.3f} s/image", flush=True)

    rows = [
        json.loads((args.work / f"qdiffusion-{name}.json").read_text())
        for name in ROWS
        if (args.work / f"qdiffusion-{name}.json").is_file()
    ]
    add_quality(rows, args.work)
    cpu = cpu_name()
    header = (
        f"Measured with `python -m bench.qdiffusion_bench` on {cpu}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} torch thread(s), float32 compute, "
        f"{time.strftime('%Y-%m-%d')}. Embedded shapes model, "
        f"{rows[0]['prompts']} adherence prompts, {STEPS} steps, guidance {GUIDANCE}; Q-Diffusion rows use the "
        "fast profile and the plugin's default options unless the row says otherwise.\n"
    )
    notes = ""
    if args.out.is_file() and "\n## Notes" in args.out.read_text():
        notes = "\n## Notes" + args.out.read_text().split("\n## Notes", 1)[1]
    args.out.write_text("# Q-Diffusion benchmark\n\n" + header + "\n" + table(rows) + "\n" + notes)
    print(table(rows))


if __name__ == "__main__":
    main()
