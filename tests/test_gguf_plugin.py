"""The GGUF plugin on the embedded UNet: quantize, save, read back with gguf-py, load again."""

import copy

import gguf
import numpy as np
import pytest
import torch

from plugins.gguf import GGUFOptions
from plugins.gguf import plugin as gguf_plugin
from quant.formats import gguf as gguf_format
from quant.formats.gguf import GGUFFileError
from quant.layers import QuantizedLayer


@pytest.fixture(scope="module")
def quantized(embedded):
    unet, report = gguf_plugin.quantize(copy.deepcopy(embedded.denoiser), GGUFOptions(qtype="Q4_1", keep=("conv_out",)))
    return unet, report


def test_report_lists_skips(quantized):
    _, report = quantized
    reasons = dict(report.skipped)
    assert reasons["conv_out"] == "on the keep list ('conv_out')"
    assert reasons["conv_in"] == "input, output or embedding layer (quantize_io is off)"
    assert reasons["time_embedding.linear_1"] == "input, output or embedding layer (quantize_io is off)"
    assert report.layers_quantized > 30
    assert report.bits_per_weight == pytest.approx(5.0)


def test_saved_file_reads_back_with_gguf_py(quantized, tmp_path):
    unet, report = quantized
    path = gguf_plugin.save(unet, report, GGUFOptions(qtype="Q4_1", keep=("conv_out",)), tmp_path / "unet.gguf")
    reader = gguf.GGUFReader(path)
    by_name = {tensor.name: tensor for tensor in reader.tensors}

    layers = {name: module for name, module in unet.named_modules() if isinstance(module, QuantizedLayer)}
    assert len(layers) == report.layers_quantized
    for name, layer in layers.items():
        tensor = by_name[f"{name}.weight"]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1
        reference = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        ours = layer.dequantize(torch.float32).reshape(reference.shape).numpy()
        assert np.array_equal(ours.view(np.uint32), reference.view(np.uint32)), name
    assert by_name["conv_in.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert by_name["conv_out.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_load_gives_same_outputs(embedded, quantized, tmp_path):
    unet, report = quantized
    path = gguf_plugin.save(unet, report, GGUFOptions(qtype="Q4_1"), tmp_path / "unet.gguf")
    loaded, loaded_report = gguf_plugin.load(path, copy.deepcopy(embedded.denoiser))
    assert loaded_report.layers_quantized == report.layers_quantized
    assert loaded_report.options["qtype"] == "Q4_1"

    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(sample, 500, text).sample, unet(sample, 500, text).sample)


def test_load_rejects_other_model(quantized, tmp_path):
    unet, report = quantized
    path = gguf_plugin.save(unet, report, GGUFOptions(qtype="Q4_1"), tmp_path / "unet.gguf")
    other = torch.nn.Sequential(torch.nn.Linear(4, 4))
    message = (
        "general.architecture is 'unet2dconditionmodel', but the Sequential it is loaded into expects 'sequential'"
    )
    with pytest.raises(GGUFFileError, match=message):
        gguf_plugin.load(path, other)


def test_load_rejects_missing_tensors(embedded, tmp_path):
    from quant.formats import gguf as gguf_format

    bias = embedded.denoiser.conv_in.bias.detach().numpy()
    path = tmp_path / "partial.gguf"
    gguf_format.write_file(
        path, "unet2dconditionmodel", [gguf_format.GGUFTensor("conv_in.bias", "F32", bias.shape, bias)], {}
    )
    with pytest.raises(GGUFFileError, match=r"tensors of the model are missing: .* and \d+ more"):
        gguf_plugin.load(path, copy.deepcopy(embedded.denoiser))


def test_load_rejects_wrong_shape(embedded, tmp_path):
    from quant.formats import gguf as gguf_format

    wrong = np.zeros((7,), dtype=np.float32)
    path = tmp_path / "wrong.gguf"
    gguf_format.write_file(
        path, "unet2dconditionmodel", [gguf_format.GGUFTensor("conv_in.bias", "F32", (7,), wrong)], {}
    )
    with pytest.raises(GGUFFileError, match=r"tensor 'conv_in.bias' has shape \(7,\), expected \(32,\)"):
        gguf_plugin.load(path, copy.deepcopy(embedded.denoiser))


def test_quantize_io_packs_what_fits(embedded):
    options = GGUFOptions(qtype="Q8_0", quantize_io=True)
    unet, report = gguf_plugin.quantize(copy.deepcopy(embedded.denoiser), options)
    reasons = dict(report.skipped)
    assert reasons["conv_in"] == (
        "rows of 36 values are not a multiple of the 32-value Q8_0 block, "
        "and its 1152 values do not fill whole 256-value rows"
    )
    assert isinstance(unet.conv_out, QuantizedLayer)
    assert isinstance(unet.time_embedding.linear_1, QuantizedLayer)


def test_mix_gives_attention_higher_type(embedded):
    unet, report = gguf_plugin.quantize(copy.deepcopy(embedded.denoiser), GGUFOptions(qtype="Q4_K_M"))
    layers = {name: module for name, module in unet.named_modules() if isinstance(module, QuantizedLayer)}
    types = {name: layer.weight_format.name for name, layer in layers.items()}
    upgraded = [name for name in types if name.endswith((".to_v", ".ff.net.2"))]
    assert len(upgraded) >= 4
    assert {types[name] for name in upgraded} == {"Q6_K"}
    assert {types[name] for name in set(types) - set(upgraded)} == {"Q4_K"}
    assert 4.5 < report.bits_per_weight < 6.5625


@pytest.mark.parametrize("qtype", gguf_format.PACKABLE_TYPES)
def test_every_type_round_trips(embedded, qtype, tmp_path):
    options = GGUFOptions(qtype=qtype)
    unet, report = gguf_plugin.quantize(copy.deepcopy(embedded.denoiser), options)
    path = gguf_plugin.save(unet, report, options, tmp_path / f"{qtype}.gguf")

    layers = {name: module for name, module in unet.named_modules() if isinstance(module, QuantizedLayer)}
    by_name = {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}
    for name, layer in layers.items():
        tensor = by_name[f"{name}.weight"]
        assert tensor.tensor_type.name == qtype, name
        reference = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(-1)
        ours = layer.dequantize(torch.float32).reshape(-1).numpy()
        assert np.array_equal(ours.view(np.uint32), reference.view(np.uint32)), name

    loaded, _ = gguf_plugin.load(path, copy.deepcopy(embedded.denoiser))
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(sample, 500, text).sample, unet(sample, 500, text).sample)


def test_foreign_types_in_one_file_load(embedded, tmp_path):
    """A file mixing types we do not write (IQ4_NL, IQ4_XS) with Q4_K, Q8_0, F16 and F32 loads exactly."""
    from quant.formats import ggml

    unet = copy.deepcopy(embedded.denoiser)
    state = {name: tensor.detach().numpy() for name, tensor in unet.state_dict().items()}
    cycle = ["IQ4_NL", "IQ4_XS", "Q4_K", "Q8_0", "F16"]
    writer = gguf.GGUFWriter(tmp_path / "mixed.gguf", "unet2dconditionmodel")
    expected, used = {}, []
    for index, (name, values) in enumerate(state.items()):
        qtype = cycle[index % len(cycle)]
        if values.ndim < 2 or values.size % 256 or qtype == "F16":
            data = values.astype(np.float16) if values.ndim >= 2 else values
            writer.add_tensor(name, data)
            expected[name] = data.astype(np.float32)
            continue
        rows = values.reshape(-1, 256)
        blocks = ggml.quantize_rows(rows, gguf.GGMLQuantizationType[qtype])
        writer.add_array(gguf_format.ORIGINAL_SHAPE_KEY + name, list(values.shape))
        writer.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType[qtype])
        expected[name] = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype]).reshape(values.shape)
        used.append(qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert {"IQ4_NL", "IQ4_XS", "Q4_K", "Q8_0"} <= set(used)

    loaded, report = gguf_plugin.load(tmp_path / "mixed.gguf", copy.deepcopy(embedded.denoiser))
    assert report.layers_quantized == len(used)
    reference = copy.deepcopy(embedded.denoiser)
    reference.load_state_dict({name: torch.from_numpy(values) for name, values in expected.items()})
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(loaded(sample, 500, text).sample, reference(sample, 500, text).sample, atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [GGUFOptions(qtype="Q4_K_M"), GGUFOptions(qtype="Q8_0", keep=("conv_out",), quantize_io=True)],
    ids=["Q4_K_M", "Q8_0-io"],
)
def test_estimate_and_resident_bytes_match_file(embedded, options, tmp_path):
    from quant.layers import weight_bytes

    estimated = gguf_plugin.estimate_bytes(embedded.denoiser, options)
    unet, report = gguf_plugin.quantize(copy.deepcopy(embedded.denoiser), options)
    path = gguf_plugin.save(unet, report, options, tmp_path / "unet.gguf")
    tensor_bytes = sum(int(tensor.n_bytes) for tensor in gguf.GGUFReader(path).tensors)
    assert estimated == tensor_bytes

    loaded, _ = gguf_plugin.load(path, copy.deepcopy(embedded.denoiser))
    assert tensor_bytes <= weight_bytes(loaded) <= 1.03 * tensor_bytes


def test_interrupted_save_leaves_no_file(quantized, tmp_path, monkeypatch):
    unet, report = quantized

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", interrupt)
    with pytest.raises(KeyboardInterrupt):
        gguf_plugin.save(unet, report, GGUFOptions(qtype="Q4_1"), tmp_path / "unet.gguf")
    assert list(tmp_path.iterdir()) == []
