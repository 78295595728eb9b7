"""GGUF recipes: which block type each layer of a UNet or FLUX transformer gets.

A plain type ("Q4_K") puts every quantizable layer in that type. A mix ("Q4_K_M") follows the idea of
llama.cpp's ``_S``/``_M``/``_L`` file types: a base type, with the layers that hurt most when
quantized coarsely moved to a higher type. For diffusion models the rule here is:

- value projections (``attn1.to_v``, ``attn2.to_v``) and the FLUX double blocks' q/k/v projections,
  which the original checkpoints fuse into one ``qkv`` tensor, get the recipe's attention type;
- feed-forward output projections (``ff.net.2``, ``ff_context.net.2``) get its feed-forward type;
- the FLUX single blocks' q/k/v and MLP input, fused into one ``linear1`` tensor, stay at the base
  type, because a fused tensor holds one type and is mostly MLP.

The upgrades follow city96's llama.cpp patch for image models, without its per-layer-index rules
(Q3_K_M and Q4_K_S there upgrade only the first few value projections).

Independently of the type, the layers that ComfyUI-GGUF's converter never quantizes (input and
output layers, time, text and class embeddings) stay in full precision unless the user asks
otherwise.
"""

from dataclasses import dataclass
from fnmatch import fnmatch

# Layers kept in full precision by default, by diffusers module name: SD UNets, then FLUX.
FULL_PRECISION_LAYERS = (
    "conv_in",
    "conv_out",
    "time_embedding.*",
    "class_embedding.*",
    "add_embedding.*",
    "x_embedder",
    "context_embedder",
    "time_text_embed.*",
    "norm_out.*",
    "proj_out",
)

ATTENTION_PATTERNS = (
    "*.attn1.to_v",
    "*.attn2.to_v",
    "transformer_blocks.*.attn.to_[qkv]",
    "transformer_blocks.*.attn.add_[qkv]_proj",
)
FEED_FORWARD_PATTERNS = ("*.ff.net.2", "*.ff_context.net.2")


@dataclass(frozen=True)
class Recipe:
    """A base block type and the higher types of the attention and feed-forward layers named above."""

    name: str
    base: str
    attention: str | None = None
    feed_forward: str | None = None

    def qtype_for(self, layer_name: str) -> str:
        """Return the block type of the layer called ``layer_name`` (a diffusers module name)."""
        if layer_name.startswith("single_transformer_blocks."):
            return self.base
        if self.attention and any(fnmatch(layer_name, pattern) for pattern in ATTENTION_PATTERNS):
            return self.attention
        if self.feed_forward and any(fnmatch(layer_name, pattern) for pattern in FEED_FORWARD_PATTERNS):
            return self.feed_forward
        return self.base

    @property
    def types(self) -> set[str]:
        return {qtype for qtype in (self.base, self.attention, self.feed_forward) if qtype}


PLAIN_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K")

RECIPES: dict[str, Recipe] = {name: Recipe(name, name) for name in PLAIN_TYPES}
RECIPES |= {
    "Q5_K_M": Recipe("Q5_K_M", "Q5_K", attention="Q6_K", feed_forward="Q6_K"),
    "Q5_K_S": Recipe("Q5_K_S", "Q5_K"),
    "Q4_K_M": Recipe("Q4_K_M", "Q4_K", attention="Q6_K", feed_forward="Q6_K"),
    "Q4_K_S": Recipe("Q4_K_S", "Q4_K", attention="Q5_K", feed_forward="Q5_K"),
    "Q3_K_L": Recipe("Q3_K_L", "Q3_K", attention="Q5_K", feed_forward="Q5_K"),
    "Q3_K_M": Recipe("Q3_K_M", "Q3_K", attention="Q4_K", feed_forward="Q4_K"),
    "Q3_K_S": Recipe("Q3_K_S", "Q3_K"),
}


def is_full_precision_layer(layer_name: str) -> bool:
    """Return whether a layer is one that GGUF diffusion converters keep in full precision."""
    return any(fnmatch(layer_name, pattern) for pattern in FULL_PRECISION_LAYERS)
