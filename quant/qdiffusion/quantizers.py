"""Uniform affine quantizers of Q-Diffusion: weights per output channel, activations per tensor.

Written by hand because no maintained library implements Q-Diffusion's quantizers. They follow the
method's official code (Xiuyu-Li/q-diffusion) and BRECQ/AdaRound:

- quantize-dequantize: ``x_q = (clamp(round(x / scale) + zero_point, 0, 2**bits - 1) - zero_point) * scale``,
  with a straight-through estimator for ``round``;
- range search: 80 shrinking candidate ranges ``[min * (1 - 0.01 i), max * (1 - 0.01 i)]``, keeping
  the one with the smallest L_p error (p = 2.4) per output channel (weights) or per tensor;
- AdaRound: the integer weight is ``floor(w / scale) + h(V)``, ``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``
  with zeta = 1.1 and gamma = -0.1, initialised so that h(V) equals the fractional part of w / scale.

Worked example at 4 bits: a channel with values in [-0.3, 0.9] gets scale = 1.2 / 15 = 0.08 and
zero_point = round(0.3 / 0.08) = 4, so 0.5 maps to code round(6.25) + 4 = 10 and back to 0.48.
"""

import math

import torch
from torch import nn

LP_NORM = 2.4
RANGE_CANDIDATES = 80
RANGE_SHRINK = 0.01
ZETA, GAMMA = 1.1, -0.1
OBSERVED_PER_CALL = 4096  # activation values kept per quantizer and forward call while observing


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass and pass the gradient through unchanged."""
    return (x.round() - x).detach() + x


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize and dequantize ``x``; ``scale`` and ``zero_point`` broadcast against it."""
    codes = torch.clamp(round_ste(x / scale) + zero_point, 0, 2**bits - 1)
    return (codes - zero_point) * scale


def _range_to_affine(low: torch.Tensor, high: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = ((high - low) / (2**bits - 1)).clamp(min=1e-8)
    return scale, (-low / scale).round()


def search_range(
    x: torch.Tensor, bits: int, per_channel: bool, unsigned: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (scale, zero_point) minimising the L_p error over shrinking candidate ranges.

    ``x`` is [channels, ...] when ``per_channel`` and any shape otherwise; the results are [channels]
    or scalars. ``unsigned`` fixes the zero point at 0 and the range at [0, max], for attention
    probabilities.
    """
    rows = x.detach().float().reshape(x.shape[0], -1) if per_channel else x.detach().float().reshape(1, -1)
    low = rows.min(dim=1).values.clamp(max=0)
    high = rows.max(dim=1).values.clamp(min=0)
    if unsigned:
        low = torch.zeros_like(low)
    best_error = torch.full_like(low, math.inf)
    best_scale, best_zero = _range_to_affine(low, high, bits)

    for i in range(RANGE_CANDIDATES):
        shrink = 1 - RANGE_SHRINK * i
        scale, zero = _range_to_affine(low * shrink, high * shrink, bits)
        error = (fake_quantize(rows, scale[:, None], zero[:, None], bits) - rows).abs().pow(LP_NORM).sum(dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)

    if per_channel:
        return best_scale, best_zero
    return best_scale[0], best_zero[0]


def min_max_range(x: torch.Tensor, bits: int, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (scale, zero_point) covering the full range of ``x``: the round-to-nearest baseline."""
    rows = x.detach().float().reshape(x.shape[0], -1) if per_channel else x.detach().float().reshape(1, -1)
    scale, zero = _range_to_affine(rows.min(dim=1).values.clamp(max=0), rows.max(dim=1).values.clamp(min=0), bits)
    return (scale, zero) if per_channel else (scale[0], zero[0])


def _channel_view(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Reshape per-output-channel values [out] to broadcast against a weight [out, ...]."""
    return values.reshape(-1, *([1] * (weight.dim() - 1)))


class WeightQuantizer(nn.Module):
    """Per-output-channel asymmetric quantizer of one weight tensor, with optional AdaRound.

    Buffers: ``scales`` and ``zero_points``, float32 [out_channels]; the zero points hold integers.
    While AdaRound runs, ``rounding`` (float32, the weight's shape) is the parameter V.
    """

    def __init__(self, bits: int, out_channels: int):
        super().__init__()
        self.bits = bits
        self.register_buffer("scales", torch.ones(out_channels))
        self.register_buffer("zero_points", torch.zeros(out_channels))
        self.rounding: nn.Parameter | None = None
        self.soft = True  # soft h(V) while optimising, hard 1[V >= 0] after

    def init_range(self, weight: torch.Tensor, search: bool = True) -> None:
        scale, zero = (
            search_range(weight, self.bits, per_channel=True) if search else min_max_range(weight, self.bits, True)
        )
        self.scales.copy_(scale)
        self.zero_points.copy_(zero)

    def start_adaround(self, weight: torch.Tensor) -> None:
        """Create V so that h(V) equals the fractional part of weight / scale."""
        scaled = weight.detach() / _channel_view(self.scales, weight)
        fraction = (scaled - scaled.floor()).clamp(1e-6, 1 - 1e-6)
        self.rounding = nn.Parameter(-torch.log((ZETA - GAMMA) / (fraction - GAMMA) - 1))
        self.soft = True

    def rounding_offset(self) -> torch.Tensor:
        """h(V): the amount added to floor(w / scale), soft in [0, 1] or hardened to 0 or 1."""
        if self.soft:
            return torch.clamp(torch.sigmoid(self.rounding) * (ZETA - GAMMA) + GAMMA, 0, 1)
        return (self.rounding >= 0).float()

    def regulariser(self, beta: float) -> torch.Tensor:
        """AdaRound's term sum(1 - |2 h(V) - 1|^beta), which pushes h(V) towards 0 or 1."""
        return (1 - (2 * self.rounding_offset() - 1).abs().pow(beta)).sum()

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes in [0, 2**bits - 1] (float32, the weight's shape)."""
        scales, zeros = _channel_view(self.scales, weight), _channel_view(self.zero_points, weight)
        if self.rounding is None:
            integer = round_ste(weight / scales)
        else:
            integer = torch.floor(weight.detach() / scales) + self.rounding_offset()
        return torch.clamp(integer + zeros, 0, 2**self.bits - 1)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scales, zeros = _channel_view(self.scales, weight), _channel_view(self.zero_points, weight)
        return (self.codes(weight) - zeros) * scales


class TimestepGroups:
    """Which activation ranges apply now: a shared state set from the UNet's timestep before each call.

    ``bounds`` lists, per group, the (highest, lowest) calibrated timestep it covers, in sampling
    order. A timestep inside a group's bounds selects it. Any other timestep selects the group whose
    bounds are nearest, and ``on_fallback(timestep, group)`` is called the first time that happens.
    """

    def __init__(self, bounds: list[tuple[float, float]], calibrated: list[float], on_fallback=None):
        if not bounds:
            raise ValueError("timestep groups need at least one group")
        self.bounds = [(float(high), float(low)) for high, low in bounds]
        self.calibrated = {float(t) for t in calibrated}
        self.on_fallback = on_fallback
        self.index = 0
        self._reported: set[float] = set()

    def group_of(self, timestep: float) -> int:
        distances = [max(low - timestep, timestep - high, 0.0) for high, low in self.bounds]
        return min(range(len(distances)), key=distances.__getitem__)

    def select(self, timestep: float) -> int:
        self.index = self.group_of(timestep)
        if timestep not in self.calibrated and timestep not in self._reported and len(self.bounds) > 1:
            self._reported.add(timestep)
            if self.on_fallback is not None:
                self.on_fallback(timestep, self.index)
        return self.index


class ActivationQuantizer(nn.Module):
    """Per-tensor asymmetric quantizer of an activation, one (scale, zero point) per timestep group.

    Buffers and parameters: ``scales`` (float32 [groups], learned with LSQ-style step-size training)
    and ``zero_points`` (float32 [groups], integers). ``unsigned`` quantizers (attention
    probabilities) keep the zero point at 0 and the range at [0, max].
    """

    def __init__(self, bits: int, groups: TimestepGroups, unsigned: bool = False):
        super().__init__()
        self.bits = bits
        self.groups = groups
        self.unsigned = unsigned
        count = len(groups.bounds)
        self.scales = nn.Parameter(torch.ones(count), requires_grad=False)
        self.register_buffer("zero_points", torch.zeros(count))
        self.enabled = False
        self.observed: list[list[torch.Tensor]] | None = None  # samples per group while observing

    def observe(self, on: bool) -> None:
        self.observed = [[] for _ in self.groups.bounds] if on else None

    def init_range(self, search: bool = True, max_values: int = 1 << 16) -> None:
        """Set each group's range from the values observed, then stop observing."""
        for group, chunks in enumerate(self.observed or []):
            if not chunks:
                raise RuntimeError(f"no activations were observed for timestep group {group}")
            values = torch.cat(chunks)
            if values.numel() > max_values:
                values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:max_values]]
            if search:
                scale, zero = search_range(values, self.bits, per_channel=False, unsigned=self.unsigned)
            else:
                scale, zero = min_max_range(values, self.bits, per_channel=False)
            self.scales.data[group] = scale
            self.zero_points[group] = zero
        self.observed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observed is not None:
            # A strided subsample keeps observing cheap; the extremes are kept for min-max ranges.
            flat = x.detach().float().flatten()
            sample = flat[:: max(1, flat.numel() // OBSERVED_PER_CALL)]
            self.observed[self.groups.index].append(torch.cat([sample, flat.min()[None], flat.max()[None]]).cpu())
        if not self.enabled:
            return x
        group = self.groups.index
        return fake_quantize(x, self.scales[group], self.zero_points[group], self.bits).to(x.dtype)
