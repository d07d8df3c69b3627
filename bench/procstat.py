"""Per-process host figures for the benchmarks, read from /proc (Linux): resident memory, CPU
time, and which processes a process started (a router's forwarders, a worker's fronts)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the parenthesized command name: state is [0], ppid [1]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def rss_mib(pid: int) -> float | None:
    """The process's resident memory (VmRSS), MiB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def rss_by_kind(pid: int) -> dict[str, float] | None:
    """The process's resident memory, MiB, by what holds it (from /proc/PID/smaps): "heap" (the
    main malloc arena), "anon" (other anonymous mappings: thread arenas, large allocations,
    pinned and JIT buffers), "file" (mapped files: libraries, the model's weights), and its
    "threads"; None once it is gone."""
    out = {"heap": 0.0, "anon": 0.0, "file": 0.0}
    kind = "anon"
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                first = line.split(maxsplit=6)
                if "-" in first[0] and len(first) >= 5 and ":" in first[3]:  # a mapping's header
                    name = first[5].strip() if len(first) > 5 else ""
                    kind = (
                        "heap" if name == "[heap]" else "file" if name.startswith("/") else "anon"
                    )
                elif first[0] == "Rss:":
                    out[kind] += int(first[1]) / 1024
        with open(f"/proc/{pid}/status") as f:
            out["threads"] = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    except (OSError, StopIteration):
        return None
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the process (all its threads) so far; 0 once it is gone."""
    try:
        fields = _stat_fields(pid)
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def children_by_parent() -> dict[int, list[int]]:
    """ppid -> the pids of its children, from /proc."""
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                out.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(int(entry.name))
    return out
