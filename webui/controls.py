"""Shared controls: plugin pickers with options generated from each plugin's options dataclass."""

import dataclasses
import logging
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from plugins.base import Plugin, field_specs
from plugins.registry import Registry
from quant.runtime import DEFAULT_SCHEDULER, SCHEDULERS

logger = logging.getLogger(__name__)

MODEL_CHOICES = ["embedded"]
ENLARGE_TO = 256  # pixels on the longer side that small images are shown at


def _control(plugin: Plugin, spec: dataclasses.Field):
    """Create the component of one options field: dropdown, checkbox, number or text box."""
    hint = typing.get_type_hints(plugin.options_class)[spec.name]
    label = spec.name.replace("_", " ")
    info = spec.metadata.get("help")
    default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
    if spec.metadata.get("choices"):
        return gr.Dropdown(list(spec.metadata["choices"]), value=default, label=label, info=info)
    if hint is bool:
        return gr.Checkbox(value=default, label=label, info=info)
    if hint in (int, float):
        return gr.Number(
            value=default,
            label=label,
            info=info,
            precision=0 if hint is int else None,
            minimum=spec.metadata.get("minimum"),
            maximum=spec.metadata.get("maximum"),
        )
    if typing.get_origin(hint) is tuple:
        return gr.Textbox(value=", ".join(default), label=label, info=info)
    return gr.Textbox(value=str(default), label=label, info=info)


@dataclass
class PluginPicker:
    """A plugin dropdown and, per plugin, a group with its option controls and, optionally, a saved-file box."""

    dropdown: gr.Dropdown
    groups: dict[str, gr.Group]
    fields: list[tuple[str, str, gr.components.Component]]  # (plugin id, field name, component)
    files: dict[str, gr.Textbox]  # plugin id -> path of a saved artefact to load instead of quantizing

    @property
    def inputs(self) -> list:
        return [self.dropdown, *(component for _, _, component in self.fields), *self.files.values()]

    def values(self, plugin_id: str, option_values: tuple) -> dict:
        """Pick the chosen plugin's option values out of all option components' values."""
        return {name: value for (owner, name, _), value in zip(self.fields, option_values) if owner == plugin_id}

    def file_values(self, option_values: tuple) -> dict[str, str]:
        """Return the saved-file box of every plugin that has one, stripped, by plugin id."""
        return {
            plugin_id: (value or "").strip() for plugin_id, value in zip(self.files, option_values[len(self.fields) :])
        }

    def file(self, plugin_id: str, option_values: tuple) -> str | None:
        """Return the saved file chosen for ``plugin_id``, or None when its box is empty."""
        return self.file_values(option_values).get(plugin_id) or None

    def parse(self, registry: Registry, values: tuple) -> tuple[Plugin, object, str | None]:
        """Turn the values of ``inputs`` into the chosen plugin, its options and its saved file (or None).

        A saved file set for another plugin than the chosen one, or one that does not exist, raises.
        """
        plugin_id, *option_values = values
        option_values = tuple(option_values)
        plugin = registry.get(plugin_id)
        options = plugin.options_class.from_dict(self.values(plugin_id, option_values))
        saved_file = self.file(plugin_id, option_values)
        for other, path in self.file_values(option_values).items():
            if other != plugin_id and path:
                raise ValueError(
                    f"a saved file ({path}) is set for method {other!r}, but the chosen method is {plugin_id!r}; "
                    f"choose {other!r} to use the file, or clear its box"
                )
        if saved_file and not Path(saved_file).is_file():
            raise FileNotFoundError(f"saved file not found: {saved_file}")
        return plugin, options, saved_file

    def wire(self) -> None:
        ids = list(self.groups)
        self.dropdown.change(
            lambda chosen: [gr.update(visible=pid == chosen) for pid in ids],
            inputs=self.dropdown,
            outputs=list(self.groups.values()),
            api_visibility="private",
        )


def plugin_picker(
    registry: Registry, default: str = "gguf", exclude: tuple[str, ...] = (), with_files: bool = True
) -> PluginPicker:
    choices = []
    for plugin in registry.plugins.values():
        if plugin.id in exclude:
            continue
        ok, reason = plugin.available()
        choices.append((plugin.name if ok else f"{plugin.name} (unavailable: {reason})", plugin.id))
    ids = [value for _, value in choices]
    chosen = default if default in ids else ids[0]
    dropdown = gr.Dropdown(choices, value=chosen, label="quantization method")
    groups, fields, files = {}, [], {}
    for plugin_id in ids:
        plugin = registry.plugins[plugin_id]
        with gr.Group(visible=plugin_id == chosen) as group:
            for spec in field_specs(plugin.options_class):
                fields.append((plugin_id, spec.name, _control(plugin, spec)))
            if with_files and plugin.file_suffix:
                files[plugin_id] = gr.Textbox(
                    "",
                    label=f"saved {plugin.file_suffix} file",
                    info=f"path of a {plugin.file_suffix} file that {plugin.name} saved, to load instead of "
                    "quantizing; the file sets the options it was saved with, so the options above are ignored",
                )
        groups[plugin_id] = group
    return PluginPicker(dropdown, groups, fields, files)


@dataclass
class GenerationControls:
    model: gr.Dropdown
    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    seed: gr.Number
    random_seed: gr.Button
    steps: gr.Slider
    guidance: gr.Slider
    width: gr.Number
    height: gr.Number
    batch_size: gr.Slider
    scheduler: gr.Dropdown

    @property
    def inputs(self) -> list:
        return [
            self.model,
            self.prompt,
            self.negative_prompt,
            self.seed,
            self.steps,
            self.guidance,
            self.width,
            self.height,
            self.batch_size,
            self.scheduler,
        ]

    def wire(self) -> None:
        import random

        self.random_seed.click(lambda: random.randrange(2**31), outputs=self.seed, api_visibility="private")


def model_picker() -> gr.Dropdown:
    """Create the model dropdown, which also takes a typed folder, file or hub id."""
    return gr.Dropdown(
        MODEL_CHOICES,
        value="embedded",
        allow_custom_value=True,
        label="model",
        info="the embedded model, a diffusers folder, a .safetensors file or a hub id",
    )


def generation_controls(batch: bool = True) -> GenerationControls:
    model = model_picker()
    prompt = gr.Textbox("a red circle on a blue background", label="prompt", lines=2)
    negative_prompt = gr.Textbox("", label="negative prompt")
    with gr.Row():
        seed = gr.Number(0, label="seed", precision=0, minimum=0)
        random_seed = gr.Button("random seed", scale=0)
    with gr.Row():
        steps = gr.Slider(1, 100, value=20, step=1, label="steps")
        guidance = gr.Slider(0, 20, value=4.0, step=0.5, label="guidance scale")
    with gr.Row():
        width = gr.Number(0, label="width (0: the model's)", precision=0, minimum=0)
        height = gr.Number(0, label="height (0: the model's)", precision=0, minimum=0)
        batch_size = gr.Slider(1, 16, value=1, step=1, label="batch size", visible=batch)
    scheduler = gr.Dropdown([DEFAULT_SCHEDULER, *SCHEDULERS], value=DEFAULT_SCHEDULER, label="scheduler")
    return GenerationControls(
        model, prompt, negative_prompt, seed, random_seed, steps, guidance, width, height, batch_size, scheduler
    )


def request_from_values(values: list, batch_size: int | None = None):
    """Build a GenerationRequest from the values of ``GenerationControls.inputs`` (model first)."""
    from quant.runtime import GenerationRequest

    _model, prompt, negative, seed, steps, guidance, width, height, batch, scheduler = values
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative or "",
        seed=int(seed or 0),
        steps=int(steps),
        guidance=float(guidance),
        width=int(width) or None,
        height=int(height) or None,
        batch_size=batch_size or int(batch),
        scheduler=scheduler,
    )


def parse_values(
    registry: Registry, controls: GenerationControls, picker: PluginPicker, values: tuple, batch_size: int | None = None
):
    """Split a handler's values (``controls.inputs`` then ``picker.inputs``).

    Returns the model, the plugin, its options, the saved file to load (or None) and the request.
    """
    generation_values = list(values[: len(controls.inputs)])
    plugin, options, saved_file = picker.parse(registry, tuple(values[len(controls.inputs) :]))
    request = request_from_values(generation_values, batch_size)
    return generation_values[0], plugin, options, saved_file, request


def user_errors(handler: Callable) -> Callable:
    """Show expected failures to the user as one line (gr.Error) and log unexpected ones with a traceback."""
    import functools
    import inspect

    from quant.formats.gguf import GGUFFileError
    from quant.runtime import ModelLoadError

    expected = (ValueError, KeyError, ModelLoadError, GGUFFileError, FileNotFoundError, RuntimeError)

    def translate(error: Exception) -> gr.Error:
        if isinstance(error, expected):
            logger.warning("request failed: %s", error)
            message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
            return gr.Error(message)
        logger.exception("request failed")
        return gr.Error(f"{type(error).__name__}: {error} (details in the server log)")

    if inspect.isgeneratorfunction(handler):

        @functools.wraps(handler)
        def generator_wrapper(*args, **kwargs):
            try:
                yield from handler(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as error:
                raise translate(error) from None  # the error is logged above; no second traceback

        return generator_wrapper

    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as error:
            raise translate(error) from None

    return wrapper
