"""Text encoder GGUF files: T5 encoders under llama.cpp's tensor names, CLIP under transformers' names.

Community T5 encoder files for FLUX (city96's, for example) come from llama.cpp's converter, so they
use llama.cpp's names (``enc.blk.0.attn_q.weight``) and ``general.architecture`` "t5encoder" or "t5".
gguf-py's tensor name map turns a transformers ``T5EncoderModel`` state dict name into that name, so
no name table is written here. CLIP text encoder files are read when they carry transformers' names
under ``general.architecture`` "clip", which is what our plugin writes for a CLIP text encoder.
"""

from collections.abc import Mapping

import gguf

from quant.formats.gguf import GGUFFileError, GGUFTensor

# general.architecture values of text encoder files, by the transformers class they load into.
ARCHITECTURES = {"T5EncoderModel": ("t5encoder", "t5"), "CLIPTextModel": ("clip",)}
ALL_ARCHITECTURES = {value for values in ARCHITECTURES.values() for value in values}


def is_text_encoder(part) -> bool:
    return type(part).__name__ in ARCHITECTURES


def architecture_for(part) -> str:
    """Return the architecture our plugin writes for a text encoder."""
    return ARCHITECTURES[type(part).__name__][0]


def file_names(part, names: list[str]) -> dict[str, str]:
    """Map each state dict name of ``part`` to its name in a GGUF file."""
    if type(part).__name__ != "T5EncoderModel":
        return {name: name for name in names}
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, part.config.num_layers)
    mapped = {}
    for name in names:
        if name == "encoder.embed_tokens.weight":  # tied to shared.weight, stored once as token_embd
            mapped[name] = "token_embd.weight"
            continue
        file_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        mapped[name] = file_name if file_name is not None else name
    return mapped


def check_architecture(path, found: object, part) -> None:
    """Raise unless ``found`` (the file's general.architecture) fits the text encoder ``part``."""
    expected = ARCHITECTURES[type(part).__name__]
    if found not in expected:
        raise GGUFFileError(
            f"{path}: general.architecture is {found!r}, but the {type(part).__name__} it is loaded into "
            f"expects {' or '.join(repr(value) for value in expected)}"
        )


def to_transformers_names(
    path, tensors: list[GGUFTensor], part, state: Mapping[str, object]
) -> tuple[list[GGUFTensor], dict[str, str]]:
    """Rename a file's tensors to the state dict names of ``part``.

    Returns the renamed tensors and, for error messages, each state dict name's name in the file.
    A tensor that no state dict name maps to is an error naming it.
    """
    mapping = file_names(part, list(state))
    by_file_name: dict[str, list[str]] = {}
    for name, file_name in mapping.items():
        by_file_name.setdefault(file_name, []).append(name)
    renamed = []
    for tensor in tensors:
        targets = by_file_name.get(tensor.name)
        if not targets:
            raise GGUFFileError(
                f"{path}: tensor {tensor.name!r} does not exist in the {type(part).__name__} it is loaded into"
            )
        renamed += [GGUFTensor(name, tensor.type_name, tensor.shape, tensor.data) for name in targets]
    return renamed, mapping
