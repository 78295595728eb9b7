"""Time one UNet step at SD1.5 width in float32, bfloat16, simulated W8A8 and int8 W8A8 on the CPU.

    python -m bench.int8_bench                                  # SD1.5 width, writes bench/INT8.md
    python -m bench.int8_bench --width-divisor 10 --latent-size 16 --out /tmp/int8.md   # a quick run

The UNet is diffusers' ``UNet2DConditionModel`` with the SD1.5 config, built from code with random
weights (seed 0), so no download is needed. One step is one UNet call on a batch of 2 (classifier-free
guidance runs the unconditional and the conditional half together) with 64 x 64 latents, 77 text
tokens of width 768 and timestep 500. ``--width-divisor`` divides the channel widths and
``--latent-size`` sets the latent side, for a quick run that proves the script works.

The W8A8 rows quantize with round-to-nearest ranges and need no calibration data. Weights get
min-max ranges per output channel, and activations get min-max ranges per tensor, observed on one
random call. The decoder's skip convolutions are split as Q-Diffusion splits them, and attention
probabilities stay at 16 bits. Both W8A8 rows therefore run attention through
``QuantAttnProcessor``, an explicit softmax with quantized query, key and value. The float32 rows
use diffusers' default processor (scaled dot-product attention). The row "float32, explicit
attention" runs float32 with the explicit processor, to separate the cost of attention from that of
the int8 layers.

Each time is the median of ``--repeats`` calls after one warm-up call. Per-layer times cover the
convolution and the linear layer with the most multiply-adds in one step, on their inputs recorded
in that step. Memory: the float32 SD1.5 UNet takes 3.4 GB, and building the W8A8 model briefly keeps
a second float copy of the weights.
"""

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from torch import nn

from bench import cpu_name
from quant.layers import weight_bytes
from quant.qdiffusion import int8
from quant.qdiffusion.modules import (
    activation_quantizers,
    attach,
    find_skip_splits,
    quant_layers,
    set_activation_quantization,
)
from quant.qdiffusion.quantizers import TimestepGroups

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "INT8.md"
ROWS = ("float32", "float32-explicit-attention", "bfloat16", "simulated", "int8")
ROW_LABELS = {
    "float32": "float32",
    "float32-explicit-attention": "float32, explicit attention",
    "bfloat16": "bfloat16",
    "simulated": "simulated W8A8",
    "int8": "int8 W8A8",
}
# stable-diffusion-v1-5 unet/config.json
SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
BATCH = 2
TEXT_TOKENS = 77
TIMESTEP = 500.0


# ---------------------------------------------------------------- model and inputs


def unet_config(width_divisor: int, latent_size: int) -> dict:
    """Return the SD1.5 UNet config with channel widths divided by ``width_divisor``."""
    groups = SD15_UNET["norm_num_groups"]
    originals = SD15_UNET["block_out_channels"]
    if width_divisor < 1 or any(width % width_divisor or width // width_divisor % groups for width in originals):
        raise SystemExit(
            f"--width-divisor {width_divisor} does not give widths that are multiples of {groups} "
            "(GroupNorm's group count); use 1, 2, 5 or 10"
        )
    if latent_size < 8 or latent_size % 8:
        raise SystemExit(f"--latent-size {latent_size} must be a multiple of 8, because the UNet halves it three times")
    widths = [width // width_divisor for width in originals]
    return {**SD15_UNET, "block_out_channels": widths, "sample_size": latent_size}


def make_inputs(config: dict, dtype: torch.dtype = torch.float32) -> dict:
    generator = torch.Generator().manual_seed(1)
    side = config["sample_size"]
    return {
        "sample": torch.randn(BATCH, config["in_channels"], side, side, generator=generator).to(dtype),
        "timestep": torch.tensor([TIMESTEP]),
        "encoder_hidden_states": torch.randn(BATCH, TEXT_TOKENS, config["cross_attention_dim"], generator=generator).to(
            dtype
        ),
    }


def largest_layers(unet: nn.Module, inputs: dict) -> dict[str, tuple[str, tuple, int]]:
    """Return, for "conv" and "linear", the layer with the most multiply-adds in one call: (name, input shape, MACs)."""
    found: dict[str, tuple[str, tuple, int]] = {}

    def record(name: str):
        def hook(module, args, output):
            if isinstance(module, nn.Conv2d):
                kind, per_output = (
                    "conv",
                    module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1],
                )
            else:
                kind, per_output = "linear", module.in_features
            macs = output.numel() * per_output
            if kind not in found or macs > found[kind][2]:
                found[kind] = (name, tuple(args[0].shape), macs)

        return hook

    handles = [
        module.register_forward_hook(record(name))
        for name, module in unet.named_modules()
        if type(module) in (nn.Conv2d, nn.Linear)
    ]
    try:
        with torch.no_grad():
            unet(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return found


def quantize_w8a8(unet: nn.Module, inputs: dict, record: list[str]) -> dict[str, torch.Tensor]:
    """Turn ``unet`` into simulated W8A8 with round-to-nearest ranges, in place, and return recorded inputs.

    Activation ranges are observed on one call with ``inputs``. The returned dict maps each layer
    named in ``record`` to a copy of its input in that call.
    """
    groups = TimestepGroups([(999.0, 0.0)], [TIMESTEP])
    splits = find_skip_splits(unet, lambda: unet(**inputs))
    attach(unet, weight_bits=8, activation_bits=8, softmax_bits=16, groups=groups, splits=splits)
    for layer in quant_layers(unet).values():
        layer.init_weight_ranges(search=False)
        layer.quantize_weights = True
        layer.finalize()

    recorded: dict[str, torch.Tensor] = {}
    handles = [
        unet.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: recorded.setdefault(name, args[0].detach().clone())
        )
        for name in record
    ]
    quantizers = activation_quantizers(unet)
    for quantizer in quantizers:
        quantizer.observe(True)
    try:
        with torch.no_grad():
            unet(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    for quantizer in quantizers:
        quantizer.init_range(search=False)
    set_activation_quantization(unet, True)
    return recorded


# ---------------------------------------------------------------- timing


def median_seconds(call, repeats: int) -> float:
    """Return the median wall time of ``repeats`` calls of ``call`` after one warm-up call."""
    with torch.no_grad():
        call()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def time_step(unet: nn.Module, inputs: dict, repeats: int) -> tuple[float, torch.Tensor]:
    seconds = median_seconds(lambda: unet(**inputs), repeats)
    with torch.no_grad():
        output = unet(**inputs, return_dict=False)[0]
    return seconds, output.float()


def time_layer(
    float_module: nn.Module,
    simulated: nn.Module,
    converted: int8.Int8Layer,
    x: torch.Tensor,
    repeats: int,
    with_bfloat16: bool,
) -> dict[str, float]:
    """Return milliseconds per call of one layer in each form, and of the int8 layer's two main parts."""
    times = {"float32": median_seconds(lambda: float_module(x), repeats)}
    if with_bfloat16:
        bfloat16_module = copy.deepcopy(float_module).to(torch.bfloat16)
        x_bfloat16 = x.to(torch.bfloat16)
        times["bfloat16"] = median_seconds(lambda: bfloat16_module(x_bfloat16), repeats)
    times["simulated"] = median_seconds(lambda: simulated(x), repeats)
    times["int8"] = median_seconds(lambda: converted(x), repeats)
    if not converted.split:
        part, quantizer = converted.weights[0], converted.input_quantizers[0]
        group = quantizer.groups.index
        scale, zero_point = float(quantizer.scales[group]), int(quantizer.zero_points[group])
        memory_format = torch.channels_last if converted.is_conv else torch.contiguous_format
        codes = int8.quantize_activation(x, scale, zero_point, memory_format)
        times["quantize"] = median_seconds(
            lambda: int8.quantize_activation(x, scale, zero_point, memory_format), repeats
        )
        times["kernel"] = median_seconds(lambda: part.kernel(codes, scale, zero_point), repeats)
    return {key: 1000 * seconds for key, seconds in times.items()}


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output - reference).norm() / reference.norm())


# ---------------------------------------------------------------- results page


def step_table(steps: dict[str, dict]) -> str:
    base = steps.get("float32", {}).get("seconds")
    lines = [
        "| row | s / step | vs float32 | weight bytes | output difference to simulated W8A8 |",
        "|---|---|---|---|---|",
    ]
    for row, result in steps.items():
        speed = f"{base / result['seconds']:.2f}x" if base else ""
        difference = "reference" if row == "simulated" else f"{result.get('error', float('nan')):.2%}"
        lines.append(
            f"| {ROW_LABELS[row]} | {result['seconds']:.2f} | {speed} | {result['bytes'] / 1e6:.0f} MB | {difference} |"
        )
    return "\n".join(lines)


def layer_table(layers: dict[str, dict]) -> str:
    lines = [
        "| layer | weight | input | GMAC | float32 ms | bfloat16 ms | simulated ms | int8 ms | "
        "int8: quantize input ms | int8: kernel ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in layers.items():
        times = result["ms"]
        columns = ("float32", "bfloat16", "simulated", "int8", "quantize", "kernel")
        cells = " | ".join(f"{times[key]:.1f}" if key in times else "not run" for key in columns)
        shapes = f"{list(result['weight_shape'])} | {list(result['input_shape'])}"
        lines.append(f"| `{name}` | {shapes} | {result['macs'] / 1e9:.2f} | {cells} |")
    return "\n".join(lines)


def write_page(path: Path, header: str, steps: dict, layers: dict) -> None:
    notes = ""
    if path.is_file() and "\n## Notes" in path.read_text():
        notes = "\n## Notes" + path.read_text().split("\n## Notes", 1)[1]
    text = (
        "# int8 W8A8 benchmark\n\n" + header + "\n## One UNet step\n\n" + step_table(steps) + "\n"
        "\n## Largest layers\n\n" + layer_table(layers) + "\n" + notes
    )
    path.write_text(text)


# ---------------------------------------------------------------- entry point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--width-divisor", type=int, default=1, help="divide the SD1.5 channel widths by this (1, 2, 5 or 10)"
    )
    parser.add_argument(
        "--latent-size", type=int, default=64, help="latent height and width (default 64, a 512 px image)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed calls per measurement after one warm-up (default 3)"
    )
    parser.add_argument(
        "--weight-mode",
        default="auto",
        choices=int8.WEIGHT_MODES,
        help="how int8.convert passes the weight codes to the kernels (default auto)",
    )
    parser.add_argument(
        "--rows", nargs="+", choices=ROWS, default=list(ROWS), help="UNet step rows to time (default all)"
    )
    parser.add_argument("--threads", type=int, help="PyTorch threads (default: PyTorch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results page to write")
    args = parser.parse_args()
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    ok, reason = int8.available()
    if not ok:
        raise SystemExit(f"int8 kernels are not available: {reason}")

    config = unet_config(args.width_divisor, args.latent_size)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).eval()
    unet.requires_grad_(False)
    inputs = make_inputs(config)
    steps: dict[str, dict] = {}

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    native_bfloat16 = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    if "bfloat16" in args.rows and not native_bfloat16:
        # NOTE: on an AVX2 CPU (AMD EPYC, Zen 1), a bfloat16 3x3 convolution with 320 channels at 32 x 32
        # took 76 times as long as in float32.
        log("this CPU has no AVX512-BF16 or AMX, so bfloat16 rows can take many times as long as float32")

    largest = largest_layers(unet, inputs)
    float_modules = {name: copy.deepcopy(unet.get_submodule(name)) for name, _, _ in largest.values()}
    if "float32" in args.rows:
        seconds, output = time_step(unet, inputs, args.repeats)
        steps["float32"] = {"seconds": seconds, "bytes": weight_bytes(unet), "output": output}
        log(f"float32: {seconds:.2f} s per step")
    if "float32-explicit-attention" in args.rows:
        explicit = copy.deepcopy(unet)
        explicit.set_attn_processor(AttnProcessor())
        seconds, output = time_step(explicit, inputs, args.repeats)
        steps["float32-explicit-attention"] = {"seconds": seconds, "bytes": weight_bytes(explicit), "output": output}
        del explicit
        log(f"float32, explicit attention: {seconds:.2f} s per step")
    if "bfloat16" in args.rows:
        half = copy.deepcopy(unet).to(torch.bfloat16)
        seconds, output = time_step(half, make_inputs(config, torch.bfloat16), args.repeats)
        steps["bfloat16"] = {"seconds": seconds, "bytes": weight_bytes(half), "output": output}
        del half
        log(f"bfloat16: {seconds:.2f} s per step")

    recorded = quantize_w8a8(unet, inputs, [name for name, _, _ in largest.values()])
    simulated_layers = {name: unet.get_submodule(name) for name, _, _ in largest.values()}
    seconds, simulated_output = time_step(unet, inputs, args.repeats)
    steps["simulated"] = {"seconds": seconds, "bytes": weight_bytes(unet), "output": simulated_output}
    log(f"simulated W8A8: {seconds:.2f} s per step")
    report = int8.convert(unet, args.weight_mode)
    log(report.summary())
    if "int8" in args.rows:
        seconds, output = time_step(unet, inputs, args.repeats)
        steps["int8"] = {"seconds": seconds, "bytes": weight_bytes(unet), "output": output}
        log(f"int8 W8A8: {seconds:.2f} s per step")
    if "simulated" not in args.rows:
        del steps["simulated"]
    for result in steps.values():
        result["error"] = relative_error(result["output"], simulated_output)

    layers = {}
    for kind, (name, input_shape, macs) in largest.items():
        converted = unet.get_submodule(name)
        if not isinstance(converted, int8.Int8Layer):
            log(f"{kind} {name}: not timed, because it stays simulated: {report.skipped.get(name)}")
            continue
        times = time_layer(
            float_modules[name],
            simulated_layers[name],
            converted,
            recorded[name],
            args.repeats,
            "bfloat16" in args.rows,
        )
        layers[name] = {"weight_shape": converted.weight_shape, "input_shape": input_shape, "macs": macs, "ms": times}
        log(f"{kind} {name}: " + ", ".join(f"{key} {value:.1f} ms" for key, value in times.items()))

    flags = "AVX-512 VNNI or AMX" if int8.has_int8_dot_product() else "no AVX-512 VNNI or AMX"
    command = " ".join(["python -m bench.int8_bench", *sys.argv[1:]])
    header = (
        f"Measured with `{command}` on {cpu_name()} ({os.cpu_count()} logical CPUs, PyTorch threads: "
        f"{torch.get_num_threads()}, {torch.backends.cpu.get_cpu_capability()}, {flags}), torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}. UNet: SD1.5 config, channels {config['block_out_channels']}, random "
        f"weights; batch {BATCH}, {config['sample_size']} x {config['sample_size']} latents, {TEXT_TOKENS} text "
        f"tokens. int8 weight mode: {report.weight_mode}. Times are medians of {args.repeats} calls after a "
        "warm-up; the last column is the relative L2 difference of the UNet output.\n"
    )
    write_page(args.out, header, steps, layers)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
