"""Quantize tab: quantize a model's UNet or transformer to a file, see its cost first, then use it elsewhere."""

import logging
import threading

import gradio as gr

from plugins.registry import Registry
from plugins.studio import Cancelled, artefact_name, cancellable, estimate, quantize_to_file
from quant.runtime import PipelineCache
from webui.controls import PluginPicker, model_picker, plugin_picker, user_errors
from webui.generate_tab import OUTPUT_DIR

logger = logging.getLogger(__name__)


def build(registry: Registry, cache: PipelineCache, targets: list[PluginPicker]) -> None:
    """Build the tab; "use in Generate and Compare" fills the saved-file box of each picker in ``targets``."""
    excluded = tuple(plugin.id for plugin in registry.plugins.values() if not plugin.file_suffix)
    # Cancel requests of the running quantize runs, by browser session, so that one user's Cancel
    # button stops only that user's run.
    running: dict[str, threading.Event] = {}

    # components
    with gr.Row():
        with gr.Column(scale=2):
            model = model_picker()
            picker = plugin_picker(registry, exclude=excluded, with_files=False)
            with gr.Row():
                estimate_button = gr.Button("Estimate size and cost")
                quantize_button = gr.Button("Quantize and save", variant="primary")
                cancel_button = gr.Button("Cancel", variant="stop")
        with gr.Column(scale=3):
            sizes = gr.JSON(label="estimate (calibrating methods also show samples, memory and time)")
            status = gr.Markdown()
            saved = gr.File(label="quantized file", interactive=False)
            saved_path = gr.Textbox(label="saved to", interactive=False)
            use = gr.Button("Use in Generate and Compare", interactive=False)
            skipped = gr.Dataframe(
                headers=["layer", "reason"], label="layers kept in full precision", interactive=False
            )

    # events
    picker.wire()

    def parse(model_name: str, values: tuple):
        plugin, options, _ = picker.parse(registry, values)
        return model_name, plugin, options

    @user_errors
    def on_estimate(model_name, *values):
        return estimate(cache, *parse(model_name, values))

    @user_errors
    def on_quantize(request: gr.Request, model_name, *values, progress=gr.Progress()):
        model_name, plugin, options = parse(model_name, values)
        cancel = threading.Event()
        running[request.session_hash] = cancel
        try:
            figures = estimate(cache, model_name, plugin, options)
            yield figures, f"quantizing with {plugin.name}...", gr.skip(), gr.skip(), gr.skip(), gr.skip()
            out = OUTPUT_DIR / "quantized" / artefact_name(model_name, plugin, options)
            report = quantize_to_file(
                cache,
                model_name,
                plugin,
                options,
                out,
                cancellable(lambda fraction, message: progress(fraction, desc=message), cancel),
            )
        except Cancelled as stopped:
            logger.info("quantize with plugin %s to %s: %s", plugin.id, out, stopped)
            yield gr.skip(), f"{stopped}; nothing was saved", None, "", gr.update(interactive=False), []
            return
        finally:
            running.pop(request.session_hash, None)
        figures["file"] = f"{out.stat().st_size / 1e6:.2f} MB"
        yield (
            figures,
            f"done: {report.summary()}",
            str(out),
            str(out.resolve()),
            gr.update(interactive=True),
            [list(row) for row in report.skipped],
        )

    def on_cancel(request: gr.Request):
        cancel = running.get(request.session_hash)
        if cancel is None:
            return "no quantize run of yours is running"
        cancel.set()
        return "cancelling: the run stops at its next progress report..."

    inputs = [model, *picker.inputs]
    estimate_button.click(on_estimate, inputs=inputs, outputs=sizes, api_name="estimate")
    quantize_button.click(
        on_quantize, inputs=inputs, outputs=[sizes, status, saved, saved_path, use, skipped], api_name="quantize"
    )
    cancel_button.click(on_cancel, outputs=status, api_name="cancel_quantize")

    # Sending the file: each target picker switches to the plugin and gets the path in its file box.
    def send(plugin_id: str, path: str):
        updates = []
        for target in targets:
            updates.append(gr.update(value=plugin_id))
            updates += [gr.update(value=path if owner == plugin_id else "") for owner in target.files]
        return updates

    outputs = []
    for target in targets:
        outputs += [target.dropdown, *target.files.values()]
    use.click(send, inputs=[picker.dropdown, saved_path], outputs=outputs, api_visibility="private")
