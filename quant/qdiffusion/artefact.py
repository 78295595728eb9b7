"""The calibrated model on disk: a safetensors file with integer weights, quantizer parameters and a config.

Tensors are those of ``quant.qdiffusion.modules`` under the UNet's module names: ``{layer}.qweight``
(uint8 codes), ``{layer}.weight_quantizers.{i}.scales`` / ``.zero_points``, and the activation
quantizers' ``scales`` / ``zero_points`` (one value per timestep group). Biases, norms and every
other float weight come from the base model when the file is loaded, so the file records a hash of
the base weights and the UNet's config, and loading names whatever differs.

The config (JSON in the safetensors metadata under ``lowbit.qdiffusion``) has a ``format_version``;
this module reads versions up to ``FORMAT_VERSION``.
"""

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from quant.files import atomic_path

FORMAT_VERSION = 1
METADATA_KEY = "lowbit.qdiffusion"
QUANTIZED_KEYS = (".qweight", "_quantizers.", "_quantizer.")
# Config entries of diffusers models that describe the file, not the model.
IGNORED_CONFIG_KEYS = {"_diffusers_version", "_name_or_path", "_use_default_values", "_class_name"}


class ArtefactMismatch(ValueError):
    """A saved calibration that does not fit the base model it is being loaded into."""


def weights_hash(model: nn.Module) -> str:
    """SHA-256 of the model's float weights, each rounded to bfloat16 first.

    Rounding first gives the same hash for a model loaded in float32 on a CPU and in bfloat16 or
    float16 on a GPU, as long as its weights round to the same bfloat16 values.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not tensor.is_floating_point():
            continue
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def model_config(model: nn.Module) -> dict:
    """Return the diffusers config of ``model`` as plain JSON values, without the file-describing entries."""
    config = dict(getattr(model, "config", {}))
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in IGNORED_CONFIG_KEYS}, default=list))


def layer_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Return the weight shape of every Conv2d and Linear of a full-precision model, by name."""
    return {name: list(m.weight.shape) for name, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)}


def float_layer_bytes(model: nn.Module) -> int:
    """Return the bytes of the Conv2d and Linear weights of a full-precision model."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear))


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: tensor.detach().contiguous().cpu()
        for name, tensor in model.state_dict().items()
        if any(marker in name for marker in QUANTIZED_KEYS)
    }


def save(model: nn.Module, config: dict, path: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the quantized tensors of ``model`` (or ``state``, taken before int8 conversion) and ``config``.

    The write is atomic.
    """
    if state is None and getattr(model, "lowbit_int8", None) is not None:
        raise ValueError(
            "cannot save this UNet, because its int8 layers no longer contain the stored codes. "
            "Save it before calling int8.convert"
        )
    path = Path(path)
    metadata = {METADATA_KEY: json.dumps({**config, "format_version": FORMAT_VERSION}, sort_keys=True)}
    with atomic_path(path) as temporary:
        save_file(quantized_state(model) if state is None else state, str(temporary), metadata=metadata)
    return path


def read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Return (config, tensors) of a saved calibration; raise ArtefactMismatch for other files."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise ArtefactMismatch(f"{path} is not a readable .safetensors file: {error}") from error
    if METADATA_KEY not in metadata:
        raise ArtefactMismatch(
            f"{path} is a safetensors file but not a Q-Diffusion calibration (no {METADATA_KEY!r} metadata); "
            "pass a file written by the qdiffusion plugin"
        )
    config = json.loads(metadata[METADATA_KEY])
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtefactMismatch(
            f"{path} has format version {version!r}; this version of the plugin reads up to {FORMAT_VERSION}. "
            "Update LowBit Studio to load it"
        )
    return config, tensors


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_base(config: dict, base: nn.Module, path: Path) -> None:
    """Raise ArtefactMismatch naming every difference between the saved base model and ``base``."""
    problems = []
    saved_class, base_class = config.get("model_class"), type(base).__name__
    if saved_class != base_class:
        problems.append(f"model class: the file has {saved_class}, the model is {base_class}")

    saved, current = config.get("model_config", {}), model_config(base)
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            problems.append(
                f"config {key}: the file has {_short(saved.get(key))}, the model has {_short(current.get(key))}"
            )

    layers = layer_shapes(base)
    saved_layers = config.get("layers", {})
    missing = sorted(set(saved_layers) - set(layers))
    extra = sorted(set(layers) - set(saved_layers))
    if missing:
        problems.append(
            f"layers in the file but not in the model: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
        )
    if extra:
        problems.append(
            f"layers in the model but not in the file: {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else "")
        )
    for name in sorted(set(saved_layers) & set(layers)):
        if saved_layers[name] != layers[name]:
            problems.append(f"layer {name}: the file has shape {saved_layers[name]}, the model {layers[name]}")

    if not problems:
        digest = weights_hash(base)
        if digest != config.get("base_hash"):
            problems.append(
                f"weights: the model's hash is {digest[:12]}..., the file was calibrated on "
                f"{str(config.get('base_hash'))[:12]}... (same architecture, different weights)"
            )

    if problems:
        listed = "; ".join(problems)
        raise ArtefactMismatch(
            f"{path} was calibrated on another model ({config.get('source', 'unknown source')}): {listed}. "
            "Load it with the model it was calibrated on"
        )
