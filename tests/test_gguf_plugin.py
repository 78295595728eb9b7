"""The GGUF plugin on the embedded UNet: quantize, save, read back with gguf-py, load again."""

import copy

import gguf
import numpy as np
import pytest
import torch

from plugins.gguf import GGUFOptions
from plugins.gguf import plugin as gguf_plugin
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
