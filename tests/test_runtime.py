import json

import pytest
import torch
from PIL import Image

from quant import pngmeta
from quant.runtime import GenerationRequest, ModelLoadError, PipelineCache, load_pipeline, resolve_source


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("width", 30, "width must be a multiple of 8"),
        ("height", 0, "height must be a multiple of 8"),
        ("steps", 0, "steps must be between 1 and 500"),
        ("batch_size", 17, "batch size must be between 1 and 16"),
        ("guidance", -1.0, "guidance must be between 0 and 50"),
        ("seed", -5, "seed must be between"),
        ("scheduler", "Heun", "unknown scheduler 'Heun'"),
    ],
)
def test_request_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        GenerationRequest(prompt="a", **{field: value})


def test_resolve_sources(tmp_path):
    assert resolve_source(None) == ("embedded", "embedded")
    assert resolve_source("embedded") == ("embedded", "embedded")
    assert resolve_source("stabilityai/sdxl-turbo") == ("hub", "stabilityai/sdxl-turbo")
    (tmp_path / "model_index.json").write_text("{}")
    assert resolve_source(str(tmp_path)) == ("folder", str(tmp_path.resolve()))


def test_missing_folder_is_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="model folder or file not found: '.*absent'"):
        resolve_source(str(tmp_path / "absent"))


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline"):
        resolve_source(str(tmp_path))


def test_unsupported_checkpoint_suffix(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="expected a .safetensors file"):
        resolve_source(str(path))


def test_single_file_of_unknown_family(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ModelLoadError, match="is not an SD1.5, SDXL or FLUX checkpoint"):
        load_pipeline(str(path), dtype=torch.float32, device="cpu")


def test_hub_offline_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="not in the local cache"):
        load_pipeline("lowbit-test/not-cached", dtype=torch.float32, device="cpu")


def test_local_folder_loads(embedded, tmp_path):
    embedded.pipeline.save_pretrained(tmp_path / "copy")
    loaded = load_pipeline(str(tmp_path / "copy"), dtype=torch.float32, device="cpu")
    assert loaded.family == "StableDiffusionPipeline"
    assert loaded.denoiser_name == "unet"


def test_cache_replaces_model(embedded, tmp_path):
    embedded.pipeline.save_pretrained(tmp_path / "copy")
    cache = PipelineCache()
    first = cache.get(None, torch.float32)
    assert cache.get("embedded", torch.float32) is first
    second = cache.get(str(tmp_path / "copy"), torch.float32)
    assert second is not first
    assert cache._model is second


def test_png_parameters_round_trip(tmp_path):
    text = pngmeta.parameters_text(
        "a red circle on a blue background",
        "blurry",
        {
            "Steps": 20,
            "Sampler": "DPM++ 2M",
            "Seed": 3,
            "Quantization": "gguf",
            "Quantization options": {"qtype": "Q4_0", "keep": []},
        },
    )
    path = tmp_path / "image.png"
    pngmeta.save_png(Image.new("RGB", (8, 8)), path, text)
    stored = pngmeta.read_parameters(path)
    assert stored == text
    prompt, negative, settings = stored.split("\n")
    assert prompt == "a red circle on a blue background"
    assert negative == "Negative prompt: blurry"
    assert settings.startswith("Steps: 20, Sampler: DPM++ 2M, Seed: 3, Quantization: gguf, Quantization options: ")
    assert json.loads(settings.split("Quantization options: ", 1)[1]) == {"keep": [], "qtype": "Q4_0"}


def test_scheduler_choice_does_not_stick(embedded):
    from quant.runtime import generate

    default = generate(embedded, GenerationRequest(prompt="a red circle on a blue background", steps=4))
    generate(embedded, GenerationRequest(prompt="a red circle on a blue background", steps=4, scheduler="Euler"))
    again = generate(embedded, GenerationRequest(prompt="a red circle on a blue background", steps=4))
    assert type(embedded.pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert list(default.images[0].getdata()) == list(again.images[0].getdata())


def test_generation_reports_measurements(embedded):
    from quant.runtime import generate

    steps = []
    result = generate(
        embedded,
        GenerationRequest(prompt="a red circle on a blue background", steps=5, batch_size=2, seed=7),
        progress=lambda step, total: steps.append((step, total)),
    )
    assert steps == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    assert len(result.images) == 2
    assert result.seeds == [7, 8]
    assert result.peak_memory_bytes > result.weight_bytes > 0
    assert result.seconds_per_step == pytest.approx(result.seconds / 5)


def test_single_file_offline_is_clear(monkeypatch, tmp_path):
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    path = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, path)
    with pytest.raises(ModelLoadError, match="could not load sd15.safetensors as StableDiffusionPipeline"):
        load_pipeline(str(path), dtype=torch.float32, device="cpu")
