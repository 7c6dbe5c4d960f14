"""What this host is: CPU, cores, memory, OS, the runtimes of `agent.runtimes` installed here;
and how its devices are named and described."""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
from pathlib import Path

from agent import __version__
from agent.protocol import PROTOCOL_VERSION, Capabilities, Runtime
from agent.runtimes import installed_runtimes
from agent.runtimes.onnxruntime import CPU_PROVIDER, available_providers

#: the runtime's part of a default device name (the runtime's name where it has none here)
_RUNTIME_TAGS: dict[Runtime, str] = {Runtime.onnxruntime: "ort", Runtime.pytorch: "torch", Runtime.openvino: "ov",
                                     Runtime.tensorrt: "trt"}


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def cpu_model() -> str:
    """Best-effort CPU model name: /proc/cpuinfo, then sysctl (macOS), then `platform`."""
    info = _read_text("/proc/cpuinfo")
    if info:
        fields: dict[str, str] = {}
        for line in info.splitlines():
            key, sep, value = line.partition(":")
            if sep and value.strip():
                fields.setdefault(key.strip().lower(), value.strip())
        # x86 "model name"; ARM kernels expose "Hardware", "Model" or only "CPU part".
        for key in ("model name", "hardware", "model", "cpu model", "processor"):
            value = fields.get(key, "")
            if value and not value.isdigit():
                return value
        if "cpu part" in fields:
            return f"{platform.machine()} cpu part {fields['cpu part']}"
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5, check=False
            ).stdout.strip()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cpus() -> list[int]:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        try:
            return sorted(os.sched_getaffinity(0))
        except OSError:
            pass
    return list(range(os.cpu_count() or 1))


def cpu_cores() -> int:
    return max(1, len(usable_cpus()))


def memory_bytes() -> int:
    """Physical memory: MemTotal from /proc/meminfo, else page size x page count, else 0."""
    info = _read_text("/proc/meminfo")
    if info:
        match = re.search(r"^MemTotal:\s+(\d+)\s*kB", info, re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 0


def detect_capabilities() -> Capabilities:
    runtimes = installed_runtimes()
    return Capabilities(
        hostname=socket.gethostname() or "unknown",
        cpu_model=cpu_model(),
        cpu_cores=cpu_cores(),
        memory_bytes=memory_bytes(),
        os=platform.platform(),
        python=platform.python_version(),
        agent_version=__version__,
        protocol_version=PROTOCOL_VERSION,
        runtimes=runtimes,
        onnxruntime_providers=available_providers() if Runtime.onnxruntime.value in runtimes else [],
    )


def _slug(text: str) -> str:
    """Fit text to the device-name pattern `^[A-Za-z0-9][A-Za-z0-9._/-]*$`."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")
    return slug or "host"


def default_device_name(
    threads: int, hostname: str | None = None, runtime: Runtime = Runtime.onnxruntime, provider: str | None = None
) -> str:
    """`<hostname>-<runtime>-<threads>t-b1`, e.g. `bench01-ort-4t-b1` or `rpi5-litert-4t-b1`;
    an ONNX Runtime provider other than the CPU one is named too: `bench01-ort-cuda-1t-b1`."""
    host = _slug((hostname or socket.gethostname() or "host").split(".")[0])
    tag = _RUNTIME_TAGS.get(runtime, runtime.value)
    if provider and provider != CPU_PROVIDER:
        tag += "-" + _slug(provider.removesuffix("ExecutionProvider").lower())
    return f"{host}-{tag}-{threads}t-b1"


def device_attributes(
    capabilities: Capabilities, threads: int, runtime: Runtime = Runtime.onnxruntime, provider: str | None = None
) -> dict[str, str | int | float | bool | None]:
    """Attributes of a device this agent serves; the server keys comparability on them, and
    leases jobs for the device with its `runtime` and `provider` (ONNX Runtime only)."""
    return {
        "hardware": capabilities.cpu_model,
        "runtime": runtime.value,
        "runtime_version": capabilities.runtimes.get(runtime.value, ""),
        "threads": threads,
        "batch_size": 1,
        "precision": "fp32",
        "provider": (provider or CPU_PROVIDER) if runtime is Runtime.onnxruntime else None,
    }
