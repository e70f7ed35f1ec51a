"""Device facts and the environment fingerprint written into every report.

Besides the device and torch's own versions, the fingerprint carries what triage needs: `versions`
(every value a known-failure entry can range on: core/known.VERSION_KEYS) and `collect_env`, the
fields of torch.utils.collect_env.get_env_info() that bear on numerics (runtime versions of CUDA,
HIP and MIOpen, the driver, allocator settings, the pip packages torch lists), read once per process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils import collect_env

from .. import __version__
from ..implementations import DeviceFacts


class DeviceError(ValueError):
    pass


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_facts(device: str | None = None) -> DeviceFacts:
    """Facts about `device` ("cpu", "cuda", "cuda:N"; ROCm devices are "cuda" to torch)."""
    device = device or default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return DeviceFacts(device="cpu", kind="cpu", name=platform.processor() or platform.machine(),
                           arch=platform.machine())
    if dev.type != "cuda":
        raise DeviceError(f"device {device!r} is not supported (use cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} is not there: torch.cuda.is_available() is False")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device {device!r} is not there: {torch.cuda.device_count()} GPU(s) visible")
    props = torch.cuda.get_device_properties(index)
    return gpu_facts(f"cuda:{index}", props, torch.version.hip)


def gpu_facts(device: str, props: object, hip_version: str | None) -> DeviceFacts:
    """Pure: facts from device properties (injected in tests to fake CUDA and ROCm GPUs)."""
    if hip_version:
        arch = str(getattr(props, "gcnArchName", "")).split(":")[0]
        return DeviceFacts(device=device, kind="rocm", name=str(getattr(props, "name", "")), arch=arch)
    major, minor = getattr(props, "major", 0), getattr(props, "minor", 0)
    return DeviceFacts(device=device, kind="cuda", name=str(getattr(props, "name", "")), arch=f"sm_{major}{minor}")


def device_label(facts: DeviceFacts) -> str:
    """Short stable label for file names and matrix columns: cpu-x86_64, cuda-sm_90, rocm-gfx942."""
    return f"{facts.kind}-{facts.arch}".replace(" ", "_") if facts.arch else facts.kind


def cudnn_version(raw: int | None) -> str | None:
    """torch reports cuDNN as an int: 91900 is 9.19.0 (9.x: M*10000+m*100+p), 8907 is 8.9.7 (8.x: M*1000+m*100+p)."""
    if raw is None:
        return None
    raw = int(raw)
    if raw >= 90000:
        return f"{raw // 10000}.{raw % 10000 // 100}.{raw % 100}"
    return f"{raw // 1000}.{raw % 1000 // 100}.{raw % 100}"


def rocm_fa_library() -> str | None:
    """Which ROCm flash library SDPA uses ("aotriton" or "ck"); None off ROCm."""
    getter = getattr(torch.backends.cuda, "preferred_rocm_fa_library", None)
    if not torch.version.hip or getter is None:
        return None
    try:
        return str(getter()).split(".")[-1].lower()
    except Exception:  # noqa: BLE001 - only meaningful on ROCm builds
        return None


# collect_env fields that bear on numerics or on reproducing a run; the rest (compilers aside) is host detail.
COLLECT_ENV_FIELDS = ("torch_version", "is_debug_build", "cuda_compiled_version", "cuda_runtime_version",
                      "cuda_module_loading", "nvidia_driver_version", "nvidia_gpu_models", "cudnn_version",
                      "hip_compiled_version", "hip_runtime_version", "miopen_runtime_version",
                      "caching_allocator_config", "os", "libc_version", "gcc_version", "pip_packages")


def _na(value: Any) -> Any:
    return None if value in ("N/A", "", "None", "Could not collect") else value


@functools.lru_cache(maxsize=1)
def collect_env_facts() -> dict[str, Any]:
    """The fields of torch.utils.collect_env.get_env_info() in COLLECT_ENV_FIELDS ("N/A" as null), pip
    packages as {name: version}; once per process (it runs pip and the driver tools: ~0.5 s)."""
    try:
        info = collect_env.get_env_info()._asdict()
    except Exception as exc:  # noqa: BLE001 - a triage aid must never stop a run
        return {"error": f"{type(exc).__name__}: {exc}"}
    out = {k: _na(info.get(k)) for k in COLLECT_ENV_FIELDS if k in info}
    pins = (line.strip().split("==", 1) for line in str(info.get("pip_packages") or "").splitlines() if "==" in line)
    out["pip_packages"] = {name.strip(): version.strip() for name, version in pins}
    if isinstance(out.get("caching_allocator_config"), dict):
        out["caching_allocator_config"] = {str(k): str(v) for k, v in out["caching_allocator_config"].items()}
    return {k: v if isinstance(v, (dict, type(None))) else str(v) for k, v in out.items()}


def aotriton_version(torch_dir: Path | None = None) -> str | None:
    """The AOTriton version a ROCm wheel ships, from torch/include/aotriton/config.h (None without it)."""
    path = (torch_dir or Path(torch.__file__).parent) / "include" / "aotriton" / "config.h"
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    parts = dict(re.findall(r"#define\s+AOTRITON_VERSION_(MAJOR|MINOR|PATCH)(?:_INT)?\s+(\d+)", text))
    if "MAJOR" not in parts or "MINOR" not in parts:
        return None
    return ".".join(parts[k] for k in ("MAJOR", "MINOR", "PATCH") if k in parts)


def package_version(*names: str) -> str | None:
    """The installed version of the first of `names` present (read from metadata: nothing is imported)."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def environment_versions(environ: dict[str, str] | None = None) -> dict[str, str | None]:
    """The versions known-failure entries can be ranged on (core/known.VERSION_KEYS), from this process."""
    environ = os.environ if environ is None else environ
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None  # as loaded
    info = collect_env_facts()
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "hip": torch.version.hip,
            "cudnn": cudnn_version(cudnn), "rocm_fa_library": rocm_fa_library(), "rocm": rocm_version(environ),
            "aotriton": aotriton_version(), "aotriton_experimental": environ.get("TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL"),
            "flash_attn": package_version("flash_attn", "flash-attn"), "xformers": package_version("xformers"),
            "triton": package_version("triton", "pytorch-triton-rocm", "pytorch-triton"),
            "hip_runtime": info.get("hip_runtime_version"), "miopen": info.get("miopen_runtime_version"),
            # collect_env reads the runtime from nvcc: only a CUDA build of torch makes it this run's
            "cuda_runtime": info.get("cuda_runtime_version") if torch.version.cuda else None,
            "nvidia_driver": info.get("nvidia_driver_version")}


def math_reduction_allowed() -> bool | None:
    getter = getattr(torch.backends.cuda, "fp16_bf16_reduction_math_sdp_allowed", None)
    return bool(getter()) if getter else None


def pin_math_reduction(allowed: bool = False) -> bool | None:
    """The math backend may reduce fp16/bf16 in low precision; a process-global flag, so pin it."""
    setter = getattr(torch.backends.cuda, "allow_fp16_bf16_reduction_math_sdp", None)
    if setter is not None:
        setter(allowed)
    return math_reduction_allowed()


def pin_process_state() -> dict[str, Any]:
    """Set the process-global settings that change numerics to what every result assumes, and return
    them for the fingerprint. Called once per process that runs kernels (the session's, each worker)."""
    return {"math_fp16_bf16_reduction_allowed": pin_math_reduction(False)}


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_BLOCKS_BELOW = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


def keep_freed_blocks(libc: Any = None) -> bool:
    """Let glibc serve the oracle's blocks (2 MiB logits, per-head buffers, up to 32 MiB) from its heap
    and keep them after free, instead of a fresh mmap per block whose pages fault in again on every
    use: on 2 threads the median oracle/GEMM ratio over five alternated process pairs went 0.494 ->
    0.519 at d128 and 0.528 -> 0.549 at d256 (d64 unchanged), small beside run-to-run noise of +-10 %.
    The price is a run process whose resident set stays at its peak. A no-op where
    the C library has no mallopt (musl, macOS). Called once, by the CLI, for the run's own process."""
    if libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, 1 << 30)) and bool(mallopt(M_MMAP_THRESHOLD, KEEP_BLOCKS_BELOW))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rocm_version(environ: dict[str, str] | None = None) -> str | None:
    """The ROCm release installed (not the HIP version torch was built with): the file every
    ROCm install writes, under $ROCM_PATH or /opt/rocm, as in AMD's rocm/pytorch images."""
    root = (os.environ if environ is None else environ).get("ROCM_PATH") or "/opt/rocm"
    try:
        with open(os.path.join(root, ".info", "version")) as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def _rocm_facts() -> dict[str, object]:
    facts: dict[str, object] = {"hip": torch.version.hip, "rocm": rocm_version()}
    getter = getattr(torch.backends.cuda, "preferred_rocm_fa_library", None)
    if getter is not None:
        try:
            facts["rocm_fa_library"] = str(getter())
        except Exception as exc:  # noqa: BLE001 - only meaningful on ROCm builds
            facts["rocm_fa_library"] = f"unknown ({type(exc).__name__})"
    for var in ("TORCH_ROCM_FA_PREFER_CK", "TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL", "HIP_VISIBLE_DEVICES"):
        if var in os.environ:
            facts[var] = os.environ[var]
    return facts


def fingerprint(facts: DeviceFacts) -> dict[str, object]:
    fp: dict[str, object] = {
        "harness": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None),
        "cuda": torch.version.cuda,
        "hip": torch.version.hip,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": facts.device,
        "device_kind": facts.kind,
        "device_name": facts.name,
        "device_arch": facts.arch,
        "device_label": device_label(facts),
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "math_fp16_bf16_reduction_allowed": math_reduction_allowed(),
        "versions": {**environment_versions(), "torch": facts.torch_version},
        "collect_env": collect_env_facts(),
    }
    if facts.kind == "cuda" and torch.cuda.is_available():
        fp["driver"] = _nvidia_driver()
    if facts.kind == "rocm":
        fp.update(_rocm_facts())
    return fp


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None
