"""The example database of a search: Hypothesis's own format and reuse, under the space's key.

Under `KEY` lie the choice sequences of every finding's shrunk example; under `KEY.pending` the
example of a failure met but not yet shrunk (written the moment it is met, so a killed search
loses nothing). A replay puts one entry under `KEY.replay` for Hypothesis's reuse phase to run
first: a shrunk one in the primary corpus (Hypothesis then does not shrink it again), a pending
one in the secondary corpus (which Hypothesis replays and then shrinks).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hypothesis.database import DirectoryBasedExampleDatabase, ExampleDatabase

SUBKEYS = (b"", b".secondary", b".pareto")  # the corpora Hypothesis keeps under a key


@dataclass(frozen=True)
class Entry:
    value: bytes
    shrunk: bool


@dataclass(frozen=True)
class ExampleStore:
    db: ExampleDatabase
    key: bytes

    @classmethod
    def open(cls, path: Path, key: bytes) -> ExampleStore:
        return cls(DirectoryBasedExampleDatabase(path), key)

    @property
    def pending_key(self) -> bytes:
        return self.key + b".pending"

    @property
    def replay_key(self) -> bytes:
        return self.key + b".replay"

    def entries(self) -> list[Entry]:
        """Shrunk examples (shortest first), then pending ones."""
        shrunk = sorted(self.db.fetch(self.key), key=lambda v: (len(v), v))
        pending = sorted(self.db.fetch(self.pending_key), key=lambda v: (len(v), v))
        return [Entry(v, True) for v in shrunk] + [Entry(v, False) for v in pending if v not in shrunk]

    def clear_replay(self) -> None:
        for sub in SUBKEYS:
            for value in list(self.db.fetch(self.replay_key + sub)):
                self.db.delete(self.replay_key + sub, value)

    def stage(self, entry: Entry) -> bytes:
        """Put `entry` alone under the replay key; returns the key to replay."""
        self.clear_replay()
        self.db.save(self.replay_key if entry.shrunk else self.replay_key + b".secondary", entry.value)
        return self.replay_key

    def save_pending(self, value: bytes) -> None:
        self.db.save(self.pending_key, value)

    def settle(self, old: bytes | None, new: bytes | None) -> None:
        """A finding is shrunk: the database example it came back from leaves, its shrunk one joins the corpus."""
        self.drop(old)
        if new is not None:
            self.db.save(self.key, new)

    def drop(self, value: bytes | None) -> None:
        if value is not None:
            self.db.delete(self.key, value)
            self.db.delete(self.pending_key, value)
