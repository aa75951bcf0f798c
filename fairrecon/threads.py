"""Threads: how many an audit uses (`default_threads`), and `one_thread` for arithmetic whose rounding would
otherwise depend on that number.

No number an audit writes depends on its thread count (tests/test_threads.py). torch's CPU kernels round
differently at different thread counts in three ways, measured on this project's machine: MKL's matrix products
split their inner dimension between threads when a product runs alone (a batch of one, or fewer matrices than
threads); a sum down to one number is cut into one piece per thread; and elementwise kernels such as softplus and
sigmoid compute the tail of each thread's piece with scalar code that rounds differently from their vector code.
So every cell's arithmetic runs on one thread (runners.LoopedRunner: a cell per worker thread), and the few sums
outside the cells run under `one_thread`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"


@contextmanager
def one_thread() -> Iterator[None]:
    """torch's intra-op threads set to 1 inside, put back after: for arithmetic whose rounding would otherwise
    depend on how many threads share it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def default_threads() -> tuple[int, str]:
    """Threads for an audit, and why: every CPU this process may use (`usable_cpus`).

    Not the CPUs left idle by the 1-minute load average (the rule before 0.2): that average still counts
    work that has just finished (a previous audit, a pip install), so an audit started right after one
    ran at half speed on an idle machine (issue 22). Pass `threads` to choose yourself.
    """
    n, why = usable_cpus()
    return n, f"auto: {why}"


def usable_cpus(cpu_max: Path | None = None) -> tuple[int, str]:
    """The CPUs this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (rounded down, at
    least 1), and the words that say which limit decided."""
    cpu_max = CGROUP_CPU_MAX if cpu_max is None else cpu_max
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    why = f"{cores} CPUs in this process's affinity"
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return cores, why
    if quota != "max" and int(period) > 0 and int(quota) // int(period) < cores:
        return max(1, int(quota) // int(period)), f"{why}, cgroup quota {int(quota) / int(period):g} CPUs"
    return cores, why
