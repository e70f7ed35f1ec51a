"""Run options, declared once: `gqa-harness run` adds them as --NAME, the pytest plugin as --gqa-NAME
(pytest-benchmark's pattern: one option builder taking the parser's add function and a prefix)."""

from __future__ import annotations

from typing import Any, Callable

RUN_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("suite", dict(action="append", default=[], metavar="NAME",
                   help="cases/NAME.toml, a directory of them, or one file in it; repeatable (default: smoke "
                        "when no --case is given)")),
    ("case", dict(action="append", default=[], metavar="SPEC",
                  help="inline case, e.g. b=2,hq=32,hkv=8,lq=128,d=128; repeatable")),
    ("device", dict(default=None, help="cpu, cuda or cuda:N (default: the GPU if there is one)")),
    ("impl", dict(action="append", default=[], metavar="IMPL",
                  help="built-in name or package.module:function; repeatable (default: every built-in)")),
    ("dtype", dict(default=None, help="comma list of dtypes to keep, e.g. bf16,fp16")),
    ("max-tokens", dict(type=int, default=None,
                        help="cap q/kv lengths at N (ratio and head geometry kept), e.g. models on a CPU")),
    ("out", dict(default="gqa-report", help="report directory (default: gqa-report)")),
    ("strict", dict(action="store_true", help="KNOWN failures fail too")),
    ("in-process", dict(action="store_true",
                        help="run kernels in this process: no crash/hang isolation, no order check")),
)


def add_run_options(add: Callable[..., Any], prefix: str = "--") -> None:
    for name, kwargs in RUN_OPTIONS:
        add(prefix + name, **kwargs)
