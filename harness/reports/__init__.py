"""Saved runs: the store (streams and report files), rendering, the failure-text renderer, compare, diff,
the known-failure ledger and the CI summary. Never runs a kernel."""
