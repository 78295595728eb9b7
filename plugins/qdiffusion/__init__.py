"""Q-Diffusion plugin: timestep-aware post-training quantization of a diffusion UNet (W8A8, W4A8, W4A16).

Follows Q-Diffusion (Li et al., ICCV 2023, "Q-Diffusion: Quantizing Diffusion Models"): calibration
data from the whole sampling trajectory, AdaRound with BRECQ block reconstruction for the weights,
learned step sizes for 8-bit per-tensor activations, and split quantizers on the decoder's skip
convolutions. Beyond the paper, ``grouped_ranges`` gives each group of timesteps its own activation
ranges. The maths lives in ``quant.qdiffusion``; this module turns options into a calibration run
and a saved file.
"""

import copy
import logging
import time
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from plugins.base import CalibrationSource, Plugin, PluginOptions, Progress, QuantizeReport, option
from quant.layers import SwapReport
from quant.qdiffusion import artefact, int8
from quant.qdiffusion.calibration import calibration_prompts, capture, select_steps
from quant.qdiffusion.modules import (
    FULL_ACTIVATION_BITS,
    attach,
    find_skip_splits,
    quant_layers,
    set_activation_quantization,
)
from quant.qdiffusion.quantizers import TimestepGroups
from quant.qdiffusion.reconstruct import Calibrator, Schedule, calibrate

logger = logging.getLogger(__name__)

BITS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A16": (4, FULL_ACTIVATION_BITS)}
PROFILES = {
    # The official Stable Diffusion settings: hours per model on a GPU.
    "paper": Schedule(weight_iterations=20_000, activation_iterations=5_000, batch_size=8),
    # NOTE: iteration counts chosen so that the embedded model calibrates in minutes on two CPU cores.
    "fast": Schedule(weight_iterations=200, activation_iterations=100, batch_size=32),
}
SAMPLING_BATCH = 8  # prompts per full-precision sampling call while capturing calibration data


@dataclass(frozen=True)
class QDiffusionOptions(PluginOptions):
    bits: str = option(
        "W8A8",
        "bits of weights and activations: W8A8, W4A8, or W4A16 (4-bit weights, activations left unquantized)",
        choices=tuple(BITS),
    )
    method: str = option(
        "reconstruct",
        "reconstruct: Q-Diffusion (AdaRound and BRECQ block reconstruction, learned activation steps); "
        "nearest: the round-to-nearest baseline with min-max ranges",
        choices=("reconstruct", "nearest"),
    )
    profile: str = option(
        "fast",
        "paper: 20,000 weight and 5,000 activation iterations per block at batch 8, the official Stable "
        "Diffusion settings; fast: 200 and 100 at batch 32, a CPU-sized departure from the paper with "
        "about 1/100 of its weight iterations, which gives up some accuracy",
        choices=tuple(PROFILES),
    )
    calibration_prompts: int = option(
        8,
        "calibration prompts; with guidance each gives an unconditional and a conditional sample per step",
        minimum=1,
        maximum=1024,
    )
    sampling_steps: int = option(
        20, "steps of the full-precision sampling runs that record calibration data", minimum=1, maximum=500
    )
    calibration_steps: int = option(
        10,
        "sampling steps kept for calibration, spread evenly from the noisiest; 1 keeps only the noisiest "
        "(the paper's one-step baseline)",
        minimum=1,
        maximum=500,
    )
    calibration_guidance: float = option(
        4.0, "classifier-free guidance scale of the calibration sampling runs", minimum=0.0, maximum=50.0
    )
    grouped_ranges: bool = option(
        False, "give each group of timesteps its own activation ranges, chosen from the current timestep"
    )
    range_groups: int = option(4, "number of timestep groups when grouped_ranges is on", minimum=2, maximum=100)
    softmax_bits: int = option(
        16, "bits of the attention probabilities (16 leaves them practically exact)", choices=(8, 16)
    )
    split_shortcut: bool = option(
        True, "quantize the two halves of each decoder skip convolution's concatenated input separately"
    )
    weight_iterations: int = option(
        0, "weight reconstruction iterations per block; 0 takes the profile's", minimum=0, maximum=100_000
    )
    activation_iterations: int = option(
        0, "activation step-size iterations per block; 0 takes the profile's", minimum=0, maximum=100_000
    )
    kernels: str = option(
        "simulated",
        "simulated: quantize and dequantize around float32 matmuls, the reference on every device; int8: run "
        "W8A8 layers on oneDNN's int8 kernels (CPU only, output within about 2 percent of the simulated path on "
        "CPUs without VNNI; measured no faster than float32 on an AVX2 CPU without VNNI)",
        choices=("simulated", "int8"),
    )
    calibration_seed: int = option(0, "seed of the calibration batches", minimum=0, maximum=2**31 - 1)

    def __post_init__(self):
        super().__post_init__()
        if self.calibration_steps > self.sampling_steps:
            raise ValueError(
                f"calibration_steps ({self.calibration_steps}) must not exceed sampling_steps ({self.sampling_steps})"
            )
        if self.kernels == "int8" and self.bits != "W8A8":
            raise ValueError(
                f"kernels 'int8' runs W8A8 layers only; got bits {self.bits!r}. Use bits W8A8 or kernels 'simulated'"
            )
        if self.grouped_ranges and self.range_groups > self.calibration_steps:
            raise ValueError(
                f"range_groups ({self.range_groups}) must not exceed calibration_steps ({self.calibration_steps}), "
                "because each group needs a calibrated step"
            )

    def schedule(self) -> Schedule:
        profile = PROFILES[self.profile]
        return Schedule(
            self.weight_iterations or profile.weight_iterations,
            self.activation_iterations or profile.activation_iterations,
            profile.batch_size,
        )

    @property
    def weight_bits(self) -> int:
        return BITS[self.bits][0]

    @property
    def activation_bits(self) -> int:
        return BITS[self.bits][1]


def group_bounds(timesteps: list[float], groups: int) -> list[tuple[float, float]]:
    """Split calibrated timesteps (in sampling order) into contiguous groups: (highest, lowest) each."""
    return [(float(chunk[0]), float(chunk[-1])) for chunk in np.array_split(np.array(timesteps), groups)]


def _log_fallback(timestep: float, group: int, bounds: list[tuple[float, float]]) -> None:
    high, low = bounds[group]
    logger.info(
        "timestep %g was not calibrated; using the activation ranges of the nearest group, timesteps %g to %g",
        timestep,
        high,
        low,
    )


def _timestep_groups(bounds: list[tuple[float, float]], calibrated: list[float]) -> TimestepGroups:
    """Build the shared timestep groups, logging each timestep that falls back to a nearest group."""
    return TimestepGroups(bounds, calibrated, lambda timestep, group: _log_fallback(timestep, group, bounds))


def _storage_bytes(part: nn.Module, options: QDiffusionOptions, groups: int) -> int:
    """Bytes of the tensors ``save`` writes, computed from shapes alone."""
    quantize_activations = options.activation_bits < FULL_ACTIVATION_BITS
    total = 0
    for name, module in part.named_modules():
        if type(module) in (nn.Conv2d, nn.Linear):
            count = module.weight.numel()
            total += count if options.weight_bits == 8 else (count + 1) // 2
            parts = 2 if options.split_shortcut and _is_skip_convolution(name, module) else 1
            total += 8 * module.weight.shape[0] * parts  # float32 scales and zero points
            total += 8 * groups * parts if quantize_activations else 0
        elif isinstance(module, Attention) and quantize_activations:
            total += 4 * 8 * groups  # query, key, value and probability quantizers
    return total


def _is_skip_convolution(name: str, module: nn.Module) -> bool:
    """Return whether ``find_skip_splits`` splits this layer, a decoder ResBlock's 1x1 skip convolution."""
    return fnmatch(name, "up_blocks.*.resnets.*.conv_shortcut") and module.kernel_size == (1, 1)


def _run_int8(part: nn.Module) -> list[tuple[str, str]]:
    """Move the W8A8 layers of ``part`` onto int8 kernels, keeping the stored tensors for ``save``.

    Returns the layers that stay simulated, with the reason, for the report.
    """
    part.lowbit_qdiffusion_state = artefact.quantized_state(part)
    report = int8.convert(part)
    logger.info(
        "int8 kernels (%s weights) for %d layers, %d kept simulated, in %.1f s",
        report.weight_mode,
        len(report.converted),
        len(report.skipped),
        report.seconds,
    )
    return [(name, f"kept simulated: {reason}") for name, reason in report.skipped.items()]


class QDiffusionPlugin(Plugin):
    id = "qdiffusion"
    name = "Q-Diffusion"
    description = "Timestep-aware post-training quantization of a UNet: W8A8, W4A8 or W4A16, calibrated by sampling."
    reference = "Q-Diffusion: Quantizing Diffusion Models (Li et al., ICCV 2023)"
    parts = ("unet",)
    families = ("*",)
    options_class = QDiffusionOptions
    file_suffix = ".safetensors"
    needs_calibration = True

    def quantize(
        self,
        part: nn.Module,
        options: QDiffusionOptions,
        progress: Progress | None = None,
        calibration: CalibrationSource | None = None,
    ) -> tuple[nn.Module, QuantizeReport]:
        """Calibrate ``part`` in place on samples of ``calibration.pipeline`` and return it with a report."""
        if calibration is None:
            raise ValueError("qdiffusion calibrates by sampling: pass the full-precision pipeline as calibration")
        if not hasattr(part, "up_blocks"):
            raise ValueError(f"qdiffusion quantizes diffusers UNets, not {type(part).__name__}")
        started = time.perf_counter()
        base_hash = artefact.weights_hash(part)
        reference = copy.deepcopy(part)

        prompts = calibration_prompts(calibration.family, options.calibration_prompts)
        data = capture(
            calibration.pipeline,
            prompts,
            options.sampling_steps,
            options.calibration_steps,
            options.calibration_guidance,
            SAMPLING_BATCH,
            progress,
        )
        kept = select_steps(options.sampling_steps, options.calibration_steps)
        calibrated = [data.timesteps[index] for index in kept]
        bounds = group_bounds(calibrated, options.range_groups if options.grouped_ranges else 1)
        groups = _timestep_groups(bounds, calibrated)

        rows = torch.arange(min(2, len(data)))
        device, dtype = next(part.parameters()).device, next(part.parameters()).dtype
        splits = {}
        if options.split_shortcut:
            splits = find_skip_splits(part, lambda: part(**data.unet_inputs(rows, device, dtype)))
        layer_shapes = artefact.layer_shapes(part)
        bytes_before = artefact.float_layer_bytes(part)
        attach(part, options.weight_bits, options.activation_bits, options.softmax_bits, groups, splits)

        calibrator = Calibrator(part, reference, data, groups, options.schedule(), progress, options.calibration_seed)
        losses = calibrate(calibrator, options.method, options.activation_bits < FULL_ACTIVATION_BITS)
        del reference, calibrator

        part.lowbit_qdiffusion = {
            "options": options.to_dict(),
            "model_class": type(part).__name__,
            "model_config": artefact.model_config(part),
            "base_hash": base_hash,
            "source": calibration.source,
            "layers": layer_shapes,
            "splits": splits,
            "weight_bits": options.weight_bits,
            "activation_bits": options.activation_bits,
            "softmax_bits": options.softmax_bits,
            "calibrated_timesteps": calibrated,
            "sampling_timesteps": data.timesteps,
            "group_bounds": bounds,
            "scheduler": data.scheduler,
            "sampling_steps": options.sampling_steps,
            "guidance": options.calibration_guidance,
            "calibration_samples": len(data),
            "losses": {name: list(pair) for name, pair in losses.items()},
            "calibration_seconds": round(time.perf_counter() - started, 1),
        }
        report = self._report(part, options.to_dict(), bytes_before, time.perf_counter() - started)
        if options.kernels == "int8":
            report.skipped += _run_int8(part)
        return part, report

    def _report(self, part: nn.Module, options: dict, bytes_before: int, seconds: float) -> QuantizeReport:
        layers = quant_layers(part)
        swap = SwapReport(quantized=list(layers), bytes_before=bytes_before)
        swap.bytes_after = sum(t.numel() * t.element_size() for t in artefact.quantized_state(part).values())
        swap.values = sum(int(torch.Size(layer.weight_shape).numel()) for layer in layers.values())
        return QuantizeReport.from_swap(self.id, options, swap, seconds)

    def estimate_bytes(self, part: nn.Module, options: QDiffusionOptions) -> int:
        return _storage_bytes(part, options, options.range_groups if options.grouped_ranges else 1)

    def calibration_cost(
        self, part: nn.Module, options: QDiffusionOptions, calibration: CalibrationSource
    ) -> dict[str, str]:
        from plugins.qdiffusion.cost import calibration_cost

        return calibration_cost(part, options, calibration)

    def save(self, part: nn.Module, report: QuantizeReport, options: PluginOptions, path: Path) -> Path:
        config = getattr(part, "lowbit_qdiffusion", None)
        if config is None:
            raise ValueError("this UNet was not calibrated by the qdiffusion plugin, so there is nothing to save")
        return artefact.save(part, config, path, getattr(part, "lowbit_qdiffusion_state", None))

    def load(self, path: Path, base_part: nn.Module) -> tuple[nn.Module, QuantizeReport]:
        """Put a saved calibration into ``base_part`` (the same full-precision UNet), in place."""
        started = time.perf_counter()
        config, tensors = artefact.read(path)
        artefact.check_base(config, base_part, path)
        bounds = [tuple(pair) for pair in config["group_bounds"]]
        groups = _timestep_groups(bounds, config["calibrated_timesteps"])
        bytes_before = artefact.float_layer_bytes(base_part)
        attach(
            base_part,
            config["weight_bits"],
            config["activation_bits"],
            config["softmax_bits"],
            groups,
            {name: int(split) for name, split in config["splits"].items()},
        )
        for layer in quant_layers(base_part).values():
            layer.finalize()
        expected = set(artefact.quantized_state(base_part))
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise artefact.ArtefactMismatch(
                f"{path} does not hold the tensors its config describes: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        with torch.no_grad():
            state = base_part.state_dict()
            for name, tensor in tensors.items():
                if state[name].shape != tensor.shape:
                    raise artefact.ArtefactMismatch(
                        f"{path}: tensor {name} has shape {list(tensor.shape)}, expected {list(state[name].shape)}"
                    )
                state[name].copy_(tensor)
        set_activation_quantization(base_part, True)
        base_part.lowbit_qdiffusion = config
        options = QDiffusionOptions.from_dict(config["options"])
        report = self._report(base_part, options.to_dict(), bytes_before, time.perf_counter() - started)
        if options.kernels == "int8":
            report.skipped += _run_int8(base_part)
        return base_part, report


plugin = QDiffusionPlugin()
