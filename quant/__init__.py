"""The shared quant core: device probe, formats, quantized layers, runtime and metrics.

Nothing here imports gradio or the web UI, so every method runs from Python and the command line.
"""
