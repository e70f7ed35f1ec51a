"""Pure numerics and data: cases and suites, inputs, the fp64 oracle, the low-precision reference,
metrics, and the verdict (one judging pipeline, factors in tolerances.toml). No device scheduling, no I/O."""
