"""LowBit Studio entry point: the web UI (default) and headless sub-commands.

python launch.py                      # web UI on http://127.0.0.1:7860
python launch.py --listen --port 7861 --auth user:pass
python launch.py generate --prompt "a red circle on a blue background" --plugin gguf --qtype Q4_0 --out a.png
python launch.py quantize --plugin gguf --qtype Q4_0 --out unet.gguf
python launch.py quantize --plugin qdiffusion --bits W4A8 --out unet.safetensors
python launch.py generate --prompt "a red circle on a blue background" --plugin qdiffusion --saved unet.safetensors
python launch.py plugins
"""

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# transformers warns at import that torchvision is absent, which the studio never needs.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

logger = logging.getLogger("lowbit")


class UsageError(Exception):
    """Bad input from the command line; the message names the problem."""


def _add_plugin_options(parser: argparse.ArgumentParser, registry, command_flags: set[str]) -> None:
    """Add one flag per plugin option field (``--qtype``, ``--keep``), shared by all plugins.

    A field whose flag a command uses for itself (``--seed`` and ``--guidance`` of generate) is
    named after its plugin in every command (``--qdiffusion-seed``), and keeps its short name too
    where the command leaves it free. ``command_flags`` contains the flags that any command uses for itself.
    """
    from plugins.base import field_specs

    flags_by_option = {}
    for plugin in registry.plugins.values():
        for spec in field_specs(plugin.options_class):
            if spec.name in flags_by_option:
                continue
            flag = f"--{spec.name.replace('_', '-')}"
            flags = [flag]
            if flag in command_flags:
                flags = [f"--{plugin.id}-{spec.name.replace('_', '-')}"]
                if flag not in parser._option_string_actions:
                    flags.append(flag)
            flags_by_option[spec.name] = flags[0]
            choices = spec.metadata.get("choices")
            hint = (
                f" (plugin {plugin.id}; one of {', '.join(map(str, choices))})" if choices else f" (plugin {plugin.id})"
            )
            parser.add_argument(
                *flags,
                dest=f"option_{spec.name}",
                default=None,
                help=spec.metadata.get("help", "") + hint,
            )
    parser.set_defaults(option_flags=flags_by_option)


def _plugin_and_options(args, registry):
    from plugins.studio import options_from_values

    try:
        plugin = registry.get(args.plugin)
    except KeyError as error:
        raise UsageError(error.args[0]) from None
    values = _option_values(args)
    names = {spec.name for spec in dataclasses.fields(plugin.options_class)}
    foreign = sorted(set(values) - names)
    if foreign:
        raise UsageError(f"{_flags(args, foreign)} does not apply to plugin {plugin.id!r}")
    return plugin, options_from_values(plugin, values)


def _option_values(args) -> dict:
    """Return the plugin options given on the command line, by field name."""
    return {
        key.removeprefix("option_"): value
        for key, value in vars(args).items()
        if key.startswith("option_") and key != "option_flags" and value is not None
    }


def _flags(args, names: list[str]) -> str:
    return ", ".join(args.option_flags[name] for name in names)


def _dtype(name: str | None):
    """Resolve --dtype against what the device supports; None keeps the device probe's choice."""
    from quant.device import probe, resolve_dtype

    return resolve_dtype(name, probe()) if name else None


@contextlib.contextmanager
def _progress_bar(description: str):
    """Yield a ``(fraction, message)`` callback that drives a terminal progress bar, closed on exit."""
    from tqdm import tqdm

    bar = tqdm(total=100, desc=description, unit="%", bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def update(fraction: float, message: str) -> None:
        bar.n = round(100 * fraction)
        bar.set_postfix_str(message, refresh=False)
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


def command_generate(args, registry) -> int:
    from plugins.studio import prepare, run
    from quant.pngmeta import save_png
    from quant.runtime import GenerationRequest, PipelineCache, resolve_source

    plugin, options = _plugin_and_options(args, registry)
    saved_file = _saved_file(args, plugin, registry)
    if args.gguf_text_encoder and not Path(args.gguf_text_encoder).is_file():
        raise UsageError(f"GGUF text encoder file not found: {args.gguf_text_encoder}")
    request = GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        width=args.width,
        height=args.height,
        batch_size=args.batch_size,
        scheduler=args.scheduler,
    )
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {args.out!r}")

    resolve_source(args.model)  # a missing model folder fails here, before any progress bar
    dtype = _dtype(args.dtype)

    cache = PipelineCache()
    with _progress_bar("load and quantize") as update:
        loaded, report = prepare(cache, args.model, plugin, options, saved_file, update, dtype, args.gguf_text_encoder)
    with _progress_bar("generate") as update:
        finished = run(loaded, report, request, update)

    paths = (
        [out]
        if len(finished.result.images) == 1
        else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(finished.result.images))]
    )
    for image, path in zip(finished.result.images, paths):
        save_png(image, path, finished.parameters)
    for label, value in finished.stats().items():
        print(f"{label}: {value}")
    print("saved: " + ", ".join(str(p) for p in paths))
    return 0


def _saved_file(args, plugin, registry) -> str | None:
    """Check --saved (or --gguf, its older name for GGUF files) against the plugin and return the path, or None."""
    if args.saved and args.gguf:
        raise UsageError("give the saved file once: --saved or --gguf, not both")
    path, flag = (args.gguf, "--gguf") if args.gguf else (args.saved, "--saved")
    if not path:
        return None
    if flag == "--gguf" and plugin.id != "gguf":
        raise UsageError("--gguf needs --plugin gguf")
    if plugin.file_suffix is None:
        savers = ", ".join(p.id for p in registry.plugins.values() if p.file_suffix)
        raise UsageError(f"{flag} needs the plugin that wrote the file ({savers}); plugin {plugin.id!r} saves no file")
    if Path(path).suffix != plugin.file_suffix:
        raise UsageError(f"{flag} must name a {plugin.file_suffix} file for plugin {plugin.id!r}, got {path!r}")
    if not Path(path).is_file():
        kind = "GGUF file" if flag == "--gguf" else "saved file"
        raise UsageError(f"{kind} not found: {path}")
    options_given = sorted(_option_values(args))
    if options_given:
        raise UsageError(
            f"{_flags(args, options_given)} does not apply with {flag}: the file sets the options it was saved with"
        )
    return path


def _print_progress(fraction: float, message: str) -> None:
    print(f"[{fraction:4.0%}] {message}", flush=True)


def command_quantize(args, registry) -> int:
    from plugins.studio import estimate, quantize_to_file
    from quant.runtime import PipelineCache, resolve_source

    plugin, options = _plugin_and_options(args, registry)
    if plugin.file_suffix is None:
        raise UsageError(
            f"plugin {plugin.id!r} saves no file; pick one of: "
            + ", ".join(p.id for p in registry.plugins.values() if p.file_suffix)
        )
    out = Path(args.out)
    if out.suffix != plugin.file_suffix:
        raise UsageError(f"--out must end in {plugin.file_suffix} for plugin {plugin.id!r}, got {args.out!r}")
    resolve_source(args.model)
    dtype = _dtype(args.dtype)
    cache = PipelineCache()
    for label, value in estimate(cache, args.model, plugin, options, dtype).items():
        print(f"{label}: {value}", flush=True)
    if plugin.needs_calibration:
        # Calibration steps are few and slow, so one printed line each keeps their losses readable.
        report = quantize_to_file(cache, args.model, plugin, options, out, _print_progress, dtype)
    else:
        with _progress_bar("load and quantize") as update:
            report = quantize_to_file(cache, args.model, plugin, options, out, update, dtype)
    print(report.summary())
    print(f"saved: {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


def command_plugins(args, registry) -> int:
    from plugins.studio import system_rows

    device, rows = system_rows(registry)
    for key, value in device.items():
        print(f"{key}: {value}")
    print()
    for row in rows:
        print(f"{row['plugin']:<10} {row['available']:<4} {row['name']}: {row['reason']}")
    return 0


def parse_auth(text: str) -> list[tuple[str, str]]:
    """Parse A1111-style credentials: ``user:password``, several separated by commas."""
    credentials = []
    for pair in text.split(","):
        user, separator, password = pair.strip().partition(":")
        if not separator or not user or not password:
            raise UsageError(f"--auth expects user:password, several separated by commas; got {pair.strip()!r}")
        credentials.append((user, password))
    return credentials


def command_webui(args, registry) -> int:
    from webui.app import CSS, build_app

    auth = parse_auth(args.auth) if args.auth else None
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    app = build_app(registry)
    app.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=args.port, auth=auth, inbrowser=False, css=CSS
    )
    return 0


def build_parser(registry) -> argparse.ArgumentParser:
    from quant.runtime import DEFAULT_SCHEDULER, SCHEDULERS

    parser = argparse.ArgumentParser(prog="launch.py", description="LowBit Studio: quantized image generation.")
    parser.add_argument("--listen", action="store_true", help="serve on all interfaces (0.0.0.0) instead of 127.0.0.1")
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
        help="port of the web UI (default 7860)",
    )
    parser.add_argument("--auth", default=None, help="require a login: user:password, several separated by commas")
    parser.add_argument("--verbose", action="store_true", help="log debug messages and full tracebacks")
    commands = parser.add_subparsers(dest="command")

    generate = commands.add_parser("generate", help="generate images headless")
    generate.add_argument("--prompt", required=True, help="text prompt")
    generate.add_argument("--negative-prompt", default="", help="negative prompt")
    generate.add_argument(
        "--model", default=None, help="diffusers folder, .safetensors file or hub id (default: the embedded model)"
    )
    generate.add_argument("--plugin", default="full", help="quantization plugin id (see `launch.py plugins`)")
    generate.add_argument(
        "--saved",
        default=None,
        help="load the UNet or transformer from a file that `launch.py quantize` saved, instead of quantizing: "
        "a .gguf file with --plugin gguf, a .safetensors file with --plugin qdiffusion",
    )
    generate.add_argument("--gguf", default=None, help="the same as --saved, for .gguf files (with --plugin gguf)")
    generate.add_argument(
        "--gguf-text-encoder",
        default=None,
        help="load a T5 or CLIP text encoder from this .gguf file into the model's matching text encoder "
        "(with --plugin gguf)",
    )
    generate.add_argument("--seed", type=int, default=0, help="random seed; a batch uses seed, seed+1, ...")
    generate.add_argument("--steps", type=int, default=20, help="denoising steps")
    generate.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    generate.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    generate.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    generate.add_argument("--batch-size", type=int, default=1, help="images per run")
    generate.add_argument("--scheduler", default=DEFAULT_SCHEDULER, choices=[DEFAULT_SCHEDULER, *SCHEDULERS])
    generate.add_argument("--out", default="image.png", help="output PNG path; a batch adds -0, -1, ...")
    generate.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="compute dtype (default: the device probe's choice, shown by `launch.py plugins`)",
    )

    quantize = commands.add_parser("quantize", help="quantize a model's UNet or transformer and save the artefact")
    quantize.add_argument(
        "--model", default=None, help="diffusers folder, .safetensors file or hub id (default: the embedded model)"
    )
    quantize.add_argument("--plugin", required=True, help="quantization plugin id")
    quantize.add_argument("--out", required=True, help="output file")
    quantize.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="compute dtype (default: the device probe's choice, shown by `launch.py plugins`)",
    )
    command_flags = {*generate._option_string_actions, *quantize._option_string_actions}
    for command in (generate, quantize):
        _add_plugin_options(command, registry, command_flags)

    commands.add_parser("plugins", help="list plugins and whether they can run here")
    webui = commands.add_parser("webui", help="start the web UI (the default)")
    # The server options also work after "webui"; SUPPRESS keeps the values given before it.
    webui.add_argument("--listen", action="store_true", default=argparse.SUPPRESS, help="as above")
    webui.add_argument("--port", type=int, default=argparse.SUPPRESS, help="as above")
    webui.add_argument("--auth", default=argparse.SUPPRESS, help="as above")
    return parser


def main(argv: list[str] | None = None) -> int:
    from plugins.registry import discover

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = discover()
    args = build_parser(registry).parse_args(argv)
    logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.INFO)
    for noisy in ("httpx", "httpcore", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    handlers = {"generate": command_generate, "quantize": command_quantize, "plugins": command_plugins}

    from quant.formats.gguf import GGUFFileError
    from quant.runtime import ModelLoadError

    try:
        return handlers.get(args.command, command_webui)(args, registry)
    except (UsageError, ValueError, ModelLoadError, GGUFFileError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        if args.verbose:
            logger.exception("details")
        return 2
    except Exception as error:  # the entry point turns any failure into one line, traceback with --verbose
        print(f"error: {type(error).__name__}: {error} (rerun with --verbose for the traceback)", file=sys.stderr)
        if args.verbose:
            logger.exception("details")
        return 1


if __name__ == "__main__":
    sys.exit(main())
