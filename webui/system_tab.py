"""System tab: the device probe's results and every plugin with its availability and reason."""

import gradio as gr

from plugins.registry import Registry
from plugins.studio import system_rows


def build(registry: Registry, app: gr.Blocks) -> None:
    # components
    device = gr.Dataframe(headers=["property", "value"], label="device", interactive=False, wrap=True)
    plugins = gr.Dataframe(label="plugins", interactive=False, wrap=True)
    refresh = gr.Button("refresh")

    # events
    def on_refresh():
        device_info, rows = system_rows(registry)
        columns = list(rows[0]) if rows else ["plugin"]
        return (
            [[key, value] for key, value in device_info.items()],
            {"headers": columns, "data": [[row[c] for c in columns] for row in rows]},
        )

    refresh.click(on_refresh, outputs=[device, plugins], api_name="system")
    app.load(on_refresh, outputs=[device, plugins], api_visibility="private")
