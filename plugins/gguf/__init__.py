"""GGUF plugin: ggml's block quantization of UNets and transformers, from Q8_0 down to Q2_K.

Weights are packed by ggml's and gguf-py's quantizers (``quant.formats.gguf``) and saved as a
``.gguf`` file that ``gguf.GGUFReader`` and other GGUF tools read. The type of each layer comes from
a recipe (``plugins.gguf.recipes``): one type for all, or a llama.cpp-style ``_S``/``_M`` mix. What
cannot be packed (1-D tensors, weights that fill no whole block row), the input, output and embedding
layers, and layers on the keep list stay in full precision and are reported.
"""

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch
from torch import nn

from plugins.base import Plugin, PluginOptions, Progress, QuantizeReport, option
from plugins.gguf import text_encoders
from plugins.gguf.recipes import RECIPES, is_full_precision_layer
from quant.formats import gguf as gguf_format
from quant.formats import gguf_names
from quant.layers import (
    QUANTIZABLE,
    QuantizedLayer,
    SkipLayer,
    SwapReport,
    check_keep_patterns,
    replace_module,
    swap_layers,
    weight_bytes,
)

logger = logging.getLogger(__name__)

QTYPES = tuple(RECIPES)
FLOAT_NUMPY = {torch.float32: np.float32, torch.float16: np.float16}


@dataclass(frozen=True)
class GGUFOptions(PluginOptions):
    qtype: str = option(
        "Q8_0",
        "GGUF block type of the quantized weights, or a mix (_S, _M, _L) that gives attention value and "
        "feed-forward output layers a higher type",
        choices=QTYPES,
    )
    keep: tuple[str, ...] = option((), "layer names or fnmatch patterns to keep in full precision, comma-separated")
    quantize_io: bool = option(
        False,
        "also quantize the input, output and embedding layers (conv_in, conv_out, time and text embeddings), "
        "which GGUF converters keep in full precision",
    )


@dataclass(frozen=True)
class GGUFWeightFormat:
    """A GGUF block type as a ``quant.layers.WeightFormat``."""

    name: str

    def unpack(self, qweight: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return gguf_format.unpack(qweight, self.name, shape, dtype)


class GGUFPlugin(Plugin):
    id = "gguf"
    name = "GGUF"
    description = "ggml block quantization of the UNet or transformer weights, saved as a .gguf file."
    reference = "GGUF file format and ggml block types (llama.cpp)"
    parts = ("unet", "transformer")
    families = ("*",)
    options_class = GGUFOptions
    file_suffix = ".gguf"

    def quantize(
        self, part: nn.Module, options: GGUFOptions, progress: Progress | None = None
    ) -> tuple[nn.Module, QuantizeReport]:
        """Quantize every linear and convolution weight of ``part`` in place."""
        started = time.perf_counter()
        total = sum(type(module) in QUANTIZABLE for module in part.modules())
        done = 0

        def pack(name: str, module: nn.Module):
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total, name)
            qtype = _layer_qtype(name, tuple(module.weight.shape), options)
            return gguf_format.pack(module.weight, qtype), GGUFWeightFormat(qtype)

        swap = swap_layers(part, pack, compute_dtype=_compute_dtype(part), keep=options.keep)
        return part, QuantizeReport.from_swap(self.id, options, swap, time.perf_counter() - started)

    @staticmethod
    def _denoiser_names(path: Path, found, tensors: list, base_part: nn.Module, expected: dict):
        """Check a UNet or transformer file's architecture and rename its tensors to diffusers names.

        A file without ``general.architecture`` is recognised by its tensor names. Returns the
        architecture, the renamed tensors and each model tensor's name in the file.
        """
        model_class = type(base_part).__name__
        config = dict(getattr(base_part, "config", {}))
        if found is None:
            found = gguf_names.detect_architecture(tensor.name for tensor in tensors)
            if found is None:
                raise gguf_format.GGUFFileError(
                    f"{path}: the file has no general.architecture and its tensor names match none of "
                    f"{', '.join(gguf_names.ARCHITECTURES)}"
                )
        architecture = gguf_names.check_architecture(path, found, model_class, config)
        file_names = {name: name for name in expected}
        if architecture in gguf_names.ARCHITECTURES:
            shapes = {name: tuple(tensor.shape) for name, tensor in expected.items()}
            converted = gguf_names.from_original(path, tensors, architecture, config, shapes)
            tensors, file_names = converted.tensors, converted.file_names
        return architecture, tensors, file_names

    def estimate_bytes(self, part: nn.Module, options: GGUFOptions) -> int:
        """Return the tensor bytes of the file ``save`` would write for ``part``, without quantizing it."""
        layers = [name for name, module in part.named_modules() if type(module) in QUANTIZABLE]
        check_keep_patterns(layers, options.keep)
        packed, total = set(), 0
        for name, module in part.named_modules():
            if type(module) not in QUANTIZABLE or any(fnmatch(name, pattern) for pattern in options.keep):
                continue
            shape = tuple(module.weight.shape)
            try:
                qtype = _layer_qtype(name, shape, options)
            except SkipLayer:
                continue
            packed.add(f"{name}.weight")
            total += gguf_format.packed_nbytes(shape, qtype)
        for name, tensor in part.state_dict().items():
            if name not in packed:
                total += tensor.numel() * (2 if tensor.dtype == torch.float16 else 4)
        return total

    def save(self, part: nn.Module, report: QuantizeReport, options: GGUFOptions, path: Path) -> Path:
        """Write the whole part: packed weights in their block type, every other tensor in F32 or F16.

        SD1.x/SDXL UNets and FLUX transformers are written under the original checkpoint's tensor
        names with ``general.architecture`` "sd1", "sdxl" or "flux", as ComfyUI-GGUF reads them.
        Other models keep diffusers names, and their architecture is the class name in lowercase.
        ``lowbit.tensor_names`` records which names the file uses.

        Packed convolution weights are rows of ``in * kh * kw`` values, with their shape in
        ``comfy.gguf.orig_shape.<name>``. ComfyUI-GGUF reads them, but diffusers 0.42 does not,
        because it loads packed ``nn.Linear`` weights only.
        """
        tensors = []
        for name, module in part.named_modules():
            if isinstance(module, QuantizedLayer):
                tensors.append(_packed_tensor(f"{name}.weight", module))
        for name, tensor in part.state_dict().items():
            if name.endswith(".qweight"):
                continue
            dtype = FLOAT_NUMPY.get(tensor.dtype, np.float32)
            data = tensor.detach().float().cpu().numpy().astype(dtype)
            tensors.append(
                gguf_format.GGUFTensor(name, "F32" if dtype is np.float32 else "F16", tuple(data.shape), data)
            )

        # _name_or_path is where the model was loaded from on this machine, not part of the model.
        raw_config = getattr(part, "config", {})
        raw_config = raw_config.to_dict() if hasattr(raw_config, "to_dict") else dict(raw_config)  # transformers'
        config = {key: value for key, value in raw_config.items() if key != "_name_or_path"}
        architecture = gguf_names.architecture_of(type(part).__name__, config)
        path = Path(path)
        if text_encoders.is_text_encoder(part):
            architecture = text_encoders.architecture_for(part)
            naming = "llama.cpp" if architecture == "t5encoder" else "transformers"
            names = text_encoders.file_names(part, [tensor.name for tensor in tensors])
            written = {}  # tied tensors (T5's shared and embed_tokens) map to one file name, written once
            for tensor in tensors:
                tensor.name = names[tensor.name]
                written.setdefault(tensor.name, tensor)
            tensors = list(written.values())
        elif architecture:
            try:
                tensors = gguf_names.to_original(tensors, architecture, config)
            except ValueError as error:
                raise ValueError(f"cannot write {path} with {architecture} tensor names: {error}") from error
            naming = gguf_names.ORIGINAL_NAMES
        else:
            architecture, naming = type(part).__name__.lower(), gguf_names.DIFFUSERS_NAMES
        metadata = {
            "lowbit.plugin": self.id,
            "lowbit.options": options.to_json(),
            "lowbit.model_class": type(part).__name__,
            "lowbit.model_config": json.dumps(config, default=str, sort_keys=True),
            "lowbit.tensor_names": naming,
        }
        gguf_format.write_file(path, architecture, tensors, metadata)
        return path

    def load(self, path: Path, base_part: nn.Module) -> tuple[nn.Module, QuantizeReport]:
        """Load a .gguf file into ``base_part`` (changed in place), checking every tensor against it.

        Files with original checkpoint names (ours, ComfyUI-GGUF's, stable-diffusion.cpp's with the
        ``model.diffusion_model.`` prefix) are renamed and their fused rows split. A file without
        ``general.architecture`` is recognised by its tensor names.
        """
        started = time.perf_counter()
        metadata, tensors = gguf_format.read_file(path)
        model_class = type(base_part).__name__
        expected = base_part.state_dict()
        modules = dict(base_part.named_modules())
        compute_dtype = _compute_dtype(base_part)
        stored_types = Counter(tensor.type_name for tensor in tensors)

        found = metadata.get("general.architecture")
        if text_encoders.is_text_encoder(base_part):
            text_encoders.check_architecture(path, found, base_part)
            architecture = found
            tensors, file_names = text_encoders.to_transformers_names(path, tensors, base_part, expected)
        elif found in text_encoders.ALL_ARCHITECTURES:
            raise gguf_format.GGUFFileError(
                f"{path} is a {found} text encoder file; load it as a text encoder (--gguf-text-encoder), "
                f"not into the {model_class}"
            )
        else:
            architecture, tensors, file_names = self._denoiser_names(path, found, tensors, base_part, expected)

        def label(name: str) -> str:
            file_name = file_names.get(name, name)
            return repr(name) if file_name == name else f"{file_name!r} ({name})"

        # A quantized layer copies its module's bias when it is built, so biases load before weights.
        tensors = sorted(tensors, key=lambda tensor: tensor.type_name in gguf_format.BLOCK_TYPES)
        swap, seen, qtypes = SwapReport(), set(), Counter()
        for tensor in tensors:
            if tensor.name not in expected:
                raise gguf_format.GGUFFileError(
                    f"{path}: tensor {tensor.name!r} does not exist in the {model_class} it is loaded into"
                )
            target = expected[tensor.name]
            _check_shape(path, label(tensor.name), tensor.shape, tuple(target.shape))
            seen.add(tensor.name)
            if tensor.type_name in gguf_format.BLOCK_TYPES:
                if _load_packed(path, base_part, modules, tensor, target, compute_dtype, swap, label):
                    qtypes[tensor.type_name] += 1
            else:
                _load_float(tensor, target, modules, swap)

        missing = sorted(set(expected) - seen)
        if missing:
            listed = ", ".join(label(name) for name in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise gguf_format.GGUFFileError(f"{path}: {len(missing)} tensors of the model are missing: {listed}{more}")

        logger.info(
            "loaded %s (%s, %s names): %s; %.2f bits per quantized weight, %.1f MB resident",
            path,
            architecture,
            metadata.get("lowbit.tensor_names") or _naming(architecture),
            ", ".join(f"{count} {type_name}" for type_name, count in stored_types.most_common()),
            swap.bits_per_weight,
            weight_bytes(base_part) / 1e6,
        )
        # Files from other converters have no options; their most common block type names them.
        stored = gguf_format.metadata_json(metadata, "lowbit.options")
        qtype = stored.get("qtype") or (qtypes.most_common(1)[0][0] if qtypes else "Q8_0")
        options = {"qtype": qtype, "keep": list(stored.get("keep", ())), "quantize_io": stored.get("quantize_io")}
        return base_part, QuantizeReport.from_swap(self.id, options, swap, time.perf_counter() - started)


def _load_packed(path, part, modules, tensor, target, compute_dtype, swap: SwapReport, label) -> bool:
    """Load a packed file tensor as a quantized layer and return True, or dequantize it and return False.

    Only linear and convolution weights stay packed; a packed weight of another module (an embedding)
    is dequantized into it.
    """
    layer_name = tensor.name.removesuffix(".weight")
    module = modules.get(layer_name)
    if type(module) in QUANTIZABLE:
        qweight = _packed_rows(tensor).to(target.device)
        layer = QUANTIZABLE[type(module)](module, qweight, GGUFWeightFormat(tensor.type_name), compute_dtype)
        replace_module(part, layer_name, layer)
        swap.quantized.append(layer_name)
        swap.bytes_before += target.numel() * target.element_size()
        swap.bytes_after += qweight.numel()
        swap.values += target.numel()
        return True
    if not tensor.name.endswith(".weight") or module is None:
        raise gguf_format.GGUFFileError(
            f"{path}: tensor {label(tensor.name)} is {tensor.type_name} but {layer_name!r} is not "
            "a linear or convolution layer"
        )
    with torch.no_grad():
        target.copy_(gguf_names.float_values(tensor).reshape(target.shape))
    swap.skipped.append((layer_name, f"{tensor.type_name} in the file, dequantized at load ({type(module).__name__})"))
    return False


def _load_float(tensor: gguf_format.GGUFTensor, target: torch.Tensor, modules: dict, swap: SwapReport) -> None:
    """Copy a float file tensor into the model; a linear or conv weight stored so is reported as kept."""
    with torch.no_grad():
        target.copy_(gguf_names.float_values(tensor).reshape(target.shape))
    layer_name = tensor.name.removesuffix(".weight")
    if tensor.name.endswith(".weight") and type(modules.get(layer_name)) in QUANTIZABLE:
        swap.skipped.append((layer_name, f"stored as {tensor.type_name} in the file"))


def _naming(architecture: str) -> str:
    """Name the tensor naming of a file that does not record it, from its architecture."""
    if architecture in gguf_names.ARCHITECTURES:
        return gguf_names.ORIGINAL_NAMES
    if architecture in ("t5encoder", "t5"):
        return "llama.cpp"
    return "transformers" if architecture == "clip" else gguf_names.DIFFUSERS_NAMES


def _layer_qtype(name: str, shape: tuple[int, ...], options: GGUFOptions) -> str:
    """Return the block type of one layer under ``options``, or raise SkipLayer with the reason it stays."""
    if not options.quantize_io and is_full_precision_layer(name):
        raise SkipLayer("input, output or embedding layer (quantize_io is off)")
    qtype = RECIPES[options.qtype].qtype_for(name)
    reason = gguf_format.can_pack(shape, qtype)
    if reason:
        raise SkipLayer(reason)
    return qtype


def _packed_tensor(name: str, layer: QuantizedLayer) -> gguf_format.GGUFTensor:
    """Return a packed layer weight in the rows ``gguf_format.pack`` made; the writer records other shapes."""
    qtype = layer.weight_format.name
    rows, _ = gguf_format.pack_rows(layer.weight_shape, qtype)
    return gguf_format.GGUFTensor(name, qtype, layer.weight_shape, layer.qweight.cpu().numpy().reshape(rows, -1))


def _packed_rows(tensor: gguf_format.GGUFTensor) -> torch.Tensor:
    """Return the blocks of a file tensor as uint8 [rows, row_bytes], or [blocks, block_bytes] when rows do not fit."""
    kind = gguf_format.block_type(tensor.type_name)
    data = torch.from_numpy(np.array(tensor.data, dtype=np.uint8))
    if gguf_format.row_length(tensor.shape) % kind.block_size == 0:
        return data.reshape(tensor.shape[0], -1)
    return data.reshape(-1, kind.type_size)


def _check_shape(path: Path, label: str, found: tuple[int, ...], expected: tuple[int, ...]) -> None:
    """Raise unless a file tensor's shape is the model's, up to size-1 dimensions.

    Size-1 dimensions may differ because they do not change the order of the values. So a 1x1
    convolution may be stored as a 2-D [out, in] weight, and a linear weight as [out, in, 1, 1].
    stable-diffusion.cpp stores SDXL's proj_in and proj_out that way. Any other reshape is an error.
    """
    if found == expected:
        return
    same_count = int(np.prod(found)) == int(np.prod(expected))
    if same_count and [n for n in found if n != 1] == [n for n in expected if n != 1]:
        return
    detail = "; it holds as many values, but only size-1 dimensions may differ" if same_count else ""
    raise gguf_format.GGUFFileError(f"{path}: tensor {label} has shape {found}, expected {expected}{detail}")


def _compute_dtype(part: nn.Module) -> torch.dtype:
    """Return the dtype the part was loaded in, which is the compute dtype the device probe picked."""
    return next(part.parameters()).dtype


plugin = GGUFPlugin()
