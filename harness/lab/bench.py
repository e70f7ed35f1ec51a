"""`gqa-harness bench`: what the harness costs on this machine, measured.

(a) oracle throughput, forward + backward, on model shapes at head dims 64 / 128 / 256,
    counting Case.flops() (12·B·Hq·Lq·Lk·D, halved for causal), beside this machine's
    best square fp64 `torch.matmul` rate measured in the same run: the ratio is the
    figure of merit (the GEMMs bound the oracle at large head dims, exp at small ones);
(b) oracle peak memory against sequence length: each length runs in a fresh process and
    the peak resident set (VmHWM) is taken over the resident set just
    before the oracle, so the figure is the oracle's own (fp64 copies, outputs, blocks);
(c) wall time of a suite through the runner, split into references (inputs, fp64 oracle,
    low-precision designs), of which the oracle alone, implementations, and overhead;
(d) the row-sampled oracle's peak memory on the `long` suite's shapes (capped by long_max_tokens);
(e) the oracle's work split (units, parts) and its balance simulated on 2 and `simulate_threads`
    threads for the throughput shapes and the `models` suite: a projection where no such host is at hand.
Timings on a shared machine are noisy: every timing is the best of `repeats` runs.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tabulate import tabulate

from ..core.blocks import lanes_path
from ..core.case import Case, case_spec, parse_case_spec
from ..core.inputs import make_inputs
from ..core.oracle import oracle, work_plan
from ..core.sampling import sample_rows
from ..core.suites import load_suite, select_cases
from ..core.workplan import simulate
from ..reports.store import JsonlSink
from ..run.env import device_facts, fingerprint
from ..run.plan import RunPlan, execute_plan
from ..run.session import Session
from ..run.stages import StageClock

SCHEMA = "gqa-harness-bench/1"
# Real model geometries, causal prefill, B = 1: Llama-3.2-1B (d64), Llama-3-8B (d128), Gemma-2-9B (d256).
MODEL_SHAPES = {64: ("llama-3.2-1b", 32, 8), 128: ("llama-3-8b", 32, 8), 256: ("gemma-2-9b", 16, 8)}
GEMM_SIZES = (512, 1024, 2048)
REFERENCE_STAGES = ("inputs", "oracle", "lowprec", "dterm", "yardsticks")


@dataclass(frozen=True)
class BenchConfig:
    length: int = 1024
    repeats: int = 3
    memory_lengths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    memory_q_len: int = 256
    suite: str | None = "smoke"
    device: str | None = None
    gemm_sizes: tuple[int, ...] = GEMM_SIZES
    threads: int | None = None  # torch's thread count for the whole bench (None: torch's default)
    long_max_tokens: int | None = 16384  # the long suite's shapes capped at this length (None: full size, 0: skip)
    simulate_threads: int = 16
    suite_only: bool = False  # only the suite's stage split: no throughput, memory or work split
    suite_max_tokens: int | None = None  # the suite's lengths capped (as `run --max-tokens`)


def model_case(head_dim: int, length: int) -> Case:
    _, hq, hkv = MODEL_SHAPES[head_dim]
    return Case(1, hq, hkv, length, length, head_dim, "bf16", causal="top-left")


def best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_rates(repeats: int, sizes: tuple[int, ...] = GEMM_SIZES) -> dict[int, float]:
    """GFLOP/s of square fp64 torch.matmul per size (best of `repeats`)."""
    rates = {}
    for n in sizes:
        a = torch.randn(n, n, dtype=torch.float64)
        b = torch.randn(n, n, dtype=torch.float64)
        torch.matmul(a, b)  # warm-up: MKL's first call sets up its threads
        rates[n] = 2.0 * n**3 / best_seconds(lambda: torch.matmul(a, b), repeats) / 1e9
    return rates


def oracle_throughput(case: Case, repeats: int) -> dict[str, Any]:
    inputs = make_inputs(case)
    warm_up()
    seconds = best_seconds(lambda: oracle(inputs), repeats)
    return {"case_id": case.id, "spec": case_spec(case), "head_dim": case.head_dim, "model": MODEL_SHAPES[case.head_dim][0],
            "flops": case.flops(), "seconds": seconds, "gflops": case.flops() / seconds / 1e9}


def warm_up() -> None:
    """One small oracle call: first-call costs (library pages, thread pools) out of what is measured."""
    oracle(make_inputs(Case(1, 4, 2, 64, 64, 64, "bf16", causal="top-left")))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _hwm_bytes() -> int:
    """This process's peak resident set (VmHWM). Not getrusage: its ru_maxrss carries the parent's
    peak across fork + exec, so a spawned child would report the parent's size."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_hwm() -> None:
    try:  # Linux >= 4.0: "5" resets the peak resident set to the current one
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass  # the peak then includes the warm-up, which is small


def _peak_child(spec: str, conn) -> None:
    """In a fresh process: resident-set high-water mark during the oracle, over the RSS before it."""
    case = parse_case_spec(spec)
    warm_up()  # MKL and OpenMP map their code and thread stacks on first use: not the oracle's memory
    inputs = make_inputs(case)
    rows = inputs.sample.checked if inputs.sample is not None else None  # a long case: the row-sampled oracle
    before = _rss_bytes()
    _reset_hwm()
    start = time.perf_counter()
    oracle(inputs, rows=rows)
    seconds = time.perf_counter() - start
    peak = _hwm_bytes()
    conn.send({"peak_bytes": max(0, peak - before), "seconds": seconds})
    conn.close()


def memory_case(kv_len: int, q_len: int) -> Case:
    """Chunked prefill of the d128 model shape: the last `q_len` queries of a `kv_len` sequence."""
    _, hq, hkv = MODEL_SHAPES[128]
    return Case(1, hq, hkv, min(q_len, kv_len), kv_len, 128, "bf16", causal="bottom-right")


def oracle_peak(case: Case) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")  # a fresh high-water mark, and no forked OpenMP pool
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_peak_child, args=(case_spec(case), child))
    proc.start()
    child.close()
    got = parent.recv() if parent.poll(3600) else {}
    proc.join()
    if proc.exitcode != 0 or not got:
        return {"case_id": case.id, "kv_len": case.kv_len, "q_len": case.q_len, "error": f"exit code {proc.exitcode}"}
    # fp64 arrays the oracle must hold whatever its blocking: its copies of q, k, v, dO and the outputs
    # (of a long case's checked rows only)
    d = case.head_dim
    rows = len(sample_rows(case).checked) if case.long else case.q_len
    arrays = 8 * 2 * d * (case.batch * case.q_heads * rows * 2 + case.batch * case.kv_heads * case.kv_len * 2)
    return {"case_id": case.id, "kv_len": case.kv_len, "q_len": case.q_len, "rows": rows, "peak_bytes": got["peak_bytes"],
            "array_bytes": arrays, "workspace_bytes": got["peak_bytes"] - arrays, "seconds": got["seconds"]}


def suite_split(suite: str, device: str | None, max_tokens: int | None = None) -> dict[str, Any]:
    """One pass of `suite` through the runner as `gqa-harness run` makes it (kernels in the isolated worker,
    the stream written to a JSONL file), with its wall and CPU time split by stage (run/stages.py)."""
    session = Session.open(device)
    cases = [sc.case for sc in select_cases([suite], max_tokens=max_tokens)]
    impls, _ = session.resolve([])
    plan = RunPlan(cases=tuple(cases), impls=tuple(impls), canaries=tuple(session.canaries()), isolate=True)
    clock = StageClock()
    with tempfile.TemporaryDirectory(prefix="gqa-bench-") as tmp:
        sink = JsonlSink(Path(tmp) / "stream.jsonl")
        start, cpu = time.perf_counter(), time.process_time()
        try:
            results = execute_plan(session, plan, sink, clock=clock)
        finally:
            sink.close()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    stages = clock.to_dict()
    refs = sum(stages[s]["wall_s"] for s in REFERENCE_STAGES if s in stages)
    impl_s = sum(r.seconds for r in results)
    counted = sum(v["wall_s"] for v in stages.values())
    return {"suite": suite, "max_tokens": max_tokens, "device": session.device, "cases": len(cases),
            "results": len(results), "wall_s": wall, "cpu_s": cpu, "references_s": refs,
            "oracle_s": stages.get("oracle", {}).get("wall_s", 0.0), "implementations_s": impl_s,
            "overhead_s": max(0.0, wall - refs - impl_s), "stages": stages, "unaccounted_s": max(0.0, wall - counted),
            "statuses": dict(sorted(Counter(str(r.status) for r in results).items()))}


def work_split(cases: list[Case], threads: tuple[int, ...]) -> list[dict[str, Any]]:
    """Each case's oracle units and their balance simulated on `threads` (costs: logits computed)."""
    rows = []
    for case in cases:
        plan = work_plan(case, sample_rows(case).checked if case.long else None)
        rows.append({"case_id": case.id, "units": len(plan.units), "parts": plan.parts,
                     **{f"efficiency_{n}": round(simulate(plan, n).efficiency, 4) for n in threads}})
    return rows


def long_memory(max_tokens: int | None, log: Callable[[str], None]) -> list[dict[str, Any]]:
    out = []
    for sc in select_cases(["long"], max_tokens=max_tokens):
        log(f"peak memory {sc.case.id}")
        out.append(oracle_peak(sc.case))
    return out


def suite_bench(cfg: BenchConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """`bench --suite-only`: the suite's stage split alone, fingerprinted with the device it ran on."""
    log(f"suite {cfg.suite} on {cfg.device or 'the default device'}")
    return {"schema": SCHEMA, "fingerprint": fingerprint(device_facts(cfg.device)), "threads": torch.get_num_threads(),
            "note": "suite stage split only (--suite-only); wall and CPU seconds of one pass, the machine may be shared",
            "suite": suite_split(cfg.suite, cfg.device, cfg.suite_max_tokens)}


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.suite_only and cfg.suite:
        return suite_bench(cfg, log)
    log("fp64 GEMM rate")
    gemm = gemm_rates(cfg.repeats, cfg.gemm_sizes)
    throughput = []
    for d in sorted(MODEL_SHAPES):
        case = model_case(d, cfg.length)
        log(f"oracle {case.id}")
        throughput.append(oracle_throughput(case, cfg.repeats))
    gemm_best = max(gemm.values())
    gemm_after = gemm_rates(cfg.repeats, cfg.gemm_sizes)  # again after the oracle: load on a shared machine drifts
    gemm_best = max(gemm_best, *gemm_after.values())
    for row in throughput:
        row["ratio"] = row["gflops"] / gemm_best
    memory = []
    for kv_len in cfg.memory_lengths:
        case = memory_case(kv_len, cfg.memory_q_len)
        log(f"peak memory {case.id}")
        memory.append(oracle_peak(case))
    long = long_memory(cfg.long_max_tokens, log) if cfg.long_max_tokens != 0 else []
    sims = (2, cfg.simulate_threads)
    split = work_split([model_case(d, cfg.length) for d in sorted(MODEL_SHAPES)]
                       + [sc.case for sc in load_suite("models")], sims)
    suite = suite_split(cfg.suite, cfg.device, cfg.suite_max_tokens) if cfg.suite else None
    by_d = {str(r["head_dim"]): r for r in throughput}
    main = by_d["128"]
    peaks = [m["peak_bytes"] for m in memory if "peak_bytes" in m]
    return {
        "schema": SCHEMA,
        "fingerprint": fingerprint(device_facts("cpu")),
        "threads": torch.get_num_threads(),
        "repeats": cfg.repeats,
        "note": f"timings are the best of {cfg.repeats} runs; the machine may be shared",
        "oracle_lanes": lanes_path(),
        "oracle_gflops": main["gflops"],
        "gemm_gflops": gemm_best,
        "ratio": main["ratio"],
        "ratios": {d: r["ratio"] for d, r in by_d.items()},
        "peak_bytes": peaks[-1] if peaks else None,
        "gemm": {"sizes": {str(n): r for n, r in gemm.items()}, "sizes_after": {str(n): r for n, r in gemm_after.items()}},
        "throughput": throughput,
        "memory": memory,
        "long_memory": {"max_tokens": cfg.long_max_tokens, "cases": long},
        "work_split": {"threads": list(sims), "cases": split},
        "suite": suite,
    }


def _gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def render_stages(s: dict[str, Any]) -> list[str]:
    """The suite's wall and CPU seconds per stage, and per case."""
    cases = max(1, s["cases"])
    rows = [[name, f"{v['wall_s']:.2f}", f"{v['cpu_s']:.2f}", f"{1000 * v['wall_s'] / cases:.0f}",
             f"{100 * v['wall_s'] / s['wall_s']:.0f}%" if s["wall_s"] else ""] for name, v in s["stages"].items()]
    rows.append(["(not in a stage)", f"{s['unaccounted_s']:.2f}", "", "", ""])
    return [f"## Suite `{s['suite']}` by stage ({s['cases']} cases, {s['results']} results, wall {s['wall_s']:.1f} s, "
            f"CPU {s.get('cpu_s', 0.0):.1f} s of this process; kernel CPU is the worker's)", "",
            tabulate(rows, headers=["stage", "wall s", "CPU s", "wall ms/case", "of wall"], tablefmt="github"), ""]


def render_bench(report: dict[str, Any]) -> str:
    fp = report["fingerprint"]
    if "throughput" not in report:  # --suite-only
        return "\n".join([f"# gqa-harness bench, suite only ({fp['cpu']}, {report['threads']} threads, torch {fp['torch']})",
                          "", *render_stages(report["suite"])])
    lines = [f"# gqa-harness bench ({fp['cpu']}, {report['threads']} threads, torch {fp['torch']})", "",
             f"{report['note']}. Best square fp64 torch.matmul: {report['gemm_gflops']:.1f} GFLOP/s. "
             f"Oracle: {report.get('oracle_lanes', 'Python threads')}.", ""]
    rows = [[r["model"], r["case_id"], f"{r['flops'] / 1e9:.1f}", f"{r['seconds']:.2f}", f"{r['gflops']:.2f}",
             f"{r['ratio']:.2f}"] for r in report["throughput"]]
    lines += ["## Oracle throughput (fwd+bwd, fp64)", "",
              tabulate(rows, headers=["shape", "case", "GFLOP", "s", "GFLOP/s", "vs GEMM"], tablefmt="github"), ""]
    rows = [[m["case_id"], m["kv_len"], _gib(m.get("peak_bytes")), _gib(m.get("array_bytes")),
             _gib(m.get("workspace_bytes")), m.get("error", "")] for m in report["memory"]]
    lines += ["## Oracle peak memory vs sequence length", "",
              "Peak resident set over the resident set before the oracle, in a fresh process; arrays = the fp64 "
              "q, k, v, dO and outputs any oracle must hold; workspace = the rest (blocks, temporaries).", "",
              tabulate(rows, headers=["case", "kv_len", "peak", "arrays", "workspace", ""], tablefmt="github"), ""]
    lines += _long_and_split(report)
    s = report["suite"]
    if s:
        rows = [[s["suite"], s["cases"], s["results"], f"{s['wall_s']:.1f}", f"{s['references_s']:.1f}",
                 f"{s['oracle_s']:.1f}", f"{s['implementations_s']:.1f}", f"{s['overhead_s']:.1f}"]]
        lines += ["## Suite wall time (s)", "",
                  tabulate(rows, headers=["suite", "cases", "results", "wall", "references", "of which oracle",
                                          "implementations", "overhead"], tablefmt="github"), ""]
        lines += render_stages(s) if s.get("stages") else []
    return "\n".join(lines)


def _long_and_split(report: dict[str, Any]) -> list[str]:
    lines = []
    long = report.get("long_memory") or {}
    if long.get("cases"):
        cap = long["max_tokens"]
        rows = [[m["case_id"], m.get("rows", ""), _gib(m.get("peak_bytes")), _gib(m.get("array_bytes")),
                 f"{m['seconds']:.2f}" if "seconds" in m else "", m.get("error", "")] for m in long["cases"]]
        lines += [f"## Row-sampled oracle peak memory, `long` suite ({f'lengths capped at {cap}' if cap else 'full size'})",
                  "", tabulate(rows, headers=["case", "rows", "peak", "arrays", "s", ""], tablefmt="github"), ""]
    split = report.get("work_split") or {}
    if split.get("cases"):
        n = split["threads"]
        rows = [[c["case_id"], c["units"], c["parts"], *(f"{c[f'efficiency_{t}']:.2f}" for t in n)] for c in split["cases"]]
        lines += ["## Oracle work split: units and their balance, simulated", "",
                  "Efficiency = total work / (threads x the busiest thread's work), units handed out longest first.", "",
                  tabulate(rows, headers=["case", "units", "parts", *(f"{t} threads" for t in n)], tablefmt="github"), ""]
    return lines


def bench_command(cfg: BenchConfig, as_json: bool, out, quiet: bool) -> int:
    log = (lambda s: None) if quiet else (lambda s: print(f"bench: {s}", file=sys.stderr, flush=True))
    report = run_bench(cfg, log)
    text = json.dumps(report, indent=1, allow_nan=False)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(text)
        (out / "bench.md").write_text(render_bench(report))
    print(text if as_json else render_bench(report))
    return 0
