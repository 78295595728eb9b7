"""Build the Gradio app from the plugin registry: Generate, Compare, Quantize and System tabs."""

import logging

import gradio as gr

from plugins.registry import Registry
from quant.runtime import PipelineCache
from webui import compare_tab, generate_tab, quantize_tab, system_tab

logger = logging.getLogger(__name__)

# Small images are enlarged by an integer factor; pixelated rendering keeps any further scaling sharp.
CSS = "#generate-gallery img, .image-container img { image-rendering: pixelated; }"


def build_app(registry: Registry, cache: PipelineCache | None = None) -> gr.Blocks:
    cache = cache or PipelineCache()
    with gr.Blocks(title="LowBit Studio", analytics_enabled=False) as app:
        gr.Markdown(
            "# LowBit Studio\nQuantized image generation: pick a model and a method, "
            "compare with full precision on the same seed."
        )
        with gr.Tab("Generate"):
            generate_picker = generate_tab.build(registry, cache)
        with gr.Tab("Compare"):
            compare_picker = compare_tab.build(registry, cache)
        with gr.Tab("Quantize"):
            quantize_tab.build(registry, cache, [generate_picker, compare_picker])
        with gr.Tab("System"):
            system_tab.build(registry, app)
    for source, error in registry.errors.items():
        logger.warning("plugin %s is unavailable: %s", source, error)
    return app
