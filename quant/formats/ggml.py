"""ggml's own quantizer and dequantizers, called through the ``libggml-base`` that llama-cpp-python bundles.

gguf-py quantizes only the legacy block types (Q8_0, Q5_x, Q4_x) in numpy. The K-quants (Q6_K to
Q2_K) exist only in ggml's C code, and llama-cpp-python loads that library without binding its
quantizer, so this module binds ``ggml_quantize_chunk`` with ctypes. The bytes it returns are ggml's
bytes by construction, and the tests compare its legacy types with gguf-py's quantizer.

It also binds ggml's ``dequantize_row_*`` functions, the CPU fast path of ``quant.formats.gguf``.
They write float32 values straight into a tensor's memory, 1.5 to 7 times faster than the PyTorch
dequantizers on one core (1280 x 1280 weights on an AVX2 EPYC). The work is split across threads,
because ctypes releases the GIL during a call.
"""

import ctypes
import importlib.util
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType

_LIBRARY_NAMES = ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll")


class GGMLUnavailableError(RuntimeError):
    """ggml's quantizer is not installed, so the K-quant types cannot be produced."""


@cache
def _library() -> ctypes.CDLL:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise GGMLUnavailableError(
            "quantizing to K-quant types needs ggml's quantizer from llama-cpp-python, which is not installed; "
            "install it with `pip install -r requirements.txt`, or pick Q8_0, Q5_1, Q5_0, Q4_1 or Q4_0"
        )
    lib_dir = Path(spec.origin).parent / "lib"
    for name in _LIBRARY_NAMES:
        if (lib_dir / name).is_file():
            library = ctypes.CDLL(str(lib_dir / name))
            break
    else:
        raise GGMLUnavailableError(
            f"llama-cpp-python is installed but {lib_dir} contains none of {_LIBRARY_NAMES}; reinstall it"
        )

    library.ggml_quantize_chunk.restype = ctypes.c_size_t
    library.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,  # enum ggml_type
        ctypes.c_void_p,  # const float * src
        ctypes.c_void_p,  # void * dst
        ctypes.c_int64,  # start (index of the first value)
        ctypes.c_int64,  # nrows
        ctypes.c_int64,  # n_per_row
        ctypes.c_void_p,  # const float * imatrix, or NULL
    ]
    library.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    library.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    library.ggml_quantize_init.restype = None
    library.ggml_quantize_init.argtypes = [ctypes.c_int]
    return library


def available() -> bool:
    """Return whether ggml's quantizer can be loaded."""
    try:
        _library()
    except (GGMLUnavailableError, OSError):
        return False
    return True


def quantize_rows(rows: np.ndarray, qtype: QType) -> np.ndarray:
    """Quantize float32 rows [n, k] into ggml blocks, returned as uint8 [n, k / block * type_size].

    ggml's K-quant quantizers without an importance matrix are its reference routines, so the
    result does not depend on the CPU's vector extensions.
    """
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] % block_size:
        raise ValueError(
            f"{qtype.name} needs rows whose length is a multiple of {block_size} values, got shape {rows.shape}"
        )
    library = _library()
    if library.ggml_quantize_requires_imatrix(int(qtype)):
        raise ValueError(f"{qtype.name} needs an importance matrix, which diffusion models do not have")
    library.ggml_quantize_init(int(qtype))  # builds the type's lookup tables on first use

    n_rows, n_per_row = rows.shape
    out = np.empty((n_rows, n_per_row // block_size * type_size), dtype=np.uint8)
    written = library.ggml_quantize_chunk(int(qtype), rows.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, None)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes for {qtype.name}, expected {out.nbytes}")
    return out


# Tensors of fewer values are dequantized in one call, because handing out chunks would cost more
# than it saves. NOTE: 2**16 is an estimate, not a tuned figure.
_THREADED_VALUES = 1 << 16


@cache
def _dequantizer(qtype: QType):
    """Return ggml's ``dequantize_row_<type>(blocks, out, n_values)``, or None if the library lacks it."""
    name = "dequantize_row_" + qtype.name.lower().replace("_k", "_K")
    function = getattr(_library(), name, None)
    if function is not None:
        function.restype = None
        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return function


@cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ggml-dequantize")


@cache
def can_dequantize(qtype: QType) -> bool:
    """Return whether ggml's CPU dequantizer for ``qtype`` can be used here (cached: every forward calls it)."""
    return available() and _dequantizer(qtype) is not None


def dequantize(blocks: torch.Tensor, qtype: QType) -> torch.Tensor:
    """Dequantize contiguous uint8 CPU blocks into a new float32 tensor of all their values, flat."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if blocks.device.type != "cpu" or blocks.dtype != torch.uint8:
        raise ValueError(f"ggml dequantizes uint8 CPU tensors, got {blocks.dtype} on {blocks.device}")
    blocks = blocks.contiguous()
    n_blocks = blocks.numel() // type_size
    out = torch.empty(n_blocks * block_size, dtype=torch.float32)
    function = _dequantizer(qtype)
    workers = min(torch.get_num_threads(), max(1, out.numel() // _THREADED_VALUES))
    if workers == 1:
        function(blocks.data_ptr(), out.data_ptr(), out.numel())
        return out

    per_chunk = -(-n_blocks // workers)
    chunks = [(start, min(per_chunk, n_blocks - start)) for start in range(0, n_blocks, per_chunk)]
    calls = [
        _pool(workers).submit(
            function,
            blocks.data_ptr() + start * type_size,
            out.data_ptr() + start * block_size * out.element_size(),
            count * block_size,
        )
        for start, count in chunks
    ]
    for call in calls:
        call.result()
    return out
