"""GGUF plugin: ggml's block quantization of UNets and transformers, from Q8_0 down to Q2_K.

Weights are packed by ggml's and gguf-py's quantizers (``quant.formats.gguf``) and saved as a
``.gguf`` file that ``gguf.GGUFReader`` and other GGUF tools read. The type of each layer comes from
a recipe (``plugins.gguf.recipes``): one type for all, or a llama.cpp-style ``_S``/``_M`` mix. What
cannot be packed (1-D tensors, weights that fill no whole block row), the input, output and embedding
layers, and layers on the keep list stay in full precision and are reported.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from plugins.base import Plugin, PluginOptions, Progress, QuantizeReport, option
from plugins.gguf.recipes import RECIPES, is_full_precision_layer
from quant.formats import gguf as gguf_format
from quant.layers import QUANTIZABLE, QuantizedLayer, SkipLayer, SwapReport, replace_module, swap_layers

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
        recipe = RECIPES[options.qtype]

        def pack(name: str, module: nn.Module):
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total, name)
            if not options.quantize_io and is_full_precision_layer(name):
                raise SkipLayer("input, output or embedding layer (quantize_io is off)")
            qtype = recipe.qtype_for(name)
            reason = gguf_format.can_pack(tuple(module.weight.shape), qtype)
            if reason:
                raise SkipLayer(reason)
            return gguf_format.pack(module.weight, qtype), GGUFWeightFormat(qtype)

        swap = swap_layers(part, pack, compute_dtype=_compute_dtype(part), keep=options.keep)
        return part, QuantizeReport.from_swap(self.id, options, swap, time.perf_counter() - started)

    def save(self, part: nn.Module, report: QuantizeReport, options: GGUFOptions, path: Path) -> Path:
        """Write the whole part: packed weights in their block type, every other tensor in F32 or F16."""
        tensors = []
        for name, module in part.named_modules():
            if isinstance(module, QuantizedLayer):
                data = module.qweight.cpu().numpy().reshape(module.weight_shape[0], -1)
                tensors.append(
                    gguf_format.GGUFTensor(f"{name}.weight", module.weight_format.name, module.weight_shape, data)
                )
        for name, tensor in part.state_dict().items():
            if name.endswith(".qweight"):
                continue
            dtype = FLOAT_NUMPY.get(tensor.dtype, np.float32)
            data = tensor.detach().float().cpu().numpy().astype(dtype)
            tensors.append(
                gguf_format.GGUFTensor(name, "F32" if dtype is np.float32 else "F16", tuple(data.shape), data)
            )
        # _name_or_path is where the model was loaded from on this machine, not part of the model.
        config = {key: value for key, value in dict(getattr(part, "config", {})).items() if key != "_name_or_path"}
        metadata = {
            "lowbit.plugin": self.id,
            "lowbit.options": options.to_json(),
            "lowbit.model_class": type(part).__name__,
            "lowbit.model_config": json.dumps(config, default=str, sort_keys=True),
        }
        # TODO(gguf): tensor names and general.architecture follow diffusers, not the original
        # checkpoint names that ComfyUI-GGUF and stable-diffusion.cpp expect.
        path = Path(path)
        gguf_format.write_file(path, type(part).__name__.lower(), tensors, metadata)
        return path

    def load(self, path: Path, base_part: nn.Module) -> tuple[nn.Module, QuantizeReport]:
        """Load a .gguf file into ``base_part`` (changed in place), checking every tensor against it."""
        started = time.perf_counter()
        metadata, tensors = gguf_format.read_file(path)
        expected = base_part.state_dict()
        modules = dict(base_part.named_modules())
        compute_dtype = _compute_dtype(base_part)
        swap, seen, qtypes = SwapReport(), set(), set()

        for tensor in tensors:
            if tensor.name not in expected:
                raise gguf_format.GGUFFileError(
                    f"{path}: tensor {tensor.name!r} does not exist in the {type(base_part).__name__} it is loaded into"
                )
            target = expected[tensor.name]
            if tuple(target.shape) != tensor.shape:
                raise gguf_format.GGUFFileError(
                    f"{path}: tensor {tensor.name!r} has shape {tensor.shape}, expected {tuple(target.shape)}"
                )
            seen.add(tensor.name)
            if tensor.type_name in gguf_format.BLOCK_TYPES:
                layer_name = tensor.name.removesuffix(".weight")
                module = modules.get(layer_name)
                if type(module) not in QUANTIZABLE:
                    raise gguf_format.GGUFFileError(
                        f"{path}: tensor {tensor.name!r} is {tensor.type_name} but {layer_name!r} is not a linear "
                        "or convolution layer"
                    )
                qweight = torch.from_numpy(np.array(tensor.data, dtype=np.uint8)).to(target.device)
                layer = QUANTIZABLE[type(module)](module, qweight, GGUFWeightFormat(tensor.type_name), compute_dtype)
                replace_module(base_part, layer_name, layer)
                swap.quantized.append(layer_name)
                swap.bytes_before += target.numel() * target.element_size()
                swap.bytes_after += qweight.numel()
                swap.values += target.numel()
                qtypes.add(tensor.type_name)
            else:
                with torch.no_grad():
                    target.copy_(torch.from_numpy(np.array(tensor.data)).reshape(target.shape))
                module = modules.get(tensor.name.removesuffix(".weight"))
                if tensor.name.endswith(".weight") and type(module) in QUANTIZABLE:
                    swap.skipped.append(
                        (tensor.name.removesuffix(".weight"), f"stored as {tensor.type_name} in the file")
                    )

        missing = sorted(set(expected) - seen)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise gguf_format.GGUFFileError(f"{path}: {len(missing)} tensors of the model are missing: {shown}")

        stored = gguf_format.metadata_json(metadata, "lowbit.options")
        qtype = stored.get("qtype") or (sorted(qtypes)[0] if qtypes else "Q8_0")
        options = GGUFOptions.from_dict({"qtype": qtype, "keep": stored.get("keep", ())})
        return base_part, QuantizeReport.from_swap(self.id, options, swap, time.perf_counter() - started)


def _compute_dtype(part: nn.Module) -> torch.dtype:
    """Return the dtype the part was loaded in, which is the compute dtype the device probe picked."""
    return next(part.parameters()).dtype


plugin = GGUFPlugin()
