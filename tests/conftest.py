import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from plugins.registry import discover  # noqa: E402
from quant.runtime import load_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def registry():
    return discover()


@pytest.fixture(scope="session")
def embedded():
    """The embedded model in float32, loaded once for the whole session."""
    return load_pipeline(None, dtype=torch.float32, device="cpu")
