"""Kernels run in a worker process per device, so a crash, a hang or an OOM costs one result, not the run.

The worker is started with the `spawn` method: a fresh interpreter, never a fork of a
process that may hold a CUDA/HIP context (a forked context is unusable). It receives
(case, implementation name, device), regenerates the inputs from the case seed, runs
`run_implementation` and sends the CPU outputs back; the oracle stays in the parent,
which checks the worker's input SHA-256s against its own so both saw the same bits.

What can go wrong, and what the parent records (error_kind of the ERROR result):
  * the kernel raises                  -> exception (message and traceback kept)
  * torch.OutOfMemoryError             -> oom (memory freed in the worker, which lives on)
  * a sticky device error (illegal memory access, device-side assert: the context is
    poisoned, every later call would fail too) -> crash; the worker exits and is restarted
  * the process dies (abort, segfault)  -> crash, with the signal and the last stderr lines
  * no answer within the case's budget  -> timeout; the worker is killed and restarted
"""

from __future__ import annotations

import ctypes
import faulthandler
import functools
import io
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.case import Case
from ..core.inputs import Inputs, make_inputs
from ..core.results import Outputs
from ..implementations import Implementation, RegistryError, builtin_implementations, by_name
from .env import pin_process_state
from .execute import Failure, execute, failure_of

# Per-case budget = BASE + FLOPs / RATE. The rates are deliberately pessimistic floors (a loaded
# 2-core CPU reaches ~2 GFLOP/s in fp64-free bf16 SDPA, an H100 ~300 TFLOP/s): the budget only has
# to tell a hang from slow work. BASE covers first-call costs (plan building, autotuning, compiles).
BASE_SECONDS = 120.0
FLOP_RATE = {"cpu": 2e8, "cuda": 1e11, "rocm": 1e11}
STARTUP_SECONDS = 600.0  # importing torch and initialising a device in a fresh interpreter
STDERR_LINES = 20
PR_SET_PDEATHSIG = 1  # linux/prctl.h

# Errors after which the device context is unusable (CUDA "sticky" errors, their HIP equivalents).
_STICKY = re.compile(
    r"illegal memory access|device-side assert|unspecified launch failure|illegal instruction|"
    r"misaligned address|hardware exception|memory access fault|uncorrectable ECC|launch timed out",
    re.I)


class WorkerCrash(Exception):
    """The worker died (signal or exit) or hit a sticky device error; `stderr` holds its last lines."""

    def __init__(self, message: str, stderr: str = ""):
        super().__init__(message)
        self.stderr = stderr


class WorkerTimeout(WorkerCrash):
    """No answer within the case's budget; the worker was killed."""


def timeout_budget(case: Case, device_kind: str, repeat: int = 1, override: float | None = None) -> float:
    """Seconds one (case, implementation) may take before it is declared hung."""
    if override is not None:
        return override
    return BASE_SECONDS + repeat * case.flops() / FLOP_RATE.get(device_kind, FLOP_RATE["cuda"])


def rebuildable(impl: Implementation) -> bool:
    """Whether a fresh process can rebuild `impl` from its name (else it runs in the parent)."""
    if impl.name in builtin_implementations():
        return True
    if ":" not in impl.name:
        return False
    try:
        by_name(impl.name)
    except RegistryError:
        return False
    return True


def is_sticky(failure: Failure) -> bool:
    """A device error after which the context is unusable."""
    return failure.kind == "exception" and bool(_STICKY.search(failure.message + failure.notes.get("exception", "")))


@functools.lru_cache(maxsize=1)
def case_inputs(case: Case) -> tuple[Inputs, dict[str, str]]:
    """The inputs of the worker's current case and their SHA-256, drawn once for all its implementations (a
    run or search sends every implementation of a case in a row), as the parent shares its own copy."""
    inputs = make_inputs(case)
    return inputs, inputs.hashes()


def serve(task: dict[str, Any]) -> dict[str, Any]:
    """One task in the worker: the reply is plain data (outputs serialised by torch.save)."""
    try:
        impl = by_name(task["impl"])
        inputs, drawn = case_inputs(Case(**task["case"]))
    except Exception as exc:  # noqa: BLE001 - reported like a raising kernel; the worker lives on
        return {"failure": asdict(failure_of(exc)), "sticky": False}
    wall, cpu = time.perf_counter(), time.process_time()
    outcome = execute(impl, inputs, task["device"], task.get("repeat", 1))
    kernel = (time.perf_counter() - wall, time.process_time() - cpu)  # the run's stage split (stages.py)
    # off the CPU the kernel is handed device copies only (execute.py's placement): nothing to re-hash
    hashes = inputs.hashes() if task["device"].startswith("cpu") else drawn
    if hashes != drawn:  # a kernel wrote into a CPU input (the parent's check names it): the next call draws afresh
        case_inputs.cache_clear()
    if isinstance(outcome, Failure):
        return {"failure": asdict(outcome), "sticky": is_sticky(outcome), "kernel": kernel}
    return {**spool_outputs(outcome, task.get("spool")), "hashes": hashes, "kernel": kernel}


def spool_outputs(outcome: Outputs, spool: str | None) -> dict[str, Any]:
    """The outputs as a file in the parent's spool directory (memory-backed where /dev/shm is), which
    the parent maps instead of reading through the pipe: pickling tens of MB per call through
    multiprocessing's pipe was half of a GPU suite's wall time. Inline bytes without a spool or when
    the file cannot be written (a full /dev/shm or disk, a file size limit)."""
    if spool:
        fd, path = tempfile.mkstemp(suffix=".pt", dir=spool)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(outcome.__dict__, fh)
            return {"outputs_path": path}
        except (OSError, RuntimeError):  # torch.save's writer reports a short write as a RuntimeError
            Path(path).unlink(missing_ok=True)
    buf = io.BytesIO()
    torch.save(outcome.__dict__, buf)
    return {"outputs": buf.getvalue()}


def unspool_outputs(reply: dict[str, Any]) -> dict[str, Any]:
    """spool_outputs' other half: the file is mapped, not read (torch.load mmap), and unlinked at once."""
    if "outputs_path" not in reply:
        return torch.load(io.BytesIO(reply["outputs"]), weights_only=False)
    path = reply["outputs_path"]
    try:
        return torch.load(path, mmap=True, weights_only=False)
    finally:
        Path(path).unlink(missing_ok=True)


def spool_directory() -> str:
    """Where a worker leaves its outputs for the parent: memory-backed when /dev/shm takes files."""
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    return tempfile.mkdtemp(prefix="gqa-spool-", dir=base)


def die_with(parent_pid: int) -> None:
    """The worker must not outlive its parent (a `kill -9` on the run while a kernel hangs would leave it
    spinning): the kernel's death signal where Linux has one, and a watchdog thread everywhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(4)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(4)

    threading.Thread(target=watch, name="gqa-parent-watchdog", daemon=True).start()


def _child_main(conn, device: str, log_path: str, parent_pid: int) -> None:
    """Worker loop: stdout/stderr go to the log (the parent reads its tail after a crash)."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    faulthandler.enable(all_threads=False)  # a crash leaves the kernel thread's traceback (not the watchdog's)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    die_with(parent_pid)
    pin_process_state()
    if device.startswith("cuda"):
        torch.cuda.init()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if task is None:
            return
        reply = serve(task)
        conn.send_bytes(pickle.dumps(reply))
        if reply.get("sticky"):
            os._exit(3)  # the device context is poisoned: a fresh worker takes over


# faulthandler's dump around the kernel's own last words: not what a one-line error should quote.
_BOILERPLATE = re.compile(r"^(Fatal Python error|Extension modules|Current thread|Thread 0x|Stack \(most|  File |"
                          r"<no Python frame>|Traceback|\s*$)")


def last_words(stderr: str) -> str:
    """The line of a dead worker's stderr most worth quoting: its last line that is not a traceback dump."""
    lines = [line for line in stderr.splitlines() if not _BOILERPLATE.match(line)]
    return lines[-1].strip()[:300] if lines else ""


def describe_exit(code: int | None) -> str:
    if code is None:
        return "the worker stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the worker died from {name}"
    return f"the worker exited with status {code}"


@dataclass
class Call:
    """One call a worker made, kept so an order-dependent failure can name what came before it."""

    case: Case
    impl: str


class Worker:
    """One spawn-started process per device, restarted after a crash or a timeout."""

    def __init__(self, device: str, device_kind: str = "cpu", *, timeout: float | None = None, repeat: int = 1,
                 log_dir: Path | None = None):
        self.device = device
        self.device_kind = device_kind
        self.timeout = timeout
        self.repeat = repeat
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="gqa-worker-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.history: list[Call] = []  # calls since the current process started
        self.last_kernel: tuple[float, float] | None = None  # (wall, CPU) seconds of the last call's kernel
        self.starts = 0
        self._proc = None
        self._conn = None
        self._log: Path | None = None
        self._spool: str | None = None  # spool_outputs' directory while a process runs
        self._hashed: tuple[Inputs, dict[str, str]] | None = None  # (the last case's inputs, their hashes)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self.starts += 1
        self._log = self.log_dir / f"worker-{self.starts}.log"
        self._proc = ctx.Process(target=_child_main, args=(child, self.device, str(self._log), os.getpid()),
                                 name=f"gqa-worker-{self.device}", daemon=True)
        self._spool = self._spool or spool_directory()
        self._proc.start()
        child.close()
        self._conn = parent
        self.history = []
        if not parent.poll(STARTUP_SECONDS):
            self.stop()
            raise WorkerCrash(f"the worker did not start within {STARTUP_SECONDS:.0f} s", self._tail(0))
        try:
            parent.recv()
        except (EOFError, OSError):
            code = self._reap()
            raise WorkerCrash(f"{describe_exit(code)} while starting", self._tail(0)) from None

    def stop(self) -> None:
        if self._proc is None:
            return
        try:
            if self._proc.is_alive() and self._conn is not None:
                try:
                    self._conn.send(None)
                except OSError:
                    pass
                self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
        finally:
            if self._conn is not None:  # None when Ctrl-C landed between the process's start and its pipe
                self._conn.close()
            if self._spool:  # a file the dead process left half-written goes with it
                shutil.rmtree(self._spool, ignore_errors=True)
            self._proc = self._conn = self._spool = None

    close = stop

    def _reap(self) -> int | None:
        proc = self._proc
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        code = proc.exitcode
        self._conn.close()
        self._proc = self._conn = None
        return code

    def _log_size(self) -> int:
        return self._log.stat().st_size if self._log and self._log.exists() else 0

    def _tail(self, offset: int) -> str:
        if not self._log or not self._log.exists():
            return ""
        with self._log.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", "replace")
        return "\n".join(text.strip().splitlines()[-STDERR_LINES:])

    def call(self, case: Case, impl: str, timeout: float | None = None) -> dict[str, Any]:
        """Send one task and wait for the reply; crashes and timeouts raise WorkerCrash/WorkerTimeout."""
        if self._proc is None:
            self.start()
        budget = timeout_budget(case, self.device_kind, self.repeat, self.timeout) if timeout is None else timeout
        offset = self._log_size()
        self.history.append(Call(case, impl))
        self._conn.send({"case": case.to_dict(), "impl": impl, "device": self.device, "repeat": self.repeat,
                         "spool": self._spool})
        if not self._conn.poll(budget):
            self._proc.kill()
            self._reap()
            raise WorkerTimeout(f"timeout: no result within {budget:.0f} s; the worker was killed",
                                self._tail(offset))
        try:
            reply = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            code = self._reap()
            raise WorkerCrash(describe_exit(code), self._tail(offset)) from None
        if reply.get("sticky"):
            self._reap()  # it exits by itself; the next call starts a fresh one
            raise WorkerCrash(f"device error, context poisoned: {reply['failure']['message']}", self._tail(offset))
        return reply

    def _parent_hashes(self, inputs: Inputs) -> dict[str, str]:
        """The parent's input hashes, once per case: every implementation of a case shares one Inputs,
        which only the oracle reads in this process."""
        if self._hashed is None or self._hashed[0] is not inputs:
            self._hashed = (inputs, inputs.hashes())
        return self._hashed[1]

    def execute(self, impl: Implementation, inputs: Inputs, device: str) -> Outputs | Failure:
        """execute.execute's contract, across the process boundary."""
        self.last_kernel = None
        try:
            reply = self.call(inputs.case, impl.name)
            self.last_kernel = reply.get("kernel")
        except WorkerCrash as exc:  # the process died or hung: the kernel's doing, the run goes on
            words = last_words(exc.stderr)
            tail = f"; stderr: {words}" if words else ""
            return Failure("timeout" if isinstance(exc, WorkerTimeout) else "crash", f"{exc}{tail}",
                           {"stderr": exc.stderr})
        if "failure" in reply:
            return Failure(**reply["failure"])
        if reply["hashes"] != self._parent_hashes(inputs):
            return Failure("harness", "harness defect: the worker regenerated inputs that differ from the parent's "
                                      "(SHA-256 mismatch)")
        return Outputs(**unspool_outputs(reply))
