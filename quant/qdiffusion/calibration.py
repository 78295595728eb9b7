"""Timestep-aware calibration data: the UNet's inputs recorded along full-precision sampling runs.

Q-Diffusion calibrates on the inputs the UNet sees across the whole denoising trajectory, not on
one step. ``capture`` runs the full-precision pipeline on calibration prompts and records, at every
sampling step, the latent, the timestep and the text conditioning. With classifier-free guidance
the UNet sees the unconditional and the conditional half in one batch, so both are recorded.
``select_steps`` then keeps ``count`` steps chosen uniformly by index, starting at the noisiest
(indices 0, k, 2k, ... with k = steps // count). ``count = 1`` keeps only the noisiest step, the
one-step calibration that Q-Diffusion (Li et al., ICCV 2023) uses as its naive baseline.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from models.shapes import grammar

logger = logging.getLogger(__name__)

# Seeds of the embedded model's calibration prompts start here, far from the evaluation seeds
# (0 to 89, one per scene), so that no calibration image is an evaluation image.
CALIBRATION_SEED_OFFSET = 1_000_000
# Prompts for models other than the embedded one; the evaluation prompts of those models are the user's.
GENERAL_PROMPTS = (
    "a photograph of a red fox sitting in fresh snow, morning light",
    "an oil painting of a harbour with fishing boats at sunset",
    "a close-up portrait of an elderly man with a grey beard, studio lighting",
    "a bowl of ramen with a soft-boiled egg on a wooden table",
    "a futuristic city skyline at night with neon reflections in the rain",
    "a watercolour illustration of a lighthouse on a rocky coast",
    "a golden retriever puppy playing in autumn leaves",
    "an isometric 3d render of a small cosy bedroom",
    "a mountain lake surrounded by pine trees under a clear blue sky",
    "a vintage red car parked on a cobblestone street",
    "a pencil sketch of a cat sleeping on a windowsill",
    "a plate of colourful macarons on a marble counter",
    "an astronaut floating above the earth, detailed spacesuit",
    "a medieval castle on a hill in fog, dramatic clouds",
    "a field of sunflowers at noon, wide angle",
    "a cyberpunk street market with glowing signs",
)


@dataclass
class CalibrationData:
    """UNet inputs recorded along sampling runs, one row per UNet batch element.

    ``sample`` [N, C, H, W], ``timestep`` [N] (float32), ``step`` [N] (int64, the index along the
    trajectory, 0 the noisiest), ``encoder_hidden_states`` [N, tokens, dim], and ``added``: extra
    conditioning tensors of SDXL-style UNets ([N, ...] each). All tensors stay on the CPU.
    """

    sample: torch.Tensor
    timestep: torch.Tensor
    step: torch.Tensor
    encoder_hidden_states: torch.Tensor
    added: dict[str, torch.Tensor]
    timesteps: list[float]  # the sampler's timesteps in sampling order
    scheduler: str
    guidance: float
    prompts: int

    def __len__(self) -> int:
        return self.sample.shape[0]

    def subset(self, rows: torch.Tensor) -> "CalibrationData":
        return CalibrationData(
            self.sample[rows],
            self.timestep[rows],
            self.step[rows],
            self.encoder_hidden_states[rows],
            {name: value[rows] for name, value in self.added.items()},
            self.timesteps,
            self.scheduler,
            self.guidance,
            self.prompts,
        )

    def unet_inputs(self, rows: torch.Tensor, device: str | torch.device, dtype: torch.dtype) -> dict:
        """Keyword arguments of a UNet call on ``rows``."""
        inputs = {
            "sample": self.sample[rows].to(device, dtype),
            "timestep": self.timestep[rows].to(device),
            "encoder_hidden_states": self.encoder_hidden_states[rows].to(device, dtype),
        }
        if self.added:
            inputs["added_cond_kwargs"] = {name: value[rows].to(device, dtype) for name, value in self.added.items()}
        return inputs

    def nbytes(self) -> int:
        tensors = [self.sample, self.timestep, self.step, self.encoder_hidden_states, *self.added.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


def calibration_prompts(family: str, count: int) -> list[tuple[str, int]]:
    """Return ``count`` (prompt, seed) pairs for calibration, kept apart from the evaluation pairs.

    The embedded model's grammar has 90 captions, and the adherence score uses all of them. So its
    calibration pairs take captions in a fixed shuffled order, with seeds from 1,000,000 up.
    """
    if family == "shapes":
        scenes = grammar.all_scenes()
        order = torch.randperm(len(scenes), generator=torch.Generator().manual_seed(CALIBRATION_SEED_OFFSET))
        return [(scenes[int(order[i % len(scenes)])].caption(), CALIBRATION_SEED_OFFSET + i) for i in range(count)]
    return [(GENERAL_PROMPTS[i % len(GENERAL_PROMPTS)], CALIBRATION_SEED_OFFSET + i) for i in range(count)]


def select_steps(steps: int, count: int) -> list[int]:
    """Return ``count`` step indices spread uniformly from the noisiest: 0, k, 2k, ... with k = steps // count."""
    if not 1 <= count <= steps:
        raise ValueError(f"calibration steps must be between 1 and the sampling steps ({steps}), got {count}")
    stride = steps // count
    return [i * stride for i in range(count)]


class _Recorder:
    """Forward pre-hook that copies each UNet call's inputs to the CPU."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, module, args, kwargs):
        sample = kwargs.get("sample", args[0] if args else None)
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        hidden = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        batch = sample.shape[0]
        timestep = torch.as_tensor(timestep, dtype=torch.float32).flatten().cpu()
        added = kwargs.get("added_cond_kwargs") or {}
        self.calls.append(
            {
                "sample": sample.detach().float().cpu(),
                "timestep": timestep.expand(batch).clone() if timestep.numel() == 1 else timestep,
                "encoder_hidden_states": hidden.detach().float().cpu(),
                "added": {name: value.detach().float().cpu() for name, value in added.items()},
            }
        )


@torch.inference_mode()
def capture(
    pipeline: DiffusionPipeline,
    prompts: list[tuple[str, int]],
    steps: int,
    calibration_steps: int,
    guidance: float,
    batch_size: int = 8,
    progress: Callable[[int, int, str], None] | None = None,
) -> CalibrationData:
    """Sample ``prompts`` with the full-precision ``pipeline`` and keep the UNet inputs of the selected steps."""
    keep = set(select_steps(steps, calibration_steps))
    unet = pipeline.unet
    started = time.perf_counter()
    rows: list[dict] = []
    step_of_row: list[int] = []
    timesteps: list[float] = []

    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        recorder = _Recorder()
        handle = unet.register_forward_pre_hook(recorder, with_kwargs=True)
        try:
            pipeline(
                [prompt for prompt, _ in chunk],
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=[torch.Generator(device="cpu").manual_seed(seed) for _, seed in chunk],
                output_type="latent",
            )
        finally:
            handle.remove()
        if len(recorder.calls) != steps:
            raise RuntimeError(f"the pipeline called the UNet {len(recorder.calls)} times for {steps} steps")
        timesteps = [float(call["timestep"][0]) for call in recorder.calls]
        for index, call in enumerate(recorder.calls):
            if index in keep:
                rows.append(call)
                step_of_row += [index] * call["sample"].shape[0]
        if progress is not None:
            done = min(start + batch_size, len(prompts))
            progress(done, len(prompts), f"sampled {done}/{len(prompts)} calibration prompts")

    data = CalibrationData(
        sample=torch.cat([row["sample"] for row in rows]),
        timestep=torch.cat([row["timestep"] for row in rows]),
        step=torch.tensor(step_of_row),
        encoder_hidden_states=torch.cat([row["encoder_hidden_states"] for row in rows]),
        added={name: torch.cat([row["added"][name] for row in rows]) for name in rows[0]["added"]},
        timesteps=timesteps,
        scheduler=type(pipeline.scheduler).__name__,
        guidance=guidance,
        prompts=len(prompts),
    )
    logger.info(
        "calibration data: %d UNet inputs from %d prompts at %d of %d steps (%.1f MB) in %.1f s",
        len(data),
        len(prompts),
        len(keep),
        steps,
        data.nbytes() / 1e6,
        time.perf_counter() - started,
    )
    return data
