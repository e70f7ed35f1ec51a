"""The oracle against an earlier version of itself: `python -m tests.oracle_agreement --rev REV`.

Loads harness/core/oracle.py as it was at REV (git show) into a throwaway module and compares both
oracles' out, dQ, dK, dV over every case of a suite (default smoke): the largest relative L2
difference per tensor must stay under 1e-12 (exit 1 otherwise). Used when the oracle's blocking or
threading changes (issue 17): its results must not.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types

from harness.core.inputs import make_inputs
from harness.core.suites import select_cases

LIMIT = 1e-12


def old_oracle(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:harness/core/oracle.py"], check=True, capture_output=True,
                            text=True).stdout
    module = types.ModuleType("oracle_at_rev")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source.replace("from .", "from harness.core."), f"{rev}:oracle.py", "exec"), module.__dict__)
    return module.oracle


def rel(a, b) -> float:
    a, b = a.nan_to_num(0.0), b.nan_to_num(0.0)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the git revision whose oracle is the reference")
    parser.add_argument("--suite", default="smoke")
    parser.add_argument("--max-tokens", type=int, default=None)
    args = parser.parse_args(argv)
    from harness.core.oracle import oracle  # the working tree's; imported here beside the old one on purpose

    before = old_oracle(args.rev)
    worst: dict[str, tuple[float, str]] = {}
    cases = [sc.case for sc in select_cases([args.suite], max_tokens=args.max_tokens)]
    for case in cases:
        inputs = make_inputs(case)
        new, old = oracle(inputs).tensors(), before(inputs).tensors()
        for name, t in old.items():
            r = rel(new[name], t)
            if r >= worst.get(name, (-1.0, ""))[0]:
                worst[name] = (r, case.id)
    print(f"{len(cases)} cases of {args.suite}, working tree vs {args.rev}: largest relative L2 difference")
    for name, (r, cid) in sorted(worst.items()):
        print(f"  {name}: {r:.3g} ({cid})")
    return 0 if all(r < LIMIT for r, _ in worst.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
