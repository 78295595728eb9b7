"""The full-precision baseline: the model as loaded, nothing quantized."""

import time
from dataclasses import dataclass

from torch import nn

from plugins.base import Plugin, PluginOptions, Progress, QuantizeReport
from quant.layers import weight_bytes


@dataclass(frozen=True)
class FullOptions(PluginOptions):
    """The baseline has no settings."""


class FullPrecision(Plugin):
    id = "full"
    name = "Full precision"
    description = "The model as loaded, in the compute dtype: the baseline every method is compared with."
    reference = "none"
    parts = ("unet", "transformer", "text_encoder", "vae", "llm")
    families = ("*",)
    options_class = FullOptions

    def quantize(
        self, part: nn.Module, options: PluginOptions, progress: Progress | None = None
    ) -> tuple[nn.Module, QuantizeReport]:
        started = time.perf_counter()
        size = weight_bytes(part)
        bits = 8 * next(part.parameters()).element_size()
        return part, QuantizeReport(
            self.id, options.to_dict(), 0, [], float(bits), size, size, time.perf_counter() - started
        )


plugin = FullPrecision()
