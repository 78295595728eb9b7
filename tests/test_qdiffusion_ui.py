"""Q-Diffusion through the studio operations that the UI and the command line call.

Calibrations here are tiny (one prompt, one calibration step, one iteration per block), so they
test the plumbing: estimate rows, progress, cancelling, and a saved file that generates exactly
like the model it was saved from. Quality floors belong to the plugin's own tests.
"""

import re
import threading

import numpy as np
import pytest
import torch

import plugins.qdiffusion
from plugins import studio
from plugins.base import CalibrationSource
from plugins.qdiffusion import cost
from quant.qdiffusion import reconstruct
from quant.runtime import GenerationRequest, PipelineCache

RECONSTRUCT = {
    "bits": "W4A8",
    "calibration_prompts": 1,
    "sampling_steps": 2,
    "calibration_steps": 1,
    "weight_iterations": 1,
    "activation_iterations": 1,
}
NEAREST = {"bits": "W4A8", "method": "nearest", "calibration_prompts": 1, "sampling_steps": 2, "calibration_steps": 1}
REQUEST = GenerationRequest(prompt="a red circle on a blue background", seed=3, steps=4)
BLOCK_MESSAGE = re.compile(r"^\d+/\d+: (weights|activations) [\w.]+: loss \S+ -> \S+$")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Calibration runs many small tensor operations. With one intra-op thread they skip the
    # thread synchronisation that slows them down many times on a CPU shared with other work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def plugin(registry):
    return registry.get("qdiffusion")


@pytest.fixture(scope="module")
def cache():
    return PipelineCache()


def _options(plugin, values: dict, **changes):
    return plugin.options_class.from_dict({**values, **changes})


@pytest.fixture(scope="module")
def calibrated(plugin, cache):
    """A calibration through ``studio.prepare``, with its progress messages and the bytes of the data it captured."""
    messages, captured = [], {}
    sample, capture_unit = plugins.qdiffusion.capture, reconstruct.Calibrator.capture

    def recording_sample(*args, **kwargs):
        data = sample(*args, **kwargs)
        captured["UNet inputs"] = data.nbytes()
        return data

    def recording_capture(calibrator, unit_name):
        data = capture_unit(calibrator, unit_name)
        captured[unit_name] = cost._tensor_bytes((data.args, data.kwargs, data.target))
        return data

    options = _options(plugin, RECONSTRUCT)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plugins.qdiffusion, "capture", recording_sample)
        patch.setattr(reconstruct.Calibrator, "capture", recording_capture)
        loaded, report = studio.prepare(
            cache, None, plugin, options, progress=lambda _, message: messages.append(message)
        )
    return loaded, report, options, messages, captured


def test_estimate_adds_calibration_rows(plugin, cache):
    figures = studio.estimate(
        cache, None, plugin, _options(plugin, RECONSTRUCT, calibration_prompts=2, calibration_steps=2)
    )
    assert figures["part"] == "unet of embedded"
    assert figures["calibration samples"] == "8 UNet inputs: 2 prompts x 2 (unconditional and conditional) x 2 steps"
    memory = figures["calibration memory (estimate)"]
    assert re.match(r"^\d+\.\d MB beyond the loaded model: recorded UNet inputs ", memory), memory
    assert "AdaRound variables" in memory
    assert re.match(
        r"^\d+(\.\d)? (s|min|h) from passes timed now on this machine \(sampling ",
        figures["calibration time (estimate)"],
    )


def test_estimate_without_guidance_counts_one_row(plugin, cache):
    figures = studio.estimate(
        cache, None, plugin, _options(plugin, NEAREST, calibration_prompts=3, calibration_guidance=1.0)
    )
    assert figures["calibration samples"] == "3 UNet inputs: 3 prompts x 1 (conditional only) x 1 step"
    assert "AdaRound" not in figures["calibration memory (estimate)"]


def test_estimate_memory_matches_calibration(plugin, cache, calibrated):
    loaded, _, options, _, captured = calibrated
    base = cache.get(None)
    measured = cost.measure(base.denoiser, options, CalibrationSource(base.pipeline, base.family, base.source))
    assert measured.samples == loaded.denoiser.lowbit_qdiffusion["calibration_samples"]
    assert measured.input_bytes == captured.pop("UNet inputs")
    largest = max(captured, key=captured.get)
    assert measured.largest_unit == largest
    assert measured.unit_bytes == captured[largest]


def test_progress_reports_each_block_with_loss(calibrated):
    _, _, _, messages, _ = calibrated
    blocks = [message for message in messages if BLOCK_MESSAGE.match(message)]
    assert blocks[0].startswith("1/79: weights time_embedding.linear_1: loss ")
    assert blocks[-1].startswith("79/79: activations conv_out: loss ")
    assert len(blocks) == 78  # 39 blocks, each in both phases; step 40 initialises the activation ranges


def test_saved_file_generates_same_image(plugin, cache, calibrated, tmp_path):
    loaded, report, options, _, _ = calibrated
    in_memory = studio.run(loaded, report, REQUEST)
    path = plugin.save(loaded.denoiser, report, options, tmp_path / studio.artefact_name(None, plugin, options))
    assert path.name == "embedded-qdiffusion-W4A8.safetensors"

    from_file, file_report = studio.prepare(cache, None, plugin, plugin.default_options(), saved_file=str(path))
    from_disk = studio.run(from_file, file_report, REQUEST)
    assert from_disk.stats()["method"] == "qdiffusion W4A8"
    np.testing.assert_array_equal(np.asarray(from_disk.result.images[0]), np.asarray(in_memory.result.images[0]))


def test_cancel_writes_nothing_and_next_run_works(plugin, cache, tmp_path):
    cancel = threading.Event()
    messages = []

    def progress(_, message):
        messages.append(message)
        if BLOCK_MESSAGE.match(message):
            cancel.set()  # cancel once block reconstruction has begun

    out = tmp_path / "embedded-qdiffusion-W4A8.safetensors"
    options = _options(plugin, RECONSTRUCT, calibration_seed=1)
    with pytest.raises(studio.Cancelled, match=r"^cancelled at 2/79: weights time_embedding.linear_2: loss "):
        studio.quantize_to_file(cache, None, plugin, options, out, studio.cancellable(progress, cancel))
    assert list(tmp_path.iterdir()) == []

    report = studio.quantize_to_file(cache, None, plugin, _options(plugin, NEAREST), out)
    assert report.plugin == "qdiffusion"
    assert list(tmp_path.iterdir()) == [out]
    loaded, _ = studio.prepare(cache, None, plugin, plugin.default_options(), saved_file=str(out))
    assert studio.run(loaded, report, REQUEST).result.images


@pytest.mark.parametrize(
    "name, error, message",
    [
        ("unet.gguf", ValueError, "plugin 'qdiffusion' loads .safetensors files, got '{path}'"),
        ("missing.safetensors", FileNotFoundError, "saved file not found: {path}"),
    ],
)
def test_saved_file_checked_before_loading(plugin, cache, tmp_path, name, error, message):
    path = tmp_path / name
    with pytest.raises(error, match=re.escape(message.format(path=path))):
        studio.prepare(cache, None, plugin, plugin.default_options(), saved_file=str(path))


def test_artefact_names(registry):
    gguf, qdiffusion = registry.get("gguf"), registry.get("qdiffusion")
    assert studio.artefact_name(None, gguf, gguf.options_class(qtype="Q4_K_M")) == "embedded-Q4_K_M.gguf"
    assert studio.artefact_name("models/sd15/", qdiffusion, qdiffusion.options_class(bits="W8A8")) == (
        "sd15-qdiffusion-W8A8.safetensors"
    )
