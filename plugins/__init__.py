"""Quantization methods, one package per method; each registers one Plugin."""
