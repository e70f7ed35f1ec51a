"""A finding: one distinct failure of one implementation, shrunk, confirmed alone, ready to file.

Its signature is (implementation, tensor, rule/kind, severity, case class). A failing result is
*explained* by a finding when it is the same implementation failing the finding's tensor by the same
rule (`repro.shrink.same_failure`, gross or not) in a case with every feature of the finding's class
(`space.within`): a search
reports such a result but does not hunt it again, so one bug gives one finding, not hundreds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..core.case import Case, case_spec
from ..core.generate import case_toml
from ..core.results import ImplResult
from ..reports.explain import quoted, reproduce_command
from ..repro.shrink import Signature, same_failure
from .space import CaseClass, class_text, within

SEVERITIES = ("gross", "beyond", "")  # "": a call that raised


@dataclass(frozen=True)
class Finding:
    number: int
    impl: str
    signature: Signature
    case: Case  # shrunk
    start: Case  # as first met
    case_class: CaseClass  # of the shrunk case
    reason: str  # the verdict on the shrunk case
    found_after_examples: int
    found_after_s: float
    shrink_evaluations: int
    shrink_s: float
    shrink_complete: bool  # False when the shrink budget ran out first
    confirmed: bool  # the shrunk case fails the same way alone, in a fresh process
    confirm_status: str  # that run's status
    replayed: bool = False  # came back from the example database of an earlier search

    @property
    def name(self) -> str:
        impl = self.impl.replace(":", "-").replace(".", "-")
        return f"f{self.number}-{impl}-{self.signature.tensor or 'call'}-{self.signature.kind}"

    def explains(self, result: ImplResult, cls: CaseClass) -> bool:
        """The same implementation failing this tensor by this rule (gross or not) in a class containing ours."""
        return (result.impl == self.impl and within(cls, self.case_class)
                and any(same_failure(result, replace(self.signature, severity=s)) for s in SEVERITIES))

    def to_record(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(type="finding", signature=asdict(self.signature), case=self.case.to_dict(),
                    start=self.start.to_dict(), case_class=[list(f) for f in self.case_class],
                    spec=case_spec(self.case), case_id=self.case.id, start_id=self.start.id,
                    summary=str(self.signature), class_text=class_text(self.case_class))
        return data


def subsumed(findings: list[Finding]) -> dict[int, int]:
    """Finding number -> the number of another finding of the same implementation, tensor and rule in a
    strictly wider class (met later, or shrunk further): the same bug, so it is not filed twice."""
    out = {}
    for f in findings:
        for g in findings:
            same = (g.impl, g.signature.tensor, g.signature.kind) == (f.impl, f.signature.tensor, f.signature.kind)
            if same and within(f.case_class, g.case_class) and not within(g.case_class, f.case_class):
                out[f.number] = g.number
                break
    return out


def finding_from_record(rec: dict[str, Any]) -> Finding:
    fields = {k: rec[k] for k in Finding.__dataclass_fields__ if k in rec}
    return Finding(**{**fields, "signature": Signature(**rec["signature"]), "case": Case(**rec["case"]),
                      "start": Case(**rec["start"]), "case_class": tuple(tuple(f) for f in rec["case_class"])})


def repro_command(finding: Finding, device: str, out: str = "gqa-repro") -> str:
    """`gqa-harness repro` for the shrunk case: it writes the standalone script and the issue body."""
    tensor = f" --tensor {finding.signature.tensor}" if finding.signature.tensor else ""
    return (f"gqa-harness repro --device {device} --case {quoted(case_spec(finding.case))} --impl {finding.impl}"
            f"{tensor} --out {out}/{finding.name}")


def _string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def found_toml(findings: list[Finding], label: str, torch_version: str, device: str) -> str:
    """The confirmed findings as a suite: ready to copy under cases/regressions/, each entry failing under
    `gqa-harness run --suite <file> --impl <its implementation>`."""
    within_other = subsumed(findings)
    confirmed = [f for f in findings if f.confirmed and f.number not in within_other]
    lines = [f"# Written by `gqa-harness search` on {label} (torch {torch_version}): {len(confirmed)} confirmed "
             f"finding(s), each shrunk and re-run alone in a fresh process.",
             "# Before committing one under cases/regressions/, cite its evidence in [suite] (see the README there)."]
    lines += [f"# Finding {n} is left out: the same failure as finding {m}, whose class is wider."
              for n, m in sorted(within_other.items())]
    lines += ["", "[suite]",
             f"description = {_string(f'Findings of gqa-harness search on {label}')}",
             'tags = ["search"]', ""]
    for f in confirmed:
        note = (f"{f.impl}: {f.signature} ({class_text(f.case_class)}); {f.reason}; found after "
                f"{f.found_after_examples} examples; run: {reproduce_command(case_spec(f.case), f.impl, device)}")
        lines.append(case_toml(f.case, f.name) + f"notes = {_string(note)}\n")
    return "\n".join(lines)
