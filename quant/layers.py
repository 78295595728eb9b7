"""Quantized drop-in layers for ``nn.Linear`` and ``nn.Conv2d``, and the function that swaps them in.

A quantized layer stores a packed weight (``qweight``, a uint8 buffer) and a ``WeightFormat`` that
unpacks it. Its forward pass is the reference path: dequantize the whole weight into the
compute dtype, then run the ordinary matmul or convolution in that dtype, and return the result in
the input's dtype.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


class WeightFormat(Protocol):
    """Unpacking rule of one storage format, implemented by each format."""

    name: str

    def unpack(self, qweight: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor: ...


class SkipLayer(Exception):
    """Raised by a quantize function to leave a layer in full precision, with the reason."""


class QuantizedLayer(nn.Module):
    """Common state of the quantized layers: packed weight, its format, bias and compute dtype."""

    def __init__(
        self,
        qweight: torch.Tensor,
        weight_format: WeightFormat,
        shape: tuple[int, ...],
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
    ):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.weight_format = weight_format
        self.weight_shape = tuple(shape)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.compute_dtype = compute_dtype

    @property
    def weight(self) -> torch.Tensor:
        """A meta tensor with the weight's shape and the compute dtype, for code that reads ``weight.dtype``.

        transformers' T5 casts its hidden states to ``wo.weight.dtype``, for example. The values are
        packed in ``qweight``; ``dequantize()`` returns them.
        """
        return torch.empty(self.weight_shape, dtype=self.compute_dtype, device="meta")

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.weight_format.unpack(self.qweight, self.weight_shape, dtype or self.compute_dtype)

    def _bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(self.compute_dtype)

    def extra_repr(self) -> str:
        return f"shape={self.weight_shape}, format={self.weight_format.name}, compute_dtype={self.compute_dtype}"


class QuantizedLinear(QuantizedLayer):
    def __init__(
        self, linear: nn.Linear, qweight: torch.Tensor, weight_format: WeightFormat, compute_dtype: torch.dtype
    ):
        super().__init__(qweight, weight_format, tuple(linear.weight.shape), linear.bias, compute_dtype)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.compute_dtype), self.dequantize(), self._bias()).to(x.dtype)


class QuantizedConv2d(QuantizedLayer):
    def __init__(self, conv: nn.Conv2d, qweight: torch.Tensor, weight_format: WeightFormat, compute_dtype: torch.dtype):
        if conv.padding_mode != "zeros":
            raise SkipLayer(f"padding mode {conv.padding_mode!r} is not supported, only 'zeros'")
        super().__init__(qweight, weight_format, tuple(conv.weight.shape), conv.bias, compute_dtype)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(
            x.to(self.compute_dtype),
            self.dequantize(),
            self._bias(),
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )
        return y.to(x.dtype)


QUANTIZABLE = {nn.Linear: QuantizedLinear, nn.Conv2d: QuantizedConv2d}


@dataclass
class SwapReport:
    """Outcome of ``swap_layers``: every layer quantized or skipped, and the bytes before and after."""

    quantized: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    values: int = 0

    @property
    def bits_per_weight(self) -> float:
        """Bits per quantized weight value, block scales included."""
        return 8 * self.bytes_after / self.values if self.values else 0.0


def replace_module(model: nn.Module, name: str, replacement: nn.Module) -> None:
    """Put ``replacement`` where the submodule called ``name`` (a dotted path) was."""
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, replacement)


def check_keep_patterns(layer_names: Sequence[str], keep: Sequence[str]) -> None:
    """Raise ValueError for a keep pattern that matches none of ``layer_names``, showing what names look like."""
    for pattern in keep:
        if not any(fnmatch(name, pattern) for name in layer_names):
            examples = ", ".join(layer_names[:3])
            raise ValueError(
                f"keep pattern {pattern!r} matches no linear or convolution layer (names look like: {examples})"
            )


def swap_layers(
    model: nn.Module,
    pack: Callable[[str, nn.Module], tuple[torch.Tensor, WeightFormat]],
    compute_dtype: torch.dtype,
    keep: Sequence[str] = (),
) -> SwapReport:
    """Replace every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` with its quantized layer, in place.

    ``pack(name, module)`` returns (qweight, format) or raises ``SkipLayer`` with a reason. Layers whose
    qualified name matches a pattern of ``keep`` (fnmatch, "conv_in" or "*.proj_out") stay as they are.
    Every skipped layer is logged and listed in the report with its reason.
    """
    report = SwapReport()
    targets = [(name, module) for name, module in model.named_modules() if type(module) in QUANTIZABLE]
    check_keep_patterns([name for name, _ in targets], keep)
    for name, module in targets:
        matched = next((pattern for pattern in keep if fnmatch(name, pattern)), None)
        if matched:
            report.skipped.append((name, f"on the keep list ({matched!r})"))
            continue
        try:
            qweight, weight_format = pack(name, module)
            quantized = QUANTIZABLE[type(module)](module, qweight, weight_format, compute_dtype)
        except SkipLayer as reason:
            report.skipped.append((name, str(reason)))
            continue
        replace_module(model, name, quantized.to(module.weight.device))
        report.quantized.append(name)
        report.bytes_before += module.weight.numel() * module.weight.element_size()
        report.bytes_after += qweight.numel() * qweight.element_size()
        report.values += module.weight.numel()
    for name, reason in report.skipped:
        logger.info("kept %s in full precision: %s", name, reason)
    logger.info(
        "quantized %d layers (%.2f bits per weight), kept %d in full precision",
        len(report.quantized),
        report.bits_per_weight,
        len(report.skipped),
    )
    return report


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers resident in a model, packed weights included."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())
