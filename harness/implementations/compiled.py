"""SDPA inside torch.compile, per pinned backend, and the compile discipline flex shares.

Compiled attention is a different kernel from eager attention: inductor decomposes
the math backend into its own fused loops and may choose or fuse differently, so it
is judged on its own. Three things keep it honest:

- dynamo is reset before every call, so each case compiles exactly as a user's first
  call would, whatever ran before it (no order-dependent static vs. dynamic kernels,
  and no recompile limit to hit across a suite);
- `fullgraph=True` and `fail_on_recompile_limit_hit=True`: a graph break or the
  recompile limit raises instead of quietly running (part of) the call eagerly;
- the backend is wrapped in a counter and a call that compiled no graph is an error,
  never a PASS: otherwise a silent eager fallback would test eager SDPA twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .base import DeviceFacts, Implementation, SdpaCall
from .sdpa import BACKENDS

# What `torch.compile(fn)` uses unless told otherwise; tests swap in "eager"/"aot_eager" for speed.
DEFAULT_COMPILER = "inductor"
# Each case compiles from scratch (seconds to tens of seconds on a CPU), so these run only when named.
OPT_IN = "compiles every case (~2-15 s each on a 2-core CPU)"


class EagerFallback(RuntimeError):
    """torch.compile returned without compiling a graph: the call ran eagerly."""


@dataclass
class GraphCounter:
    """A dynamo backend that counts the graphs it is handed, then compiles them with `compiler`."""

    compiler: str | Callable  # a registered backend name, or a backend callable (tests)
    graphs: int = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]):
        self.graphs += 1
        return torch._dynamo.lookup_backend(self.compiler)(gm, example_inputs)


# torch's own refusals, found in the text of dynamo's or inductor's wrapper (which may not chain them)
_REFUSAL = re.compile(r"(No available kernel|No viable backend|NYI: )[^'\n]*")


def kernel_refusal(exc: BaseException | None) -> str | None:
    """The case refused by torch's kernel checks, which under compile run while tracing (fake tensors) or
    lowering and come back wrapped as TorchRuntimeError / InductorError; None for any other error.
    The text is put where the runner looks for a refusal, so it records UNSUPPORTED, not ERROR."""
    seen = 0
    while exc is not None and seen < 8:
        found = _REFUSAL.search(str(exc))
        if found:
            return f"Unsupported under torch.compile: {found.group(0).strip()}"
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def run_compiled(fn: Callable[..., torch.Tensor], args: tuple, compiler: str | Callable = DEFAULT_COMPILER,
                 notes: dict[str, str] | None = None) -> torch.Tensor:
    """fn(*args) through torch.compile(fullgraph=True) from a fresh dynamo state; raises if nothing compiled."""
    torch.compiler.reset()
    counter = GraphCounter(compiler)
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            out = torch.compile(fn, backend=counter, fullgraph=True)(*args)
    except Exception as exc:
        refusal = kernel_refusal(exc)
        if refusal is None:
            raise
        raise RuntimeError(refusal) from exc
    if counter.graphs < 1:
        raise EagerFallback(f"torch.compile({compiler}) compiled no graph: the call ran eagerly")
    if notes is not None:
        notes["compiler"] = compiler if isinstance(compiler, str) else getattr(compiler, "__name__", type(compiler).__name__)
        notes["compiled_graphs"] = str(counter.graphs)
    return out


def _available(kinds: tuple[str, ...], backend: str) -> Callable[[DeviceFacts], str | None]:
    def check(facts: DeviceFacts) -> str | None:
        if facts.kind in kinds:
            return None
        return f"torch has no {backend} SDPA kernel for {facts.kind} devices"
    return check


def compiled_forward(backend: SDPBackend | None, compiler: str | Callable = DEFAULT_COMPILER) -> Callable[[SdpaCall], torch.Tensor]:
    """SDPA pinned to `backend` (None: unpinned) inside the compiled region, as a user writes it."""

    def forward(call: SdpaCall) -> torch.Tensor:
        def attend(query, key, value, attn_mask):
            kwargs = dict(attn_mask=attn_mask, is_causal=call.is_causal, scale=call.scale, enable_gqa=call.enable_gqa)
            if backend is None:
                return F.scaled_dot_product_attention(query, key, value, **kwargs)
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(query, key, value, **kwargs)

        return run_compiled(attend, (call.query, call.key, call.value, call.attn_mask), compiler, call.notes)

    return forward


def implementations(compiler: str = DEFAULT_COMPILER) -> list[Implementation]:
    impls = [
        Implementation(
            name=f"compiled-sdpa-{suffix}", family="compiled-sdpa", forward=compiled_forward(backend, compiler),
            available=_available(kinds, suffix), opt_in=OPT_IN,
            description=f"F.scaled_dot_product_attention pinned to {backend.name} inside torch.compile "
                        f"({compiler}, fullgraph), enable_gqa=True",
        )
        for suffix, (backend, kinds) in BACKENDS.items()
    ]
    impls.append(Implementation(
        name="compiled-sdpa-default", family="compiled-sdpa", forward=compiled_forward(None, compiler), opt_in=OPT_IN,
        description=f"F.scaled_dot_product_attention unpinned inside torch.compile ({compiler}, fullgraph)",
    ))
    return impls
