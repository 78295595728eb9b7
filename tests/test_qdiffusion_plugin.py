"""The qdiffusion plugin on the embedded model: calibration, the saved file and its checks, quality."""

import copy
import json
import logging

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from plugins import studio
from plugins.qdiffusion import QDiffusionOptions, plugin
from quant.qdiffusion import artefact, int8
from quant.qdiffusion.calibration import calibration_prompts, capture, select_steps
from quant.runtime import GenerationRequest, PipelineCache, generate

TINY = {
    "bits": "W4A8",
    "calibration_prompts": 2,
    "sampling_steps": 4,
    "calibration_steps": 2,
    "grouped_ranges": True,
    "range_groups": 2,
    "weight_iterations": 5,
    "activation_iterations": 5,
}


@pytest.fixture(scope="module")
def cache():
    return PipelineCache()


@pytest.fixture(scope="module")
def calibrated(cache):
    options = QDiffusionOptions.from_dict(TINY)
    loaded, report = studio.prepare(cache, None, plugin, options, dtype=torch.float32)
    return loaded, report, options


@pytest.fixture(scope="module")
def saved(calibrated, tmp_path_factory):
    loaded, report, options = calibrated
    path = tmp_path_factory.mktemp("qdiffusion") / "embedded-W4A8.safetensors"
    plugin.save(loaded.denoiser, report, options, path)
    return path


def _unet_inputs(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=generator),
        "timestep": torch.tensor(999.0),
        "encoder_hidden_states": torch.randn(2, 16, 64, generator=generator),
    }


def test_options_reject_more_steps_than_sampled():
    with pytest.raises(ValueError, match=r"calibration_steps \(8\) must not exceed sampling_steps \(4\)"):
        QDiffusionOptions(sampling_steps=4, calibration_steps=8)


def test_options_reject_more_groups_than_steps():
    with pytest.raises(ValueError, match=r"range_groups \(5\) must not exceed calibration_steps \(4\)"):
        QDiffusionOptions(calibration_steps=4, grouped_ranges=True, range_groups=5)


def test_select_steps_uniform_from_noisiest():
    assert select_steps(20, 5) == [0, 4, 8, 12, 16]
    assert select_steps(20, 1) == [0]
    with pytest.raises(ValueError, match="between 1 and the sampling steps"):
        select_steps(4, 5)


def test_calibration_prompts_apart_from_evaluation():
    from models.shapes import grammar

    evaluation = set(grammar.adherence_prompts())
    pairs = calibration_prompts("shapes", 200)
    assert not evaluation & set(pairs)
    assert all(grammar.parse_caption(prompt) for prompt, _ in pairs)


def test_capture_records_both_guidance_halves(cache):
    loaded = cache.get(None, torch.float32)
    data = capture(loaded.pipeline, calibration_prompts("shapes", 3), steps=6, calibration_steps=3, guidance=4.0)
    # 3 prompts x 2 halves (unconditional, conditional) x 3 kept steps.
    assert len(data) == 18
    assert sorted(set(data.step.tolist())) == [0, 2, 4]
    assert data.timestep[data.step == 0].unique().item() == max(data.timesteps)
    unconditional, conditional = data.encoder_hidden_states[:3], data.encoder_hidden_states[3:6]
    assert torch.equal(unconditional[0], unconditional[1])
    assert not torch.equal(conditional[0], conditional[1])


def test_report_counts_every_layer(calibrated):
    loaded, report, _ = calibrated
    layers = sum(type(m) in (torch.nn.Conv2d, torch.nn.Linear) for m in loaded.pipeline.text_encoder.modules())
    assert layers > 0  # the text encoder stays as it was
    assert report.layers_quantized == 123
    assert report.skipped == []
    assert 4.0 < report.bits_per_weight < 5.0
    assert report.bytes_after < report.bytes_before / 5


def test_save_load_gives_same_output(cache, calibrated, saved):
    loaded, _, _ = calibrated
    base = copy.deepcopy(cache.get(None, torch.float32).denoiser)
    reloaded, report = plugin.load(saved, base)
    inputs = _unet_inputs()
    with torch.no_grad():
        expected = loaded.denoiser(**inputs).sample
        actual = reloaded(**inputs).sample
    assert torch.equal(expected, actual)
    assert report.layers_quantized == 123


def test_saved_file_records_calibration(saved):
    config, tensors = artefact.read(saved)
    assert config["format_version"] == artefact.FORMAT_VERSION
    assert config["options"]["bits"] == "W4A8"
    assert config["scheduler"] == "DPMSolverMultistepScheduler"
    assert len(config["calibrated_timesteps"]) == 2
    assert len(config["group_bounds"]) == 2
    assert config["splits"] == {
        "up_blocks.0.resnets.0.conv_shortcut": 64,
        "up_blocks.0.resnets.1.conv_shortcut": 64,
        "up_blocks.1.resnets.0.conv_shortcut": 64,
        "up_blocks.1.resnets.1.conv_shortcut": 32,
    }
    assert tensors["conv_in.qweight"].dtype == torch.uint8
    assert tensors["conv_in.input_quantizers.0.scales"].shape == (2,)


def test_estimate_equals_saved_tensor_bytes(cache, calibrated, saved):
    _, _, options = calibrated
    _, tensors = artefact.read(saved)
    written = sum(t.numel() * t.element_size() for t in tensors.values())
    assert plugin.estimate_bytes(cache.get(None, torch.float32).denoiser, options) == written


def test_load_names_config_differences(saved):
    config = dict(UNet2DConditionModel.load_config(str(studio_model_folder() / "unet")))
    config["cross_attention_dim"] = 32
    other = UNet2DConditionModel.from_config(config)
    with pytest.raises(artefact.ArtefactMismatch) as error:
        plugin.load(saved, other)
    message = str(error.value)
    assert "was calibrated on another model (embedded)" in message
    assert "config cross_attention_dim: the file has 64, the model has 32" in message
    assert (
        "layer down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k: "
        "the file has shape [32, 64], the model [32, 32]" in message
    )


def test_load_names_weight_difference(cache, saved):
    other = copy.deepcopy(cache.get(None, torch.float32).denoiser)
    with torch.no_grad():
        other.conv_in.weight[0, 0, 0, 0] += 0.5
    with pytest.raises(artefact.ArtefactMismatch, match=r"weights: the model's hash is \w{12}\.\.\., the file"):
        plugin.load(saved, other)


def test_load_rejects_foreign_safetensors(cache, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(artefact.ArtefactMismatch, match="not a Q-Diffusion calibration"):
        plugin.load(path, copy.deepcopy(cache.get(None, torch.float32).denoiser))


def test_load_rejects_newer_format(cache, saved, tmp_path):
    config, tensors = artefact.read(saved)
    config["format_version"] = artefact.FORMAT_VERSION + 1
    path = tmp_path / "newer.safetensors"
    save_file(tensors, str(path), metadata={artefact.METADATA_KEY: json.dumps(config)})
    with pytest.raises(artefact.ArtefactMismatch, match=r"format version 2; this version of the plugin reads up to 1"):
        plugin.load(path, copy.deepcopy(cache.get(None, torch.float32).denoiser))


def test_other_scheduler_uses_nearest_group(calibrated, caplog):
    loaded, _, _ = calibrated
    with caplog.at_level(logging.INFO, logger="plugins.qdiffusion"):
        result = generate(loaded, GenerationRequest("a red circle on a blue background", steps=7, scheduler="Euler"))
    assert len(result.images) == 1
    fallbacks = [r.getMessage() for r in caplog.records if "was not calibrated" in r.getMessage()]
    assert fallbacks
    assert "using the activation ranges of the nearest group" in fallbacks[0]


def studio_model_folder():
    from models.shapes import MODEL_DIR

    return MODEL_DIR


@pytest.mark.skipif(not int8.available()[0], reason=f"oneDNN int8 kernels missing: {int8.available()[1]}")
def test_int8_kernels_close_to_simulated_and_saved(cache, tmp_path):
    settings = {**TINY, "bits": "W8A8", "method": "nearest", "grouped_ranges": False}
    inputs = _unet_inputs(1)
    simulated, _ = studio.prepare(cache, None, plugin, QDiffusionOptions.from_dict(settings), dtype=torch.float32)
    with torch.no_grad():
        expected = simulated.denoiser(**inputs).sample
    options = QDiffusionOptions.from_dict({**settings, "kernels": "int8"})
    loaded, report = studio.prepare(cache, None, plugin, options, dtype=torch.float32)
    with torch.no_grad():
        actual = loaded.denoiser(**inputs).sample
    relative = float((actual - expected).norm() / expected.norm())
    assert relative < 0.05
    assert loaded.denoiser.lowbit_int8.converted

    path = tmp_path / "int8.safetensors"
    plugin.save(loaded.denoiser, report, options, path)
    reloaded, _ = plugin.load(path, copy.deepcopy(cache.get(None, torch.float32).denoiser))
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).sample, actual)


def test_int8_kernels_need_w8a8():
    with pytest.raises(ValueError, match="kernels 'int8' runs W8A8 layers only; got bits 'W4A8'"):
        QDiffusionOptions(bits="W4A8", kernels="int8")


def test_short_calibration_beats_round_to_nearest(cache):
    from models.shapes import grammar

    # Held-out inputs: the UNet calls of 6 evaluation prompts, at 10 of 20 steps.
    loaded = cache.get(None, torch.float32)
    held_out = capture(loaded.pipeline, grammar.adherence_prompts()[:6], steps=20, calibration_steps=10, guidance=4.0)
    rows = torch.arange(len(held_out))
    with torch.no_grad():
        reference = loaded.denoiser(**held_out.unet_inputs(rows, "cpu", torch.float32)).sample

    def output_sqnr(settings: dict) -> float:
        options = QDiffusionOptions.from_dict({**SHORT, **settings})
        quantized, _ = studio.prepare(cache, None, plugin, options, dtype=torch.float32)
        with torch.no_grad():
            output = quantized.denoiser(**held_out.unet_inputs(rows, "cpu", torch.float32)).sample
        return float(10 * torch.log10(reference.pow(2).sum() / (reference - output).pow(2).sum()))

    nearest = output_sqnr({"method": "nearest"})
    reconstructed = output_sqnr({})
    # Measured: 16.07 dB round to nearest, 17.46 dB Q-Diffusion (and 15.29 dB calibrated on one step).
    assert reconstructed > nearest + 0.7


SHORT = {
    "bits": "W4A8",
    "calibration_prompts": 4,
    "sampling_steps": 20,
    "calibration_steps": 5,
    "weight_iterations": 60,
    "activation_iterations": 20,
}
