"""The web UI through its HTTP API, with the app launched on loopback as a user would start it."""

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gradio_client import Client

from plugins.base import field_specs
from plugins.qdiffusion import QDiffusionOptions
from quant.pngmeta import read_parameters

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle on a blue background"
TINY_CALIBRATION = {
    "bits": "W4A8",
    "calibration_prompts": 1,
    "sampling_steps": 2,
    "calibration_steps": 1,
    "weight_iterations": 1,
    "activation_iterations": 1,
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(url: str, server: subprocess.Popen, auth=None, timeout: float = 120) -> Client:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"server exited with {server.returncode}: {server.stderr.read()}")
        try:
            return Client(url, auth=auth, verbose=False)
        except Exception:  # not listening yet
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    outputs = tmp_path_factory.mktemp("outputs")
    # One intra-op thread: calibration runs many small tensor operations, which thread
    # synchronisation slows down many times on a CPU shared with other work.
    env = {"LOWBIT_OUTPUT_DIR": str(outputs), "PATH": "/usr/bin:/bin", "HOME": str(outputs), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), "--port", str(port), "--auth", "ada:lovelace"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    client = _wait_for(url, process, auth=("ada", "lovelace"))
    yield url, client, outputs
    process.terminate()
    process.wait(timeout=30)


def _qdiffusion_values(**changes) -> list:
    """The qdiffusion option fields in the order the UI lists them."""
    values = QDiffusionOptions(**changes).to_dict()
    return [values[spec.name] for spec in field_specs(QDiffusionOptions)]


def _plugin_values(plugin: str, qtype: str = "Q4_0", qdiffusion: dict | None = None) -> list:
    # plugin, then the option fields of every plugin in registry order: gguf's qtype, keep and
    # quantize_io, then qdiffusion's
    return [plugin, qtype, "", False, *_qdiffusion_values(**(qdiffusion or {}))]


def _generation_values(
    plugin: str, qtype: str = "Q4_0", width: int = 0, saved_file: str = "", qdiffusion_file: str = ""
) -> list:
    # model, prompt, negative prompt, seed, steps, guidance, width, height, batch, scheduler,
    # the plugin and its options, then the saved-file box of every plugin that saves one (gguf, qdiffusion)
    generation = ["embedded", PROMPT, "", 0, 20, 4.0, width, 0, 2, "model default"]
    return [*generation, *_plugin_values(plugin, qtype), saved_file, qdiffusion_file]


def test_login_required(server):
    url, _, _ = server
    with pytest.raises(ValueError, match="Could not login"):
        Client(url, auth=("ada", "wrong"), verbose=False)


def test_generate_gguf_q4_0(server):
    _, client, _ = server
    gallery, files, status, stats, skipped = client.predict(*_generation_values("gguf"), api_name="/generate")
    assert len(gallery) == 2
    assert len(files) == 2
    assert status.startswith("done: gguf:")
    assert stats["method"] == "gguf Q4_0"
    assert stats["bits per weight (quantized layers)"] == "4.50"
    assert int(stats["layers kept in full precision"]) == len(skipped["data"])
    assert any(row[1] == "input, output or embedding layer (quantize_io is off)" for row in skipped["data"])
    parameters = read_parameters(files[0])
    assert parameters.startswith(PROMPT)
    assert '"qtype": "Q4_0"' in parameters


def test_generate_bad_size_reports_error_and_server_survives(server):
    _, client, _ = server
    with pytest.raises(Exception, match="width must be a multiple of 8"):
        client.predict(*_generation_values("full", width=30), api_name="/generate")
    gallery, *_ = client.predict(*_generation_values("full"), api_name="/generate")
    assert len(gallery) == 2


def test_compare_full_against_q8_0(server):
    _, client, _ = server
    values = _generation_values("gguf", qtype="Q8_0")
    values[8] = 1
    baseline, quantized, status, table = client.predict(*values, api_name="/compare")
    assert Path(baseline).is_file()
    assert Path(quantized).is_file()
    rows = {row[0]: dict(zip(table["headers"], row)) for row in table["data"]}
    assert set(rows) == {"full precision", "quantized"}
    assert float(rows["quantized"]["PSNR (dB)"]) > 25
    assert 0 < float(rows["quantized"]["SSIM"]) <= 1
    assert rows["full precision"]["adherence"] in ("0.00", "1.00")


def test_system_lists_plugins(server):
    _, client, _ = server
    device, plugins = client.predict(api_name="/system")
    properties = dict(device["data"])
    assert properties["device"].startswith("cpu")
    ids = {row[0]: row for row in plugins["data"]}
    assert ids["gguf"][2] == "yes"


def test_quantize_tab_estimates_saves_and_generates(server):
    _, client, _ = server
    sizes = client.predict("embedded", *_plugin_values("gguf", "Q4_K_M"), api_name="/estimate")
    assert sizes["part"] == "unet of embedded"
    assert sizes["estimated file"].endswith("of full precision)")
    estimated_mb = float(sizes["estimated file"].split(" MB")[0])

    # The API leaves out the "use in Generate and Compare" button among the outputs.
    sizes, status, _, saved_path, skipped = client.predict(
        "embedded", *_plugin_values("gguf", "Q4_K_M"), api_name="/quantize"
    )
    assert status.startswith("done: gguf:")
    assert saved_path.endswith("embedded-Q4_K_M.gguf")
    # The estimate counts tensor bytes; the file adds its header and metadata.
    assert estimated_mb <= float(sizes["file"].split(" MB")[0]) < estimated_mb + 0.1
    assert any(row[1] == "input, output or embedding layer (quantize_io is off)" for row in skipped["data"])

    gallery, _, status, stats, _ = client.predict(
        *_generation_values("gguf", saved_file=saved_path), api_name="/generate"
    )
    assert len(gallery) == 2
    assert stats["method"] == "gguf Q4_K_M"


def test_generate_missing_saved_file_reports_error(server):
    _, client, _ = server
    with pytest.raises(Exception, match="saved file not found: /nonexistent/model.gguf"):
        client.predict(*_generation_values("gguf", saved_file="/nonexistent/model.gguf"), api_name="/generate")


def test_saved_file_for_other_method_rejected(server):
    _, client, _ = server
    values = _generation_values("full", saved_file="/some/unet.gguf")
    with pytest.raises(Exception, match="a saved file \\(/some/unet.gguf\\) is set for method 'gguf'"):
        client.predict(*values, api_name="/generate")


def test_estimate_rejects_unmatched_keep_pattern(server):
    _, client, _ = server
    values = _plugin_values("gguf", "Q8_0")
    values[2] = "nomatch*"  # the keep pattern
    with pytest.raises(Exception, match="keep pattern 'nomatch\\*' matches no linear or convolution layer"):
        client.predict("embedded", *values, api_name="/estimate")


def _wait_for_progress(job, pattern: str, timeout: float = 240) -> str:
    """Return the first progress message of ``job`` that matches ``pattern``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job.status()
        for unit in status.progress_data or []:
            if unit.desc and re.match(pattern, unit.desc):
                return unit.desc
        if job.done():
            raise AssertionError(f"the job ended before a progress message matched {pattern!r}: {job.outputs()}")
        time.sleep(0.2)
    raise AssertionError(f"no progress message matched {pattern!r} within {timeout} s")


def test_quantize_tab_qdiffusion_cancel_and_use(server):
    _, client, outputs = server
    sizes = client.predict("embedded", *_plugin_values("qdiffusion", qdiffusion=TINY_CALIBRATION), api_name="/estimate")
    assert sizes["calibration samples"] == "2 UNet inputs: 1 prompt x 2 (unconditional and conditional) x 1 step"
    assert "calibration memory (estimate)" in sizes
    assert "calibration time (estimate)" in sizes

    job = client.submit("embedded", *_plugin_values("qdiffusion", qdiffusion=TINY_CALIBRATION), api_name="/quantize")
    block = _wait_for_progress(job, r"^\d+/79: weights \S+: loss \S+ -> \S+$")
    assert client.predict(api_name="/cancel_quantize").startswith("cancelling")
    _, status, saved, saved_path, skipped = job.result(timeout=240)
    assert re.match(r"^cancelled at \d+/79: .*; nothing was saved$", status), (block, status)
    assert saved is None
    assert saved_path == ""
    assert skipped["data"] in ([], [["", ""]])
    assert not list((outputs / "quantized").glob("*.safetensors*"))
    assert client.predict(api_name="/cancel_quantize") == "no quantize run of yours is running"

    # the next request works, and its file generates in the Generate tab's saved-file box
    nearest = {**TINY_CALIBRATION, "method": "nearest"}
    _, status, _, saved_path, _ = client.predict(
        "embedded", *_plugin_values("qdiffusion", qdiffusion=nearest), api_name="/quantize"
    )
    assert status.startswith("done: qdiffusion:")
    assert saved_path.endswith("embedded-qdiffusion-W4A8.safetensors")
    gallery, _, status, stats, _ = client.predict(
        *_generation_values("qdiffusion", qdiffusion_file=saved_path), api_name="/generate"
    )
    assert len(gallery) == 2
    assert stats["method"] == "qdiffusion W4A8"
