"""Which block type each layer gets under the GGUF recipes."""

import pytest

from plugins.gguf.recipes import RECIPES, is_full_precision_layer
from quant.formats.gguf import PACKABLE_TYPES


@pytest.mark.parametrize(
    "layer, qtype",
    [
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v", "Q6_K"),
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v", "Q6_K"),
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "Q4_K"),
        ("up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2", "Q6_K"),
        ("up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj", "Q4_K"),
        ("transformer_blocks.3.attn.to_q", "Q6_K"),
        ("transformer_blocks.3.attn.add_k_proj", "Q6_K"),
        ("transformer_blocks.3.attn.to_out.0", "Q4_K"),
        ("transformer_blocks.3.ff_context.net.2", "Q6_K"),
        ("single_transformer_blocks.0.attn.to_v", "Q4_K"),
        ("single_transformer_blocks.0.proj_mlp", "Q4_K"),
    ],
)
def test_q4_k_m_layer_types(layer, qtype):
    assert RECIPES["Q4_K_M"].qtype_for(layer) == qtype


def test_plain_type_is_uniform():
    recipe = RECIPES["Q4_0"]
    assert recipe.types == {"Q4_0"}
    assert recipe.qtype_for("transformer_blocks.0.attn.to_v") == "Q4_0"


def test_every_recipe_uses_packable_types():
    for recipe in RECIPES.values():
        assert recipe.types <= set(PACKABLE_TYPES), recipe.name


@pytest.mark.parametrize(
    "layer, kept",
    [
        ("conv_in", True),
        ("conv_out", True),
        ("time_embedding.linear_1", True),
        ("add_embedding.linear_2", True),
        ("x_embedder", True),
        ("time_text_embed.timestep_embedder.linear_1", True),
        ("norm_out.linear", True),
        ("proj_out", True),
        ("single_transformer_blocks.0.proj_out", False),
        ("down_blocks.0.attentions.0.proj_out", False),
        ("down_blocks.0.resnets.0.conv1", False),
    ],
)
def test_full_precision_layers(layer, kept):
    assert is_full_precision_layer(layer) is kept
