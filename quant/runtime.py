"""Runtime: load pipelines, keep one in a cache, run a generation and measure it.

Model sources, in the order they are tried:

- ``None`` or ``"embedded"``: the shapes model shipped in ``models/shapes/weights``;
- a local folder in the diffusers layout (it has a ``model_index.json``);
- a single-file checkpoint (``.safetensors``) of SD1.5, SDXL or FLUX, through diffusers'
  ``from_single_file``;
- a Hugging Face hub id (``owner/name``), through the normal hub cache.
"""

import gc
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import psutil
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image

from models.shapes import MODEL_DIR
from quant.device import probe, resolve_dtype
from quant.layers import weight_bytes

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
SCHEDULERS = {
    "DPM++ 2M": DPMSolverMultistepScheduler,
    "Euler": EulerDiscreteScheduler,
    "Euler a": EulerAncestralDiscreteScheduler,
    "DDIM": DDIMScheduler,
    "UniPC": UniPCMultistepScheduler,
}
DEFAULT_SCHEDULER = "model default"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
MAX_SIDE = 4096
MAX_BATCH = 16
T = TypeVar("T")


class ModelLoadError(RuntimeError):
    """A model source that cannot be loaded. The message names the cause and the next step."""


# ---------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A loaded pipeline and what the rest of the studio needs to know about it."""

    source: str
    pipeline: DiffusionPipeline
    family: str  # "shapes", "sd1", "sdxl", "flux" or the pipeline class name
    denoiser_name: str  # "unet" or "transformer"
    dtype: torch.dtype
    device: str
    default_scheduler: object = None  # the scheduler the model shipped with; generate() may swap in others

    def __post_init__(self):
        if self.default_scheduler is None:
            self.default_scheduler = self.pipeline.scheduler

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def is_embedded(self) -> bool:
        return self.source == EMBEDDED


# UNet widths that tell SD1.x (768-wide text conditioning) and SDXL (2048) apart from other UNets.
SD_UNET_WIDTHS = {(320, 640, 1280, 1280): {768: "sd1"}, (320, 640, 1280): {2048: "sdxl"}}


def _family(pipeline: DiffusionPipeline, source: str) -> str:
    """Name the model family ("shapes", "sd1", "sdxl", "flux"), or the pipeline class for others."""
    if source == EMBEDDED:
        return "shapes"
    if type(pipeline).__name__ == "FluxPipeline":
        return "flux"
    unet = getattr(pipeline, "unet", None)
    if unet is not None:
        widths = SD_UNET_WIDTHS.get(tuple(unet.config.block_out_channels), {})
        family = widths.get(unet.config.cross_attention_dim)
        if family:
            return family
    return type(pipeline).__name__


def _single_file_pipeline(path: Path) -> type[DiffusionPipeline]:
    """Pick the diffusers pipeline class of a single-file checkpoint from its tensor names."""
    from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as checkpoint:
            keys = list(checkpoint.keys())
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise ModelLoadError(f"{path} is not a readable .safetensors checkpoint: {error}") from error
    if any("double_blocks." in key for key in keys):
        return FluxPipeline
    if any(key.startswith("conditioner.embedders.1") for key in keys):
        return StableDiffusionXLPipeline
    if any(key.startswith("model.diffusion_model.input_blocks") for key in keys):
        return StableDiffusionPipeline
    raise ModelLoadError(
        f"{path} is not an SD1.5, SDXL or FLUX checkpoint (no UNet or transformer tensors found); "
        "pass a diffusers folder instead"
    )


def resolve_source(source: str | None) -> tuple[str, str]:
    """Classify a model source as ("embedded" | "folder" | "single_file" | "hub", normalised source)."""
    if source is None or source in ("", EMBEDDED):
        return EMBEDDED, EMBEDDED
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{path} is a folder but not a diffusers pipeline (no model_index.json in it)")
        return "folder", str(path.resolve())
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelLoadError(f"unsupported checkpoint file {path.name!r}; expected a .safetensors file")
        return "single_file", str(path.resolve())
    if HUB_ID.match(source) and not source.startswith("."):
        return "hub", source
    raise ModelLoadError(
        f"model folder or file not found: {source!r}; pass a diffusers folder, a .safetensors file or a hub id"
    )


def load_pipeline(
    source: str | None = None, dtype: torch.dtype | None = None, device: str | None = None
) -> LoadedModel:
    """Load a pipeline from any supported source onto ``device`` in ``dtype``."""
    info = probe(device)
    dtype = dtype or resolve_dtype(None, info)
    kind, source = resolve_source(source)
    started = time.perf_counter()
    if kind == EMBEDDED:
        if not (MODEL_DIR / "model_index.json").is_file():
            raise ModelLoadError(f"the embedded model is missing from {MODEL_DIR}; reinstall or retrain it")
        pipeline = DiffusionPipeline.from_pretrained(MODEL_DIR, dtype=dtype)
    elif kind == "folder":
        pipeline = DiffusionPipeline.from_pretrained(source, dtype=dtype)
    elif kind == "single_file":
        pipeline_class = _single_file_pipeline(Path(source))
        try:
            pipeline = pipeline_class.from_single_file(source, dtype=dtype)
        except OSError as error:
            raise ModelLoadError(
                f"could not load {Path(source).name} as {pipeline_class.__name__}: diffusers needs the pipeline's "
                f"configuration from the Hugging Face hub cache and could not get it ({error.__class__.__name__}). "
                "Pass a diffusers folder instead, or load the checkpoint once where the hub is reachable"
            ) from error
    else:
        try:
            pipeline = DiffusionPipeline.from_pretrained(source, dtype=dtype)
        except OSError as error:
            raise ModelLoadError(
                f"could not load {source!r} from the Hugging Face hub: it is not in the local cache and the hub "
                f"could not be reached ({type(error).__name__}). Download it where the hub is reachable "
                "(`hf download " + source + "`) or pass a local folder"
            ) from error

    pipeline.to(info.device)
    pipeline.set_progress_bar_config(disable=True)
    denoiser_name = "unet" if hasattr(pipeline, "unet") else "transformer"
    loaded = LoadedModel(source, pipeline, _family(pipeline, source), denoiser_name, dtype, info.device)
    logger.info(
        "loaded %s (%s, %s) in %.1f s: %.1f MB of weights",
        source,
        loaded.family,
        str(dtype).removeprefix("torch."),
        time.perf_counter() - started,
        pipeline_weight_bytes(pipeline) / 1e6,
    )
    return loaded


def pipeline_weight_bytes(pipeline: DiffusionPipeline) -> int:
    return sum(weight_bytes(module) for module in pipeline.components.values() if isinstance(module, torch.nn.Module))


def with_denoiser(loaded: LoadedModel, denoiser: torch.nn.Module) -> LoadedModel:
    """Return a model that shares every component of ``loaded`` except the UNet or transformer."""
    return with_component(loaded, loaded.denoiser_name, denoiser)


def with_component(loaded: LoadedModel, name: str, module: torch.nn.Module) -> LoadedModel:
    """Return a model that shares every component of ``loaded`` except the one called ``name``."""
    components = {**loaded.pipeline.components, name: module}
    if "requires_safety_checker" in loaded.pipeline.config:
        components["requires_safety_checker"] = loaded.pipeline.config.requires_safety_checker
    pipeline = type(loaded.pipeline)(**components)
    pipeline.set_progress_bar_config(disable=True)
    return LoadedModel(
        loaded.source,
        pipeline,
        loaded.family,
        loaded.denoiser_name,
        loaded.dtype,
        loaded.device,
        loaded.default_scheduler,
    )


class PipelineCache:
    """Keeps one loaded model, and variants of its denoiser; loading another model frees the old one."""

    def __init__(self):
        self._key: tuple | None = None
        self._model: LoadedModel | None = None
        self._variants: dict[str, object] = {}
        self._lock = threading.Lock()

    def get(self, source: str | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
        key = (resolve_source(source)[1], dtype)
        with self._lock:
            if self._key != key:
                self.clear()
                self._model = load_pipeline(source, dtype)
                self._key = key
            return self._model

    def variant(self, base: LoadedModel, key: str, build: Callable[[LoadedModel], T]) -> T:
        """Return what ``build(base)`` returned for ``key``, building it on first use; one variant is kept."""
        with self._lock:
            if key not in self._variants:
                self._variants.clear()
                self._variants[key] = build(base)
            return self._variants[key]

    def clear(self) -> None:
        self._model, self._key = None, None
        self._variants.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- generation


@dataclass(frozen=True)
class GenerationRequest:
    """Settings of one generation; invalid values raise ValueError naming the field."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 4.0
    width: int | None = None  # None: the model's native size
    height: int | None = None
    batch_size: int = 1
    scheduler: str = DEFAULT_SCHEDULER

    def __post_init__(self):
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be between 0 and 2**63 - 1, got {self.seed}")
        if not 1 <= self.steps <= 500:
            raise ValueError(f"steps must be between 1 and 500, got {self.steps}")
        if not 0 <= self.guidance <= 50:
            raise ValueError(f"guidance must be between 0 and 50, got {self.guidance}")
        for name in ("width", "height"):
            side = getattr(self, name)
            if side is not None and not (8 <= side <= MAX_SIDE and side % 8 == 0):
                raise ValueError(f"{name} must be a multiple of 8 between 8 and {MAX_SIDE}, got {side}")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise ValueError(f"batch size must be between 1 and {MAX_BATCH}, got {self.batch_size}")
        if self.scheduler != DEFAULT_SCHEDULER and self.scheduler not in SCHEDULERS:
            raise ValueError(
                f"unknown scheduler {self.scheduler!r}; expected one of {[DEFAULT_SCHEDULER, *SCHEDULERS]}"
            )


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seconds: float
    seconds_per_step: float
    peak_memory_bytes: int
    peak_memory_kind: str  # what peak_memory_bytes measures
    weight_bytes: int
    seeds: list[int] = field(default_factory=list)


class PeakMemory:
    """Peak memory during a block: CUDA allocator peak on a GPU, sampled process RSS on the CPU."""

    INTERVAL_S = 0.005

    def __init__(self, device: str):
        self.device = device
        self.peak = 0
        self.kind = "peak CUDA memory allocated" if device == "cuda" else "peak process RSS"
        self._stop = threading.Event()

    def _sample(self):
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            self._stop.wait(self.INTERVAL_S)

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = psutil.Process().memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, psutil.Process().memory_info().rss)


def _scheduler(loaded: LoadedModel, name: str):
    if name == DEFAULT_SCHEDULER:
        return loaded.default_scheduler
    config = loaded.default_scheduler.config
    if name == "DDIM" and "clip_sample" not in config:
        # DDIM clips x0 to [-1, 1] by default, which is right for pixels but ruins latents.
        return DDIMScheduler.from_config(config, clip_sample=False)
    return SCHEDULERS[name].from_config(config)


@torch.inference_mode()
def generate(
    loaded: LoadedModel,
    request: GenerationRequest,
    progress: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Run one generation and measure its time, peak memory and resident weight bytes.

    ``progress(step, total)`` is called after every denoising step.
    """
    pipeline = loaded.pipeline
    pipeline.scheduler = _scheduler(loaded, request.scheduler)
    seeds = [request.seed + i for i in range(request.batch_size)]
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]

    def on_step_end(_pipeline, step, _timestep, kwargs):
        if progress is not None:
            progress(step + 1, request.steps)
        return kwargs

    arguments = dict(
        prompt=[request.prompt] * request.batch_size,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance,
        width=request.width,
        height=request.height,
        generator=generators,
        callback_on_step_end=on_step_end,
    )
    if request.negative_prompt:
        arguments["negative_prompt"] = [request.negative_prompt] * request.batch_size
    started = time.perf_counter()
    with PeakMemory(loaded.device) as memory:
        images = pipeline(**arguments).images
    seconds = time.perf_counter() - started
    return GenerationResult(
        images=images,
        seconds=seconds,
        seconds_per_step=seconds / request.steps,
        peak_memory_bytes=memory.peak,
        peak_memory_kind=memory.kind,
        weight_bytes=pipeline_weight_bytes(pipeline),
        seeds=seeds,
    )


@torch.inference_mode()
def generate_many(
    loaded: LoadedModel, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 4.0, chunk: int = 32
) -> list[Image.Image]:
    """Generate one image per (prompt, seed) pair, ``chunk`` pairs per pipeline call.

    Each image starts from the noise of its own seed, as a single ``generate`` call with that seed does.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds; expected one seed per prompt")
    loaded.pipeline.scheduler = loaded.default_scheduler
    images = []
    for start in range(0, len(prompts), chunk):
        batch_prompts = prompts[start : start + chunk]
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds[start : start + chunk]]
        images += loaded.pipeline(
            batch_prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators
        ).images
    return images
