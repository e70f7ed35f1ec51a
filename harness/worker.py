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

import faulthandler
import io
import os
import pickle
import re
import signal
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .case import Case
from .execute import HarnessDefect, Outputs, Unsupported, run_implementation
from .implementations import Implementation, RegistryError, builtin_implementations
from .inputs import Inputs, make_inputs

# Per-case budget = BASE + FLOPs / RATE. The rates are deliberately pessimistic floors (a loaded
# 2-core CPU reaches ~2 GFLOP/s in fp64-free bf16 SDPA, an H100 ~300 TFLOP/s): the budget only has
# to tell a hang from slow work. BASE covers first-call costs (plan building, autotuning, compiles).
BASE_SECONDS = 120.0
FLOP_RATE = {"cpu": 2e8, "cuda": 1e11, "rocm": 1e11}
STARTUP_SECONDS = 600.0  # importing torch and initialising a device in a fresh interpreter
STDERR_LINES = 20

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


class RemoteError(Exception):
    """The kernel raised in the worker; keeps the original type name and traceback."""

    def __init__(self, type_name: str, message: str, tb: str = ""):
        super().__init__(message)
        self.type_name = type_name
        self.tb = tb

    def first_line(self) -> str:
        text = str(self).strip()
        return f"{self.type_name}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def timeout_budget(case: Case, device_kind: str, repeat: int = 1, override: float | None = None) -> float:
    """Seconds one (case, implementation) may take before it is declared hung."""
    if override is not None:
        return override
    return BASE_SECONDS + repeat * case.flops() / FLOP_RATE.get(device_kind, FLOP_RATE["cuda"])


def implementation_by_name(name: str) -> Implementation:
    """The implementation a worker rebuilds from its name: a built-in, or `module:function`."""
    builtins = builtin_implementations()
    if name in builtins:
        return builtins[name]
    if ":" in name:
        from .implementations.user import load_user_implementation

        return load_user_implementation(name)
    raise RegistryError(f"implementation {name!r} cannot be rebuilt by name in a worker process")


def rebuildable(impl: Implementation) -> bool:
    """Whether a fresh process can rebuild `impl` from its name (else it runs in the parent)."""
    if impl.name in builtin_implementations():
        return True
    if ":" not in impl.name:
        return False
    try:
        implementation_by_name(impl.name)
    except RegistryError:
        return False
    return True


def is_sticky_device_error(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and bool(_STICKY.search(str(exc)))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _free_device_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def serve(task: dict[str, Any]) -> dict[str, Any]:
    """One task in the worker: the reply is plain data (outputs serialised by torch.save)."""
    from .determinism import run_repeated

    case = Case(**task["case"])
    try:
        impl = implementation_by_name(task["impl"])
        inputs = make_inputs(case)
        hashes = inputs.hashes()
        outputs = run_repeated(lambda: run_implementation(impl, inputs, task["device"]), task.get("repeat", 1))
    except Unsupported as exc:
        return {"kind": "unsupported", "error": str(exc)}
    except torch.OutOfMemoryError as exc:
        _free_device_memory()
        return {"kind": "oom", "error": _one_line(str(exc))}
    except HarnessDefect as exc:
        return {"kind": "harness", "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a raising kernel is a result; the worker lives on
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]
        return {"kind": "exception", "type": type(exc).__name__, "error": str(exc), "traceback": tb,
                "sticky": is_sticky_device_error(exc)}
    buf = io.BytesIO()
    torch.save(outputs.__dict__, buf)
    return {"kind": "ok", "outputs": buf.getvalue(), "hashes": hashes}


def _child_main(conn, device: str, log_path: str) -> None:
    """Worker loop: stdout/stderr go to the log (the parent reads its tail after a crash)."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    faulthandler.enable()  # a segfault or abort leaves a Python traceback in the log
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    from .env import pin_math_reduction

    pin_math_reduction(False)
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
        self.starts = 0
        self._proc = None
        self._conn = None
        self._log: Path | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.starts += 1
        self._log = self.log_dir / f"worker-{self.starts}.log"
        self._proc = ctx.Process(target=_child_main, args=(child, self.device, str(self._log)),
                                 name=f"gqa-worker-{self.device}", daemon=True)
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
            if self._proc.is_alive():
                try:
                    self._conn.send(None)
                except OSError:
                    pass
                self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
        finally:
            self._conn.close()
            self._proc = self._conn = None

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
        self._conn.send({"case": case.to_dict(), "impl": impl, "device": self.device, "repeat": self.repeat})
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
            raise WorkerCrash(f"device error, context poisoned: {reply['type']}: {_one_line(reply['error'])}",
                              self._tail(offset))
        return reply

    def execute(self, impl: Implementation, inputs: Inputs, device: str) -> Outputs:
        """run_implementation's contract, across the process boundary (raises what it would raise)."""
        reply = self.call(inputs.case, impl.name)
        kind = reply["kind"]
        if kind == "unsupported":
            raise Unsupported(reply["error"])
        if kind == "oom":
            raise torch.OutOfMemoryError(reply["error"])
        if kind == "harness":
            raise HarnessDefect(reply["error"])
        if kind == "exception":
            raise RemoteError(reply["type"], reply["error"], reply.get("traceback", ""))
        if reply["hashes"] != inputs.hashes():
            raise HarnessDefect("the worker regenerated inputs that differ from the parent's (SHA-256 mismatch)")
        fields = torch.load(io.BytesIO(reply["outputs"]), weights_only=False)
        return Outputs(**fields)


def _one_line(text: str) -> str:
    text = str(text).strip()
    return text.splitlines()[0] if text else ""
