"""Generate tab: pick a model and a method, generate, and read time, memory and size after each run."""

import datetime
import os
from pathlib import Path

import gradio as gr

from plugins.registry import Registry
from plugins.studio import prepare, run, save_images
from quant.runtime import PipelineCache
from webui.controls import (
    ENLARGE_TO,
    PluginPicker,
    generation_controls,
    parse_values,
    plugin_picker,
    user_errors,
)

OUTPUT_DIR = Path(os.environ.get("LOWBIT_OUTPUT_DIR", "outputs"))


def output_folder() -> Path:
    return OUTPUT_DIR / datetime.date.today().isoformat()


def build(registry: Registry, cache: PipelineCache) -> PluginPicker:
    """Build the tab and return its plugin picker, which the Quantize tab fills with a saved file."""
    # components
    with gr.Row():
        with gr.Column(scale=2):
            controls = generation_controls()
            picker = plugin_picker(registry)
            generate = gr.Button("Generate", variant="primary")
        with gr.Column(scale=3):
            gallery = gr.Gallery(
                label="images (enlarged, nearest neighbour)",
                columns=2,
                height=560,
                object_fit="contain",
                elem_id="generate-gallery",
            )
            files = gr.Files(label="PNG files with generation parameters")
            status = gr.Markdown()
            stats = gr.JSON(label="figures of the last run")
            skipped = gr.Dataframe(
                headers=["layer", "reason"], label="layers kept in full precision", interactive=False
            )

    # events
    controls.wire()
    picker.wire()

    @user_errors
    def on_generate(*values, progress=gr.Progress()):
        model, plugin, options, saved_file, request = parse_values(registry, controls, picker, values)

        yield gr.skip(), gr.skip(), f"loading {model} and applying {plugin.name}...", gr.skip(), gr.skip()
        loaded, report = prepare(
            cache, model, plugin, options, saved_file, lambda fraction, message: progress(fraction, desc=message)
        )
        yield gr.skip(), gr.skip(), f"generating with {plugin.name}...", gr.skip(), gr.skip()
        finished = run(loaded, report, request, progress=lambda fraction, message: progress(fraction, desc=message))
        saved = save_images(finished, output_folder(), ENLARGE_TO)
        yield (
            [str(display) for _, display in saved],
            [str(original) for original, _ in saved],
            f"done: {report.summary()}",
            finished.stats(),
            [list(row) for row in report.skipped],
        )

    generate.click(
        on_generate,
        inputs=[*controls.inputs, *picker.inputs],
        outputs=[gallery, files, status, stats, skipped],
        api_name="generate",
    )
    return picker
