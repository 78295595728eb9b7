"""Storage formats: how a weight is packed, dequantized and what it really costs in bits."""
