import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from quant.formats import ggml
from quant.formats import gguf as gguf_format

PACKABLE = list(gguf_format.PACKABLE_TYPES)
LEGACY = [name for name in PACKABLE if gguf_format.block_type(name).packer == "gguf-py"]
K_QUANTS = [name for name in PACKABLE if gguf_format.block_type(name).packer == "ggml"]
ALL_TYPES = list(gguf_format.BLOCK_TYPES)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(params=["ggml", "torch"])
def dequantizer(request, monkeypatch):
    """Run a test with each CPU dequantizer: ggml's C functions and the PyTorch reference."""
    monkeypatch.setattr(gguf_format, "CPU_DEQUANTIZER", request.param)
    return request.param


# Byte offsets of the float16 scales in each block, so random blocks get finite scales.
SCALE_OFFSETS = {
    "Q8_0": [0], "Q5_1": [0, 2], "Q5_0": [0], "Q4_1": [0, 2], "Q4_0": [0],
    "Q6_K": [208], "Q5_K": [0, 2], "Q4_K": [0, 2], "Q3_K": [108], "Q2_K": [80, 82],
    "IQ4_NL": [0], "IQ4_XS": [0],
}  # fmt: skip


def _weights(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * 0.05
    weight[0, :256] = 0  # an all-zero block: scale 0 must not divide by zero
    weight[1, 5] = 3.0  # an outlier that sets its block's scale
    return weight


def _random_blocks(qtype: str, n_blocks: int, seed: int) -> np.ndarray:
    """Random bytes for every field of ``n_blocks`` blocks, with finite float16 scales near 0.01."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n_blocks, gguf_format.block_type(qtype).type_size), dtype=np.uint8)
    for offset in SCALE_OFFSETS[qtype]:
        scales = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def _same_bits(ours: torch.Tensor, reference: np.ndarray) -> bool:
    return np.array_equal(ours.cpu().numpy().view(np.uint32), reference.astype(np.float32).view(np.uint32))


def test_scale_offsets_cover_every_type():
    assert set(SCALE_OFFSETS) == set(ALL_TYPES)


@pytest.mark.parametrize("qtype", LEGACY)
def test_pack_matches_gguf_quantize(qtype):
    weight = _weights(48, 256)
    ours = gguf_format.pack(weight, qtype).numpy()
    reference = gguf.quants.quantize(weight.numpy(), QType[qtype])
    assert ours.dtype == np.uint8
    assert np.array_equal(ours, reference)


@pytest.mark.parametrize("qtype", LEGACY)
def test_ggml_and_gguf_py_write_same_blocks(qtype):
    weight = _weights(48, 256, seed=7).numpy()
    assert np.array_equal(ggml.quantize_rows(weight, QType[qtype]), gguf.quants.quantize(weight, QType[qtype]))


@pytest.mark.parametrize("qtype", PACKABLE)
def test_unpack_bit_exact_against_gguf(qtype, dequantizer):
    weight = _weights(64, 512, seed=1)
    qweight = gguf_format.pack(weight, qtype)
    ours = gguf_format.unpack(qweight, qtype, (64, 512))
    reference = gguf.quants.dequantize(qweight.numpy(), QType[qtype])
    assert ours.dtype == torch.float32
    assert _same_bits(ours, reference)


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_unpack_random_blocks_bit_exact(qtype, dequantizer):
    blocks = _random_blocks(qtype, 40000, seed=len(qtype))  # enough values to split across threads
    kind = gguf_format.block_type(qtype)
    ours = gguf_format.unpack(torch.from_numpy(blocks), qtype, (40000 * kind.block_size,))
    reference = gguf.quants.dequantize(blocks.reshape(16, -1), kind.qtype).reshape(-1)
    assert _same_bits(ours, reference)


@pytest.mark.parametrize("qtype", ["IQ4_NL", "IQ4_XS"])
def test_unpack_ggml_iq4_blocks(qtype, dequantizer):
    weight = _weights(16, 512, seed=8)
    blocks = ggml.quantize_rows(weight.numpy(), QType[qtype])
    ours = gguf_format.unpack(torch.from_numpy(blocks), qtype, (16, 512))
    assert _same_bits(ours, gguf.quants.dequantize(blocks, QType[qtype]))
    assert (ours - weight)[2:].abs().max() < 0.04  # rows 0 and 1 hold the zero block and the outlier


@pytest.mark.parametrize("qtype", ["IQ4_NL", "IQ4_XS"])
def test_read_only_types_refuse_to_pack(qtype):
    with pytest.raises(ValueError, match=f"{qtype} can be read but not written"):
        gguf_format.pack(_weights(4, 256), qtype)


@CUDA
@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_unpack_on_cuda_bit_exact(qtype):
    blocks = _random_blocks(qtype, 2048, seed=3)
    kind = gguf_format.block_type(qtype)
    ours = gguf_format.unpack(torch.from_numpy(blocks).cuda(), qtype, (2048 * kind.block_size,))
    reference = gguf.quants.dequantize(blocks.reshape(16, -1), kind.qtype).reshape(-1)
    assert ours.device.type == "cuda"
    assert _same_bits(ours, reference)


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_bfloat16_unpack_rounds_float32_once(qtype, dequantizer):
    blocks = torch.from_numpy(_random_blocks(qtype, 256, seed=4))
    values = 256 * gguf_format.block_type(qtype).block_size
    as_float32 = gguf_format.unpack(blocks, qtype, (values,))
    as_bfloat16 = gguf_format.unpack(blocks, qtype, (values,), torch.bfloat16)
    assert torch.equal(as_bfloat16, as_float32.to(torch.bfloat16))


@pytest.mark.parametrize("qtype", PACKABLE)
def test_unpack_conv_shape(qtype, dequantizer):
    weight = _weights(16, 64 * 9, seed=2).reshape(16, 64, 3, 3)
    qweight = gguf_format.pack(weight, qtype)
    values = gguf_format.unpack(qweight, qtype, (16, 64, 3, 3))
    reference = gguf.quants.dequantize(qweight.numpy(), QType[qtype])
    assert values.shape == (16, 64, 3, 3)
    assert _same_bits(values.reshape(-1), reference.reshape(-1))


def test_k_quant_conv_packed_in_flat_rows():
    weight = _weights(64, 32 * 9, seed=9).reshape(64, 32, 3, 3)
    qweight = gguf_format.pack(weight, "Q4_K")
    assert gguf_format.pack_rows((64, 32, 3, 3), "Q4_K") == (72, 256)
    assert tuple(qweight.shape) == (72, 144)
    assert gguf_format.pack_rows((64, 32, 3, 3), "Q4_0") == (64, 288)
    values = gguf_format.unpack(qweight, "Q4_K", (64, 32, 3, 3))
    assert (values - weight).reshape(-1)[1024:].abs().max() < 0.03  # past the zero block and the outlier


@pytest.mark.parametrize(
    "qtype, bits, max_error",
    [
        ("Q8_0", 8.5, 0.004),
        ("Q6_K", 6.5625, 0.008),
        ("Q5_K", 5.5, 0.016),
        ("Q5_1", 6.0, 0.012),
        ("Q5_0", 5.5, 0.016),
        ("Q4_K", 4.5, 0.03),
        ("Q4_1", 5.0, 0.025),
        ("Q4_0", 4.5, 0.03),
        ("Q3_K", 3.4375, 0.06),
        ("Q2_K", 2.625, 0.12),
    ],
)
def test_bits_and_error_bound(qtype, bits, max_error):
    weight = _weights(32, 256, seed=3)
    weight[1, 5] = 0.0
    qweight = gguf_format.pack(weight, qtype)
    kind = gguf_format.block_type(qtype)
    assert kind.bits_per_weight == bits
    assert qweight.numel() == gguf_format.packed_nbytes((32, 256), qtype)
    error = (gguf_format.unpack(qweight, qtype, (32, 256)) - weight).abs().max().item()
    assert error < max_error


@pytest.mark.parametrize(
    "shape, qtype, reason",
    [
        ((64,), "Q8_0", "1-D tensors stay in full precision"),
        (
            (8, 36),
            "Q8_0",
            "rows of 36 values are not a multiple of the 32-value Q8_0 block, "
            "and its 288 values do not fill whole 256-value rows",
        ),
        (
            (8, 4, 3, 3),
            "Q4_K",
            "rows of 36 values are not a multiple of the 256-value Q4_K block, "
            "and its 288 values do not fill whole 256-value rows",
        ),
        ((8, 32, 3, 3), "Q4_K", None),
        ((8, 320), "Q2_K", None),
    ],
)
def test_can_pack_reasons(shape, qtype, reason):
    assert gguf_format.can_pack(shape, qtype) == reason


def test_unknown_type_rejected():
    with pytest.raises(ValueError, match="unsupported GGUF type 'Q3_X'"):
        gguf_format.block_type("Q3_X")


def test_file_round_trip(tmp_path):
    weight = _weights(16, 32 * 9, seed=5).reshape(16, 32, 3, 3)
    bias = torch.randn(16)
    tensors = [
        gguf_format.GGUFTensor("conv.weight", "Q4_0", (16, 32, 3, 3), gguf_format.pack(weight, "Q4_0").numpy()),
        gguf_format.GGUFTensor("conv.bias", "F32", (16,), bias.numpy()),
    ]
    path = tmp_path / "model.gguf"
    gguf_format.write_file(path, "test", tensors, {"lowbit.note": "round trip"})

    reader = gguf.GGUFReader(path)
    assert [t.name for t in reader.tensors] == ["conv.weight", "conv.bias"]
    assert reader.tensors[0].tensor_type == gguf.GGMLQuantizationType.Q4_0
    metadata, read = gguf_format.read_file(path)
    assert metadata["general.architecture"] == "test"
    assert metadata["lowbit.note"] == "round trip"
    assert read[0].shape == (16, 32, 3, 3)
    assert np.array_equal(read[0].data, tensors[0].data)
    assert np.array_equal(read[1].data, bias.numpy())
    assert not list(tmp_path.glob("*.part"))


def test_read_rejects_garbage(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(
        gguf_format.GGUFFileError, match=r"broken.gguf: not a GGUF file \(magic b'not ', expected b'GGUF'\)"
    ):
        gguf_format.read_file(path)


def test_read_rejects_missing(tmp_path):
    with pytest.raises(gguf_format.GGUFFileError, match="GGUF file not found"):
        gguf_format.read_file(tmp_path / "absent.gguf")


def test_read_rejects_unsupported_type(tmp_path):
    path = tmp_path / "iq2.gguf"
    writer = gguf.GGUFWriter(path, "test")
    blocks = np.zeros((4, gguf.GGML_QUANT_SIZES[QType.IQ2_XXS][1]), dtype=np.uint8)
    writer.add_tensor("layer.weight", blocks, raw_dtype=QType.IQ2_XXS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(gguf_format.GGUFFileError, match="'layer.weight' has type IQ2_XXS"):
        gguf_format.read_file(path)


def test_read_rejects_truncated_file(tmp_path):
    weight = _weights(64, 256, seed=6)
    tensors = [gguf_format.GGUFTensor("layer.weight", "Q8_0", (64, 256), gguf_format.pack(weight, "Q8_0").numpy())]
    path = tmp_path / "truncated.gguf"
    gguf_format.write_file(path, "test", tensors, {})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        gguf_format.GGUFFileError, match=r"tensor 'layer.weight' ends at byte \d+ but the file has \d+ bytes"
    ):
        gguf_format.read_file(path)


def test_read_rejects_cut_header(tmp_path):
    path = tmp_path / "cut.gguf"
    gguf_format.write_file(path, "test", [], {"lowbit.note": "x" * 100})
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(
        gguf_format.GGUFFileError, match="the header at byte 56 runs past the end; the file is truncated"
    ):
        gguf_format.read_file(path)


def test_read_rejects_future_version(tmp_path):
    path = tmp_path / "v9.gguf"
    path.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(16))
    with pytest.raises(gguf_format.GGUFFileError, match="GGUF version 9 is not supported; expected 2 or 3"):
        gguf_format.read_file(path)


def test_ggml_dequantizes_every_type():
    assert all(ggml.can_dequantize(kind.qtype) for kind in gguf_format.BLOCK_TYPES.values())


def test_ggml_dequantize_rejects_other_dtypes():
    with pytest.raises(ValueError, match="ggml dequantizes uint8 CPU tensors, got torch.float32"):
        ggml.dequantize(torch.zeros(34), QType.Q8_0)


def _handmade_file(path, tensors: list[tuple[str, list[int], int, int]], data_bytes: int) -> None:
    """Write a GGUF v3 file by hand: no metadata, the given tensor table (name, ggml dims, type id, offset)."""
    import struct

    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 0)
    for name, dims, type_id, offset in tensors:
        encoded = name.encode()
        header += struct.pack("<Q", len(encoded)) + encoded + struct.pack("<I", len(dims))
        header += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", type_id, offset)
    header += bytes(-len(header) % 32)
    path.write_bytes(header + bytes(data_bytes))


def test_handmade_file_is_valid(tmp_path):
    path = tmp_path / "valid.gguf"
    _handmade_file(path, [("a.weight", [32, 2], int(QType.Q8_0), 0), ("b.bias", [8], int(QType.F32), 96)], 128)
    _, tensors = gguf_format.read_file(path)
    assert [(tensor.name, tensor.shape) for tensor in tensors] == [("a.weight", (2, 32)), ("b.bias", (8,))]


@pytest.mark.parametrize(
    "tensors, data_bytes, message",
    [
        ([("a.weight", [32, 2], 99, 0)], 128, "tensor 'a.weight' has unknown type id 99"),
        (
            [("a.weight", [32, 2], int(QType.Q8_0), 0), ("b.weight", [32, 2], int(QType.Q8_0), 32)],
            160,
            r"tensor 'b.weight' starts at byte \d+, inside tensor 'a.weight' \(which ends at byte \d+\); "
            "tensor data must not overlap",
        ),
        (
            [("a.weight", [32, 2], int(QType.Q8_0), 16)],
            128,
            "tensor 'a.weight' starts at offset 16, not a multiple of 32",
        ),
        (
            [("a.weight", [48, 2], int(QType.Q8_0), 0)],
            128,
            "tensor 'a.weight' has rows of 48 values; Q8_0 needs a multiple of 32",
        ),
        (
            [("a.weight", [32, 2, 1, 1, 1], int(QType.Q8_0), 0)],
            128,
            "tensor 'a.weight' has 5 dimensions; expected 1 to 4",
        ),
        (
            [("a.weight", [32, 64], int(QType.Q8_0), 0)],
            128,
            r"tensor 'a.weight' ends at byte \d+ but the file has \d+ bytes",
        ),
    ],
    ids=["unknown-type", "overlap", "misaligned", "partial-block", "five-dims", "out-of-range"],
)
def test_handmade_broken_files(tmp_path, tensors, data_bytes, message):
    path = tmp_path / "broken.gguf"
    _handmade_file(path, tensors, data_bytes)
    with pytest.raises(gguf_format.GGUFFileError, match=message):
        gguf_format.read_file(path)
