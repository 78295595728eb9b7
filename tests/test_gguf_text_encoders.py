"""Text encoder GGUF files: T5 under llama.cpp's names, CLIP under transformers' names."""

import copy
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import T5Config, T5EncoderModel

from plugins.gguf import GGUFOptions, text_encoders
from plugins.gguf import plugin as gguf_plugin
from quant.formats.gguf import GGUFFileError
from quant.layers import QuantizedLayer

ROOT = Path(__file__).resolve().parent.parent
Q8_0, F16, F32 = (gguf.GGMLQuantizationType[name] for name in ("Q8_0", "F16", "F32"))


def _t5(seed: int) -> T5EncoderModel:
    """A T5 v1.1-style encoder (gated GELU) at a small width, with random weights."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=256,
        d_model=64,
        d_kv=32,
        d_ff=128,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
    )
    return T5EncoderModel(config).eval()


def _encode(model: T5EncoderModel) -> torch.Tensor:
    tokens = torch.tensor([[5, 17, 42, 99, 3, 1]])
    with torch.no_grad():
        return model(input_ids=tokens).last_hidden_state


def _write_llama_cpp_t5(model: T5EncoderModel, path: Path) -> T5EncoderModel:
    """Write ``model`` as llama.cpp's converter does (Q8_0 matrices and embedding, F32 norms, F16 bias).

    Returns a model holding the values a reader gets back.
    """
    names = text_encoders.file_names(model, list(model.state_dict()))
    writer = gguf.GGUFWriter(path, "t5encoder")
    stored, written = {}, set()
    for name, tensor in model.state_dict().items():
        values = tensor.numpy()
        if names[name] in written:  # the embedding is tied: one tensor in the file
            stored[name] = stored["shared.weight"]
            continue
        written.add(names[name])
        if name.endswith("relative_attention_bias.weight"):
            data, qtype, back = values.astype(np.float16), F16, values.astype(np.float16).astype(np.float32)
        elif values.ndim == 2:
            data = gguf.quants.quantize(values, Q8_0)
            qtype, back = Q8_0, gguf.quants.dequantize(data, Q8_0)
        else:
            data, qtype, back = values, F32, values
        writer.add_tensor(names[name], data, raw_dtype=qtype)
        stored[name] = torch.from_numpy(np.ascontiguousarray(back))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reference = _t5(seed=9)
    reference.load_state_dict(stored)
    return reference


def test_t5_names_follow_llama_cpp():
    names = text_encoders.file_names(_t5(0), list(_t5(0).state_dict()))
    assert names["encoder.block.0.layer.0.SelfAttention.q.weight"] == "enc.blk.0.attn_q.weight"
    assert names["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"] == "enc.blk.1.ffn_gate.weight"
    assert names["encoder.block.1.layer.1.DenseReluDense.wo.weight"] == "enc.blk.1.ffn_down.weight"
    assert names["encoder.final_layer_norm.weight"] == "enc.output_norm.weight"
    assert names["shared.weight"] == "token_embd.weight"


def test_community_t5_file_loads(tmp_path):
    path = tmp_path / "t5-encoder-Q8_0.gguf"
    reference = _write_llama_cpp_t5(_t5(seed=0), path)
    loaded, report = gguf_plugin.load(path, _t5(seed=1))
    assert report.layers_quantized == 2 * 7  # q, k, v, o, wi_0, wi_1, wo per block
    assert ("shared", "Q8_0 in the file, dequantized at load (Embedding)") in report.skipped
    assert isinstance(loaded.encoder.block[0].layer[0].SelfAttention.q, QuantizedLayer)
    assert torch.allclose(_encode(loaded), _encode(reference), rtol=0, atol=1e-5)


def test_t5_round_trip_uses_llama_cpp_names(tmp_path):
    options = GGUFOptions(qtype="Q8_0")
    quantized, report = gguf_plugin.quantize(_t5(seed=0), options)
    path = gguf_plugin.save(quantized, report, options, tmp_path / "t5.gguf")
    reader = gguf.GGUFReader(path)
    names = [tensor.name for tensor in reader.tensors]
    assert reader.fields["general.architecture"].contents() == "t5encoder"
    assert "enc.blk.0.attn_q.weight" in names
    assert names.count("token_embd.weight") == 1

    loaded, _ = gguf_plugin.load(path, _t5(seed=1))
    assert torch.equal(_encode(loaded), _encode(quantized))


def test_t5_file_rejected_by_unet(embedded, tmp_path):
    path = tmp_path / "t5.gguf"
    _write_llama_cpp_t5(_t5(seed=0), path)
    with pytest.raises(GGUFFileError, match="t5.gguf is a t5encoder text encoder file; load it as a text encoder"):
        gguf_plugin.load(path, copy.deepcopy(embedded.denoiser))


def test_clip_file_rejected_by_t5(embedded, tmp_path):
    options = GGUFOptions(qtype="Q8_0")
    encoder, report = gguf_plugin.quantize(copy.deepcopy(embedded.pipeline.text_encoder), options)
    path = gguf_plugin.save(encoder, report, options, tmp_path / "clip.gguf")
    with pytest.raises(
        GGUFFileError,
        match="general.architecture is 'clip', but the T5EncoderModel it is loaded into expects 't5encoder' or 't5'",
    ):
        gguf_plugin.load(path, _t5(seed=1))


def _launch(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "launch.py"), "generate", "--prompt", "a red circle on a blue background"]
    return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_generate_with_clip_text_encoder_file(embedded, tmp_path):
    options = GGUFOptions(qtype="Q8_0")
    encoder, report = gguf_plugin.quantize(copy.deepcopy(embedded.pipeline.text_encoder), options)
    clip_path = gguf_plugin.save(encoder, report, options, tmp_path / "clip.gguf")
    t5_path = tmp_path / "t5.gguf"
    _write_llama_cpp_t5(_t5(seed=0), t5_path)

    result = _launch("--plugin", "gguf", "--gguf-text-encoder", str(clip_path), "--out", str(tmp_path / "a.png"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "a.png").is_file()

    result = _launch("--plugin", "gguf", "--gguf-text-encoder", str(t5_path), "--out", str(tmp_path / "b.png"))
    assert result.returncode == 2
    assert "fits none of this model's text encoders: text_encoder (CLIPTextModel, which takes 'clip')" in result.stderr

    result = _launch("--gguf-text-encoder", str(clip_path), "--out", str(tmp_path / "c.png"))
    assert result.returncode == 2
    assert "error: a GGUF text encoder file needs plugin 'gguf', not 'full'" in result.stderr
