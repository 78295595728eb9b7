"""GGUF files under the original checkpoint names: the name maps checked against diffusers' own
converters, and our files read back by our loader and by diffusers' GGUF loader.

The models are SD1.5, SDXL and FLUX.1-dev with their real configs' keys and block layouts, at reduced
width and depth and with random weights, so each test runs in seconds on a CPU.
"""

import copy
import logging

import gguf
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    SingleFileComponentError,
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_ldm_unet_checkpoint,
)
from diffusers.models.model_loading_utils import load_gguf_checkpoint

from plugins.gguf import GGUFOptions
from plugins.gguf import plugin as gguf_plugin
from quant.formats import gguf_names
from quant.formats.gguf import ORIGINAL_SHAPE_KEY, GGUFFileError, GGUFTensor

# ---------------------------------------------------------------- configs

# stable-diffusion-v1-5 unet/config.json
SD15 = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# stable-diffusion-xl-base-1.0 unet/config.json
SDXL = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}
# FLUX.1-dev transformer/config.json
FLUX = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}
# Reduced width and depth. Every row stays a multiple of 32 values where the real model's is, and the
# SDXL time embedding keeps its layout: pooled text width + 6 * addition_time_embed_dim.
SMALL = {
    "sd1": {**SD15, "block_out_channels": [32, 64, 64, 64], "cross_attention_dim": 32, "sample_size": 8},
    "sdxl": {
        **SDXL,
        "attention_head_dim": [2, 4, 4],
        "block_out_channels": [32, 64, 64],
        "cross_attention_dim": 64,
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 32 + 6 * 8,
        "transformer_layers_per_block": [1, 2, 2],
        "sample_size": 8,
    },
    "flux": {
        **FLUX,
        "attention_head_dim": 16,
        "axes_dims_rope": [4, 6, 6],
        "in_channels": 32,
        "joint_attention_dim": 32,
        "num_attention_heads": 2,
        "num_layers": 2,
        "num_single_layers": 2,
        "pooled_projection_dim": 32,
    },
}
MODEL_CLASSES = {"sd1": UNet2DConditionModel, "sdxl": UNet2DConditionModel, "flux": FluxTransformer2DModel}
NO_HUB = {"local_files_only": True}
# diffusers multiplies the float16 block scale by the quants in float16, rounding every weight to 11
# significant bits (relative error up to 2**-11, about 4.9e-4), while our loader keeps float32. Measured
# on these models: at most 3.5e-4 of max |output| (FLUX, Q4_0). A wrong tensor or a swapped half moves
# the output by its own size, so 2e-3 keeps a margin of 5x and still catches every naming error.
TOLERANCE = 2e-3


def _build(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = MODEL_CLASSES[kind](**SMALL[kind]).eval()
    # Random init leaves some layers at zero (FLUX's final projection), which would hide errors.
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.abs().sum():
                parameter.normal_(0, 0.02)
    return model


def _inputs(kind: str) -> dict:
    generator = torch.Generator().manual_seed(1)
    config = SMALL[kind]
    if kind == "flux":
        tokens, text = 16, 8
        return {
            "hidden_states": torch.randn(1, tokens, config["in_channels"], generator=generator),
            "encoder_hidden_states": torch.randn(1, text, config["joint_attention_dim"], generator=generator),
            "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=generator),
            "timestep": torch.tensor([0.5]),
            "img_ids": torch.zeros(tokens, 3),
            "txt_ids": torch.zeros(text, 3),
            "guidance": torch.tensor([3.5]),
        }
    inputs = {
        "sample": torch.randn(1, 4, 8, 8, generator=generator),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 6, config["cross_attention_dim"], generator=generator),
    }
    if kind == "sdxl":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, 32, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
        }
    return inputs


def _run(model: torch.nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(kind), return_dict=False)[0]


@pytest.fixture(scope="module")
def models():
    return {kind: _build(kind) for kind in SMALL}


# ---------------------------------------------------------------- name maps against diffusers' converters


def _f32_tensors(state: dict[str, torch.Tensor]) -> list[GGUFTensor]:
    return [GGUFTensor(name, "F32", tuple(value.shape), value.numpy()) for name, value in state.items()]


@pytest.mark.parametrize("config", [SD15, SDXL], ids=["sd1", "sdxl"])
def test_ldm_names_real_configs(config):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    names = list(unet.state_dict())
    architecture = gguf_names.architecture_of("UNet2DConditionModel", unet.config)
    rules = gguf_names.name_rules(architecture, unet.config, names)
    assert all(len(rule.parts) == 1 for rule in rules)

    # diffusers' converter moves values by name, so names stand in for tensors.
    ldm = {gguf_names.LDM_PREFIX + rule.original: rule.parts[0] for rule in rules}
    converted = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert converted == {name: name for name in names}


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_ldm_names_invert_diffusers(models, kind):
    state = models[kind].state_dict()
    original = gguf_names.to_original(_f32_tensors(state), kind, models[kind].config)
    assert "time_embed.0.weight" in {tensor.name for tensor in original}
    assert ("label_emb.0.0.weight" in {tensor.name for tensor in original}) == (kind == "sdxl")

    checkpoint = {gguf_names.LDM_PREFIX + t.name: torch.from_numpy(t.data) for t in original}
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(models[kind].config))
    assert set(converted) == set(state)
    for name, value in state.items():
        assert torch.equal(converted[name], value), name


def test_flux_names_invert_diffusers_real_width():
    # diffusers' FLUX converter only accepts the real width (3072), so this runs at that width with
    # two columns per weight: fusing, splitting and the halves swap all act on rows.
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**{**FLUX, "num_layers": 2, "num_single_layers": 2})
    generator = torch.Generator().manual_seed(0)
    state = {
        name: torch.randn(value.shape[0], *([2] if value.dim() > 1 else []), generator=generator)
        for name, value in transformer.state_dict().items()
    }
    original = {t.name: torch.from_numpy(t.data) for t in gguf_names.to_original(_f32_tensors(state), "flux", FLUX)}
    assert original["single_blocks.1.linear1.weight"].shape == (3 * 3072 + 4 * 3072, 2)
    assert original["double_blocks.0.img_attn.qkv.bias"].shape == (3 * 3072,)

    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    assert set(converted) == set(state)
    for name, value in state.items():
        assert torch.equal(converted[name], value), name

    back = gguf_names.from_original(
        "file.gguf", _f32_tensors(original), "flux", FLUX, {n: v.shape for n, v in state.items()}
    )
    assert {t.name: t.shape for t in back.tensors} == {n: tuple(v.shape) for n, v in state.items()}
    for tensor in back.tensors:
        assert np.array_equal(tensor.data.reshape(tensor.shape), state[tensor.name].numpy()), tensor.name


def test_fuse_mixed_types_as_f32():
    from quant.formats import gguf as gguf_format

    weight = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    q = GGUFTensor("q.weight", "Q8_0", (32, 32), gguf_format.pack(weight[:32], "Q8_0").numpy())
    k = GGUFTensor("k.weight", "F32", (32, 32), weight[32:].numpy())
    fused = gguf_names._stack("qk.weight", [q, k])
    assert fused.type_name == "F32"
    assert fused.shape == (64, 32)
    assert np.array_equal(fused.data[:32], gguf_format.unpack(torch.from_numpy(q.data), "Q8_0", (32, 32)).numpy())
    assert np.array_equal(fused.data[32:], weight[32:].numpy())


def test_architecture_of_models(models):
    for kind, model in models.items():
        assert gguf_names.architecture_of(type(model).__name__, model.config) == kind
    text_unet = {**SMALL["sd1"], "addition_embed_type": "text"}
    assert gguf_names.architecture_of("UNet2DConditionModel", text_unet) is None


# ---------------------------------------------------------------- files read by our loader and by diffusers

QTYPES = ["Q8_0", "Q4_0"]


def _save(model: torch.nn.Module, kind: str, qtype: str, folder, keep: tuple[str, ...] = ()):
    """Quantize a copy of ``model`` with the plugin and save it; return the quantized copy and the file."""
    options = GGUFOptions(qtype=qtype, keep=keep)
    quantized, report = gguf_plugin.quantize(copy.deepcopy(model), options)
    return quantized, gguf_plugin.save(quantized, report, options, folder / f"{kind}-{qtype}.gguf")


def _config_folder(model: torch.nn.Module, folder) -> str:
    model.save_config(folder / "config")
    return str(folder / "config")


def _conv_names(model: torch.nn.Module) -> tuple[str, ...]:
    return tuple(name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d))


@pytest.mark.parametrize("kind", list(SMALL))
def test_file_uses_original_names(models, kind, tmp_path):
    _, path = _save(models[kind], kind, "Q8_0", tmp_path)
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert fields["general.architecture"] == kind
    assert fields["lowbit.tensor_names"] == "original"

    if kind == "flux":
        qkv = tensors["double_blocks.0.img_attn.qkv.weight"]
        assert qkv.tensor_type == gguf.GGMLQuantizationType.Q8_0
        assert list(qkv.shape) == [32, 3 * 32]  # ggml order: [in, out]
        assert list(tensors["single_blocks.1.linear1.weight"].shape) == [32, 3 * 32 + 4 * 32]
        assert tensors["final_layer.adaLN_modulation.1.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    else:
        conv = tensors["input_blocks.1.0.in_layers.2.weight"]
        assert conv.tensor_type == gguf.GGMLQuantizationType.Q8_0
        assert list(conv.shape) == [32 * 9, 32]  # rows of in * kh * kw values, original shape in metadata
        assert fields[ORIGINAL_SHAPE_KEY + "input_blocks.1.0.in_layers.2.weight"] == [32, 32, 3, 3]
        assert tensors["input_blocks.0.0.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # rows of 36
        assert tensors["out.0.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    assert not any(name.startswith(("down_blocks.", "transformer_blocks.")) for name in tensors)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("kind", list(SMALL))
def test_our_loader_reproduces_model(models, kind, qtype, tmp_path):
    quantized, path = _save(models[kind], kind, qtype, tmp_path)
    loaded, report = gguf_plugin.load(path, _build(kind, seed=1))
    assert report.options["qtype"] == qtype
    assert torch.equal(_run(loaded, kind), _run(quantized, kind))


@pytest.mark.parametrize(
    "kind, error, message",
    [
        ("sd1", SingleFileComponentError, "Weights for this component appear to be missing in the checkpoint"),
        ("sdxl", KeyError, "'label_emb.0.0.weight'"),
    ],
)
def test_diffusers_rejects_ldm_names_without_prefix(models, kind, error, message, tmp_path):
    # diffusers 0.42's convert_ldm_unet_checkpoint keeps only names under "model.diffusion_model.",
    # which ComfyUI-GGUF's files (and ours) do not have. SD1 ends with nothing to load, and SDXL's
    # text_time embedding then looks up a name that was dropped.
    _, path = _save(models[kind], kind, "Q8_0", tmp_path)
    with pytest.raises(error, match=message):
        UNet2DConditionModel.from_single_file(
            str(path),
            config=_config_folder(models[kind], tmp_path),
            quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
            **NO_HUB,
        )


def test_diffusers_rejects_quantized_conv(models, tmp_path):
    # diffusers replaces nn.Linear only, so a packed convolution weight fails its shape check.
    _, path = _save(models["sd1"], "sd1", "Q8_0", tmp_path)
    checkpoint = {gguf_names.LDM_PREFIX + name: value for name, value in load_gguf_checkpoint(str(path)).items()}
    with pytest.raises(
        ValueError,
        match=r"has an expected shape of: torch.Size\(\[\d+, \d+, 3, 3\]\), "
        r"but the loaded GGUF weight decodes to shape: \(\d+, \d+\)",
    ):
        UNet2DConditionModel.from_single_file(
            checkpoint,
            config=_config_folder(models["sd1"], tmp_path),
            quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
            **NO_HUB,
        )


def test_diffusers_rejects_flux_width(models, tmp_path):
    # diffusers 0.42's convert_flux_transformer_checkpoint_to_diffusers splits linear1 at a fixed
    # width of 3072 with a 4x MLP, so it rejects any other width.
    _, path = _save(models["flux"], "flux", "Q8_0", tmp_path)
    with pytest.raises(RuntimeError, match=r"split_sizes=\[3072, 3072, 3072, 12288\]"):
        FluxTransformer2DModel.from_single_file(
            str(path),
            config=_config_folder(models["flux"], tmp_path),
            quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
            **NO_HUB,
        )


def _diffusers_load(model: torch.nn.Module, kind: str, path, tmp_path) -> torch.nn.Module:
    """Load a file with diffusers' GGUF reader, quantizer and GGUFLinear.

    SD names only need the prefix diffusers' LDM converter requires. FLUX names are split with our
    rules (checked above against diffusers' converter), because that converter rejects this width.
    """
    checkpoint = load_gguf_checkpoint(str(path))
    if kind == "flux":
        shapes = {name: tuple(value.shape) for name, value in model.state_dict().items()}
        state = {}
        for rule in gguf_names.name_rules("flux", model.config, shapes):
            value = checkpoint.pop(rule.original)
            if rule.swap_halves:
                value = torch.cat(list(value.chunk(2))[::-1])
            parts = torch.split(value, [shapes[name][0] for name in rule.parts])
            state.update(zip(rule.parts, parts))
        assert not checkpoint
    else:
        state = {gguf_names.LDM_PREFIX + name: value for name, value in checkpoint.items()}
    return type(model).from_single_file(
        state,
        config=_config_folder(model, tmp_path),
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        **NO_HUB,
    )


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("kind", list(SMALL))
def test_diffusers_outputs_match(models, kind, qtype, tmp_path):
    keep = _conv_names(models[kind]) if kind != "flux" else ()
    _, path = _save(models[kind], kind, qtype, tmp_path, keep=keep)
    ours, _ = gguf_plugin.load(path, _build(kind, seed=1))
    theirs = _diffusers_load(models[kind], kind, path, tmp_path)
    assert any(type(module).__name__ == "GGUFLinear" for module in theirs.modules())

    expected, found = _run(ours, kind), _run(theirs, kind)
    difference = (found - expected).abs().max().item()
    scale = expected.abs().max().item()
    print(f"{kind} {qtype}: max |diffusers - ours| = {difference:.3g}, max |ours| = {scale:.3g}")
    assert difference <= TOLERANCE * scale


# ---------------------------------------------------------------- community files and errors

Q8_0, F16, F32 = (gguf.GGMLQuantizationType[name] for name in ("Q8_0", "F16", "F32"))


def _community_tensor(name: str, values: np.ndarray, kind: str):
    """Pick a tensor's type as community converters do.

    Returns the stored data, its type, the values a reader gets back, and the original shape when the
    data is flattened (else None).

    1-D tensors are F32. Weights whose rows hold whole 32-value blocks are Q8_0, and SD convolutions are
    flattened to rows of 256 values first, with their shape in metadata (ComfyUI-GGUF's layout). The
    rest (SD's conv_in with rows of 36 values, FLUX's img_in) is F16.
    """
    if values.ndim == 1:
        return values, F32, values, None
    if kind != "flux" and values.ndim == 4 and values.shape[-1] == 3 and values.size % 256 == 0:
        data = gguf.quants.quantize(values.reshape(-1, 256), Q8_0)
        return data, Q8_0, gguf.quants.dequantize(data, Q8_0).reshape(values.shape), list(values.shape)
    if values.ndim == 2 and values.shape[1] % 32 == 0 and not name.startswith("img_in."):
        data = gguf.quants.quantize(values, Q8_0)
        return data, Q8_0, gguf.quants.dequantize(data, Q8_0), None
    half = values.astype(np.float16)
    return half, F16, half.astype(np.float32), None


def _write_community_file(model, kind: str, path, prefix: str = "", architecture: bool = True):
    """Write ``model`` as a community GGUF file with original names; return a model with its stored values."""
    state = {name: value.numpy() for name, value in model.state_dict().items()}
    original = gguf_names.to_original(
        [GGUFTensor(name, "F32", value.shape, value) for name, value in state.items()], kind, model.config
    )
    writer = gguf.GGUFWriter(path, kind)
    if not architecture:  # stable-diffusion.cpp writes no general.architecture
        del writer.kv_data[0]["general.architecture"]
    stored = []
    for tensor in original:
        data, qtype, values, shape = _community_tensor(tensor.name, tensor.data, kind)
        if shape:
            writer.add_array(ORIGINAL_SHAPE_KEY + prefix + tensor.name, shape)
        writer.add_tensor(prefix + tensor.name, data, raw_dtype=qtype)
        stored.append(GGUFTensor(tensor.name, "F32", tensor.shape, values))
    if prefix:  # a whole checkpoint, as stable-diffusion.cpp writes it, also contains the VAE
        writer.add_tensor("first_stage_model.decoder.conv_in.bias", np.zeros(512, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    shapes = {name: value.shape for name, value in state.items()}
    converted = gguf_names.from_original(path, stored, kind, model.config, shapes).tensors
    reference = _build(kind, seed=1)
    reference.load_state_dict({t.name: torch.from_numpy(t.data).reshape(shapes[t.name]) for t in converted})
    return reference


@pytest.mark.parametrize(
    "kind, prefix, architecture",
    [("sd1", "", True), ("sdxl", "", True), ("sd1", gguf_names.LDM_PREFIX, False), ("flux", "", True)],
    ids=["sd1", "sdxl", "sd1-prefix-no-architecture", "flux"],
)
def test_community_file_loads(models, kind, prefix, architecture, tmp_path):
    path = tmp_path / "community.gguf"
    reference = _write_community_file(models[kind], kind, path, prefix, architecture)
    types = {tensor.tensor_type for tensor in gguf.GGUFReader(path).tensors}
    assert types == {Q8_0, F16, F32}

    loaded, report = gguf_plugin.load(path, _build(kind, seed=2))
    assert report.options["qtype"] == "Q8_0"
    assert report.layers_quantized > 10
    assert torch.allclose(_run(loaded, kind), _run(reference, kind), rtol=0, atol=1e-5)


def test_load_logs_summary(models, tmp_path, caplog):
    _, path = _save(models["flux"], "flux", "Q4_0", tmp_path)
    with caplog.at_level(logging.INFO, logger="plugins.gguf"):
        gguf_plugin.load(path, _build("flux", seed=1))
    (line,) = [record.getMessage() for record in caplog.records if record.name == "plugins.gguf"]
    assert "(flux, original names)" in line
    assert "Q4_0" in line
    assert "F32" in line
    assert "4.50 bits per quantized weight" in line
    assert "MB resident" in line


@pytest.mark.parametrize(
    "kind, into, expected", [("flux", "sd1", "sd1"), ("sdxl", "sd1", "sd1"), ("sd1", "flux", "flux")]
)
def test_architecture_mismatch_message(models, kind, into, expected, tmp_path):
    _, path = _save(models[kind], kind, "Q8_0", tmp_path)
    model = _build(into)
    message = (
        f"{path}: general.architecture is '{kind}', but the {type(model).__name__} it is loaded into expects "
        f"'{expected}' or '{type(model).__name__.lower()}'"
    )
    with pytest.raises(GGUFFileError, match=f"^{message}$"):
        gguf_plugin.load(path, model)


def test_unknown_architecture_message(tmp_path):
    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(path, "sd9")
    writer.add_tensor("conv_in.bias", np.zeros(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        GGUFFileError,
        match=r"general.architecture 'sd9' is not a known architecture; "
        r"expected one of sd1, sdxl, flux, or a diffusers model class name",
    ):
        gguf_plugin.load(path, _build("sd1"))


def _write_f32_file(path, architecture: str, tensors: dict[str, np.ndarray]) -> None:
    writer = gguf.GGUFWriter(path, architecture)
    for name, values in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_one_by_one_conv_stored_2d_loads(models, tmp_path):
    model = models["sd1"]
    original = {t.name: t.data for t in gguf_names.to_original(_f32_tensors(model.state_dict()), "sd1", model.config)}
    name = "input_blocks.1.1.proj_in.weight"  # a 1x1 convolution in SD1.x
    assert original[name].shape == (32, 32, 1, 1)
    original[name] = original[name].reshape(32, 32)
    _write_f32_file(tmp_path / "flat.gguf", "sd1", original)

    loaded, _ = gguf_plugin.load(tmp_path / "flat.gguf", _build("sd1", seed=1))
    assert torch.equal(_run(loaded, "sd1"), _run(model, "sd1"))


def test_other_reshape_is_an_error(models, tmp_path):
    model = models["sd1"]
    original = {t.name: t.data for t in gguf_names.to_original(_f32_tensors(model.state_dict()), "sd1", model.config)}
    name = "input_blocks.1.0.in_layers.2.weight"
    original[name] = original[name].reshape(32, 288)
    _write_f32_file(tmp_path / "reshaped.gguf", "sd1", original)

    message = (
        r"tensor 'input_blocks.1.0.in_layers.2.weight' \(down_blocks.0.resnets.0.conv1.weight\) has shape \(32, 288\), "
        r"expected \(32, 32, 3, 3\); it holds as many values, but only size-1 dimensions may differ"
    )
    with pytest.raises(GGUFFileError, match=message):
        gguf_plugin.load(tmp_path / "reshaped.gguf", _build("sd1", seed=1))


def test_missing_tensor_named_as_in_file(models, tmp_path):
    model = models["flux"]
    original = {t.name: t.data for t in gguf_names.to_original(_f32_tensors(model.state_dict()), "flux", model.config)}
    del original["guidance_in.in_layer.weight"]
    _write_f32_file(tmp_path / "schnell.gguf", "flux", original)
    message = (
        r"1 tensors of the model are missing: "
        r"'guidance_in.in_layer.weight' \(time_text_embed.guidance_embedder.linear_1.weight\)"
    )
    with pytest.raises(GGUFFileError, match=message):
        gguf_plugin.load(tmp_path / "schnell.gguf", _build("flux", seed=1))
