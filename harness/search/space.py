"""What a search draws from: the generated-case space, its key in the example database, and case classes.

The space is `harness.core.generate.cases` with the dtypes asked for, lengths up to --max-tokens
(default 512), batch and kv heads up to --max-batch and --max-kv-heads (default 4 each), and the fp64
memory bound of a profile (dev 16 MiB, ci 8 MiB, nightly 256 MiB per case). A case's *class* is what makes it
other than the plainest case of the space: its mask, causal alignment, layout, value
distribution, an explicit scale, a value head dim, a dtype other than the first one searched.
Hypothesis shrinks towards the plainest case, so the class of a shrunk failure is what the
failure needs; two failures of one implementation and tensor are one finding when the class of
the first is contained in the other's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from hypothesis import strategies as st

from ..core.case import DTYPES, Case
from ..core.generate import BUDGETS, cases

PROFILES = tuple(BUDGETS)  # dev, ci, nightly: the memory bound per case
MAX_TOKENS, MAX_BATCH, MAX_KV_HEADS = 512, 4, 4  # cases()'s own defaults

# Field -> its plainest value; a case's class lists the fields that differ (value-less ones by presence only).
PLAIN = {"causal": "none", "mask": "none", "mask_fill": "-inf", "mask_per_head": False, "layout": "bhld",
         "values": "normal", "scale": None, "v_head_dim": None}
BY_PRESENCE = {"scale", "v_head_dim"}  # which scale or value head dim is the length's business, not the class's

CaseClass = tuple[tuple[str, str], ...]


class SearchError(ValueError):
    """A search that cannot start as asked; one line naming the option."""


@dataclass(frozen=True)
class SearchSpace:
    dtypes: tuple[str, ...] = ("bf16", "fp16")
    profile: str = "dev"
    max_tokens: int = MAX_TOKENS  # longest q/kv length drawn
    max_batch: int = MAX_BATCH
    max_kv_heads: int = MAX_KV_HEADS  # query heads are kv heads x a group of up to 16

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise SearchError(f"--profile {self.profile!r} is not one of {', '.join(PROFILES)}")
        bad = [d for d in self.dtypes if d not in DTYPES]
        if bad or not self.dtypes:
            raise SearchError(f"--dtype {','.join(self.dtypes) or '(empty)'}: each must be one of {', '.join(DTYPES)}")
        for option, value in (("--max-tokens", self.max_tokens), ("--max-batch", self.max_batch),
                              ("--max-kv-heads", self.max_kv_heads)):
            if value < 1:
                raise SearchError(f"{option} {value} must be at least 1")

    @property
    def memory(self) -> int:
        return BUDGETS[self.profile]

    def strategy(self) -> st.SearchStrategy[Case]:
        return cases(memory=self.memory, dtypes=self.dtypes, max_len=self.max_tokens, max_batch=self.max_batch,
                     max_kv_heads=self.max_kv_heads)

    def key(self, label: str, impls: list[str]) -> bytes:
        """The example-database key of this space on this device for these implementations: the stored
        examples are Hypothesis choice sequences of this strategy, meaningless for another (so the version
        in it changes with the strategy: 3 since group sizes are drawn in ascending order)."""
        sizes = f"{self.max_tokens}/{self.max_batch}/{self.max_kv_heads}"
        text = "|".join(("gqa-harness-search-3", label, ",".join(self.dtypes), self.profile, sizes, ",".join(sorted(impls))))
        return b"gqa-search." + hashlib.sha256(text.encode()).hexdigest()[:24].encode()

    def case_class(self, case: Case) -> CaseClass:
        feats = [(name, "set" if name in BY_PRESENCE else str(getattr(case, name)))
                 for name, plain in PLAIN.items() if getattr(case, name) != plain]
        if case.dtype != self.dtypes[0]:
            feats.append(("dtype", case.dtype))
        return tuple(sorted(feats))


def _coarse(cls: CaseClass) -> set[tuple[str, str]]:
    """A class as containment sees it: which features, not which mask or layout (the dtype stays by value)."""
    return {(k, v if k == "dtype" else "") for k, v in cls}


def within(cls: CaseClass, finding_class: CaseClass) -> bool:
    """A case of class `cls` has every feature a finding's shrunk case needed (a per-head mask of any kind
    contains a per-head bool mask): its failure of the same kind is that finding's, not a new one."""
    return _coarse(finding_class) <= _coarse(cls)


def class_text(cls: CaseClass) -> str:
    return ", ".join(f"{k}={v}" if v != "set" else k for k, v in cls) or "plain"


def parse_dtypes(text: str | None) -> tuple[str, ...]:
    if not text:
        return SearchSpace().dtypes
    return tuple(dict.fromkeys(d.strip() for d in text.split(",") if d.strip()))
