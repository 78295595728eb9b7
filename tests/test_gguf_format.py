import gguf
import numpy as np
import pytest
import torch

from quant.formats import gguf as gguf_format

QTYPES = list(gguf_format.BLOCK_TYPES)


def _weights(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * 0.05
    weight[0, :32] = 0  # an all-zero block: scale 0 must not divide by zero
    weight[1, 5] = 3.0  # an outlier that sets its block's scale
    return weight


@pytest.mark.parametrize("qtype", QTYPES)
def test_pack_matches_gguf_quantize(qtype):
    weight = _weights(48, 256)
    ours = gguf_format.pack(weight, qtype).numpy()
    reference = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType[qtype])
    assert ours.dtype == np.uint8
    assert np.array_equal(ours, reference)


@pytest.mark.parametrize("qtype", QTYPES)
def test_unpack_bit_exact_against_gguf(qtype):
    weight = _weights(64, 320, seed=1)
    qweight = gguf_format.pack(weight, qtype)
    ours = gguf_format.unpack(qweight, qtype, (64, 320))
    reference = gguf.quants.dequantize(qweight.numpy(), gguf.GGMLQuantizationType[qtype])
    assert ours.dtype == torch.float32
    assert np.array_equal(ours.numpy().view(np.uint32), reference.view(np.uint32))


@pytest.mark.parametrize("qtype", QTYPES)
def test_unpack_conv_shape(qtype):
    weight = _weights(16, 32 * 9, seed=2).reshape(16, 32, 3, 3)
    qweight = gguf_format.pack(weight, qtype)
    values = gguf_format.unpack(qweight, qtype, (16, 32, 3, 3))
    reference = gguf.quants.dequantize(qweight.numpy(), gguf.GGMLQuantizationType[qtype])
    assert values.shape == (16, 32, 3, 3)
    assert np.array_equal(values.reshape(16, -1).numpy(), reference)


@pytest.mark.parametrize(
    "qtype, bits, max_error",
    [("Q8_0", 8.5, 0.004), ("Q5_1", 6.0, 0.012), ("Q5_0", 5.5, 0.016), ("Q4_1", 5.0, 0.025), ("Q4_0", 4.5, 0.03)],
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


def test_bfloat16_unpack_rounds_float32_once():
    weight = _weights(8, 64, seed=4)
    qweight = gguf_format.pack(weight, "Q4_1")
    as_float32 = gguf_format.unpack(qweight, "Q4_1", (8, 64))
    as_bfloat16 = gguf_format.unpack(qweight, "Q4_1", (8, 64), torch.bfloat16)
    assert torch.equal(as_bfloat16, as_float32.to(torch.bfloat16))


@pytest.mark.parametrize(
    "shape, reason",
    [
        ((64,), "1-D tensors stay in full precision"),
        ((8, 36), "rows of 36 values are not a multiple of the 32-value block"),
        ((8, 4, 3, 3), "rows of 36 values are not a multiple of the 32-value block"),
    ],
)
def test_can_pack_reasons(shape, reason):
    assert gguf_format.can_pack(shape) == reason


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
    path = tmp_path / "k.gguf"
    writer = gguf.GGUFWriter(path, "test")
    blocks = np.zeros((4, gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_K][1]), dtype=np.uint8)
    writer.add_tensor("layer.weight", blocks, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(gguf_format.GGUFFileError, match="'layer.weight' has type Q4_K"):
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
