"""From a failure to something to file: shrink, the standalone repro script, the issue body, plots."""
