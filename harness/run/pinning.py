"""xdist worker pinning: gwN to the N-th visible GPU and cores / workers CPU threads.

Done in pytest_configure, before anything touches a device: CUDA reads CUDA_VISIBLE_DEVICES
(ROCm HIP_VISIBLE_DEVICES) once, when the driver first initialises, so a later change is
silently ignored. Pure functions here take the environment as a mapping, so tests inject
fake 8-GPU CUDA and ROCm runners.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import pytest
import torch  # importing does not initialise CUDA; the device count is read at first use


def worker_index(worker: str) -> int:
    """`gw3` -> 3."""
    digits = worker.removeprefix("gw")
    if not digits.isdigit():
        raise pytest.UsageError(f"PYTEST_XDIST_WORKER={worker!r} is not of the form gwN")
    return int(digits)


def pinned_env(env: Mapping[str, str], worker: str, hip: bool) -> dict[str, str | None]:
    """Environment changes that pin xdist worker gwN to one GPU: the N-th of the GPUs visible to
    the run (or device N when none are listed). None means unset. ROCm reads HIP_VISIBLE_DEVICES,
    and a CUDA_VISIBLE_DEVICES left beside it would re-index the pinned list, so it goes."""
    index = worker_index(worker)
    var = "HIP_VISIBLE_DEVICES" if hip else "CUDA_VISIBLE_DEVICES"
    listed = (env.get("HIP_VISIBLE_DEVICES") or env.get("CUDA_VISIBLE_DEVICES")) if hip else env.get("CUDA_VISIBLE_DEVICES")
    devices = [d.strip() for d in listed.split(",") if d.strip()] if listed else []
    changes: dict[str, str | None] = {var: devices[index % len(devices)] if devices else str(index)}
    if hip and "CUDA_VISIBLE_DEVICES" in env:
        changes["CUDA_VISIBLE_DEVICES"] = None
    return changes


def threads_per_worker(cores: int, workers: int) -> int:
    return max(1, cores // max(1, workers))


def wants_gpu_pinning(device: str | None) -> bool:
    """The default device and bare `cuda` are pinned; `cpu` has nothing to pin and an explicit
    `cuda:N` is the user's choice."""
    return device is None or device == "cuda"


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def pin_worker(config: pytest.Config, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Pin this xdist worker before anything touches a device; returns what it did."""
    env = os.environ if env is None else env
    worker = env.get("PYTEST_XDIST_WORKER")
    if not worker:
        return {}
    done: dict[str, Any] = {"worker": worker}
    if wants_gpu_pinning(config.getoption("gqa_device")):
        if torch.cuda.is_initialized():
            raise pytest.UsageError("CUDA was initialised before the gqa-harness plugin could pin this worker to one GPU")
        for var, value in pinned_env(env, worker, hip=torch.version.hip is not None).items():
            if value is None:
                env.pop(var, None)
            else:
                env[var] = value
            done[var] = value
    threads = threads_per_worker(_available_cores(), int(env.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    torch.set_num_threads(threads)
    env["OMP_NUM_THREADS"] = str(threads)  # the spawn-started kernel worker inherits it
    done["threads"] = threads
    return done
