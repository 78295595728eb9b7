"""Check a GGUF file's header and tensor table against its size before anything is read into memory.

gguf-py's reader maps the whole file and fails on a truncated or corrupt one with numpy's own
messages. This walks the header by hand (GGUF versions 2 and 3, little-endian) and rejects the file
with one message that names the file, the tensor, what was found and what was expected.

Layout: the magic "GGUF", version u32, tensor count u64 and key-value count u64 come first, then
the key-value pairs. Each tensor then has its name, n_dims u32, dims u64[n_dims] in ggml order, type
u32 and offset u64. Tensor data starts at the next multiple of ``general.alignment`` (32 by default).
"""

import struct
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType, GGUFValueType

MAX_TENSORS = 1_000_000
MAX_KEY_VALUES = 1_000_000
MAX_STRING = 1 << 24
SCALAR_FORMATS = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}


class GGUFHeaderError(ValueError):
    """A GGUF file whose header or tensor table does not fit the file."""


class _NeedMore(Exception):
    """The header runs past the bytes read so far, but the file has more."""


class _Cursor:
    """Reader of little-endian values from a prefix of the file, ``complete`` when the prefix is all of it."""

    def __init__(self, data: bytes, path: Path, complete: bool):
        self.data, self.position, self.path, self.complete = data, 0, path, complete

    def _overrun(self, what: str) -> Exception:
        if not self.complete:
            return _NeedMore()
        return GGUFHeaderError(f"{self.path}: {what} at byte {self.position} runs past the end; the file is truncated")

    def read(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.position + size > len(self.data):
            raise self._overrun("the header")
        (value,) = struct.unpack_from("<" + fmt, self.data, self.position)
        self.position += size
        return value

    def string(self) -> str:
        length = self.read("Q")
        if length > MAX_STRING:
            raise GGUFHeaderError(
                f"{self.path}: a string of {length} bytes at byte {self.position} is implausibly long"
            )
        if self.position + length > len(self.data):
            raise self._overrun(f"a string of {length} bytes")
        value = self.data[self.position : self.position + length].decode("utf-8", errors="replace")
        self.position += length
        return value

    def value(self, kind: int):
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind == GGUFValueType.ARRAY:
            item_kind, count = self.read("I"), self.read("Q")
            if count > MAX_STRING:
                raise GGUFHeaderError(
                    f"{self.path}: an array of {count} items at byte {self.position} is implausibly long"
                )
            return [self.value(item_kind) for _ in range(count)]
        if kind not in SCALAR_FORMATS:
            raise GGUFHeaderError(f"{self.path}: unknown metadata value type {kind} at byte {self.position}")
        return self.read(SCALAR_FORMATS[kind])


def check_file(path: Path, supported: set[str]) -> None:
    """Raise ``GGUFHeaderError`` unless every tensor of the file has a supported type and fits the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as file:
        # The header is read in growing prefixes, so a multi-gigabyte file is never read whole.
        prefix = file.read(min(size, 1 << 20))
        while True:
            try:
                _check_prefix(prefix, path, size, supported)
                return
            except _NeedMore:
                more = file.read(len(prefix))
                if not more:  # the file shrank while it was read
                    raise GGUFHeaderError(f"{path}: the file ended while its header was read") from None
                prefix += more


def _check_prefix(prefix: bytes, path: Path, size: int, supported: set[str]) -> None:
    cursor = _Cursor(prefix, path, complete=len(prefix) == size)
    magic = cursor.read("I")
    if magic != gguf.GGUF_MAGIC:
        raise GGUFHeaderError(f"{path}: not a GGUF file (magic {prefix[:4]!r}, expected b'GGUF')")
    version = cursor.read("I")
    if version not in (2, 3):
        raise GGUFHeaderError(f"{path}: GGUF version {version} is not supported; expected 2 or 3")
    tensor_count, key_value_count = cursor.read("Q"), cursor.read("Q")
    if tensor_count > MAX_TENSORS or key_value_count > MAX_KEY_VALUES:
        raise GGUFHeaderError(f"{path}: implausible counts ({tensor_count} tensors, {key_value_count} keys)")

    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    for _ in range(key_value_count):
        key = cursor.string()
        value = cursor.value(cursor.read("I"))
        if key == "general.alignment":
            alignment = value
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFHeaderError(f"{path}: general.alignment is {alignment!r}; expected a power of two")

    tensors = []
    for _ in range(tensor_count):
        name = cursor.string()
        n_dims = cursor.read("I")
        if not 1 <= n_dims <= 4:
            raise GGUFHeaderError(f"{path}: tensor {name!r} has {n_dims} dimensions; expected 1 to 4")
        dims = [cursor.read("Q") for _ in range(n_dims)]
        type_id, offset = cursor.read("I"), cursor.read("Q")
        tensors.append((name, dims, type_id, offset))

    data_start = -(-cursor.position // alignment) * alignment
    spans = []  # (first byte, end byte, name) of every tensor's data
    for name, dims, type_id, offset in tensors:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise GGUFHeaderError(f"{path}: tensor {name!r} has unknown type id {type_id}") from None
        if qtype.name not in supported:
            raise GGUFHeaderError(
                f"{path}: tensor {name!r} has type {qtype.name}, which this version cannot dequantize; "
                f"supported: {', '.join(sorted(supported))}"
            )
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if dims[0] % block_size:
            raise GGUFHeaderError(
                f"{path}: tensor {name!r} has rows of {dims[0]} values; {qtype.name} needs a multiple of {block_size}"
            )
        values = 1
        for dim in dims:
            values *= dim
        end = data_start + offset + values // block_size * type_size
        if offset % alignment:
            raise GGUFHeaderError(f"{path}: tensor {name!r} starts at offset {offset}, not a multiple of {alignment}")
        if end > size:
            raise GGUFHeaderError(
                f"{path}: tensor {name!r} ends at byte {end} but the file has {size} bytes; the file is truncated"
            )
        spans.append((data_start + offset, end, name))

    spans.sort()
    for (_, previous_end, previous), (start, _, name) in zip(spans, spans[1:]):
        if start < previous_end:
            raise GGUFHeaderError(
                f"{path}: tensor {name!r} starts at byte {start}, inside tensor {previous!r} (which ends at byte "
                f"{previous_end}); tensor data must not overlap"
            )
