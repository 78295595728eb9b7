"""Tensor names of the original checkpoints for diffusers models, in both directions.

GGUF files for image models are read by ComfyUI-GGUF and stable-diffusion.cpp under the names of the
original checkpoints, not under diffusers' names:

- SD1.x and SDXL UNets (``UNet2DConditionModel``) use the LDM names (``time_embed.0``,
  ``input_blocks.N.M``, ``middle_block.N``, ``output_blocks.N.M``, ``out.2``, ``label_emb.0.0``),
  stored without the ``model.diffusion_model.`` prefix of the full checkpoints;
- FLUX transformers (``FluxTransformer2DModel``) use the BFL names (``double_blocks.N.img_attn.qkv``,
  ``single_blocks.N.linear1``, ``final_layer.adaLN_modulation.1``). BFL fuses q, k and v (and, in
  single blocks, the MLP input projection) into one tensor, and stores the final modulation as
  (shift, scale) where diffusers has (scale, shift).

``general.architecture`` is then "sd1", "sdxl" or "flux", the values ComfyUI-GGUF's loader accepts.
stable-diffusion.cpp reads no architecture key and identifies the model by its tensor names.

Fusing and splitting run along the first (output) dimension. A packed weight is stored as rows of whole
blocks, so cutting or joining it along that dimension moves packed rows and never requantizes.

What is written by hand, and why:

- diffusers -> original (saving) for all three: diffusers ships converters in the other direction
  only. The tests check each map as the inverse of diffusers' converter.
- original -> diffusers (loading) for FLUX: ``convert_flux_transformer_checkpoint_to_diffusers``
  (diffusers 0.42) fixes the width at 3072 and the MLP at 4x, so it rejects any other width. Our
  loader splits fused rows with the sizes of the model it loads into instead.

Loading SD1.x and SDXL names reuses diffusers' ``convert_ldm_unet_checkpoint``.
"""

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from quant.formats import gguf as gguf_format
from quant.formats.gguf import GGUFFileError, GGUFTensor

logger = logging.getLogger(__name__)

ARCHITECTURES = ("sd1", "sdxl", "flux")
LDM_PREFIX = "model.diffusion_model."
# Value of the ``lowbit.tensor_names`` metadata key.
ORIGINAL_NAMES = "original"
DIFFUSERS_NAMES = "diffusers"

# ---------------------------------------------------------------- SD1.x / SDXL UNet (LDM names)

_LDM_BLOCK_TYPES = {
    "down_block_types": {"CrossAttnDownBlock2D", "DownBlock2D"},
    "up_block_types": {"CrossAttnUpBlock2D", "UpBlock2D"},
}
_LDM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_LDM_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "mid_block.resnets.0": "middle_block.0",
    "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
}


def _ldm_prefixes(config: Mapping) -> dict[str, str]:
    """Map each diffusers module prefix of a UNet to its LDM prefix.

    With ``layers_per_block`` = L, down block b's layer l is ``input_blocks.{1 + b(L+1) + l}`` and its
    downsampler the slot after the last layer. Up block b has L+1 layers at ``output_blocks.{b(L+1) + l}``,
    and its upsampler follows the last layer's resnet (index 1) and attention (index 2), when present.
    """
    per_block = config["layers_per_block"]
    prefixes = dict(_LDM_TOP)
    down_types = config["down_block_types"]
    for block in range(len(down_types)):
        for layer in range(per_block):
            index = 1 + block * (per_block + 1) + layer
            prefixes[f"down_blocks.{block}.resnets.{layer}"] = f"input_blocks.{index}.0"
            prefixes[f"down_blocks.{block}.attentions.{layer}"] = f"input_blocks.{index}.1"
        if block < len(down_types) - 1:
            prefixes[f"down_blocks.{block}.downsamplers.0.conv"] = (
                f"input_blocks.{1 + block * (per_block + 1) + per_block}.0.op"
            )
    up_types = config["up_block_types"]
    for block, block_type in enumerate(up_types):
        for layer in range(per_block + 1):
            index = block * (per_block + 1) + layer
            prefixes[f"up_blocks.{block}.resnets.{layer}"] = f"output_blocks.{index}.0"
            prefixes[f"up_blocks.{block}.attentions.{layer}"] = f"output_blocks.{index}.1"
        if block < len(up_types) - 1:
            upsampler = 2 if block_type.startswith("CrossAttn") else 1
            prefixes[f"up_blocks.{block}.upsamplers.0.conv"] = f"output_blocks.{index}.{upsampler}.conv"
    return prefixes


def _ldm_name(name: str, prefixes: Mapping[str, str]) -> str:
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in prefixes:
            rest = parts[end:]
            if ".resnets." in prefix:
                rest[0] = _LDM_RESNET.get(rest[0], rest[0])
            return ".".join([prefixes[prefix], *rest])
    raise KeyError(name)


# ---------------------------------------------------------------- FLUX transformer (BFL names)

_FLUX_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
# Inside transformer_blocks.N -> inside double_blocks.N. Modules that share a BFL name are fused in
# the order listed here.
_FLUX_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_q": "img_attn.qkv",
    "attn.to_k": "img_attn.qkv",
    "attn.to_v": "img_attn.qkv",
    "attn.add_q_proj": "txt_attn.qkv",
    "attn.add_k_proj": "txt_attn.qkv",
    "attn.add_v_proj": "txt_attn.qkv",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
# Inside single_transformer_blocks.N -> inside single_blocks.N.
_FLUX_SINGLE = {
    "norm.linear": "modulation.lin",
    "attn.to_q": "linear1",
    "attn.to_k": "linear1",
    "attn.to_v": "linear1",
    "proj_mlp": "linear1",
    "proj_out": "linear2",
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
}
_FLUX_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
# BFL's final modulation stores (shift, scale), but diffusers' AdaLayerNormContinuous stores (scale, shift).
_FLUX_SWAPPED = "final_layer.adaLN_modulation.1."


def _flux_name(name: str) -> tuple[str, int]:
    """Return the BFL name of a diffusers FLUX tensor and its position among the tensors fused there."""
    match = _FLUX_BLOCK.match(name)
    if match:
        kind, index, inner = match.groups()
        table, block = (
            (_FLUX_DOUBLE, "double_blocks") if kind == "transformer_blocks" else (_FLUX_SINGLE, "single_blocks")
        )
        prefix = f"{block}.{index}."
    else:
        table, inner, prefix = _FLUX_TOP, name, ""
    if inner in table:
        return prefix + table[inner], 0
    module, _, parameter = inner.rpartition(".")
    original = table[module]  # KeyError: no BFL name
    siblings = [key for key, value in table.items() if value == original]
    return f"{prefix}{original}.{parameter}", siblings.index(module)


# ---------------------------------------------------------------- architecture of a model


def architecture_of(model_class: str, config: Mapping) -> str | None:
    """Return "sd1", "sdxl" or "flux" when the model has a layout of those checkpoints, else None.

    An SD UNet has only the LDM block types, one ``layers_per_block`` for all blocks, and either no
    extra embedding (SD1.x and SD2.x, all "sd1" to ComfyUI-GGUF) or SDXL's "text_time" embedding.
    """
    if model_class == "FluxTransformer2DModel":
        return "flux"
    if model_class != "UNet2DConditionModel":
        return None
    layout_ok = (
        all(set(config.get(key) or ()) <= allowed for key, allowed in _LDM_BLOCK_TYPES.items())
        and config.get("mid_block_type") == "UNetMidBlock2DCrossAttn"
        and isinstance(config.get("layers_per_block"), int)
        and config.get("class_embed_type") is None
        and config.get("num_class_embeds") is None
        and config.get("encoder_hid_dim_type") is None
        and config.get("time_cond_proj_dim") is None
        and config.get("addition_embed_type") in (None, "text_time")
    )
    if not layout_ok:
        return None
    return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd1"


def detect_architecture(names: Iterable[str]) -> str | None:
    """Detect the architecture from tensor names, for files without ``general.architecture``."""
    names = {name.removeprefix(LDM_PREFIX) for name in names}
    if any(name.startswith("double_blocks.") for name in names):
        return "flux"
    if any(name.startswith("input_blocks.") for name in names):
        return "sdxl" if any(name.startswith("label_emb.") for name in names) else "sd1"
    return None


def check_architecture(path, found: str | None, model_class: str, config: Mapping) -> str:
    """Return the architecture a file is read as, or raise if it does not fit the model.

    ``found`` is the file's ``general.architecture``. Besides "sd1", "sdxl" and "flux", files with
    diffusers tensor names carry the diffusers class name in lowercase ("unet2dconditionmodel").
    """
    expected = architecture_of(model_class, config)
    diffusers_value = model_class.lower()
    if found not in ARCHITECTURES and not _is_diffusers_class(found):
        raise GGUFFileError(
            f"{path}: general.architecture {found!r} is not a known architecture; expected one of "
            f"{', '.join(ARCHITECTURES)}, or a diffusers model class name in lowercase "
            f"(as {diffusers_value!r}) for a file with diffusers tensor names"
        )
    if found not in (expected, diffusers_value):
        accepted = " or ".join(repr(value) for value in (expected, diffusers_value) if value)
        raise GGUFFileError(
            f"{path}: general.architecture is {found!r}, but the {model_class} it is loaded into expects {accepted}"
        )
    return found


def _is_diffusers_class(value: str | None) -> bool:
    import diffusers

    return isinstance(value, str) and any(name.lower() == value for name in dir(diffusers))


# ---------------------------------------------------------------- name rules


@dataclass(frozen=True)
class NameRule:
    """One tensor of the original checkpoint and the diffusers tensors it holds, stacked along dim 0."""

    original: str
    parts: tuple[str, ...]
    swap_halves: bool = False  # the two halves of the rows are stored in the other order


def name_rules(architecture: str, config: Mapping, names: Iterable[str]) -> list[NameRule]:
    """Return the rules that turn the diffusers tensors ``names`` into the original ones.

    Raises ``KeyError`` with the first name that has no original counterpart.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    fused: dict[str, list[tuple[int, str]]] = {}
    prefixes = _ldm_prefixes(config) if architecture != "flux" else {}
    for name in names:
        if architecture == "flux":
            original, position = _flux_name(name)
        else:
            original, position = _ldm_name(name, prefixes), 0
        fused.setdefault(original, []).append((position, name))
    return [
        NameRule(original, tuple(name for _, name in sorted(parts)), original.startswith(_FLUX_SWAPPED))
        for original, parts in fused.items()
    ]


# ---------------------------------------------------------------- rows of stored tensors


def _rows(tensor: GGUFTensor) -> np.ndarray:
    """Return the tensor's data as [shape[0], values or bytes per row], so rows can be cut and joined."""
    if tensor.type_name in gguf_format.BLOCK_TYPES:
        block_size = gguf_format.block_type(tensor.type_name).block_size
        per_row = gguf_format.row_length(tensor.shape)
        if len(tensor.shape) < 2 or per_row % block_size:
            raise ValueError(
                f"tensor {tensor.name!r} of shape {tensor.shape} has rows of {per_row} values, not whole "
                f"{tensor.type_name} blocks of {block_size}, so its rows cannot be split or joined"
            )
    return np.asarray(tensor.data).reshape(tensor.shape[0], -1)


def _from_rows(name: str, type_name: str, rows: np.ndarray, shape: tuple[int, ...]) -> GGUFTensor:
    data = rows if type_name in gguf_format.BLOCK_TYPES or rows.dtype == np.uint8 else rows.reshape(shape)
    return GGUFTensor(name, type_name, shape, np.ascontiguousarray(data))


def float_values(tensor: GGUFTensor) -> torch.Tensor:
    """Return the values of a stored tensor as float32 in its logical shape (packed blocks dequantized)."""
    data = np.asarray(tensor.data)
    if tensor.type_name in gguf_format.BLOCK_TYPES:
        return gguf_format.unpack(torch.from_numpy(data.astype(np.uint8)), tensor.type_name, tensor.shape)
    if tensor.type_name == "BF16":
        return torch.from_numpy(data.copy()).view(torch.bfloat16).float().reshape(tensor.shape)
    return torch.from_numpy(data.astype(np.float32)).reshape(tensor.shape)


def _stack(name: str, parts: list[GGUFTensor]) -> GGUFTensor:
    """Join tensors along dim 0. Parts of different types are joined as F32 values, without loss."""
    rest = {part.shape[1:] for part in parts}
    if len(rest) > 1:
        raise ValueError(f"cannot fuse {[part.name for part in parts]} into {name!r}: trailing shapes differ ({rest})")
    shape = (sum(part.shape[0] for part in parts), *parts[0].shape[1:])
    types = {part.type_name for part in parts}
    if len(types) == 1:
        return _from_rows(name, parts[0].type_name, np.concatenate([_rows(part) for part in parts]), shape)
    logger.info("fused %s from tensors of types %s as F32 values", name, ", ".join(sorted(types)))
    values = torch.cat([float_values(part) for part in parts]).numpy()
    return GGUFTensor(name, "F32", shape, values)


def _split(tensor: GGUFTensor, names: tuple[str, ...], sizes: list[int]) -> list[GGUFTensor]:
    rows = _rows(tensor)
    if rows.shape[0] != sum(sizes):
        described = " + ".join(f"{size} ({name})" for name, size in zip(names, sizes))
        raise ValueError(f"tensor {tensor.name!r} has {rows.shape[0]} rows, expected {sum(sizes)} = {described}")
    pieces = np.split(rows, np.cumsum(sizes)[:-1])
    return [
        _from_rows(name, tensor.type_name, piece, (size, *tensor.shape[1:]))
        for name, size, piece in zip(names, sizes, pieces)
    ]


def _swap_halves(tensor: GGUFTensor) -> GGUFTensor:
    rows = _rows(tensor)
    half = rows.shape[0] // 2
    return _from_rows(tensor.name, tensor.type_name, np.concatenate([rows[half:], rows[:half]]), tensor.shape)


# ---------------------------------------------------------------- conversions


def to_original(tensors: list[GGUFTensor], architecture: str, config: Mapping) -> list[GGUFTensor]:
    """Rename (and fuse) diffusers-named tensors to the original checkpoint's tensors."""
    by_name = {tensor.name: tensor for tensor in tensors}
    try:
        rules = name_rules(architecture, config, by_name)
    except KeyError as error:
        raise ValueError(f"tensor {error.args[0]!r} has no {architecture} checkpoint name") from None
    converted = []
    for rule in rules:
        parts = [by_name[name] for name in rule.parts]
        if len(parts) == 1:
            tensor = GGUFTensor(rule.original, parts[0].type_name, parts[0].shape, parts[0].data)
        else:
            tensor = _stack(rule.original, parts)
        converted.append(_swap_halves(tensor) if rule.swap_halves else tensor)
    return converted


@dataclass
class Converted:
    """Tensors of a file under diffusers names, and the file's name for each of the model's tensors."""

    tensors: list[GGUFTensor]
    file_names: dict[str, str]


def from_original(
    path, tensors: list[GGUFTensor], architecture: str, config: Mapping, shapes: Mapping[str, tuple[int, ...]]
) -> Converted:
    """Rename (and split) a file's original-named tensors to the diffusers names of a model.

    ``shapes`` maps the model's tensor names to their shapes; fused rows are split by them. Tensors of
    the file that match none of the model's are returned under their own names, so the caller reports
    them with the other unknown tensors. A file whose names are already the model's is returned as is.

    In a whole checkpoint (stable-diffusion.cpp writes the VAE and text encoders into the same file),
    only the tensors under ``model.diffusion_model.`` are read.
    """
    prefixed = [tensor for tensor in tensors if tensor.name.startswith(LDM_PREFIX)]
    if prefixed:
        if len(prefixed) < len(tensors):
            logger.info(
                "%s: reading the %d tensors under %r, ignoring %d others (VAE, text encoders)",
                path,
                len(prefixed),
                LDM_PREFIX,
                len(tensors) - len(prefixed),
            )
        tensors = [GGUFTensor(t.name.removeprefix(LDM_PREFIX), t.type_name, t.shape, t.data) for t in prefixed]
    rules = name_rules(architecture, config, shapes)
    file_names = {part: rule.original for rule in rules for part in rule.parts}
    if all(tensor.name in shapes for tensor in tensors):
        return Converted(tensors, {name: name for name in shapes})

    if architecture == "flux":
        return Converted(_split_flux(path, tensors, rules, shapes), file_names)
    return Converted(_rename_ldm(path, tensors, config), file_names)


def _rename_ldm(path, tensors: list[GGUFTensor], config: Mapping) -> list[GGUFTensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    # The converter moves values by name, so converting names to themselves yields the renaming.
    try:
        renamed = convert_ldm_unet_checkpoint({LDM_PREFIX + t.name: t.name for t in tensors}, dict(config))
    except KeyError as error:
        raise GGUFFileError(f"{path}: tensor {error.args[0]!r} is missing") from None
    by_name = {tensor.name: tensor for tensor in tensors}
    converted = [
        GGUFTensor(new, by_name[old].type_name, by_name[old].shape, by_name[old].data)
        for new, old in renamed.items()
        if old is not None
    ]
    consumed = set(renamed.values())
    converted += [tensor for tensor in tensors if tensor.name not in consumed]
    return converted


def _split_flux(path, tensors: list[GGUFTensor], rules: list[NameRule], shapes: Mapping) -> list[GGUFTensor]:
    by_name = {tensor.name: tensor for tensor in tensors}
    converted = []
    for rule in rules:
        tensor = by_name.pop(rule.original, None)
        if tensor is None:
            continue  # reported as missing by the caller, under the file's name
        try:
            if rule.swap_halves:
                tensor = _swap_halves(tensor)
            if len(rule.parts) == 1:
                converted.append(GGUFTensor(rule.parts[0], tensor.type_name, tensor.shape, tensor.data))
            else:
                converted += _split(tensor, rule.parts, [shapes[name][0] for name in rule.parts])
        except ValueError as error:
            raise GGUFFileError(f"{path}: {error}") from None
    return converted + list(by_name.values())
