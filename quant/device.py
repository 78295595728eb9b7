"""Device probe: which device, which dtypes work there, free memory and optional engines.

Plugins query it for what they can run, and the System tab and ``launch.py plugins`` show its results.
"""

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from functools import cache

import psutil
import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Optional engines and the install hint shown when one is missing.
ENGINES = {
    "bitsandbytes": "install it with: pip install bitsandbytes",
    "llama_cpp": "install it with: pip install llama-cpp-python, which compiles llama.cpp in about 5 minutes",
    "nunchaku": (
        "install it from the nunchaku GitHub releases on a CUDA machine; the PyPI package of that name is unrelated"
    ),
}


@dataclass(frozen=True)
class DeviceInfo:
    """Probe results for one device."""

    device: str
    name: str
    dtypes: tuple[str, ...]
    compute_dtype: str
    compute_dtype_reason: str
    total_memory: int
    free_memory: int
    compute_capability: tuple[int, int] | None = None
    cpu_flags: tuple[str, ...] = ()
    engines: dict[str, str] = field(default_factory=dict)


def _cpu_flags() -> tuple[str, ...]:
    """Return the CPU feature flags that matter for bfloat16 matmuls (Linux only)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return tuple(sorted(flags & {"amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2"}))
    except OSError:
        pass
    return ()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def _engine_status(engine: str, device: str) -> str:
    """Return "available" or the reason the engine cannot run here."""
    if importlib.util.find_spec(engine) is None:
        return f"not installed; {ENGINES[engine]}"
    if engine == "nunchaku" and device != "cuda":
        return "needs a CUDA GPU"
    return "available"


def _pick_cpu_compute_dtype(flags: tuple[str, ...]) -> tuple[str, str]:
    override = os.environ.get("LOWBIT_COMPUTE_DTYPE")
    if override:
        return override, "set by LOWBIT_COMPUTE_DTYPE"
    if "amx_bf16" in flags or "avx512_bf16" in flags:
        return "bfloat16", "the CPU has native bfloat16 matmuls (AMX or AVX512-BF16)"
    return "float32", "the CPU has no native bfloat16 matmuls"


@cache
def probe(device: str | None = None) -> DeviceInfo:
    """Probe ``device`` ("cuda", "mps", "cpu"), or the best one present when None."""
    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        elif torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if device not in ("cuda", "mps", "cpu"):
        raise ValueError(f"unknown device {device!r}; expected 'cuda', 'mps' or 'cpu'")
    engines = {engine: _engine_status(engine, device) for engine in ENGINES}

    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "device 'cuda' was requested but PyTorch sees no CUDA GPU; install a CUDA build of torch"
            )
        capability = torch.cuda.get_device_capability()
        free, total = torch.cuda.mem_get_info()
        bf16 = capability >= (8, 0)
        dtypes = ("float32", "float16", "bfloat16") if bf16 else ("float32", "float16")
        compute = os.environ.get("LOWBIT_COMPUTE_DTYPE") or ("bfloat16" if bf16 else "float16")
        reason = "bfloat16 needs compute capability 8.0 or newer" if not bf16 else "the GPU has bfloat16 tensor cores"
        return DeviceInfo(
            "cuda", torch.cuda.get_device_name(), dtypes, compute, reason, total, free, capability, (), engines
        )

    memory = psutil.virtual_memory()
    if device == "mps":
        return DeviceInfo(
            "mps",
            "Apple GPU",
            ("float32", "float16"),
            "float16",
            "MPS has float16 matmuls",
            memory.total,
            memory.available,
            None,
            (),
            engines,
        )

    flags = _cpu_flags()
    compute, reason = _pick_cpu_compute_dtype(flags)
    # No float16 on the CPU: PyTorch's CPU float16 matmuls are emulated and slow.
    return DeviceInfo(
        "cpu",
        _cpu_name(),
        ("float32", "bfloat16"),
        compute,
        reason,
        memory.total,
        memory.available,
        None,
        flags,
        engines,
    )


def resolve_dtype(name: str | None, info: DeviceInfo) -> torch.dtype:
    """Turn a dtype name (or None for the probe's choice) into a torch dtype usable on the device."""
    name = name or info.compute_dtype
    if name not in DTYPES:
        raise ValueError(f"unknown compute dtype {name!r}; expected one of {sorted(DTYPES)}")
    if name not in info.dtypes:
        raise ValueError(f"compute dtype {name!r} is not usable on {info.device}; usable: {', '.join(info.dtypes)}")
    return DTYPES[name]
