"""The command line as a user runs it: exit codes, one-line errors, and a real generation."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch

from quant.pngmeta import read_parameters

ROOT = Path(__file__).resolve().parent.parent
# Calibration runs many small tensor operations. With one intra-op thread they skip the
# thread synchronisation that slows them down many times on a CPU shared with other work.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY_CALIBRATION = [
    "--bits",
    "W4A8",
    "--calibration-prompts",
    "1",
    "--sampling-steps",
    "2",
    "--calibration-steps",
    "1",
    "--weight-iterations",
    "1",
    "--activation-iterations",
    "1",
]


def _launch(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )


def _generate(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return _launch("generate", "--prompt", "a red circle on a blue background", *args, cwd=cwd, env=env)


def _error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--plugin", "nope"], "error: unknown plugin 'nope'; available: full, gguf, qdiffusion"),
        (["--width", "30"], "error: width must be a multiple of 8 between 8 and 4096, got 30"),
        (["--model", "no/such/folder"], "error: model folder or file not found: 'no/such/folder'"),
        (["--plugin", "gguf", "--qtype", "Q9_9"], "error: qtype must be one of"),
        (["--plugin", "full", "--qtype", "Q4_0"], "error: --qtype does not apply to plugin 'full'"),
        (["--plugin", "gguf", "--gguf", "missing.gguf"], "error: GGUF file not found: missing.gguf"),
        (["--out", "image.jpg"], "error: --out must name a .png file"),
        (["--plugin", "gguf", "--gguf", "unet.gguf", "--qtype", "Q8_0"], "error: --qtype does not apply with --gguf"),
    ],
)
def test_generate_bad_input(args, message, tmp_path):
    (tmp_path / "unet.gguf").write_bytes(b"GGUF")
    result = _generate(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert _error_line(result).startswith(message)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--plugin", "qdiffusion", "--saved", "unet.gguf"],
            "error: --saved must name a .safetensors file for plugin 'qdiffusion', got 'unet.gguf'",
        ),
        (
            ["--plugin", "qdiffusion", "--saved", "missing.safetensors"],
            "error: saved file not found: missing.safetensors",
        ),
        (
            ["--plugin", "qdiffusion", "--saved", "unet.safetensors", "--bits", "W8A8"],
            "error: --bits does not apply with --saved: the file sets the options it was saved with",
        ),
        (
            ["--saved", "unet.safetensors"],
            "error: --saved needs the plugin that wrote the file (gguf, qdiffusion); plugin 'full' saves no file",
        ),
        (["--plugin", "gguf", "--saved", "unet.gguf", "--gguf", "unet.gguf"], "error: give the saved file once"),
    ],
)
def test_generate_bad_saved_file(args, message, tmp_path, monkeypatch, capsys):
    # These fail before any model loads, so main() runs in this process to spare a start-up each.
    sys.path.insert(0, str(ROOT))
    from launch import main

    (tmp_path / "unet.gguf").write_bytes(b"GGUF")
    (tmp_path / "unet.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--prompt", "a red circle on a blue background", *args]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith(message)


def test_unreadable_gguf(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 7)
    result = _generate(
        "--plugin",
        "gguf",
        "--gguf",
        str(broken),
        "--out",
        str(tmp_path / "a.png"),
    )
    assert result.returncode == 2
    assert _error_line(result) == f"error: {broken}: GGUF version 0 is not supported; expected 2 or 3"


def test_plugins_lists_availability():
    result = _launch("plugins")
    assert result.returncode == 0
    assert "compute dtype:" in result.stdout
    assert "gguf       yes  GGUF: available" in result.stdout


def test_generate_quantize_and_load_gguf(tmp_path):
    out = tmp_path / "q4.png"
    result = _generate(
        "--plugin",
        "gguf",
        "--qtype",
        "Q4_0",
        "--seed",
        "0",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "bits per weight (quantized layers): 4.50" in result.stdout
    parameters = read_parameters(out)
    assert parameters.startswith(
        "a red circle on a blue background\nSteps: 20, Sampler: DPM++ 2M, CFG scale: 4.0, Seed: 0, Size: 32x32"
    )
    assert (
        'Quantization: gguf, Quantization options: {"keep": [], "qtype": "Q4_0", "quantize_io": false, "version": 1}'
        in parameters
    )

    gguf_file = tmp_path / "unet.gguf"
    result = _launch("quantize", "--plugin", "gguf", "--qtype", "Q4_0", "--out", str(gguf_file))
    assert result.returncode == 0, result.stderr
    assert gguf_file.is_file()

    from_file = tmp_path / "from_file.png"
    result = _generate(
        "--plugin",
        "gguf",
        "--gguf",
        str(gguf_file),
        "--out",
        str(from_file),
    )
    assert result.returncode == 0, result.stderr
    assert from_file.read_bytes() != b""
    from PIL import Image

    assert list(Image.open(from_file).getdata()) == list(Image.open(out).getdata())


def test_auth_without_password_rejected():
    result = _launch("--auth", "ada")
    assert result.returncode == 2
    assert _error_line(result) == "error: --auth expects user:password, several separated by commas; got 'ada'"


def test_auth_accepts_several_logins():
    sys.path.insert(0, str(ROOT))
    from launch import parse_auth

    assert parse_auth("ada:lovelace, alan:turing") == [("ada", "lovelace"), ("alan", "turing")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="float16 is usable on a CUDA GPU")
def test_float16_rejected_on_cpu(tmp_path):
    result = _generate(
        "--dtype",
        "float16",
        "--out",
        str(tmp_path / "a.png"),
    )
    assert result.returncode == 2
    assert _error_line(result) == "error: compute dtype 'float16' is not usable on cpu; usable: float32, bfloat16"


def test_quantize_mix_from_model_folder(tmp_path):
    from models.shapes import MODEL_DIR

    gguf_file = tmp_path / "shapes-q4_k_m.gguf"
    result = _launch(
        "quantize", "--plugin", "gguf", "--qtype", "Q4_K_M", "--model", str(MODEL_DIR), "--out", str(gguf_file)
    )
    assert result.returncode == 0, result.stderr
    assert "estimated file: " in result.stdout
    assert f"saved: {gguf_file}" in result.stdout
    reader = gguf.GGUFReader(gguf_file)
    types = {tensor.tensor_type.name for tensor in reader.tensors}
    assert {"Q4_K", "Q6_K", "F32"} <= types

    result = _generate("--plugin", "gguf", "--gguf", str(gguf_file), "--out", str(tmp_path / "a.png"))
    assert result.returncode == 0, result.stderr


def test_quantize_rejects_wrong_suffix(tmp_path):
    result = _launch("quantize", "--plugin", "gguf", "--qtype", "Q4_K", "--out", str(tmp_path / "unet.bin"))
    assert result.returncode == 2
    assert _error_line(result) == f"error: --out must end in .gguf for plugin 'gguf', got '{tmp_path / 'unet.bin'}'"


@pytest.mark.parametrize("argv", [["webui", "--port", "7871", "--listen"], ["--port", "7871", "--listen", "webui"]])
def test_server_options_before_or_after_webui(argv):
    sys.path.insert(0, str(ROOT))
    from launch import build_parser
    from plugins.registry import discover

    args = build_parser(discover()).parse_args(argv)
    assert args.command == "webui"
    assert args.port == 7871
    assert args.listen is True


def _other_model(folder: Path) -> Path:
    """Copy the embedded model with one UNet bias changed: same architecture, different weights."""
    from safetensors.torch import load_file, save_file

    from models.shapes import MODEL_DIR

    shutil.copytree(MODEL_DIR, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["conv_in.bias"] = tensors["conv_in.bias"] + 0.5
    save_file(tensors, weights)
    return folder


def test_qdiffusion_quantize_then_generate(tmp_path):
    saved = tmp_path / "unet.safetensors"
    result = _launch("quantize", "--plugin", "qdiffusion", *TINY_CALIBRATION, "--out", str(saved), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    labels = [line.split(": ")[0] for line in lines[:6]]
    assert labels == [
        "part",
        "full precision",
        "estimated file",
        "calibration samples",
        "calibration memory (estimate)",
        "calibration time (estimate)",
    ]
    assert lines[3] == "calibration samples: 2 UNet inputs: 1 prompt x 2 (unconditional and conditional) x 1 step"
    blocks = [line for line in lines[6:-2] if re.match(r"^\[ *\d+%\] \d+/79: (weights|activations) \S+: loss ", line)]
    assert len(blocks) == 78
    assert blocks[0].startswith("[  1%] 1/79: weights time_embedding.linear_1: loss ")
    assert lines[-2].startswith("qdiffusion: 123 layers quantized at 4.55 bits per weight")
    assert lines[-1] == f"saved: {saved} ({saved.stat().st_size / 1e6:.2f} MB)"

    image = tmp_path / "a.png"
    result = _generate("--plugin", "qdiffusion", "--saved", str(saved), "--out", str(image), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    assert "method: qdiffusion W4A8" in result.stdout
    assert "Quantization: qdiffusion, " in read_parameters(image)

    other = _other_model(tmp_path / "other-model")
    result = _generate(
        "--model", str(other), "--plugin", "qdiffusion", "--saved", str(saved), "--out", str(tmp_path / "b.png")
    )
    assert result.returncode == 2
    line = _error_line(result)
    assert line.startswith(f"error: {saved} was calibrated on another model (embedded): weights: the model's hash is ")
    assert line.endswith("Load it with the model it was calibrated on")


def test_taken_option_flag_gets_plugin_prefix():
    sys.path.insert(0, str(ROOT))
    from dataclasses import dataclass

    from launch import build_parser
    from plugins.base import Plugin, PluginOptions, option
    from plugins.registry import Registry

    @dataclass(frozen=True)
    class SeededOptions(PluginOptions):
        seed: int = option(0, "seed of the plugin's own sampling")
        guidance: float = option(1.0, "guidance of the plugin's own sampling")

    class Seeded(Plugin):
        id, name, description, reference = "seeded", "Seeded", "test plugin", "none"
        parts, families, options_class = ("unet",), ("*",), SeededOptions

        def quantize(self, part, options, progress=None, calibration=None):
            raise NotImplementedError

    registry = Registry()
    registry.register(Seeded(), "test")
    parser = build_parser(registry)
    generate = parser.parse_args(["generate", "--prompt", "p", "--seed", "5", "--seeded-seed", "7"])
    assert generate.seed == 5
    assert generate.option_seed == "7"
    quantize = parser.parse_args(["quantize", "--plugin", "seeded", "--out", "u.safetensors", "--guidance", "2"])
    assert quantize.option_guidance == "2"


def test_command_help_lists_plugin_options():
    sys.path.insert(0, str(ROOT))
    from launch import build_parser
    from plugins.registry import discover

    parser = build_parser(discover())
    for command in ("generate", "quantize"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0
