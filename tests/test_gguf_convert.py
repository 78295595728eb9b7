"""GGUF files under the original checkpoint names: the name maps checked against diffusers' own
converters, and our files read back by our loader and by diffusers' GGUF loader.

The models are SD1.5, SDXL and FLUX.1-dev with their real configs' keys and block layouts, at reduced
width and depth and with random weights, so each test runs in seconds on a CPU.
"""

import copy
import json
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
