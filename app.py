"""Hugging Face Spaces entry point: the same app as ``python launch.py``, on the port Spaces sets."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from plugins.registry import discover  # noqa: E402
from webui.app import CSS, build_app  # noqa: E402

demo = build_app(discover())

if __name__ == "__main__":
    demo.queue(default_concurrency_limit=1).launch(server_name="0.0.0.0", css=CSS)
