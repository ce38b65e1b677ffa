"""Helpers shared by the benchmarks: machine description, memory accounting, raw probes, statistics, formatting.

Nothing here imports ignite or MONAI; torch is imported lazily so the orchestrating process stays light.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

MiB = 2**20


# -- machine -----------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def filesystem_of(path: str) -> dict[str, Any]:
    """The mount that holds ``path`` (device, type, options) and its free space."""
    real = os.path.realpath(path)
    best: tuple[str, str, str, str] = ("?", "/", "?", "")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 4:
                    continue
                device, mount, fstype, options = parts[0], parts[1].replace("\\040", " "), parts[2], parts[3]
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best[1]):
                    best = (device, mount, fstype, options)
    except OSError:
        pass
    try:
        usage = shutil.disk_usage(real)
        free, total = usage.free, usage.total
    except OSError:
        free = total = 0
    return {
        "path": real,
        "device": best[0],
        "mount": best[1],
        "fstype": best[2],
        "options": best[3],
        "free_bytes": free,
        "total_bytes": total,
    }


def machine_info(ckpt_dir: str) -> dict[str, Any]:
    """CPU, cores, RAM, load, software versions and the file system the checkpoints go to."""
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("ignite", "monai", "async_ckpt"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # a missing optional package is reported, not fatal
            versions[mod] = "not installed"
    try:  # by its distribution's metadata: importing lightning costs seconds, and only its benchmark needs it
        from importlib.metadata import version

        versions["lightning"] = version("lightning")
    except Exception:
        versions["lightning"] = "not installed"
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 0
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": _mem_total_bytes(),
        "loadavg": list(os.getloadavg()),
        "kernel": platform.release(),
        "versions": versions,
        "filesystem": filesystem_of(ckpt_dir),
    }


def describe_machine(info: dict[str, Any]) -> str:
    """:func:`machine_info` as Markdown bullet lines, for the top of a report."""
    fs = info["filesystem"]
    v = info["versions"]
    return "\n".join(
        [
            f"- CPU: {info['cpu_model']} ({info['usable_cpus']} usable of {info['logical_cpus']} logical CPUs, "
            f"torch threads {info['torch_threads']})",
            f"- RAM: {info['ram_bytes'] / 2**30:.1f} GiB; load average at start: "
            + ", ".join(f"{x:.2f}" for x in info["loadavg"]),
            f"- Software: Python {v['python']}, torch {v['torch']}, ignite {v['ignite']}, monai {v['monai']}, "
            f"lightning {v.get('lightning', '?')}, async_ckpt {v['async_ckpt']}; kernel {info['kernel']}",
            f"- Checkpoint dir: {fs['path']} on {fs['device']} ({fs['fstype']}, mounted at {fs['mount']}, "
            f"{fs['free_bytes'] / 2**30:.0f} GiB free)",
        ]
    )


# -- memory ------------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Current resident set size of this process."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return int(psutil.Process().memory_info().rss)


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (Linux ``clear_refs`` 5); ``False`` where the kernel refuses."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """Peak RSS since the last :func:`reset_peak_rss` (or since the process started)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak * (1 if sys.platform == "darwin" else 1024))


# -- raw probes --------------------------------------------------------------------------------------------------
def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_write_probe(directory: str, nbytes: int, chunk: int = 64 * MiB) -> dict[str, float]:
    """Plain sequential ``write`` of ``nbytes`` from memory, ``fsync`` of the file and directory, then unlink.

    Returns:
        ``write_s`` (the write calls), ``fsync_s``, ``total_s`` and ``mib_s`` (bytes over total time).
    """
    import torch

    buf = torch.ones(min(nbytes, chunk), dtype=torch.uint8)
    view = memoryview(buf.numpy())
    path = os.path.join(directory, f"disk-probe-{os.getpid()}.bin")
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            n = os.write(fd, view[: min(left, len(view))])
            left -= n
        t1 = time.perf_counter()
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(directory)
    t2 = time.perf_counter()
    os.unlink(path)
    fsync_dir(directory)
    total = t2 - t0
    return {"write_s": t1 - t0, "fsync_s": t2 - t1, "total_s": total, "mib_s": nbytes / MiB / total}


def memcpy_probe(nbytes: int, repeats: int = 3) -> dict[str, float]:
    """``copy_`` of ``nbytes`` into a preallocated, already-touched buffer: the floor of any snapshot."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    del src, dst
    gc.collect()
    best = min(times)
    return {"copy_s": median(times), "best_s": best, "gib_s": nbytes / 2**30 / best}


# -- statistics --------------------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100); NaN for no values."""
    xs = sorted(v for v in values if not math.isnan(v))
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


def dir_bytes(path: str) -> int:
    """Bytes of all regular files under ``path``."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


# -- formatting and JSON ---------------------------------------------------------------------------------------------
def fmt_ms(x: float | None) -> str:
    """Seconds as milliseconds with one decimal; ``n/a`` for a missing or NaN value."""
    return "n/a" if x is None or math.isnan(x) else f"{x * 1e3:.1f}"


def fmt_num(x: float | None, fmt: str = "{:.0f}") -> str:
    """``x`` formatted with ``fmt``; ``n/a`` for a missing or NaN value."""
    return "n/a" if x is None or math.isnan(x) else fmt.format(x)


def finite(obj: Any) -> Any:
    """``obj`` with NaN/inf floats replaced by ``None`` and keys made strings, so it is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json(path: str, payload: Any) -> None:
    """Write ``payload`` as strict JSON (NaN becomes ``null``), creating the parent directory."""
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(finite(payload), f, indent=1, default=str, allow_nan=False)
