"""The cost of a Q-Diffusion calibration, measured before it runs: samples, memory and time.

Shapes come from one real sampling step of the calibration pipeline and one hooked call of a
quantized copy of the UNet at the calibration batch size. Times come from passes timed on this
machine, scaled by the counts the options set:

- sampling: one pipeline step on the first chunk of prompts, then one UNet call per further step;
- range search: the L_p search timed on the smallest and largest weight, fitted linearly in the
  number of values, then applied to every weight and to the values each activation quantizer keeps;
- each reconstruction unit: capturing its inputs and targets over all samples, which runs the
  quantized UNet up to the unit and the full-precision one through it. Then the loss before and
  after on the probe rows, and one timed forward and backward pass per iteration.

Both figures are estimates. Time spent copying and hashing weights is not counted, and a machine
shared with other work runs at a different speed than when it was timed.
"""

import copy
import inspect
import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from plugins.base import CalibrationSource
from quant.qdiffusion.calibration import CalibrationData, calibration_prompts, capture
from quant.qdiffusion.modules import (
    FULL_ACTIVATION_BITS,
    activation_quantizers,
    attach,
    quant_layers,
    set_activation_quantization,
)
from quant.qdiffusion.quantizers import ActivationQuantizer, TimestepGroups, search_range
from quant.qdiffusion.reconstruct import Calibrator

logger = logging.getLogger(__name__)

# Values an activation quantizer keeps per timestep group for its range search.
MAX_OBSERVED_VALUES = inspect.signature(ActivationQuantizer.init_range).parameters["max_values"].default


@dataclass
class UnitTimes:
    """Seconds and bytes of one reconstruction unit, measured at the calibration batch size."""

    start: float = 0.0  # seconds into the quantized UNet call at which the unit starts
    end: float = 0.0  # ... and at which it returns
    data_bytes: int = 0  # its inputs and output at that batch size
    weight_step: float = 0.0  # one AdaRound forward and backward pass
    activation_step: float = 0.0  # one step-size forward and backward pass, or 0 without trainable quantizers


@dataclass
class CalibrationCost:
    """The measured figures behind ``calibration_cost``'s rows, in bytes and seconds."""

    prompts: int
    rows_per_prompt: int  # 2 when guidance adds the unconditional half to each UNet call, else 1
    calibration_steps: int
    input_bytes: int  # recorded UNet inputs, float32 in CPU memory
    largest_unit: str  # "" when the method reconstructs no unit
    unit_bytes: int  # that unit's captured inputs and targets over all samples
    unet_bytes: int  # the UNet being calibrated plus its full-precision reference copy
    rounding_bytes: int  # AdaRound's variables: one float32 per quantized weight
    seconds: dict[str, float] = field(default_factory=dict)  # phase -> seconds

    @property
    def samples(self) -> int:
        return self.prompts * self.rows_per_prompt * self.calibration_steps

    @property
    def memory_bytes(self) -> int:
        return self.input_bytes + self.unit_bytes + self.unet_bytes + self.rounding_bytes

    def rows(self) -> dict[str, str]:
        """Return the display rows, in order."""
        halves = "unconditional and conditional" if self.rows_per_prompt == 2 else "conditional only"
        samples = (
            f"{self.samples} UNet inputs: {_count(self.prompts, 'prompt')} x {self.rows_per_prompt} ({halves}) "
            f"x {_count(self.calibration_steps, 'step')}"
        )
        parts = [f"recorded UNet inputs {_megabytes(self.input_bytes)}"]
        if self.largest_unit:
            parts.append(f"inputs and targets of the largest unit ({self.largest_unit}) {_megabytes(self.unit_bytes)}")
        parts.append(f"UNet being calibrated and its full-precision copy {_megabytes(self.unet_bytes)}")
        if self.rounding_bytes:
            parts.append(f"AdaRound variables {_megabytes(self.rounding_bytes)}")
        memory = f"{_megabytes(self.memory_bytes)} beyond the loaded model: " + ", ".join(parts)
        phases = ", ".join(f"{phase} {_duration(seconds)}" for phase, seconds in self.seconds.items())
        total = _duration(sum(self.seconds.values()))
        return {
            "calibration samples": samples,
            "calibration memory (estimate)": memory,
            "calibration time (estimate)": f"{total} from passes timed now on this machine ({phases})",
        }


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _megabytes(count: int) -> str:
    return f"{count / 1e3:.0f} kB" if count < 1e6 else f"{count / 1e6:.1f} MB"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _tensor_bytes(value) -> int:
    """Count the bytes of every tensor in a call's arguments or output, inside tuples and dicts too."""
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(item) for item in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    return 0


def _timed(function, repeats: int = 2) -> float:
    """Return the seconds of the fastest of ``repeats`` calls, because the first call also warms caches up."""
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def _search_seconds(weights: list[torch.Tensor], bits: int) -> tuple[float, float]:
    """Fit the range search's seconds as ``fixed + per_value * values`` from the smallest and largest weight."""
    small = min(weights, key=torch.Tensor.numel)
    large = max(weights, key=torch.Tensor.numel)
    small_seconds = _timed(lambda: search_range(small, bits, per_channel=True))
    large_seconds = _timed(lambda: search_range(large, bits, per_channel=True))
    if large.numel() == small.numel():
        return 0.0, large_seconds / large.numel()
    per_value = max(large_seconds - small_seconds, 0.0) / (large.numel() - small.numel())
    return max(small_seconds - per_value * small.numel(), 0.0), per_value


class _UnitProbe:
    """Forward hooks on every unit of a quantized UNet: when they start and return, and their step time.

    While ``train`` is None the hooks record when each unit starts and returns and the bytes of its
    inputs and output. While it names a ``UnitTimes`` field, the pre-hook instead runs the unit once
    more with gradients on, backward included, and stores the seconds of that pass in the field.
    """

    def __init__(self, model: nn.Module, names: list[str]):
        self.model, self.names = model, names
        self.times = {name: UnitTimes() for name in names}
        self.train: str | None = None  # None, "weight_step" or "activation_step"
        self.started = 0.0
        self._inside = False
        self._handles = []

    def __enter__(self) -> "_UnitProbe":
        for name in self.names:
            unit = self.model.get_submodule(name)
            self._handles.append(unit.register_forward_pre_hook(self._before(name), with_kwargs=True))
            self._handles.append(unit.register_forward_hook(self._after(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def run(self, inputs: dict) -> float:
        """Call the UNet once; return the seconds of the call, step passes excluded."""
        self.started, self._stepping = time.perf_counter(), 0.0
        with torch.no_grad():
            self.model(**inputs, return_dict=False)
        return self._now()

    def _now(self) -> float:
        return time.perf_counter() - self.started - self._stepping

    def _before(self, name: str):
        def hook(unit, args, kwargs):
            if self._inside:
                return
            times = self.times[name]
            if self.train is None:
                times.start = self._now()
                times.data_bytes = _tensor_bytes(args) + _tensor_bytes(kwargs)
                return
            began = time.perf_counter()
            setattr(times, self.train, self._step(unit, args, kwargs))
            self._stepping += time.perf_counter() - began

        return hook

    def _after(self, name: str):
        def hook(unit, args, kwargs, output):
            if self._inside or self.train is not None:
                return
            times = self.times[name]
            times.end = self._now()
            times.data_bytes += _tensor_bytes(output)

        return hook

    def _step(self, unit: nn.Module, args: tuple, kwargs: dict) -> float:
        trainable = [parameter for parameter in unit.parameters() if parameter.requires_grad]
        if not trainable:
            return 0.0
        self._inside = True
        try:
            started = time.perf_counter()
            with torch.enable_grad():
                output = unit(*args, **kwargs)
                output.float().pow(2).mean().backward()
            for parameter in trainable:
                parameter.grad = None
            return time.perf_counter() - started
        finally:
            self._inside = False


def _sample_inputs(calibration: CalibrationSource, options) -> tuple[CalibrationData, float, int]:
    """Run one sampling step on the first chunk of calibration prompts.

    Returns the UNet inputs it recorded, its seconds and the number of prompts in the chunk.
    """
    from plugins.qdiffusion import SAMPLING_BATCH

    chunk = calibration_prompts(calibration.family, min(options.calibration_prompts, SAMPLING_BATCH))
    started = time.perf_counter()
    data = capture(calibration.pipeline, chunk, 1, 1, options.calibration_guidance, SAMPLING_BATCH)
    return data, time.perf_counter() - started, len(chunk)


@dataclass
class _QuantizedTimes:
    """Timings and sizes that ``_time_quantized_copy`` measured at the calibration batch size."""

    call: float  # seconds of one call with activation observation on, as captures and range observation run it
    units: dict[str, UnitTimes]
    observed: list[int]  # values each activation quantizer observed in that call
    probe_rows: int  # rows on which the calibrator reports each unit's loss before and after


def _time_quantized_copy(part: nn.Module, options, rows: CalibrationData, samples: int) -> _QuantizedTimes:
    """Time a quantized copy of ``part``, built as the calibrator builds it but with round-to-nearest weights."""
    schedule = options.schedule()
    reconstruct = options.method == "reconstruct"
    quantize_activations = options.activation_bits < FULL_ACTIVATION_BITS
    device, dtype = next(part.parameters()).device, next(part.parameters()).dtype
    inputs = rows.unet_inputs(torch.arange(len(rows)), device, dtype)

    quantized = copy.deepcopy(part)
    for parameter in quantized.parameters():
        parameter.requires_grad_(False)
    timestep = float(rows.timestep[0])
    groups = TimestepGroups([(timestep, timestep)], [timestep])
    attach(quantized, options.weight_bits, options.activation_bits, options.softmax_bits, groups, {})
    layers = quant_layers(quantized).values()
    for layer in layers:
        layer.init_weight_ranges(search=False)
        layer.quantize_weights = True
    calibrator = Calibrator(quantized, quantized, rows, groups, schedule)
    units = calibrator.units() if reconstruct else []
    quantizers = activation_quantizers(quantized)

    with _UnitProbe(quantized, units) as probe:
        for quantizer in quantizers:
            quantizer.observe(True)
        call = probe.run(inputs)
        observed = [sum(values.numel() for values in quantizer.observed[0]) for quantizer in quantizers]

        # the weight phase: AdaRound on every weight, activations unquantized
        if reconstruct:
            for layer in layers:
                layer.start_adaround()
            probe.train = "weight_step"
            probe.run(inputs)
            for layer in layers:
                layer.harden()

        # the activation phase: finished weights, activation step sizes trained
        for layer in layers:
            layer.finalize()
        if reconstruct and quantize_activations and schedule.activation_iterations:
            for quantizer in quantizers:
                quantizer.init_range(search=False)
                quantizer.scales.requires_grad_(quantizer.bits < FULL_ACTIVATION_BITS)
            set_activation_quantization(quantized, True)
            probe.train = "activation_step"
            probe.run(inputs)

    return _QuantizedTimes(call, probe.times, observed, len(calibrator._probe_rows(samples)))


def _range_search_seconds(part: nn.Module, options, observed: list[int], batches_per_group: int) -> float:
    """Estimate the L_p range search over every weight and over the values each activation quantizer keeps."""
    weights = [module.weight for module in part.modules() if type(module) in (nn.Conv2d, nn.Linear)]
    fixed, per_value = _search_seconds(weights, options.weight_bits)
    seconds = sum(fixed + per_value * weight.numel() for weight in weights)
    groups = options.range_groups if options.grouped_ranges else 1
    for count in observed:
        seconds += groups * (fixed + per_value * min(count * batches_per_group, MAX_OBSERVED_VALUES))
    return seconds


def measure(part: nn.Module, options, calibration: CalibrationSource) -> CalibrationCost:
    """Measure what calibrating ``part`` with ``options`` on samples of ``calibration`` will take."""
    from plugins.qdiffusion import SAMPLING_BATCH

    schedule = options.schedule()
    reconstruct = options.method == "reconstruct"
    quantize_activations = options.activation_bits < FULL_ACTIVATION_BITS
    device, dtype = next(part.parameters()).device, next(part.parameters()).dtype

    # shapes, and the time of sampling: one real step, then one UNet call per further step
    data, first_step_seconds, chunk = _sample_inputs(calibration, options)
    rows_per_prompt = len(data) // chunk
    samples = options.calibration_prompts * rows_per_prompt * options.calibration_steps
    batch = min(schedule.batch_size, samples)
    rows = data.subset(torch.arange(batch) % len(data))
    with torch.no_grad():
        batch_inputs = rows.unet_inputs(torch.arange(batch), device, dtype)
        full_call = _timed(lambda: part(**batch_inputs, return_dict=False))
        chunk_inputs = data.unet_inputs(torch.arange(len(data)), device, dtype)
        chunk_call = _timed(lambda: part(**chunk_inputs, return_dict=False))
    chunks = math.ceil(options.calibration_prompts / SAMPLING_BATCH)
    seconds = {"sampling": chunks * (first_step_seconds + (options.sampling_steps - 1) * chunk_call)}

    # the calibrator's batches stay inside one timestep group each
    groups = options.range_groups if options.grouped_ranges else 1
    batches_per_group = math.ceil(samples / groups / schedule.batch_size)
    batches = groups * batches_per_group
    quantized = _time_quantized_copy(part, options, rows, samples)
    probe_batches = math.ceil(quantized.probe_rows / schedule.batch_size)
    if reconstruct:
        seconds["range search"] = _range_search_seconds(part, options, quantized.observed, batches_per_group)

    # per unit: capture (quantized up to it, full precision through it), probe loss, iterations
    to_full = full_call / max(quantized.call, 1e-9)

    def unit_seconds(unit: UnitTimes, iterations: int, step: float) -> float:
        captured = batches * (unit.start + unit.end * to_full)
        probed = 2 * probe_batches * (unit.end - unit.start)
        return captured + probed + iterations * step

    units = quantized.units.values()
    if reconstruct:
        seconds["weights"] = sum(unit_seconds(unit, schedule.weight_iterations, unit.weight_step) for unit in units)
    if quantize_activations:
        seconds["activations"] = batches * quantized.call  # observing activations for their ranges
        if reconstruct and schedule.activation_iterations:
            seconds["activations"] += sum(
                unit_seconds(unit, schedule.activation_iterations, unit.activation_step)
                for unit in units
                if unit.activation_step
            )

    # memory from shapes
    # NOTE: not counted are a unit's activations kept for its backward pass, and the moment when a
    # capture concatenates its batches, which briefly doubles the unit's data.
    unet_bytes = sum(t.numel() * t.element_size() for t in [*part.parameters(), *part.buffers()])
    largest = max(quantized.units, key=lambda name: quantized.units[name].data_bytes, default="")
    unit_bytes = quantized.units[largest].data_bytes * samples // batch if largest else 0
    weight_values = sum(module.weight.numel() for module in part.modules() if type(module) in (nn.Conv2d, nn.Linear))
    return CalibrationCost(
        prompts=options.calibration_prompts,
        rows_per_prompt=rows_per_prompt,
        calibration_steps=options.calibration_steps,
        input_bytes=data.nbytes() * samples // len(data),
        largest_unit=largest,
        unit_bytes=unit_bytes,
        unet_bytes=2 * unet_bytes,
        rounding_bytes=4 * weight_values if reconstruct else 0,
        seconds=seconds,
    )


def calibration_cost(part: nn.Module, options, calibration: CalibrationSource) -> dict[str, str]:
    """Measure what calibrating ``part`` will take and return it as display rows: samples, memory and time."""
    started = time.perf_counter()
    cost = measure(part, options, calibration)
    logger.info(
        "calibration estimate: %d samples, %s, about %s (measured in %.1f s)",
        cost.samples,
        _megabytes(cost.memory_bytes),
        _duration(sum(cost.seconds.values())),
        time.perf_counter() - started,
    )
    return cost.rows()
