"""GGUF block formats: packing through ggml and gguf-py, dequantization in PyTorch, file read and write.

Packing uses the field's own quantizers, so the blocks we write are the blocks ggml defines: gguf-py
(llama.cpp's numpy port of ggml's reference quantizers) for the legacy types, and ggml itself through
``quant.formats.ggml`` for the K-quants, which gguf-py cannot produce. IQ4_NL and IQ4_XS are read but
not written, because ggml produces good IQ blocks only with an importance matrix.

Dequantization runs in PyTorch, so it runs on any device and in any compute dtype. The legacy types
use the dequantizers below. The K-quants and IQ4 types use diffusers' GGUF dequantizers, called
with float32 arithmetic: with their default (float16 arithmetic) they differ from ggml's float32
results by up to 1e-3 on weights of 0.01. In float32 both equal ``gguf.quants.dequantize`` bit for
bit, which the tests check for every type; another dtype gets that float32 result rounded once.

Block layouts of the legacy types (``d`` and ``m`` are float16, ``qs`` packs 4-bit values, low
nibbles holding values 0-15 of a block and high nibbles values 16-31, ``qh`` holds the fifth bit of
value j at bit j):

    type   bytes  layout                    value
    Q8_0   34     d, qs[32] int8            d * q
    Q5_1   24     d, m, qh[4], qs[16]       d * q + m
    Q5_0   22     d, qh[4], qs[16]          d * (q - 16)
    Q4_1   20     d, m, qs[16]              d * q + m
    Q4_0   18     d, qs[16]                 d * (q - 8)

The K-quants hold 256 values per block in 16 or 8 sub-blocks, each with its own 4- to 8-bit scale.

A packed weight is a uint8 tensor of shape [rows, row_bytes]. A weight of shape [out, in] or
[out, in, kh, kw] is packed as ``out`` rows of ``in * kh * kw`` values when that row length is a
multiple of the block. Otherwise, when the weight has a multiple of 256 values, it is packed
flattened into rows of 256 values, as ComfyUI-GGUF's converter stores such tensors. Either way the
blocks follow the weight's own value order, so unpacking does not depend on the row split.
"""

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gguf
import numpy as np
import torch
from diffusers.quantizers.gguf.utils import dequantize_functions as diffusers_dequantizers
from gguf import GGMLQuantizationType as QType

from quant.files import atomic_path
from quant.formats import ggml
from quant.formats.gguf_check import GGUFHeaderError, check_file

logger = logging.getLogger(__name__)

# Row length that ComfyUI-GGUF's converter flattens weights to when their rows do not fit a block.
FLAT_ROW = 256
# Metadata key prefix for the original shape of a tensor stored flattened to rows (ComfyUI-GGUF's key).
ORIGINAL_SHAPE_KEY = "comfy.gguf.orig_shape."
FLOAT_TYPES = {QType.F32: torch.float32, QType.F16: torch.float16, QType.BF16: torch.bfloat16}


# ---------------------------------------------------------------- dequantizers of the legacy types


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


def _diffusers_float32(qtype: QType) -> Callable[[torch.Tensor], torch.Tensor]:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return partial(diffusers_dequantizers[qtype], block_size=block_size, type_size=type_size, dtype=torch.float32)


# ---------------------------------------------------------------- the block types


@dataclass(frozen=True)
class BlockType:
    """One GGUF block type: its size, its PyTorch dequantizer, and who packs it (None: read only)."""

    qtype: QType
    block_size: int
    type_size: int
    dequantize_blocks: Callable[[torch.Tensor], torch.Tensor]
    packer: str | None  # "gguf-py", "ggml" or None

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size


BLOCK_TYPES: dict[str, BlockType] = {}


def _register(qtype: QType, dequantize_blocks: Callable[[torch.Tensor], torch.Tensor], packer: str | None) -> None:
    if qtype.name in BLOCK_TYPES:
        raise ValueError(f"block type {qtype.name} is registered twice")
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    BLOCK_TYPES[qtype.name] = BlockType(qtype, block_size, type_size, dequantize_blocks, packer)


_register(QType.Q8_0, _dequantize_q8_0, "gguf-py")
_register(QType.Q6_K, _diffusers_float32(QType.Q6_K), "ggml")
_register(QType.Q5_K, _diffusers_float32(QType.Q5_K), "ggml")
_register(QType.Q5_1, _dequantize_q5_1, "gguf-py")
_register(QType.Q5_0, _dequantize_q5_0, "gguf-py")
_register(QType.Q4_K, _diffusers_float32(QType.Q4_K), "ggml")
_register(QType.Q4_1, _dequantize_q4_1, "gguf-py")
_register(QType.Q4_0, _dequantize_q4_0, "gguf-py")
_register(QType.Q3_K, _diffusers_float32(QType.Q3_K), "ggml")
_register(QType.Q2_K, _diffusers_float32(QType.Q2_K), "ggml")
_register(QType.IQ4_NL, _diffusers_float32(QType.IQ4_NL), None)
_register(QType.IQ4_XS, _diffusers_float32(QType.IQ4_XS), None)

# Types this version writes, highest precision first.
PACKABLE_TYPES = tuple(name for name, kind in BLOCK_TYPES.items() if kind.packer)


def block_type(name: str) -> BlockType:
    """Look up a block type by its GGUF name ("Q4_0"), with a clear error for unknown names."""
    try:
        return BLOCK_TYPES[name]
    except KeyError:
        raise ValueError(f"unsupported GGUF type {name!r}; supported: {', '.join(BLOCK_TYPES)}") from None


# ---------------------------------------------------------------- packing and unpacking


def row_length(shape: tuple[int, ...]) -> int:
    """Number of values in one row of a weight of this shape (all but the first dimension)."""
    return int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])


def can_pack(shape: tuple[int, ...], qtype: str = "Q8_0") -> str | None:
    """Return None if a weight of this shape can be packed as ``qtype``, else the reason it cannot."""
    if len(shape) < 2:
        return f"{len(shape)}-D tensors stay in full precision"
    block_size = block_type(qtype).block_size
    if row_length(shape) % block_size == 0:
        return None
    values = int(np.prod(shape))
    if values % FLAT_ROW == 0 and values > FLAT_ROW:
        return None
    return (
        f"rows of {row_length(shape)} values are not a multiple of the {block_size}-value {qtype} block, "
        f"and its {values} values do not fill whole {FLAT_ROW}-value rows"
    )


def pack_rows(shape: tuple[int, ...], qtype: str) -> tuple[int, int]:
    """Return the (rows, values per row) that a weight of this shape is packed as."""
    if row_length(shape) % block_type(qtype).block_size == 0:
        return int(shape[0]), row_length(shape)
    return int(np.prod(shape)) // FLAT_ROW, FLAT_ROW


def pack(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """Quantize a weight into uint8 blocks [rows, row_bytes] with ggml's or gguf-py's quantizer."""
    kind = block_type(qtype)
    shape = tuple(weight.shape)
    reason = can_pack(shape, qtype)
    if reason:
        raise ValueError(f"cannot pack a weight of shape {shape} as {qtype}: {reason}")
    if kind.packer is None:
        raise ValueError(f"{qtype} can be read but not written; pick one of {', '.join(PACKABLE_TYPES)}")
    rows = weight.detach().float().cpu().reshape(pack_rows(shape, qtype)).numpy()
    if kind.packer == "ggml":
        return torch.from_numpy(ggml.quantize_rows(rows, kind.qtype))
    return torch.from_numpy(gguf.quants.quantize(rows, kind.qtype))


# On the CPU, "ggml" dequantizes with ggml's C functions when llama-cpp-python is installed, and
# "torch" with the PyTorch dequantizers above, which every other device uses. Both give the same bits.
CPU_DEQUANTIZER = os.environ.get("LOWBIT_GGUF_CPU_DEQUANTIZER", "ggml")
if CPU_DEQUANTIZER not in ("ggml", "torch"):
    raise ValueError(f"LOWBIT_GGUF_CPU_DEQUANTIZER must be 'ggml' or 'torch', got {CPU_DEQUANTIZER!r}")


def unpack(
    qweight: torch.Tensor, qtype: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dequantize uint8 blocks [rows, row_bytes] into a ``dtype`` tensor of ``shape``.

    The dequantized values are computed in float32 and rounded to ``dtype`` once at the end.
    """
    kind = block_type(qtype)
    if qweight.device.type == "cpu" and CPU_DEQUANTIZER == "ggml" and ggml.can_dequantize(kind.qtype):
        values = ggml.dequantize(qweight, kind.qtype)
    else:
        values = kind.dequantize_blocks(qweight.reshape(-1, kind.type_size))
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
                kind = block_type(tensor.type_name)
                rows, row_bytes = tensor.data.shape
                if (rows, row_bytes // kind.type_size * kind.block_size) != tuple(tensor.shape):
                    writer.add_array(ORIGINAL_SHAPE_KEY + tensor.name, list(tensor.shape))
                writer.add_tensor(tensor.name, tensor.data, raw_dtype=kind.qtype)
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
