"""The plugin contract: identity, availability, options, and the quantize / save / load hooks.

A plugin is one object. Its options are a frozen dataclass (subclass of ``PluginOptions``) whose
fields carry UI metadata (``help``, ``choices``). The web UI controls, the command-line flags and the
PNG metadata are all generated from it. Hooks, in the order they run:

- ``available()``: can it run on this machine, and if not, why;
- ``quantize(part, options, progress, calibration)``: quantize a model part (UNet, transformer, ...)
  and report; methods that calibrate sample from ``calibration``;
- ``save(part, report, options, path)`` / ``load(path, base_part)``: the artefact on disk.
"""

import dataclasses
import json
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from quant.layers import SwapReport

PARTS = ("unet", "transformer", "text_encoder", "vae", "llm")
Progress = Callable[[int, int, str], None]  # (done, total, what)


def option(default, help: str, choices: tuple | None = None, **bounds):
    """Declare an options field with its help text, allowed choices and numeric bounds (minimum, maximum)."""
    metadata = {"help": help, "choices": choices, **bounds}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class PluginOptions:
    """Base of every plugin's options: versioned, validated in ``__post_init__``, JSON round trip."""

    VERSION: typing.ClassVar[int] = 1
    version: int = option(1, "version of these options; older saved artefacts keep loading")

    def __post_init__(self):
        if self.version > self.VERSION:
            raise ValueError(f"options version {self.version} is newer than this plugin supports ({self.VERSION})")
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            choices = spec.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ValueError(f"{spec.name} must be one of {list(choices)}, got {value!r}")
            minimum, maximum = spec.metadata.get("minimum"), spec.metadata.get("maximum")
            if minimum is not None and value < minimum or maximum is not None and value > maximum:
                raise ValueError(f"{spec.name} must be between {minimum} and {maximum}, got {value!r}")

    def to_dict(self) -> dict:
        return {
            name: list(value) if isinstance(value, tuple) else value for name, value in dataclasses.asdict(self).items()
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> "PluginOptions":
        """Build options from loose values (JSON, command line, UI), converting and checking each field."""
        known = {spec.name: spec for spec in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for {cls.__name__}; known: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        converted = {name: _convert(name, value, hints[name]) for name, value in values.items()}
        return cls(**converted)

    @classmethod
    def from_json(cls, text: str) -> "PluginOptions":
        return cls.from_dict(json.loads(text))


def _convert(name: str, value, hint):
    """Convert a loose value to the field's type; strings split on commas for tuple fields."""
    origin = typing.get_origin(hint)
    try:
        if origin is tuple:
            if isinstance(value, str):
                value = [item.strip() for item in value.split(",") if item.strip()]
            return tuple(value)
        if hint is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if hint in (int, float, str):
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return hint(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {name} expects {getattr(hint, '__name__', hint)}, got {value!r}") from None
    return value


@dataclass
class CalibrationSource:
    """The source a calibrating method samples from: the full-precision pipeline, its family and its source."""

    pipeline: object  # a diffusers pipeline whose denoiser is still in full precision
    family: str
    source: str


@dataclass
class QuantizeReport:
    """Result of a plugin's quantize: layers, bits per weight, skipped layers with reasons, time."""

    plugin: str
    options: dict
    layers_quantized: int
    skipped: list[tuple[str, str]]
    bits_per_weight: float
    bytes_before: int
    bytes_after: int
    seconds: float

    @classmethod
    def from_swap(
        cls, plugin: str, options: "PluginOptions | dict", swap: SwapReport, seconds: float
    ) -> "QuantizeReport":
        """Build a report; ``options`` may be a plain dict when a loaded file names a type no option allows."""
        return cls(
            plugin,
            options.to_dict() if isinstance(options, PluginOptions) else dict(options),
            len(swap.quantized),
            swap.skipped,
            swap.bits_per_weight,
            swap.bytes_before,
            swap.bytes_after,
            seconds,
        )

    def summary(self) -> str:
        if self.plugin == "full":
            return f"full precision: {self.bytes_before / 1e6:.2f} MB of weights, nothing quantized"
        return (
            f"{self.plugin}: {self.layers_quantized} layers quantized at {self.bits_per_weight:.2f} bits per weight "
            f"({self.bytes_before / 1e6:.2f} MB -> {self.bytes_after / 1e6:.2f} MB), "
            f"{len(self.skipped)} kept in full precision, {self.seconds:.1f} s"
        )


class Plugin(ABC):
    """One quantization method. Subclasses set the identity attributes and implement the hooks."""

    id: str
    name: str
    description: str
    reference: str  # the paper or format the method follows
    parts: tuple[str, ...]
    families: tuple[str, ...]  # model families it applies to; "*" for all
    options_class: type[PluginOptions]
    file_suffix: str | None = None  # the artefact's file suffix, None when it saves nothing
    needs_calibration = False  # True: quantize() samples from ``calibration``, which must be given

    def available(self) -> tuple[bool, str]:
        """Return whether the plugin can run on this machine, and the reason when it cannot."""
        return True, "available"

    def applies_to(self, family: str, part: str) -> bool:
        return part in self.parts and ("*" in self.families or family in self.families)

    def default_options(self) -> PluginOptions:
        return self.options_class()

    @abstractmethod
    def quantize(
        self,
        part: nn.Module,
        options: PluginOptions,
        progress: Progress | None = None,
        calibration: CalibrationSource | None = None,
    ) -> tuple[nn.Module, QuantizeReport]:
        """Quantize a model part and return it (it may be the same object, changed in place) with a report.

        ``calibration`` is given to plugins whose ``needs_calibration`` is True.
        """

    def estimate_bytes(self, part: nn.Module, options: PluginOptions) -> int | None:
        """Return the estimated size in bytes of the artefact ``save`` writes, or None when unknown."""
        return None

    def calibration_cost(
        self, part: nn.Module, options: PluginOptions, calibration: CalibrationSource
    ) -> dict[str, str]:
        """Return what calibrating will take (samples, memory, time), for display before a run; {} when nothing."""
        return {}

    def save(self, part: nn.Module, report: QuantizeReport, options: PluginOptions, path: Path) -> Path:
        raise NotImplementedError(f"plugin {self.id!r} has no artefact to save")

    def load(self, path: Path, base_part: nn.Module) -> tuple[nn.Module, QuantizeReport]:
        raise NotImplementedError(f"plugin {self.id!r} has no artefact to load")


def field_specs(options_class: type[PluginOptions]) -> list[dataclasses.Field]:
    """The user-facing fields of an options class (the version field is internal)."""
    return [spec for spec in dataclasses.fields(options_class) if spec.name != "version"]
