"""What `winq bench` measures besides time: memory of this process, an artifact's size, the machine.

Peak memory is VmHWM of /proc/self/status: Linux keeps getrusage's ru_maxrss across fork and
execve, so a worker started by a parent that holds torch would report at least the parent's peak
(ru_maxrss is recorded too, and used where /proc does not exist). psutil (a declared dependency)
gives the current RSS where /proc/self/statm does not exist.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from winq.errors import ConfigError

MB = 1024 * 1024


def artifact_bytes(path) -> int:
    """Bytes on disk: a checkpoint's model.safetensors, a folder's files (recursively), or a file."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if (path / "winq.json").is_file() and (path / "model.safetensors").is_file():
        return (path / "model.safetensors").stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    raise ConfigError(f"{path} not found")


def rss_mb() -> float:
    """Resident set size of this process now (MB)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss / MB


def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def ru_maxrss_mb() -> float:
    """getrusage(RUSAGE_SELF).ru_maxrss in MB (KB on Linux, bytes on macOS)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / MB if sys.platform == "darwin" else r / 1024


def peak_rss_mb() -> float:
    """Peak resident set size of this process (MB).

    Linux keeps ru_maxrss across fork and execve, so a worker started by a parent that holds
    torch would report at least the parent's peak; VmHWM (/proc/self/status) belongs to the
    process's own address space, fresh after execve, and is used where it exists.
    """
    hwm = _proc_status_mb("VmHWM")
    return hwm if hwm is not None else ru_maxrss_mb()


def machine_info(threads: int | None) -> dict:
    import torch

    return {"cpu_count": os.cpu_count(), "threads": threads, "torch_default_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine()}
