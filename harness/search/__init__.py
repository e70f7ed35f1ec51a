"""Searching for unknown bugs: Hypothesis's engine over generated cases, run as `run` runs them, each new
failure shrunk by Hypothesis's shrinker, confirmed alone and written as a regression entry.

`space.py` (what is drawn, case classes), `findings.py` (a finding, its signature, found.toml),
`store.py` (the example database), `engine.py` (rounds, the hunt, shrinking, confirming),
`output.py` (the report with a Findings section), `command.py` (`gqa-harness search`).
"""
