import pytest
import torch
from torch import nn

from plugins.gguf import GGUFWeightFormat
from quant.formats import gguf as gguf_format
from quant.layers import QuantizedConv2d, QuantizedLinear, SkipLayer, swap_layers, weight_bytes


def _pack(name, module):
    reason = gguf_format.can_pack(tuple(module.weight.shape))
    if reason:
        raise SkipLayer(reason)
    return gguf_format.pack(module.weight, "Q8_0"), GGUFWeightFormat("Q8_0")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 32, 3, padding=1),  # rows of 36 values: skipped
        nn.Conv2d(32, 32, 3, padding=1, stride=2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.Linear(64, 8, bias=False),
    )


def test_swap_reports_quantized_and_skipped():
    model = _model()
    report = swap_layers(model, _pack, torch.float32, keep=["4"])
    assert report.quantized == ["1", "3"]
    assert report.skipped == [
        (
            "0",
            "rows of 36 values are not a multiple of the 32-value Q8_0 block, "
            "and its 1152 values do not fill whole 256-value rows",
        ),
        ("4", "on the keep list ('4')"),
    ]
    assert isinstance(model[1], QuantizedConv2d)
    assert isinstance(model[3], QuantizedLinear)
    assert isinstance(model[4], nn.Linear)
    assert report.bits_per_weight == pytest.approx(8.5)


def test_keep_pattern_must_match():
    with pytest.raises(ValueError, match="keep pattern 'conv_in' matches no linear or convolution layer"):
        swap_layers(_model(), _pack, torch.float32, keep=["conv_in"])


def test_quantized_layers_match_dequantized_reference():
    model = _model()
    reference = _model()
    swap_layers(model, _pack, torch.float32)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        reference[1].weight.copy_(model[1].dequantize())
        reference[3].weight.copy_(model[3].dequantize())
        reference[4].weight.copy_(model[4].dequantize())
        assert torch.equal(model(x), reference(x))


def test_quantized_model_is_close_to_original():
    model, original = _model(), _model()
    swap_layers(model, _pack, torch.float32)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected, actual = original(x), model(x)
    sqnr = 10 * torch.log10(expected.pow(2).mean() / (expected - actual).pow(2).mean())
    assert sqnr > 35  # Q8_0 keeps about 40 dB on random weights


def test_bfloat16_compute_keeps_input_dtype():
    model = _model()
    swap_layers(model, _pack, torch.bfloat16)
    out = model(torch.randn(1, 4, 8, 8))
    assert out.dtype == torch.float32


def test_weight_bytes_shrink():
    model = _model()
    before = weight_bytes(model)
    swap_layers(model, _pack, torch.float32)
    assert weight_bytes(model) < before / 2.5
