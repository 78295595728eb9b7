"""The Gradio web UI: one module per tab, built from the plugin registry."""
