"""The OpenMP thread count of a CPU pass on a loaded machine (load-aware thread policy).

Used around every kernel call of :mod:`lossbench.cce.autograd` and
:mod:`lossbench.cce.vocab_parallel`; see :func:`threads_for_load` for the rule.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional

import torch


def _other_runnable() -> Optional[int]:
    """Runnable tasks on the machine that are not threads of this process (None if unknown)."""
    try:
        with open("/proc/loadavg") as fh:
            running = int(fh.read().split()[3].split("/")[0])
        ours = 0
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "R":
                    ours += 1
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - ours)


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_for_load(threads: int, cpus: int, others: Optional[int]) -> int:
    """Threads to run with when ``others`` runnable tasks compete for ``cpus`` CPUs.

    OpenMP's default wait policy spins at every barrier; when the threads outnumber the free
    CPUs a spinning thread holds the CPU its late peer needs, and a small step slows ~10x. So
    only as many threads as there are free CPUs (at least 1) are used; on a quiet machine
    nothing changes.
    """
    if others is None or threads <= 1:
        return threads
    return max(1, min(threads, cpus - others))


@contextmanager
def _load_aware_threads(device: torch.device) -> Iterator[None]:
    if device.type != "cpu" or os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        yield
        return
    old = torch.get_num_threads()
    n = threads_for_load(old, _available_cpus(), _other_runnable())
    if n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
