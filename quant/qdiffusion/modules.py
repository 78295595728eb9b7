"""Simulated-quantization layers of Q-Diffusion and the function that puts them into a UNet.

``QuantLayer`` replaces an ``nn.Conv2d`` or ``nn.Linear``. While calibrating it keeps the float
weight and quantizes it (round to nearest, or AdaRound while reconstructing). ``finalize()`` then
replaces the float weight with integer codes, and the forward pass dequantizes them.

Stored tensors of a finalized layer:

- ``qweight``: uint8 codes in [0, 2**bits - 1]; at 4 bits two codes share a byte (low nibble first),
  over the weight flattened in row-major order;
- per weight part, ``weight_quantizers.{i}.scales`` and ``.zero_points``: float32 [out_channels];
- per input part, ``input_quantizers.{i}.scales`` and ``.zero_points``: float32 [timestep groups].

A split layer (the 1x1 skip convolution of a decoder ResBlock, which consumes
``concat(h_deep, h_skip)``) has two parts: input channels ``[:split]`` and ``[split:]``, each with
its own weight and input quantizer.

``QuantAttnProcessor`` is the attention processor that also quantizes the inputs of both attention
matmuls: query and key before QK^T, the probabilities and the value before probabilities x V.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from quant.qdiffusion.quantizers import ActivationQuantizer, TimestepGroups, WeightQuantizer

FULL_ACTIVATION_BITS = 16  # activation bits at which inputs are left unquantized (W4A16)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes into uint8: one per byte at 8 bits, two per byte (low nibble first) at 4."""
    flat = codes.flatten().to(torch.uint8)
    if bits == 8:
        return flat
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_codes(qweight: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Undo ``pack_codes``: return float32 codes of ``shape``."""
    count = int(torch.Size(shape).numel())
    if bits == 8:
        return qweight[:count].float().reshape(shape)
    codes = torch.stack([qweight & 0x0F, qweight >> 4], dim=1).flatten()
    return codes[:count].float().reshape(shape)


class QuantLayer(nn.Module):
    """A Conv2d or Linear with quantized weight and input: the simulated reference path."""

    def __init__(
        self,
        layer: nn.Conv2d | nn.Linear,
        weight_bits: int,
        activation_bits: int,
        groups: TimestepGroups,
        split: int = 0,
    ):
        super().__init__()
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
            raise ValueError(f"padding mode {layer.padding_mode!r} is not supported, only 'zeros'")
        self.is_conv = isinstance(layer, nn.Conv2d)
        if self.is_conv:
            self.stride, self.padding, self.dilation, self.conv_groups = (
                layer.stride,
                layer.padding,
                layer.dilation,
                layer.groups,
            )
        in_features = layer.weight.shape[1]
        if split and not (self.is_conv and layer.groups == 1 and 0 < split < in_features):
            raise ValueError(f"cannot split a layer with {in_features} input channels at {split}")
        self.split = split
        self.weight_bits, self.activation_bits = weight_bits, activation_bits
        self.weight_shape = tuple(layer.weight.shape)
        self.float_weight: nn.Parameter | None = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        parts = 2 if split else 1
        out_channels = self.weight_shape[0]
        self.weight_quantizers = nn.ModuleList(WeightQuantizer(weight_bits, out_channels) for _ in range(parts))
        self.input_quantizers = nn.ModuleList(
            ActivationQuantizer(activation_bits, groups)
            for _ in range(parts if activation_bits < FULL_ACTIVATION_BITS else 0)
        )
        self.quantize_weights = False

    # ---------------------------------------------------------------- weights

    def _parts(self, tensor: torch.Tensor, dim: int) -> list[torch.Tensor]:
        return (
            [tensor]
            if not self.split
            else [tensor.narrow(dim, 0, self.split), tensor.narrow(dim, self.split, tensor.shape[dim] - self.split)]
        )

    def init_weight_ranges(self, search: bool = True) -> None:
        for quantizer, part in zip(self.weight_quantizers, self._parts(self.float_weight, 1)):
            quantizer.init_range(part, search)

    def start_adaround(self) -> list[nn.Parameter]:
        for quantizer, part in zip(self.weight_quantizers, self._parts(self.float_weight, 1)):
            quantizer.start_adaround(part)
        return [quantizer.rounding for quantizer in self.weight_quantizers]

    def harden(self) -> None:
        for quantizer in self.weight_quantizers:
            quantizer.soft = False

    def regulariser(self, beta: float) -> torch.Tensor:
        return sum(quantizer.regulariser(beta) for quantizer in self.weight_quantizers)

    def codes(self) -> torch.Tensor:
        """Return the weight's integer codes (float32, the weight's shape)."""
        if self.float_weight is None:
            return unpack_codes(self.qweight, self.weight_bits, self.weight_shape)
        parts = self._parts(self.float_weight, 1)
        return torch.cat([quantizer.codes(part) for quantizer, part in zip(self.weight_quantizers, parts)], dim=1)

    def finalize(self) -> None:
        """Replace the float weight with packed integer codes; the layer's output does not change."""
        with torch.no_grad():
            codes = self.codes()
        for quantizer in self.weight_quantizers:
            quantizer.rounding = None
        self.register_buffer("qweight", pack_codes(codes, self.weight_bits))
        self.float_weight = None
        self.quantize_weights = True

    def dequantized_weight(self) -> torch.Tensor:
        if self.float_weight is not None and not self.quantize_weights:
            return self.float_weight
        if self.float_weight is not None:
            parts = self._parts(self.float_weight, 1)
            return torch.cat([quantizer(part) for quantizer, part in zip(self.weight_quantizers, parts)], dim=1)
        # Dequantized on every call, like the GGUF layers, so only the codes stay resident.
        codes = self._parts(unpack_codes(self.qweight, self.weight_bits, self.weight_shape), 1)
        weights = []
        for quantizer, part in zip(self.weight_quantizers, codes):
            view = (-1, *([1] * (part.dim() - 1)))
            weights.append((part - quantizer.zero_points.view(view)) * quantizer.scales.view(view))
        return torch.cat(weights, dim=1)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as the forward pass uses it (quantized once calibration has fixed it)."""
        return self.dequantized_weight()

    # ---------------------------------------------------------------- forward

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_quantizers:
            return x
        dim = 1 if self.is_conv else -1
        parts = self._parts(x, dim)
        return torch.cat([quantizer(part) for quantizer, part in zip(self.input_quantizers, parts)], dim=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        weight = self.dequantized_weight().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.is_conv:
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.conv_groups)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        kind = "conv" if self.is_conv else "linear"
        split = f", split at {self.split}" if self.split else ""
        return f"{kind} {self.weight_shape}, W{self.weight_bits}A{self.activation_bits}{split}"


class QuantAttnProcessor(nn.Module):
    """Attention with quantized matmul inputs: query, key, probabilities and value.

    The steps are those of diffusers' ``AttnProcessor`` (explicit softmax, no fused kernel), so the
    probabilities exist as a tensor and can be quantized. They get an unsigned quantizer, [0, max]
    with zero point 0, at ``softmax_bits``.
    """

    def __init__(self, activation_bits: int, softmax_bits: int, groups: TimestepGroups):
        super().__init__()
        self.query_quantizer = ActivationQuantizer(activation_bits, groups)
        self.key_quantizer = ActivationQuantizer(activation_bits, groups)
        self.value_quantizer = ActivationQuantizer(activation_bits, groups)
        self.probability_quantizer = ActivationQuantizer(softmax_bits, groups, unsigned=True)

    def __call__(
        self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs
    ):
        return self.forward(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            batch, channels, height, width = image_shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, tokens, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)

        # [batch, tokens, heads * dim] -> [batch * heads, tokens, dim], each matmul input quantized
        query = self.query_quantizer(attn.head_to_batch_dim(query))
        key = self.key_quantizer(attn.head_to_batch_dim(key))
        value = self.value_quantizer(attn.head_to_batch_dim(value))
        probabilities = self.probability_quantizer(attn.get_attention_scores(query, key, attention_mask))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probabilities, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))

        if image_shape is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def quantizers(self) -> list[ActivationQuantizer]:
        return [self.query_quantizer, self.key_quantizer, self.value_quantizer, self.probability_quantizer]


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantLayer)}


def activation_quantizers(model: nn.Module) -> list[ActivationQuantizer]:
    return [module for module in model.modules() if isinstance(module, ActivationQuantizer)]


def set_activation_quantization(model: nn.Module, enabled: bool) -> None:
    for quantizer in activation_quantizers(model):
        quantizer.enabled = enabled


def attach(
    unet: nn.Module,
    weight_bits: int,
    activation_bits: int,
    softmax_bits: int,
    groups: TimestepGroups,
    splits: dict[str, int],
) -> list[str]:
    """Replace every Conv2d and Linear of ``unet`` with a ``QuantLayer``, in place, and return their names.

    ``splits`` maps layer names to their split point. With quantized activations, every attention
    module also gets a ``QuantAttnProcessor``. A forward pre-hook selects the timestep group from
    the UNet's ``timestep`` argument before each call.
    """
    targets = [(name, module) for name, module in unet.named_modules() if type(module) in (nn.Conv2d, nn.Linear)]
    unknown = sorted(set(splits) - {name for name, _ in targets})
    if unknown:
        raise ValueError(f"split layers {unknown} are not convolution or linear layers of this UNet")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, QuantLayer(module, weight_bits, activation_bits, groups, splits.get(name, 0)))
    if activation_bits < FULL_ACTIVATION_BITS:
        for module in unet.modules():
            if isinstance(module, Attention):
                module.set_processor(QuantAttnProcessor(activation_bits, softmax_bits, groups))
    unet.register_forward_pre_hook(_GroupSelector(groups), with_kwargs=True)
    return [name for name, _ in targets]


class _GroupSelector:
    """Forward pre-hook that selects the timestep group from the UNet's ``timestep`` argument."""

    def __init__(self, groups: TimestepGroups):
        self.groups = groups

    def __call__(self, module, args, kwargs):
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        value = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        self.groups.select(value)


def find_skip_splits(unet: nn.Module, run_once: Callable[[], None]) -> dict[str, int]:
    """Return the split point of each decoder ResBlock's 1x1 skip convolution, found by one UNet call.

    A decoder ResBlock receives ``concat(h_deep, h_skip)``; its split point is the channel count of
    ``h_deep``, read from the skip tensors that the up block receives. ``run_once`` calls the UNet.
    """
    splits: dict[str, int] = {}

    def record(block_name: str):
        def hook(block, args, kwargs):
            skips = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
            if skips is None:
                return
            for index, resnet in enumerate(getattr(block, "resnets", [])):
                shortcut = getattr(resnet, "conv_shortcut", None)
                if isinstance(shortcut, nn.Conv2d) and shortcut.kernel_size == (1, 1):
                    skip_channels = skips[-(index + 1)].shape[1]
                    splits[f"{block_name}.resnets.{index}.conv_shortcut"] = shortcut.in_channels - skip_channels

        return hook

    handles = [
        block.register_forward_pre_hook(record(f"up_blocks.{index}"), with_kwargs=True)
        for index, block in enumerate(getattr(unet, "up_blocks", []))
    ]
    try:
        with torch.no_grad():
            run_once()
    finally:
        for handle in handles:
            handle.remove()
    return splits
