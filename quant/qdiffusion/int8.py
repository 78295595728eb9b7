"""Real int8 execution of finalized W8A8 Q-Diffusion layers on the CPU, through oneDNN's int8 kernels.

This module is hand-written glue, because no library runs Q-Diffusion's calibrated codes with
integer kernels. It maps them onto the int8 operators of PyTorch's CPU build, checked with PyTorch
2.13. These are ``torch.ops.onednn.qconv_prepack`` / ``qconv_pointwise`` and ``qlinear_prepack`` /
``qlinear_pointwise``, the operators behind Inductor's x86 int8 path. They take uint8 activation
codes with a per-tensor scale and zero point given at each call, int8 weights with per-output-channel
scales, add the bias and return float32 (``output_dtype``), so the output is never requantized.
fbgemm's ``quantized::linear_with_input_q_dq_qweight_dq_output_fp32`` covers linear layers only,
fbgemm has no convolution with float output, and both need the deprecated quantized tensor API.

Two properties of these kernels shape how the weights are stored:

- They ignore weight zero points: a nonzero ``w_zero_point`` changes nothing and raises nothing.
  The asymmetric codes ``c`` in [0, 255] with zero point ``z`` therefore go in as ``c - 128``, and
  ``s_w (z - 128) sum_k (q_k - z_x)`` is subtracted per output channel afterwards. The sum runs over
  each output position's input window and comes from a channel sum and a box filter.
- On CPUs without VNNI or AMX (measured on AVX2), they multiply with ``vpmaddubsw``, which adds two
  u8 x s8 products into a saturating int16. With activation codes up to 255, a pair of same-sign
  weights beyond +-64 can saturate, because 255 * 65 * 2 = 33150 > 32767. Weights of +-64 never
  did in a worst-case check. On such a CPU the stored codes gave an 18% relative error on the
  embedded UNet's output.

``weight_mode`` chooses how the codes reach the kernel:

- ``"codes"``: ``c - 128`` as above, one int8 product. Exact where the CPU has VNNI or AMX, which
  accumulate in int32.
- ``"split"``: ``c - 128 = 2 h + l`` with ``h`` in [-64, 63] and ``l`` in {0, 1}, both halves in one
  product with twice the output channels. Exact on any CPU, at twice the int8 work.
- ``"7bit"``: the dequantized weight requantized symmetrically per output channel to [-64, 64]
  (zero point 0, so no correction term). It cannot saturate and costs one product, but rounds each
  weight a second time, to about half the precision of the 8-bit codes.
- ``"auto"``: ``"codes"`` where PyTorch reports AVX-512 VNNI or AMX, ``"7bit"`` elsewhere.

The errors below were measured on an AVX2 CPU without VNNI (AMD EPYC, Zen 1), with the embedded
UNet at W8A8 (round to nearest, two timestep groups) on 12 inputs along 6 sampling steps, the setup
of ``tests/test_qdiffusion_int8.py``. The relative L2 error of the UNet output against the simulated
path was 0.55% for split, 2.1% for 7bit and 18% for codes. Even an exact integer product differs
from the simulated path, because the float sums round differently and an input near a rounding
boundary then lands on the neighbouring code in the next layer. Reordering the simulated path's own
float sums (channels-last convolutions) moves its output by 0.8%. The tests check bounds on the
split and 7bit figures.

``convert(unet)`` replaces the layers in place, for inference only, and keeps every layer it
cannot run in int8 simulated, with the reason in its report. Save a calibrated model before
converting it, because the int8 layers do not contain the stored codes.
"""

import logging
import time
from dataclasses import dataclass, field
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from quant.layers import replace_module
from quant.qdiffusion.modules import QuantLayer, quant_layers

logger = logging.getLogger(__name__)

WEIGHT_MODES = ("auto", "codes", "split", "7bit")
CODE_OFFSET = 128  # uint8 code c becomes the int8 value c - 128
SAFE_WEIGHT = 64  # largest |int8 weight| whose paired products with uint8 codes fit in int16


# ---------------------------------------------------------------- environment


@cache
def available() -> tuple[bool, str]:
    """Return whether the oneDNN int8 operators run here, and the reason when they do not."""
    if not torch.backends.mkldnn.is_available():
        return False, f"PyTorch {torch.__version__} was built without oneDNN (torch.backends.mkldnn)"
    for name in ("qconv_prepack", "qconv_pointwise", "qlinear_prepack", "qlinear_pointwise"):
        if not hasattr(torch.ops.onednn, name):
            return False, f"PyTorch {torch.__version__} has no operator torch.ops.onednn.{name}"
    try:
        layer = _PackedWeight(torch.full((2, 2), 130.0), torch.ones(2), torch.full((2,), 128.0), None, "codes", None)
        layer(torch.ones(1, 2), 1.0, 0)
    except RuntimeError as error:
        return False, f"the oneDNN int8 linear kernel failed on a 2 x 2 test layer: {error}"
    return True, ""


def has_int8_dot_product() -> bool:
    """Return whether the CPU accumulates u8 x s8 products in int32 (AVX-512 VNNI or AMX), so none saturate.

    NOTE: PyTorch 2.13 reports AVX-512 VNNI only, so CPUs with AVX-VNNI alone count as without.
    """
    vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: False)()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return bool(vnni or amx)


def resolve_weight_mode(weight_mode: str) -> str:
    """Return the weight mode that ``weight_mode`` stands for on this CPU; raise for an invalid one."""
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"invalid weight_mode {weight_mode!r}, expected one of {', '.join(WEIGHT_MODES)}")
    if weight_mode == "auto":
        return "codes" if has_int8_dot_product() else "7bit"
    return weight_mode


# ---------------------------------------------------------------- weight preparation


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, padding, dilation and groups of a convolution, as F.conv2d takes them."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int


def _channel_view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def offset_codes(codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, groups: int = 1):
    """Return (int8 weight c - 128, kernel scales, zero-point terms s_w (z - 128)) for weight mode "codes"."""
    weight = (codes - CODE_OFFSET).to(torch.int8)
    return weight, scales.clone(), scales * (zero_points - CODE_OFFSET)


def stack_halves(high: torch.Tensor, low: torch.Tensor, groups: int) -> torch.Tensor:
    """Stack per-output-channel tensors as [h; l] inside each convolution group: [groups * 2 * out / groups, ...]."""
    return torch.stack([high.unflatten(0, (groups, -1)), low.unflatten(0, (groups, -1))], dim=1).flatten(0, 2)


def split_codes(codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, groups: int = 1):
    """Return the halves [h; l] of c - 128 = 2 h + l, their kernel scales [2 s_w; s_w], and the zero-point terms.

    Worked example: c = 255 gives c - 128 = 127 = 2 * 63 + 1, and c = 0 gives -128 = 2 * (-64) + 0,
    so no weight value reaching the kernel exceeds 64 in magnitude. The halves are stacked inside each
    convolution group, so that both halves of a channel see the same input channels.
    """
    offset = codes - CODE_OFFSET
    high = torch.div(offset, 2, rounding_mode="floor")
    low = offset - 2 * high
    weight = stack_halves(high, low, groups).to(torch.int8)
    return weight, stack_halves(2 * scales, scales, groups), scales * (zero_points - CODE_OFFSET)


def requantize_7bit(codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, groups: int = 1):
    """Return the weight requantized to symmetric codes in [-64, 64] per output channel, and their scales.

    A channel's centred codes ``c - z`` are scaled by ``64 / max|c - z|`` and rounded, so a channel
    spanning [-128, 127] loses one bit. Channels that already fit keep their codes unchanged.
    """
    centred = codes - _channel_view(zero_points, codes)
    reduce_dims = tuple(range(1, codes.dim()))
    largest = centred.abs().amax(dim=reduce_dims).clamp(min=SAFE_WEIGHT)
    weight = torch.round(centred * _channel_view(SAFE_WEIGHT / largest, codes)).to(torch.int8)
    return weight, scales * largest / SAFE_WEIGHT, None


PREPARE = {"codes": offset_codes, "split": split_codes, "7bit": requantize_7bit}


# ---------------------------------------------------------------- kernels


def quantize_activation(
    x: torch.Tensor, scale: float, zero_point: int, memory_format: torch.memory_format = torch.contiguous_format
) -> torch.Tensor:
    """Return uint8 codes clamp(round(x / scale) + zero_point, 0, 255), rounded as the simulated path rounds."""
    codes = torch.div(x.float(), scale)
    codes.round_().add_(zero_point).clamp_(0, 255)
    return codes.to(torch.uint8, memory_format=memory_format)


def window_sums(
    codes: torch.Tensor, zero_point: int, geometry: ConvGeometry | None, kernel_size: tuple[int, ...]
) -> torch.Tensor:
    """Return sum(codes - zero_point) over each output's input window: float32 [..., 1] or [N, groups, H', W'].

    Padding contributes nothing, as in the kernel, which pads the codes with the zero point. The
    sums are integers below 2**24 for windows of up to 65,000 values, so float32 represents them exactly.
    """
    if geometry is None:
        sums = codes.sum(dim=-1, keepdim=True, dtype=torch.int32)
        return sums.float() - codes.shape[-1] * zero_point
    batch, channels, height, width = codes.shape
    groups = geometry.groups
    per_group = codes.reshape(batch, groups, channels // groups, height, width).sum(dim=2, dtype=torch.int32)
    centred = per_group.float() - (channels // groups) * zero_point
    box = torch.ones(groups, 1, *kernel_size)
    return F.conv2d(centred, box, None, geometry.stride, geometry.padding, geometry.dilation, groups)


class _PackedWeight(nn.Module):
    """One weight part packed for a oneDNN int8 kernel, with the terms that make its output exact.

    Buffers:

    - ``packed``: int8 in oneDNN's blocked layout, left out of the state dict;
    - ``kernel_scales``: float32 [out_channels], or [2 * out_channels] in weight mode "split";
    - ``zero_point_terms``: float32 [out_channels], None in weight mode "7bit";
    - ``kernel_bias``: float32 of the same shape as ``kernel_scales``, None without a bias.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zero_points: torch.Tensor,
        bias: torch.Tensor | None,
        weight_mode: str,
        geometry: ConvGeometry | None,
    ):
        super().__init__()
        self.weight_mode = weight_mode
        self.geometry = geometry
        self.out_channels = codes.shape[0]
        self.kernel_size = tuple(codes.shape[2:])
        self.groups = 1 if geometry is None else geometry.groups
        weight, kernel_scales, zero_point_terms = PREPARE[weight_mode](
            codes.float(), scales.float(), zero_points.float(), self.groups
        )
        self.register_buffer("kernel_scales", kernel_scales.float().contiguous())
        self.register_buffer("zero_point_terms", None if zero_point_terms is None else zero_point_terms.float())
        if bias is not None and weight_mode == "split":
            # The bias goes on the low half only, so that adding the halves adds it once.
            bias = stack_halves(torch.zeros_like(bias), bias, self.groups)
        self.register_buffer("kernel_bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("packed", self._pack(weight), persistent=False)

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        if self.geometry is None:
            return torch.ops.onednn.qlinear_prepack(weight.contiguous(), None)
        g = self.geometry
        # The activation scale and zero point given here only guide oneDNN's choice of layout.
        return torch.ops.onednn.qconv_prepack(
            weight.contiguous(), self.kernel_scales, 1.0, 0, g.stride, g.padding, g.dilation, g.groups, None
        )

    def dense_weight(self) -> torch.Tensor:
        """Return the packed int8 weight in the plain layout that F.linear or F.conv2d takes."""
        dense = self.packed.to_dense()
        return dense.t().contiguous() if self.geometry is None else dense

    # A packed oneDNN tensor has no storage that copy or pickle can read, so both go through the
    # dense weight and pack it again.
    def __getstate__(self):
        state = super().__getstate__()
        state["_buffers"] = {**state["_buffers"], "packed": self.dense_weight()}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._buffers["packed"] = self._pack(self._buffers["packed"])

    def kernel(self, codes: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
        """Run the int8 product on uint8 ``codes`` and return float32, without the zero-point terms."""
        scales = self.kernel_scales.float()
        bias = None if self.kernel_bias is None else self.kernel_bias.float()
        zeros = torch.zeros(scales.shape[0], dtype=torch.int64)
        if self.geometry is None:
            return torch.ops.onednn.qlinear_pointwise(
                codes.contiguous(), scale, zero_point, self.packed, scales, zeros, bias,
                1.0, 0, torch.float32, "none", [], "",
            )  # fmt: skip
        g = self.geometry
        return torch.ops.onednn.qconv_pointwise(
            codes.contiguous(memory_format=torch.channels_last), scale, zero_point, self.packed, scales, zeros, bias,
            g.stride, g.padding, g.dilation, g.groups, 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip

    def forward(self, x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
        """Return the float32 output of this part for float input ``x`` quantized with (scale, zero_point)."""
        # The convolution kernel reads channels-last codes, so they are written in that layout at once.
        memory_format = torch.contiguous_format if self.geometry is None else torch.channels_last
        codes = quantize_activation(x, scale, zero_point, memory_format)
        output = self.kernel(codes, scale, zero_point)
        channel_dim = output.dim() - 1 if self.geometry is None else 1

        if self.weight_mode == "split":
            # channels [groups * 2 * out / groups] -> [groups, 2, out / groups], then the halves are added
            halves = output.unflatten(channel_dim, (self.groups, 2, -1))
            combined = halves.select(channel_dim + 1, 0) + halves.select(channel_dim + 1, 1)
            output = combined.flatten(channel_dim, channel_dim + 1)

        if self.zero_point_terms is not None:
            sums = window_sums(codes, zero_point, self.geometry, self.kernel_size)
            terms = scale * self.zero_point_terms.float()
            if self.geometry is not None:
                terms = terms.view(1, -1, 1, 1)
                if self.groups > 1:
                    # [N, groups, H', W'] -> [N, out_channels, H', W'], each group's sum for its own channels
                    sums = sums.repeat_interleave(self.out_channels // self.groups, dim=1)
            # The output is a fresh tensor here, so it is corrected in place.
            output.addcmul_(terms, sums, value=-1)
        return output


# ---------------------------------------------------------------- layer


class Int8Layer(nn.Module):
    """A finalized W8A8 ``QuantLayer`` running on oneDNN int8 kernels, with output in the input's dtype.

    Each call quantizes the input with the (scale, zero point) of the current timestep group of its
    activation quantizer, which stays shared with the rest of the UNet. A split layer (decoder skip
    convolution) runs its two input-channel parts as two int8 products and adds them. Inference only.
    """

    def __init__(self, layer: QuantLayer, weight_mode: str):
        super().__init__()
        if weight_mode not in PREPARE:
            raise ValueError(f"invalid weight_mode {weight_mode!r}, expected one of {', '.join(PREPARE)}")
        reason = unsupported_reason(layer)
        if reason:
            raise ValueError(f"cannot run this layer in int8: {reason}")
        self.is_conv = layer.is_conv
        self.split = layer.split
        self.weight_shape = layer.weight_shape
        self.weight_mode = weight_mode
        geometry = None
        if layer.is_conv:
            geometry = ConvGeometry(tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation), layer.conv_groups)
        self.input_quantizers: nn.ModuleList = layer.input_quantizers

        codes = layer._parts(layer.codes(), 1)
        parts = []
        for index, (quantizer, part_codes) in enumerate(zip(layer.weight_quantizers, codes)):
            bias = layer.bias if index == 0 else None
            parts.append(
                _PackedWeight(part_codes, quantizer.scales, quantizer.zero_points, bias, weight_mode, geometry)
            )
        self.weights = nn.ModuleList(parts)

    def _inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.split:
            return [x]
        dim = 1 if self.is_conv else -1
        return [x.narrow(dim, 0, self.split), x.narrow(dim, self.split, x.shape[dim] - self.split)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = None
        for weight, quantizer, part in zip(self.weights, self.input_quantizers, self._inputs(x)):
            if not quantizer.enabled:
                raise RuntimeError(
                    "activation quantization is off, but an int8 layer needs quantized inputs. "
                    "Turn it on with set_activation_quantization(unet, True)"
                )
            group = quantizer.groups.index
            scale, zero_point = float(quantizer.scales[group]), int(quantizer.zero_points[group])
            result = weight(part, scale, zero_point)
            output = result if output is None else output.add_(result)
        if self.is_conv and not x.is_contiguous(memory_format=torch.channels_last):
            output = output.contiguous()
        return output.to(x.dtype)

    def extra_repr(self) -> str:
        kind = "conv" if self.is_conv else "linear"
        split = f", split at {self.split}" if self.split else ""
        return f"{kind} {self.weight_shape}, int8 W8A8, weight mode {self.weight_mode}{split}"


def unsupported_reason(layer: QuantLayer) -> str:
    """Return why ``layer`` cannot run in int8, or "" when it can."""
    if layer.float_weight is not None:
        return "not finalized, so the weight is still float and calibration has not fixed its codes"
    if layer.weight_bits != 8:
        return f"{layer.weight_bits}-bit weights, but the int8 path converts 8-bit weights only"
    if not layer.input_quantizers:
        return f"activations are not quantized (A{layer.activation_bits}), so there is no uint8 input"
    bits = sorted({quantizer.bits for quantizer in layer.input_quantizers})
    if bits != [8]:
        return f"{bits[-1]}-bit activations, but the int8 kernels take 8-bit activations only"
    if any(quantizer.unsigned for quantizer in layer.input_quantizers):
        return "unsigned activation quantizer, but the int8 path expects asymmetric 8-bit inputs"
    return ""


# ---------------------------------------------------------------- entry point


@dataclass
class Int8Report:
    """Outcome of ``convert``: layers now running int8 kernels and layers kept simulated, with reasons."""

    weight_mode: str
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        total = len(self.converted) + len(self.skipped)
        text = (
            f"int8: {len(self.converted)} of {total} quantized layers on oneDNN int8 kernels "
            f"(weight mode {self.weight_mode})"
        )
        if self.skipped:
            reasons: dict[str, int] = {}
            for reason in self.skipped.values():
                reasons[reason] = reasons.get(reason, 0) + 1
            reason_counts = "; ".join(f"{count} x {reason}" for reason, count in reasons.items())
            text += f", {len(self.skipped)} kept simulated: {reason_counts}"
        return text + f", in {self.seconds:.1f} s"


def convert(unet: nn.Module, weight_mode: str = "auto") -> Int8Report:
    """Replace every finalized W8A8 ``QuantLayer`` of ``unet`` with an ``Int8Layer``, in place.

    Call it after calibration or after loading a saved calibration, and after saving, because the
    int8 layers keep no stored codes. ``weight_mode`` is one of ``WEIGHT_MODES`` (see the module
    docstring). Layers that cannot run in int8 stay simulated and are listed in the report's
    ``skipped`` with the reason. Raises RuntimeError where the oneDNN int8 operators are missing,
    and ValueError for weight mode "codes" on a CPU whose int8 products saturate.
    """
    started = time.perf_counter()
    mode = resolve_weight_mode(weight_mode)
    ok, reason = available()
    if not ok:
        raise RuntimeError(f"int8 execution is not available: {reason}")
    if mode == "codes" and not has_int8_dot_product():
        raise ValueError(
            "weight_mode 'codes' needs a CPU with AVX-512 VNNI or AMX, because int8 products saturate on "
            "this CPU (18% error measured on the embedded UNet). Use 'split' for exact results or '7bit' for speed"
        )

    report = Int8Report(mode)
    for name, layer in quant_layers(unet).items():
        reason = unsupported_reason(layer)
        if reason:
            report.skipped[name] = reason
            continue
        replace_module(unet, name, Int8Layer(layer, mode))
        report.converted.append(name)
    report.seconds = time.perf_counter() - started
    unet.lowbit_int8 = report
    logger.info("%s", report.summary())
    return report


def int8_layers(model: nn.Module) -> dict[str, Int8Layer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, Int8Layer)}
