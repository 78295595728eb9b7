"""Q-Diffusion's calibration: BRECQ block reconstruction with AdaRound, then learned activation steps.

Written by hand because no maintained library implements it. It follows Q-Diffusion's official code
(Xiuyu-Li/q-diffusion), which builds on BRECQ (Li et al., 2021) and AdaRound (Nagel et al., 2020).

Units are reconstructed one at a time in the order the UNet runs them: ResBlocks and transformer
blocks as wholes, every other convolution or linear layer alone. For each unit the inputs come
from the network quantized so far and the targets from the full-precision network.

- Weight phase: AdaRound on every weight of the unit, loss = MSE (summed over channels, averaged
  over batch and positions) + lambda * sum(1 - |2 h(V) - 1|^beta) with lambda = 0.01; the
  regulariser is off for the first 20% of iterations, then beta falls linearly from 20 to 2.
  Activations stay unquantized in this phase; afterwards the rounding is hardened.
- Activation phase: ranges start from an L_p search over activations observed on calibration
  data, then the step sizes of the unit's activation quantizers are trained with Adam (lr 4e-4,
  cosine decay to 0) on an L_p loss with p = 2.4. With timestep groups, each batch comes from one
  group and trains that group's step sizes.

Departure from the official code: activation ranges are initialised from observations gathered
with activation quantization off, over all calibration batches, rather than from one batch.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from quant.qdiffusion.calibration import CalibrationData
from quant.qdiffusion.modules import (
    FULL_ACTIVATION_BITS,
    QuantLayer,
    activation_quantizers,
    quant_layers,
    set_activation_quantization,
)
from quant.qdiffusion.quantizers import LP_NORM, TimestepGroups

logger = logging.getLogger(__name__)

UNIT_TYPES = (ResnetBlock2D, BasicTransformerBlock)
ROUNDING_WEIGHT = 0.01  # lambda
BETA_START, BETA_END = 20.0, 2.0
WARMUP = 0.2
ACTIVATION_LR = 4e-4
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Schedule:
    """Iterations and batch size of one calibration run."""

    weight_iterations: int
    activation_iterations: int
    batch_size: int


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the unit of interest has run."""


def _batches(rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [rows[start : start + size] for start in range(0, len(rows), size)]


def _collate(values: list):
    """Concatenate captured call arguments along the batch dimension; keep non-tensors from the first."""
    first = values[0]
    if torch.is_tensor(first):
        return torch.cat(values)
    if isinstance(first, tuple):
        return tuple(_collate([value[i] for value in values]) for i in range(len(first)))
    if isinstance(first, dict):
        return {key: _collate([value[key] for value in values]) for key in first}
    return first


def _take(value, rows: torch.Tensor, batch: int):
    """Slice rows of every tensor whose first dimension is the batch."""
    if torch.is_tensor(value):
        return value[rows] if value.dim() and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(_take(item, rows, batch) for item in value)
    if isinstance(value, dict):
        return {key: _take(item, rows, batch) for key, item in value.items()}
    return value


@dataclass
class UnitData:
    """Inputs of one unit from the quantized network and its full-precision outputs, for all rows."""

    args: tuple
    kwargs: dict
    target: torch.Tensor
    groups: torch.Tensor  # the timestep group of each row

    def __len__(self) -> int:
        return self.target.shape[0]

    def batch(self, rows: torch.Tensor) -> tuple[tuple, dict, torch.Tensor]:
        count = len(self)
        return _take(self.args, rows, count), _take(self.kwargs, rows, count), self.target[rows]


class Calibrator:
    """Runs Q-Diffusion (or round to nearest) on a UNet whose layers ``attach`` has replaced.

    ``quantized`` is that UNet, ``reference`` a full-precision copy, ``groups`` the timestep groups
    its activation quantizers share, and ``row_groups`` the group of each calibration row.
    """

    def __init__(
        self,
        quantized: nn.Module,
        reference: nn.Module,
        data: CalibrationData,
        groups: TimestepGroups,
        schedule: Schedule,
        progress: Progress | None = None,
        seed: int = 0,
    ):
        self.quantized, self.reference, self.data = quantized, reference, data
        self.groups, self.schedule, self.progress = groups, schedule, progress
        self.row_groups = torch.tensor([groups.group_of(float(t)) for t in data.timestep])
        self.device = next(quantized.parameters()).device
        self.dtype = next(quantized.parameters()).dtype
        self.generator = torch.Generator().manual_seed(seed)
        self.losses: dict[str, tuple[float, float]] = {}
        for model in (quantized, reference):
            for parameter in model.parameters():
                parameter.requires_grad_(False)

    # ---------------------------------------------------------------- running the UNet

    def _group_batches(self) -> list[torch.Tensor]:
        """Batches of calibration rows, each inside one timestep group."""
        batches = []
        for group in range(len(self.groups.bounds)):
            rows = torch.nonzero(self.row_groups == group).flatten()
            batches += _batches(rows, self.schedule.batch_size)
        return batches

    def run(self, model: nn.Module, rows: torch.Tensor):
        return model(**self.data.unet_inputs(rows, self.device, self.dtype), return_dict=False)[0]

    @torch.no_grad()
    def capture(self, unit_name: str) -> UnitData:
        """Record the unit's inputs in the quantized network and its outputs in the full-precision one."""
        quantized_unit = self.quantized.get_submodule(unit_name)
        reference_unit = self.reference.get_submodule(unit_name)
        inputs, targets = [], []

        def record_inputs(module, args, kwargs):
            inputs.append((tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()}))
            raise _Stop

        def record_output(module, args, kwargs, output):
            targets.append(output.detach())
            raise _Stop

        hooks = (
            (self.quantized, quantized_unit.register_forward_pre_hook(record_inputs, with_kwargs=True)),
            (self.reference, reference_unit.register_forward_hook(record_output, with_kwargs=True)),
        )
        batches = self._group_batches()
        for model, hook in hooks:
            try:
                for rows in batches:
                    try:
                        self.run(model, rows)
                    except _Stop:
                        pass
            finally:
                hook.remove()
        args = _collate([args for args, _ in inputs])
        kwargs = _collate([kwargs for _, kwargs in inputs])
        # Rows were captured group by group, so each row's group follows the batches' order.
        return UnitData(args, kwargs, torch.cat(targets), self.row_groups[torch.cat(batches)])

    # ---------------------------------------------------------------- units

    def units(self) -> list[str]:
        """Names of the reconstruction units in the order one UNet call runs them."""
        candidates = {
            name: module
            for name, module in self.quantized.named_modules()
            if isinstance(module, UNIT_TYPES + (QuantLayer,))
        }
        inside_unit = {
            name
            for name in candidates
            if any(name.startswith(other + ".") and isinstance(candidates[other], UNIT_TYPES) for other in candidates)
        }
        order: list[str] = []
        handles = []
        for name, module in candidates.items():
            if name not in inside_unit:
                handles.append(module.register_forward_pre_hook(lambda *_, name=name: order.append(name)))
        try:
            with torch.no_grad():
                self.run(self.quantized, torch.arange(min(2, len(self.data))))
        finally:
            for handle in handles:
                handle.remove()
        seen = []
        for name in order:
            if name not in seen:
                seen.append(name)
        return seen

    # ---------------------------------------------------------------- weight phase

    def reconstruct_weights(self, unit_name: str, index: int, total: int) -> None:
        unit = self.quantized.get_submodule(unit_name)
        layers = [unit] if isinstance(unit, QuantLayer) else [m for m in unit.modules() if isinstance(m, QuantLayer)]
        for layer in layers:
            layer.quantize_weights = True
        data = self.capture(unit_name)
        probe = self._probe_rows(len(data))
        before = self._loss(unit, data, probe, power=2.0)

        iterations = self.schedule.weight_iterations
        parameters = [p for layer in layers for p in layer.start_adaround()]
        optimizer = torch.optim.Adam(parameters)
        warmup = int(WARMUP * iterations)
        for iteration in range(iterations):
            rows = torch.randint(len(data), (min(self.schedule.batch_size, len(data)),), generator=self.generator)
            args, kwargs, target = data.batch(rows)
            loss = _lp_loss(unit(*args, **kwargs), target, 2.0)
            if iteration >= warmup:
                progress = (iteration - warmup) / max(iterations - warmup, 1)
                beta = BETA_END + (BETA_START - BETA_END) * max(0.0, 1 - progress)
                loss = loss + ROUNDING_WEIGHT * sum(layer.regulariser(beta) for layer in layers)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        for layer in layers:
            layer.harden()
            for parameter in layer.parameters():
                parameter.requires_grad_(False)
        after = self._loss(unit, data, probe, power=2.0)
        self._report(f"weights {unit_name}", index, total, before, after)

    # ---------------------------------------------------------------- activation phase

    @torch.no_grad()
    def init_activation_ranges(self, search: bool = True) -> None:
        """Observe every activation quantizer over the calibration data, then set its ranges."""
        quantizers = activation_quantizers(self.quantized)
        for quantizer in quantizers:
            quantizer.observe(True)
        set_activation_quantization(self.quantized, False)
        for rows in self._group_batches():
            self.run(self.quantized, rows)
        for quantizer in quantizers:
            quantizer.init_range(search)
        set_activation_quantization(self.quantized, True)

    def reconstruct_activations(self, unit_name: str, index: int, total: int) -> None:
        unit = self.quantized.get_submodule(unit_name)
        quantizers = activation_quantizers(unit)
        trainable = [q for q in quantizers if q.bits < FULL_ACTIVATION_BITS]
        if not trainable or self.schedule.activation_iterations == 0:
            return
        data = self.capture(unit_name)
        groups = data.groups
        probe = self._probe_rows(len(data))
        before = self._loss(unit, data, probe, power=LP_NORM, groups=groups)

        iterations = self.schedule.activation_iterations
        for quantizer in trainable:
            quantizer.scales.requires_grad_(True)
        optimizer = torch.optim.Adam([q.scales for q in trainable], lr=ACTIVATION_LR)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations, eta_min=0.0)
        present = sorted(set(groups.tolist()))
        for iteration in range(iterations):
            group = present[iteration % len(present)]
            pool = torch.nonzero(groups == group).flatten()
            pick = torch.randint(len(pool), (min(self.schedule.batch_size, len(pool)),), generator=self.generator)
            args, kwargs, target = data.batch(pool[pick])
            self.groups.index = group
            loss = _lp_loss(unit(*args, **kwargs), target, LP_NORM)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            for quantizer in trainable:
                quantizer.scales.data.clamp_(min=1e-8)
        for quantizer in trainable:
            quantizer.scales.requires_grad_(False)
        after = self._loss(unit, data, probe, power=LP_NORM, groups=groups)
        self._report(f"activations {unit_name}", index, total, before, after)

    # ---------------------------------------------------------------- helpers

    def _probe_rows(self, count: int) -> torch.Tensor:
        """Pick the fixed rows on which the loss before and after each unit is reported."""
        return torch.randperm(count, generator=torch.Generator().manual_seed(1))[: 4 * self.schedule.batch_size]

    @torch.no_grad()
    def _loss(self, unit: nn.Module, data: UnitData, rows: torch.Tensor, power: float, groups=None) -> float:
        total, count = 0.0, 0
        for batch in _batches(rows, self.schedule.batch_size):
            if groups is None:
                chunks = [batch]
            else:
                chunks = [batch[groups[batch] == group] for group in groups[batch].unique()]
            for chunk in chunks:
                if groups is not None:
                    self.groups.index = int(groups[chunk[0]])
                args, kwargs, target = data.batch(chunk)
                total += float(_lp_loss(unit(*args, **kwargs), target, power)) * len(chunk)
                count += len(chunk)
        return total / max(count, 1)

    def _report(self, what: str, index: int, total: int, before: float, after: float) -> None:
        self.losses[what] = (before, after)
        message = f"{what}: loss {before:.4g} -> {after:.4g}"
        logger.info("unit %d/%d %s", index, total, message)
        if self.progress is not None:
            self.progress(index, total, message)


def _detach(value):
    return value.detach() if torch.is_tensor(value) else value


def _lp_loss(output: torch.Tensor, target: torch.Tensor, power: float) -> torch.Tensor:
    """Sum of |output - target|^p over channels, averaged over everything else.

    Channels are dimension 1 of [batch, channels, height, width] and the last dimension of
    [batch, channels] and [batch, tokens, channels].
    """
    error = (output - target).abs().pow(power)
    if error.dim() < 2:
        return error.mean()
    return error.sum(dim=1 if error.dim() == 4 else -1).mean()


def calibrate(calibrator: Calibrator, method: str, quantize_activations: bool) -> dict[str, tuple[float, float]]:
    """Run ``method`` ("reconstruct": Q-Diffusion; "nearest": round to nearest with min-max ranges)."""
    started = time.perf_counter()
    layers = quant_layers(calibrator.quantized)
    search = method == "reconstruct"
    for layer in layers.values():
        layer.init_weight_ranges(search)
        layer.quantize_weights = True

    units = calibrator.units() if method == "reconstruct" else []
    steps = len(units)
    if quantize_activations:
        steps += len(units) + 1  # the activation phase of each unit, after one range initialisation
    for index, name in enumerate(units, start=1):
        calibrator.reconstruct_weights(name, index, steps)
    for layer in layers.values():
        layer.finalize()

    if quantize_activations:
        calibrator.init_activation_ranges(search)
        if calibrator.progress is not None:
            calibrator.progress(len(units) + 1, max(steps, 1), "activation ranges initialised")
        for index, name in enumerate(units, start=len(units) + 2):
            calibrator.reconstruct_activations(name, index, steps)
    logger.info(
        "calibrated %d layers in %d units with %s in %.1f s",
        len(layers),
        len(units),
        method,
        time.perf_counter() - started,
    )
    return calibrator.losses
