"""Operations that the web UI and the command line share: quantize, generate, compare, describe.

Everything here runs without gradio, so the command line and tests call exactly what the UI calls.
"""

import copy
import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from plugins.base import CalibrationSource, Plugin, PluginOptions, QuantizeReport
from plugins.gguf.text_encoders import ARCHITECTURES as _TEXT_ENCODER_ARCHITECTURES
from plugins.registry import Registry
from quant import metrics
from quant.device import probe
from quant.files import release_freed_memory
from quant.formats.gguf import read_file
from quant.runtime import (
    SCHEDULERS,
    GenerationRequest,
    GenerationResult,
    LoadedModel,
    PipelineCache,
    generate,
    with_component,
    with_denoiser,
)

logger = logging.getLogger(__name__)

Progress = Callable[[float, str], None]  # (fraction done, status message)


class Cancelled(Exception):
    """A run stopped at a progress report at the user's request. It saved and cached nothing."""


def cancellable(progress: Progress | None, cancel: threading.Event) -> Progress:
    """Wrap ``progress`` so that the first report after ``cancel`` is set raises ``Cancelled``.

    A plugin reports progress between units of work (a layer, a calibration block), so a run stops
    at the end of the unit it is in, and the exception unwinds before anything is saved.
    """

    def report(fraction: float, message: str) -> None:
        if cancel.is_set():
            raise Cancelled(f"cancelled at {message}")
        if progress is not None:
            progress(fraction, message)

    return report


def method_label(plugin_id: str, options: dict) -> str:
    """Name a method with its type, as in "gguf Q4_K_M" or "qdiffusion W4A8". Full precision is "full"."""
    setting = options.get("qtype") or options.get("bits") or ""
    return f"{plugin_id} {setting}".strip() if plugin_id != "full" else plugin_id


@dataclass
class Run:
    """One finished generation with the method that produced it."""

    request: GenerationRequest
    result: GenerationResult
    report: QuantizeReport
    parameters: str  # the PNG ``parameters`` text

    def stats(self) -> dict[str, str]:
        """Return the figures shown after each run, in display order."""
        result, report = self.result, self.report
        return {
            "method": method_label(report.plugin, report.options),
            "time": f"{result.seconds:.2f} s ({result.seconds_per_step * 1000:.1f} ms per step)",
            result.peak_memory_kind: f"{result.peak_memory_bytes / 2**20:.0f} MiB",
            "weight bytes resident": f"{result.weight_bytes / 1e6:.2f} MB",
            "bits per weight (quantized layers)": f"{report.bits_per_weight:.2f}",
            "layers kept in full precision": str(len(report.skipped)),
        }


def prepare(
    cache: PipelineCache,
    model: str | None,
    plugin: Plugin,
    options: PluginOptions,
    saved_file: str | None = None,
    progress: Progress | None = None,
    dtype: torch.dtype | None = None,
    text_encoder_file: str | None = None,
) -> tuple[LoadedModel, QuantizeReport]:
    """Load ``model`` and apply ``plugin`` to its UNet or transformer, or load the plugin's ``saved_file`` into it.

    ``dtype`` is the compute dtype; None takes the device probe's choice. ``text_encoder_file``
    replaces the text encoder that the file's architecture names (T5 or CLIP) before that.
    """
    if text_encoder_file and plugin.id != "gguf":
        raise ValueError(f"a GGUF text encoder file needs plugin 'gguf', not {plugin.id!r}")
    if saved_file:
        check_saved_file(plugin, Path(saved_file))
    # A broken or foreign GGUF file fails here, before the model is loaded. Its data is only mapped.
    for path in (saved_file, text_encoder_file):
        if path and plugin.file_suffix == ".gguf":
            read_file(Path(path))
    loaded = cache.get(model, dtype)
    _check_applies(plugin, loaded)

    def layer_progress(done: int, total: int, name: str) -> None:
        if progress is not None:
            progress(done / max(total, 1), f"{done}/{total}: {name}")

    def quantize(base: LoadedModel) -> tuple[LoadedModel, QuantizeReport]:
        if text_encoder_file:
            base = load_text_encoder(base, plugin, Path(text_encoder_file))
        denoiser = copy.deepcopy(base.denoiser)
        if saved_file:
            denoiser, report = plugin.load(Path(saved_file), denoiser)
        elif plugin.needs_calibration:
            calibration = CalibrationSource(base.pipeline, base.family, base.source)
            denoiser, report = plugin.quantize(denoiser, options, layer_progress, calibration=calibration)
        else:
            denoiser, report = plugin.quantize(denoiser, options, layer_progress)
        release_freed_memory()
        logger.info("%s", report.summary())
        return with_denoiser(base, denoiser), report

    if plugin.id == "full" and not saved_file:
        _, report = plugin.quantize(loaded.denoiser, options)
        return loaded, report
    if saved_file:
        key = f"{plugin.id}:{_file_key(Path(saved_file))}"
    else:
        key = f"{plugin.id}:{options.to_json()}"
    if text_encoder_file:
        key += f":text encoder {_file_key(Path(text_encoder_file))}"
    return cache.variant(loaded, key, quantize)


def check_saved_file(plugin: Plugin, path: Path) -> None:
    """Raise unless ``path`` is an existing file with the suffix of ``plugin``'s artefacts."""
    if plugin.file_suffix is None:
        raise ValueError(f"plugin {plugin.id!r} saves no file, so it cannot load {str(path)!r}")
    if path.suffix != plugin.file_suffix:
        raise ValueError(
            f"plugin {plugin.id!r} loads {plugin.file_suffix} files, got {str(path)!r}; "
            "pick the plugin that wrote the file"
        )
    if not path.is_file():
        raise FileNotFoundError(f"saved file not found: {path}")


def _check_applies(plugin: Plugin, loaded: LoadedModel) -> None:
    ok, reason = plugin.available()
    if not ok:
        raise RuntimeError(f"plugin {plugin.id!r} is not available on this machine: {reason}")
    if not plugin.applies_to(loaded.family, loaded.denoiser_name):
        raise ValueError(
            f"plugin {plugin.id!r} does not apply to the {loaded.denoiser_name} of a {loaded.family} model"
        )


def _file_key(path: Path) -> str:
    # The modification time is part of the key, so a file rewritten in place is read again.
    return f"{path.resolve()}:{path.stat().st_mtime_ns}"


def load_text_encoder(loaded: LoadedModel, plugin: Plugin, path: Path) -> LoadedModel:
    """Return ``loaded`` with the text encoder that the GGUF file at ``path`` fits replaced by the file's."""
    from quant.formats.gguf import GGUFFileError

    metadata, _ = read_file(path)
    architecture = metadata.get("general.architecture")
    slots = {
        name: component
        for name, component in loaded.pipeline.components.items()
        if isinstance(component, torch.nn.Module) and name.startswith("text_encoder")
    }
    fitting = [
        name
        for name, component in slots.items()
        if architecture in _TEXT_ENCODER_ARCHITECTURES.get(type(component).__name__, ())
    ]
    if not fitting:
        descriptions = []
        for slot, component in slots.items():
            accepted = _TEXT_ENCODER_ARCHITECTURES.get(type(component).__name__, ())
            takes = " or ".join(repr(value) for value in accepted) or "no GGUF file"
            descriptions.append(f"{slot} ({type(component).__name__}, which takes {takes})")
        found = ", ".join(descriptions) or "none"
        raise GGUFFileError(
            f"{path}: general.architecture is {architecture!r}, which fits none of this model's text encoders: {found}"
        )

    name = fitting[0]
    encoder, report = plugin.load(path, copy.deepcopy(getattr(loaded.pipeline, name)))
    logger.info("text encoder %s from %s: %s", name, path, report.summary())
    return with_component(loaded, name, encoder)


def run(
    loaded: LoadedModel, report: QuantizeReport, request: GenerationRequest, progress: Progress | None = None
) -> Run:
    def step_progress(step: int, total: int) -> None:
        if progress is not None:
            progress(step / total, f"step {step}/{total}")

    result = generate(loaded, request, step_progress)
    return Run(request, result, report, parameters(loaded, report, request, result))


def parameters(
    loaded: LoadedModel, report: QuantizeReport, request: GenerationRequest, result: GenerationResult
) -> str:
    from quant.pngmeta import parameters_text

    width, height = result.images[0].size
    settings = {
        "Steps": request.steps,
        "Sampler": _scheduler_name(loaded),
        "CFG scale": request.guidance,
        "Seed": request.seed,
        "Size": f"{width}x{height}",
        "Model": loaded.source if loaded.is_embedded else Path(loaded.source).name,
        "Compute dtype": str(loaded.dtype).removeprefix("torch."),
        "Quantization": report.plugin,
        "Quantization options": report.options,
    }
    return parameters_text(request.prompt, request.negative_prompt, settings)


def _scheduler_name(loaded: LoadedModel) -> str:
    """Name the scheduler that ran, as the Sampler field of A1111's parameters does."""
    names = {scheduler_class: name for name, scheduler_class in SCHEDULERS.items()}
    scheduler_class = type(loaded.pipeline.scheduler)
    return names.get(scheduler_class, scheduler_class.__name__)


def compare(baseline: Run, quantized: Run) -> list[dict[str, str]]:
    """Rows of the comparison table: both runs' figures and the quality of the quantized image."""
    rows = []
    for label, run_ in (("full precision", baseline), ("quantized", quantized)):
        row = {"run": label, **run_.stats()}
        if run_ is quantized:
            reference, image = baseline.result.images[0], quantized.result.images[0]
            row["PSNR (dB)"] = f"{metrics.psnr(reference, image):.2f}"
            row["SSIM"] = f"{metrics.ssim(reference, image):.4f}"
        else:
            row["PSNR (dB)"], row["SSIM"] = "reference", "reference"
        if metrics.is_adherence_prompt(run_.request.prompt):
            images = run_.result.images
            row["adherence"] = f"{metrics.adherence(images, [run_.request.prompt] * len(images)):.2f}"
        rows.append(row)
    return rows


def system_rows(registry: Registry) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Return the device probe's results and every plugin with its availability, for the System tab and CLI."""
    info = probe()
    device = {
        "device": f"{info.device} ({info.name})",
        "usable dtypes": ", ".join(info.dtypes),
        "compute dtype": f"{info.compute_dtype}: {info.compute_dtype_reason}",
        "memory": f"{info.free_memory / 2**30:.1f} GiB free of {info.total_memory / 2**30:.1f} GiB",
        "CPU flags": ", ".join(info.cpu_flags) or "none",
        **{f"engine {name}": status for name, status in info.engines.items()},
    }
    rows = []
    for plugin in registry.plugins.values():
        ok, reason = plugin.available()
        rows.append(
            {
                "plugin": plugin.id,
                "name": plugin.name,
                "available": "yes" if ok else "no",
                "reason": reason,
                "parts": ", ".join(plugin.parts),
                "follows": plugin.reference,
            }
        )
    for source, error in registry.errors.items():
        rows.append(
            {"plugin": source, "name": "failed to load", "available": "no", "reason": error, "parts": "", "follows": ""}
        )
    return device, rows


def options_from_values(plugin: Plugin, values: dict) -> PluginOptions:
    """Build a plugin's options from UI or command-line values, ignoring unset ones."""
    names = {spec.name for spec in dataclasses.fields(plugin.options_class)}
    return plugin.options_class.from_dict({k: v for k, v in values.items() if k in names and v is not None})


def enlarge(image: Image.Image, factor: int) -> Image.Image:
    """Scale an image up by an integer factor with nearest-neighbour sampling, so pixels stay sharp."""
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def save_images(finished: Run, folder: Path, enlarge_to: int = 0) -> list[tuple[Path, Path]]:
    """Save a run's images as PNGs with their ``parameters`` chunk; returns (original, display) paths.

    When ``enlarge_to`` is larger than an image, a copy enlarged by an integer factor with
    nearest-neighbour sampling is saved beside it for display.
    """
    from quant.pngmeta import save_png

    folder.mkdir(parents=True, exist_ok=True)
    existing = len(list(folder.glob("*.png")))
    saved = []
    for index, (image, seed) in enumerate(zip(finished.result.images, finished.result.seeds)):
        stem = f"{existing + index:05d}-{finished.report.plugin}-{seed}"
        original = folder / f"{stem}.png"
        save_png(image, original, finished.parameters)
        factor = enlarge_to // max(image.size)
        display = original
        if factor > 1:
            display = folder / "display" / f"{stem}-x{factor}.png"
            save_png(enlarge(image, factor), display, finished.parameters)
        saved.append((original, display))
    return saved


def estimate(
    cache: PipelineCache, model: str | None, plugin: Plugin, options: PluginOptions, dtype: torch.dtype | None = None
) -> dict[str, str]:
    """Return the sizes a quantize run would give, computed from the model's shapes without quantizing.

    For a plugin that calibrates, the rows also list what calibrating will take (samples, memory and
    time), which the plugin measures on the loaded model.
    """
    from quant.layers import weight_bytes

    loaded = cache.get(model, dtype)
    _check_applies(plugin, loaded)
    full = weight_bytes(loaded.denoiser)
    estimated = plugin.estimate_bytes(loaded.denoiser, options)
    figures = {
        "part": f"{loaded.denoiser_name} of {loaded.source if loaded.is_embedded else Path(loaded.source).name}",
        "full precision": f"{full / 1e6:.2f} MB ({str(loaded.dtype).removeprefix('torch.')})",
    }
    if estimated is None:
        figures["estimated file"] = f"plugin {plugin.id!r} gives no estimate"
    else:
        figures["estimated file"] = f"{estimated / 1e6:.2f} MB ({estimated / full:.1%} of full precision)"
    if plugin.needs_calibration:
        calibration = CalibrationSource(loaded.pipeline, loaded.family, loaded.source)
        figures.update(plugin.calibration_cost(loaded.denoiser, options, calibration))
    return figures


def artefact_name(model: str | None, plugin: Plugin, options: PluginOptions) -> str:
    """Name the file a quantize run saves: model, type and suffix, as in embedded-Q4_K_M.gguf.

    A GGUF file is named by its qtype alone, as GGUF files usually are. Other plugins' files also
    name the plugin, as in embedded-qdiffusion-W4A8.safetensors.
    """
    stem = "embedded" if model in (None, "", "embedded") else Path(model.rstrip("/")).stem.replace("/", "-")
    values = options.to_dict()
    label = values["qtype"] if "qtype" in values else method_label(plugin.id, values).replace(" ", "-")
    return f"{stem}-{label}{plugin.file_suffix}"


def quantize_to_file(
    cache: PipelineCache,
    model: str | None,
    plugin: Plugin,
    options: PluginOptions,
    out: Path,
    progress: Progress | None = None,
    dtype: torch.dtype | None = None,
) -> QuantizeReport:
    """Quantize a model's UNet or transformer with ``plugin`` and save the artefact to ``out`` atomically."""
    if plugin.file_suffix is None:
        raise ValueError(f"plugin {plugin.id!r} saves no file")
    out = Path(out)
    if out.suffix != plugin.file_suffix:
        raise ValueError(f"the output file must end in {plugin.file_suffix} for plugin {plugin.id!r}, got {out.name!r}")
    loaded, report = prepare(cache, model, plugin, options, None, progress, dtype)
    plugin.save(loaded.denoiser, report, options, out)
    return report
