"""Compare tab: full precision and a quantized model on the same prompt and seed, side by side."""

import gradio as gr

from plugins.registry import Registry
from plugins.studio import compare, prepare, run, save_images
from quant.runtime import PipelineCache
from webui.controls import (
    ENLARGE_TO,
    PluginPicker,
    generation_controls,
    parse_values,
    plugin_picker,
    user_errors,
)
from webui.generate_tab import output_folder


def build(registry: Registry, cache: PipelineCache) -> PluginPicker:
    """Build the tab and return its plugin picker, which the Quantize tab fills with a saved file."""
    # components
    with gr.Row():
        with gr.Column(scale=2):
            controls = generation_controls(batch=False)
            picker = plugin_picker(registry, exclude=("full",))
            start = gr.Button("Compare", variant="primary")
        with gr.Column(scale=3):
            with gr.Row():
                baseline_image = gr.Image(label="full precision", type="filepath", height=300)
                quantized_image = gr.Image(label="quantized", type="filepath", height=300)
            status = gr.Markdown()
            table = gr.Dataframe(label="figures", interactive=False, wrap=True)

    # events
    controls.wire()
    picker.wire()

    @user_errors
    def on_compare(*values, progress=gr.Progress()):
        model, plugin, options, saved_file, request = parse_values(registry, controls, picker, values, batch_size=1)
        full = registry.get("full")

        yield gr.skip(), gr.skip(), "generating in full precision...", gr.skip()
        loaded, report = prepare(cache, model, full, full.default_options())
        baseline = run(
            loaded,
            report,
            request,
            lambda fraction, message: progress(0.5 * fraction, desc=f"full precision: {message}"),
        )
        baseline_path = save_images(baseline, output_folder(), ENLARGE_TO)[0][1]
        yield str(baseline_path), gr.skip(), f"applying {plugin.name}...", gr.skip()

        loaded, report = prepare(
            cache, model, plugin, options, saved_file, lambda fraction, message: progress(0.5, desc=message)
        )
        quantized = run(
            loaded,
            report,
            request,
            lambda fraction, message: progress(0.5 + 0.5 * fraction, desc=f"{plugin.name}: {message}"),
        )
        quantized_path = save_images(quantized, output_folder(), ENLARGE_TO)[0][1]
        rows = compare(baseline, quantized)
        columns = list(rows[0])
        yield (
            str(baseline_path),
            str(quantized_path),
            f"done: {report.summary()}",
            {"headers": columns, "data": [[row.get(column, "") for column in columns] for row in rows]},
        )

    start.click(
        on_compare,
        inputs=[*controls.inputs, *picker.inputs],
        outputs=[baseline_image, quantized_image, status, table],
        api_name="compare",
    )
    return picker
