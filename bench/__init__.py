"""Benchmarks: each script writes a results table; ``cpu_name`` labels the machine it ran on."""

import platform


def cpu_name() -> str:
    """Return the CPU's model name from /proc/cpuinfo, or what ``platform`` reports elsewhere."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"
