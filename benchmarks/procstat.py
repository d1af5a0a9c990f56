"""CPU time and memory of processes, read from /proc (Linux), for the gateway benchmarks.

CPU time is utime + stime from `/proc/PID/stat` in clock ticks (usually 10 ms), summed
over a process and its descendants (nginx's master and worker); the benchmarks take it
before and after a phase that lasts seconds, so the tick is well below the figures.
Memory is VmRSS from `/proc/PID/status`.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (children files list each thread's children)."""
    found = [pid]
    i = 0
    while i < len(found):
        task_dir = Path(f"/proc/{found[i]}/task")
        try:
            tasks = list(task_dir.iterdir())
        except OSError:
            tasks = []
        for task in tasks:
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            found.extend(int(c) for c in children if int(c) not in found)
        i += 1
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its descendants; 0 for a process that is gone."""
    total = 0
    for p in descendants(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total * TICK_S


def rss_bytes(pid: int, tree: bool = False) -> int:
    total = 0
    for p in descendants(pid) if tree else [pid]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuMeter:
    """CPU seconds used by named processes (and by this process) between start and stop."""

    pids: dict[str, int]

    def start(self) -> None:
        self._wall = time.perf_counter()
        self._before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._self = self_cpu_seconds()

    def stop(self) -> dict[str, float]:
        """CPU seconds per process, plus `client` (this process) and `wall`."""
        used = {name: cpu_seconds(pid) - self._before[name] for name, pid in self.pids.items()}
        used["client"] = self_cpu_seconds() - self._self
        used["wall"] = time.perf_counter() - self._wall
        return used


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nginx = subprocess.run(
            ["/usr/sbin/nginx", "-v"], capture_output=True, text=True, timeout=5
        ).stderr.strip()
    except OSError:
        nginx = ""
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "nginx": nginx.removeprefix("nginx version: "),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
