"""Running the oracle's units side by side: on threads, or on forked processes when threads stop scaling.

Each unit writes only its own rows and its own dK/dV partial (workplan.py), and every op in a unit runs
single-threaded, so where a unit runs changes no bit of the result: tests/test_oracle_scaling.py pins
threads = processes = one thread.

Why processes: on the lent H100's 16-core host every oracle block took 5x longer on 16 threads than on 1
(d128: 0.65 s on 1 thread, 0.22 s on 16, 0.15 of the fp64 GEMM), while a 32 KB torch op, pure dispatch,
went from 5 us to 656 us: the ~45 ops of a block each hand the interpreter's lock back and forth
(docs/benchmarks-calibration.md, "On a GPU host"). Forked children share nothing but the output
buffers (shared memory) and each has its own interpreter. Up to 4 threads scaled (0.58 of the GEMM). Measured
afterwards, processes did not pay either (PROCESSES_FROM): they are off unless a caller turns them on.
"""

from __future__ import annotations

import heapq
import mmap
import os
import signal
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch

# Off (None): measured on the H100's 16-core host at 8c56588, processes from 8 workers did not pay. The
# oracle bench stayed at 0.08 / 0.15 / 0.20 of the fp64 GEMM (threads: 0.08 / 0.15 / 0.17), and the
# models suite's low-precision stage took 121 s against 60 s on threads (oracle stage 33 s against 21 s):
# each call forks 15 children of a process holding torch and CUDA, and their first writes fault in pages.
# Kept, tested, for a caller that sets a worker count (tests do).
PROCESSES_FROM: int | None = None
PROCESS_MIN_COST = 1 << 23  # logits computed (workplan cost); below this a case takes a few ms


def share(t: torch.Tensor) -> None:
    """Back `t` by anonymous shared memory, in place, so forked children's writes reach this process.
    Not Tensor.share_memory_(): that goes through /dev/shm, which containers often cap at 64 MiB."""
    if not t.numel():
        return  # nothing a child could write
    buf = mmap.mmap(-1, t.numel() * t.element_size(), flags=mmap.MAP_SHARED)
    shared = torch.frombuffer(buf, dtype=t.dtype, count=t.numel()).view(t.shape)
    shared.copy_(t)
    t.set_(shared)


def use_processes(workers: int, cost: int) -> bool:
    return PROCESSES_FROM is not None and workers >= PROCESSES_FROM and cost >= PROCESS_MIN_COST and hasattr(os, "fork") and hasattr(mmap, "MAP_SHARED")


def assign(costs: Sequence[int], workers: int) -> list[list[int]]:
    """Unit indices per worker, longest first to the least loaded (ties: the lower worker): deterministic."""
    loads = [(0, w) for w in range(workers)]
    shares: list[list[int]] = [[] for _ in range(workers)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, w = heapq.heappop(loads)
        shares[w].append(i)
        heapq.heappush(loads, (load + costs[i], w))
    return shares


def run_units(units: tuple, fn: Callable, costs: Sequence[int], shared: Callable[[], None] | None = None) -> None:
    """fn over every unit on torch's thread count, each op single-threaded (a GEMM's bits may depend on its
    own thread count, and an OpenMP fork/join per small op costs more than it gains). `shared` moves the
    buffers the units write into shared memory; it is called only when the units go to processes."""
    previous = torch.get_num_threads()
    workers = min(previous, len(units))
    processes = use_processes(workers, sum(costs)) and shared is not None
    torch.set_num_threads(1)
    try:
        if workers <= 1:
            for unit in units:
                fn(unit)
        elif processes:
            shared()
            _on_processes(units, fn, assign(costs, workers))
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(fn, units))
    finally:
        torch.set_num_threads(previous)


def _on_processes(units: tuple, fn: Callable, shares: list[list[int]]) -> None:
    """Each share but the first in a forked child, the first in this process; a child that fails fails
    the call (its traceback on stderr), and an interrupted call leaves no child behind."""
    children: list[int] = []
    try:
        for mine in shares[1:]:
            pid = os.fork()
            if pid == 0:  # the child: run its units, never return into the caller's stack
                code = 0
                try:
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    for i in mine:
                        fn(units[i])
                except BaseException:  # noqa: BLE001 - reported through the exit status
                    traceback.print_exc()
                    sys.stderr.flush()
                    code = 1
                os._exit(code)
            children.append(pid)
        for i in shares[0]:
            fn(units[i])
        failed = []
        while children:
            pid, status = os.waitpid(children[0], 0)
            children.pop(0)
            if os.waitstatus_to_exitcode(status) != 0:
                failed.append(os.waitstatus_to_exitcode(status))
        if failed:
            raise RuntimeError(f"oracle: {len(failed)} forked worker(s) failed (exit {failed[0]}); see stderr")
    finally:
        for pid in children:  # interrupted or failed: no orphan keeps computing
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
