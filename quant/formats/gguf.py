"""GGUF block formats: packing through gguf-py, dequantization in PyTorch, file read and write.

Quantization uses the ``gguf`` package (llama.cpp's own Python port of ggml's reference
quantizers), so the blocks we write are the blocks ggml defines. Dequantization is written here in
PyTorch, so it runs on any device and in any compute dtype. In float32 it equals
``gguf.quants.dequantize`` bit for bit, which the tests check.

Block layouts (``d`` and ``m`` are float16, ``qs`` packs 4-bit values, low nibbles holding values
0-15 of a block and high nibbles values 16-31, ``qh`` holds the fifth bit of value j at bit j):

    type   bytes  layout                    value
    Q8_0   34     d, qs[32] int8            d * q
    Q5_1   24     d, m, qh[4], qs[16]       d * q + m
    Q5_0   22     d, qh[4], qs[16]          d * (q - 16)
    Q4_1   20     d, m, qs[16]              d * q + m
    Q4_0   18     d, qs[16]                 d * (q - 8)

A packed weight is a uint8 tensor of shape [rows, row_bytes]; a weight of shape [out, in] or
[out, in, kh, kw] is packed as rows of ``in * kh * kw`` values, which must be a multiple of 32.
"""

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from quant.files import atomic_path
from quant.formats.gguf_check import GGUFHeaderError, check_file

logger = logging.getLogger(__name__)

BLOCK_SIZE = 32
# Metadata key prefix for the original shape of a tensor stored flattened to rows (ComfyUI-GGUF's key).
ORIGINAL_SHAPE_KEY = "comfy.gguf.orig_shape."
FLOAT_TYPES = {QType.F32: torch.float32, QType.F16: torch.float16, QType.BF16: torch.bfloat16}


# ---------------------------------------------------------------- dequantizers, one per type


def _half(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """Read the float16 at byte ``offset`` of every block as float32 [n_blocks, 1]."""
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Unpack [n_blocks, 16] bytes into [n_blocks, 32] values: low nibbles first, then high."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """Unpack [n_blocks, 4] little-endian bytes into the [n_blocks, 32] bits 0..31."""
    shifts = torch.arange(8, device=qh.device, dtype=torch.uint8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)


def _dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _half(blocks, 0)
    qs = blocks[:, 2:].contiguous().view(torch.int8).float()
    return qs * d


def _dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _half(blocks, 0)
    q = _nibbles(blocks[:, 2:]).to(torch.int8) - 8
    return d * q.float()


def _dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _half(blocks, 0), _half(blocks, 2)
    q = _nibbles(blocks[:, 4:]).float()
    return d * q + m


def _dequantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _half(blocks, 0)
    q = (_nibbles(blocks[:, 6:]) | (_fifth_bits(blocks[:, 2:6]) << 4)).to(torch.int8) - 16
    return d * q.float()


def _dequantize_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _half(blocks, 0), _half(blocks, 2)
    q = (_nibbles(blocks[:, 8:]) | (_fifth_bits(blocks[:, 4:8]) << 4)).float()
    return d * q + m


@dataclass(frozen=True)
class BlockType:
    """One GGUF block type: its size and its PyTorch dequantizer."""

    qtype: QType
    block_size: int
    type_size: int
    dequantize_blocks: Callable[[torch.Tensor], torch.Tensor]

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size


BLOCK_TYPES: dict[str, BlockType] = {}


def _register(qtype: QType, dequantize_blocks: Callable[[torch.Tensor], torch.Tensor]) -> None:
    if qtype.name in BLOCK_TYPES:
        raise ValueError(f"block type {qtype.name} is registered twice")
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    BLOCK_TYPES[qtype.name] = BlockType(qtype, block_size, type_size, dequantize_blocks)


_register(QType.Q8_0, _dequantize_q8_0)
_register(QType.Q5_1, _dequantize_q5_1)
_register(QType.Q5_0, _dequantize_q5_0)
_register(QType.Q4_1, _dequantize_q4_1)
_register(QType.Q4_0, _dequantize_q4_0)


def block_type(name: str) -> BlockType:
    """Look up a block type by its GGUF name ("Q4_0"), with a clear error for unknown names."""
    try:
        return BLOCK_TYPES[name]
    except KeyError:
        raise ValueError(f"unsupported GGUF type {name!r}; supported: {', '.join(BLOCK_TYPES)}") from None


# ---------------------------------------------------------------- packing and unpacking


def row_length(shape: tuple[int, ...]) -> int:
    """Number of values in one packed row of a weight of this shape (all but the first dimension)."""
    return int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])


def can_pack(shape: tuple[int, ...]) -> str | None:
    """Return None if a weight of this shape can be packed, else the reason it cannot."""
    if len(shape) < 2:
        return f"{len(shape)}-D tensors stay in full precision"
    if row_length(shape) % BLOCK_SIZE:
        return f"rows of {row_length(shape)} values are not a multiple of the {BLOCK_SIZE}-value block"
    return None


def pack(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """Quantize a weight into uint8 blocks [rows, row_bytes] with gguf-py's reference quantizer."""
    reason = can_pack(tuple(weight.shape))
    if reason:
        raise ValueError(f"cannot pack a weight of shape {tuple(weight.shape)} as {qtype}: {reason}")
    rows = weight.detach().float().cpu().reshape(weight.shape[0], -1).numpy()
    return torch.from_numpy(gguf.quants.quantize(rows, block_type(qtype).qtype))


def unpack(
    qweight: torch.Tensor, qtype: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dequantize uint8 blocks [rows, row_bytes] into a ``dtype`` tensor of ``shape``.

    The dequantized values are computed in float32 and rounded to ``dtype`` once at the end.
    """
    kind = block_type(qtype)
    blocks = qweight.reshape(-1, kind.type_size)
    values = kind.dequantize_blocks(blocks)
    return values.reshape(shape).to(dtype)


def packed_nbytes(shape: tuple[int, ...], qtype: str) -> int:
    kind = block_type(qtype)
    return int(np.prod(shape)) // kind.block_size * kind.type_size


# ---------------------------------------------------------------- files


@dataclass
class GGUFTensor:
    """A tensor as stored in a GGUF file: packed blocks or a plain float array."""

    name: str
    type_name: str  # a GGUF type name: "Q4_0", "F32", ...
    shape: tuple[int, ...]  # the logical (PyTorch) shape, original shape restored
    data: np.ndarray  # uint8 blocks [rows, row_bytes] for block types, float values otherwise


def write_file(path: Path, architecture: str, tensors: list[GGUFTensor], metadata: dict[str, str]) -> None:
    """Write tensors and string metadata to a GGUF file atomically (temporary file, then rename)."""
    path = Path(path)
    with atomic_path(path) as temporary:
        writer = gguf.GGUFWriter(temporary, architecture)
        for key, value in metadata.items():
            writer.add_string(key, value)
        for tensor in tensors:
            if tensor.type_name in BLOCK_TYPES:
                if len(tensor.shape) != 2:
                    writer.add_array(ORIGINAL_SHAPE_KEY + tensor.name, list(tensor.shape))
                writer.add_tensor(tensor.name, tensor.data, raw_dtype=block_type(tensor.type_name).qtype)
            else:
                writer.add_tensor(tensor.name, tensor.data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    logger.info("wrote %s: %d tensors, %.1f MB", path, len(tensors), path.stat().st_size / 1e6)


class GGUFFileError(ValueError):
    """A GGUF file that cannot be read or does not fit what it is loaded into."""


def read_file(path: Path) -> tuple[dict[str, object], list[GGUFTensor]]:
    """Read a GGUF file's metadata and tensors, after checking its header and tensor table.

    Files whose tensors have types we cannot dequantize, or do not fit the file, are rejected.
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFFileError(f"GGUF file not found: {path}")
    try:
        check_file(path, supported={*BLOCK_TYPES, *(qtype.name for qtype in FLOAT_TYPES)})
    except GGUFHeaderError as error:
        raise GGUFFileError(str(error)) from error
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as error:
        raise GGUFFileError(f"{path} is not a readable GGUF file: {error}") from error

    metadata = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = []
    for tensor in reader.tensors:
        type_name = tensor.tensor_type.name
        if type_name not in BLOCK_TYPES and tensor.tensor_type not in FLOAT_TYPES:
            raise GGUFFileError(
                f"{path}: tensor {tensor.name!r} has type {type_name}, which this version cannot dequantize; "
                f"supported: {', '.join([*BLOCK_TYPES, 'F32', 'F16', 'BF16'])}"
            )
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        original = metadata.get(ORIGINAL_SHAPE_KEY + tensor.name)
        if original is not None:
            original = tuple(int(n) for n in original)
            if int(np.prod(original)) != int(np.prod(shape)):
                raise GGUFFileError(
                    f"{path}: tensor {tensor.name!r} records original shape {original} "
                    f"but holds {int(np.prod(shape))} values"
                )
            shape = original
        tensors.append(GGUFTensor(tensor.name, type_name, shape, np.asarray(tensor.data)))
    return metadata, tensors


def metadata_json(metadata: dict[str, object], key: str) -> dict:
    """Decode a JSON string stored under ``key``, or an empty dict when it is absent."""
    value = metadata.get(key)
    return json.loads(value) if isinstance(value, str) else {}
